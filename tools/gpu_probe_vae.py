"""GPU probe (development): where the VAE block decode spends its time (torch.profiler, top kernels)."""
import os, sys

import torch

import sdvg_rt  # noqa: F401  (allocator settings)
from sdvg_rt.checkpoints.wan_vae import synthetic_vae_state_dict
from sdvg_rt.floor import cuda_time
from sdvg_rt.models import wan_vae
from sdvg_rt.models.wan_vae import VAEStream, WanVAEConfig, WanVAEDecoder

torch.backends.cudnn.benchmark = True
cfg = WanVAEConfig.from_name("wan2.1")
dec = WanVAEDecoder(cfg)
dec.load_state_dict(synthetic_vae_state_dict(cfg, 0, decoder_only=True), strict=True)
dec = dec.to("cuda", torch.bfloat16).eval().to_channels_last()
wan_vae.compile_elementwise(True)
stream = VAEStream(dec, 60, 104, torch.bfloat16, "cuda")
z = torch.randn(1, 16, 3, 60, 104, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    stream.decode_commit(z, 0)
    fn = lambda: stream.decode_scratch(z, 1)
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
