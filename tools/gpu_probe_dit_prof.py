"""GPU probe (development): VAE decode time after bias folding; kernel breakdown of one 14B forward."""
import torch

from gpu_common import fast_dit_step, vae_block_decode
from sdvg_rt.floor import cuda_time

print("VAE decode ms (bias folded):", cuda_time(vae_block_decode(), iters=5, warmup=2) * 1e3)
torch.cuda.empty_cache()
# 14B forward profile at block 3
m, step, probe = fast_dit_step("wan2.1-14b")
slots = step.cache.slots(3)
with torch.no_grad():
    fn = step
    print("14B forward ms:", cuda_time(fn, iters=5, warmup=2) * 1e3,
          "floor ms:", probe.forward(slots.read_end) * 1e3)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=90))
