"""GPU probe (development): VAE decode time after bias folding; kernel breakdown of one 14B forward."""
import torch

import sdvg_rt  # noqa: F401
from sdvg_rt.bench import random_init_
from sdvg_rt.checkpoints.wan_vae import synthetic_vae_state_dict
from sdvg_rt.floor import FloorProbe, cuda_time
from sdvg_rt.kv_cache import KVCache
from sdvg_rt.models import wan_dit, wan_vae
from sdvg_rt.models.attention import set_attention_backend
from sdvg_rt.models.wan_dit import WanDiT, WanDiTConfig
from sdvg_rt.models.wan_vae import VAEStream, WanVAEConfig, WanVAEDecoder

torch.backends.cudnn.benchmark = True
# VAE
cfg = WanVAEConfig.from_name("wan2.1")
dec = WanVAEDecoder(cfg)
dec.load_state_dict(synthetic_vae_state_dict(cfg, 0, decoder_only=True), strict=True)
dec = dec.to("cuda", torch.bfloat16).eval().to_channels_last()
wan_vae.compile_elementwise(True)
stream = VAEStream(dec, 60, 104, torch.bfloat16, "cuda")
z = torch.randn(1, 16, 3, 60, 104, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    stream.decode_commit(z, 0)
    print("VAE decode ms (bias folded):", cuda_time(lambda: stream.decode_scratch(z, 1), iters=5, warmup=2) * 1e3)
del dec, stream
torch.cuda.empty_cache()
# 14B forward profile at block 3
c = WanDiTConfig.from_name("wan2.1-14b")
with torch.device("meta"):
    m = WanDiT(c)
m = m.to_empty(device="cuda").to(torch.bfloat16)
m.rope.build("cuda")
random_init_(m, c.dim)
m.eval().fuse_qkv()
wan_dit.compile_elementwise(True)
set_attention_backend("cudnn")
cache = KVCache(c.num_layers, c.num_heads, c.head_dim, 1560, 3, 21, 0, torch.bfloat16, "cuda")
cache.kv.normal_()
ctx_kv = m.prepare_context(torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16))
x = torch.randn(1, 16, 3, 60, 104, device="cuda", dtype=torch.bfloat16)
t = torch.full((3,), 937.5, device="cuda")
slots = cache.slots(3)
with torch.no_grad():
    fn = lambda: m(x, t, ctx_kv, cache.kv, slots)
    print("14B forward ms:", cuda_time(fn, iters=5, warmup=2) * 1e3,
          "floor ms:", FloorProbe(c.dim, c.ffn_dim, c.num_layers, c.num_heads, 4680).forward(slots.read_end) * 1e3)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=90))
