"""GPU probe (development): where the VAE block decode spends its time (torch.profiler, top kernels)."""
import torch

from gpu_common import vae_block_decode
from sdvg_rt.floor import cuda_time

fn = vae_block_decode()
with torch.no_grad():
    print("decode ms", cuda_time(fn, iters=5, warmup=2) * 1e3, flush=True)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    # per-op-type shapes for the convs
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=25,
                                                              max_name_column_width=40, max_shapes_column_width=90))
