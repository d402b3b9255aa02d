"""GPU probe: where a 14B forward (block 3, CUDA graph, Triton groups) spends the time
beyond its kernels, and what the floor is made of.

1. graph replay time vs the sum of the kernel times of a profiled replay, by kind;
2. the floor's parts (per-layer GEMMs, cross-attention, self-attention) as FloorProbe measures them;
3. cuDNN SDPA at the self-attention shape with the cache's token-major layout (our views) vs
   head-major contiguous tensors (the floor's)."""
import collections
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_common import fast_dit_step, graph_of
from sdvg_rt.floor import cuda_time

m, step, probe = fast_dit_step("wan2.1-14b")
slots = step.cache.slots(3)
with torch.no_grad():
    g = graph_of(step)
    replay = cuda_time(g.replay, iters=7, warmup=2) * 1e3
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
kinds, counts = collections.Counter(), collections.Counter()
for ev in prof.events():
    if ev.device_type.name != "CUDA":
        continue
    n = ev.name
    k = ("attention" if "sdpa" in n or "fmha" in n or "flash" in n else "gemm" if "nvjet" in n or "gemm" in n
         else "triton" if n.startswith("_") or "triton" in n else "memset" if "Memset" in n else "other")
    kinds[k] += ev.device_time_total / 1e3 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e3
    counts[k] += 1
total = sum(kinds.values())
print(f"graph replay {replay:.1f} ms; kernels in the profiled replay {total:.1f} ms "
      f"(gaps {replay - total:.1f} ms over {sum(counts.values())} kernels)")
for k, v in kinds.most_common():
    print(f"  {k:10s} {v:7.1f} ms  {counts[k]:4d} kernels")
with open(os.path.join(os.environ.get("OUT", "."), "prof_graph_14b.txt"), "w") as f:
    f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))

L = m.cfg.num_layers
lin = probe.linear_per_layer() * 1e3
att = probe.attention(slots.read_end) * 1e3
print(f"floor {L * (lin + att):.1f} ms = {L} x (linear+cross {lin:.2f} + self-attention {att:.2f}) "
      f"= {L * lin:.1f} + {L * att:.1f}")

H, D, n, S = m.cfg.num_heads, m.cfg.head_dim, slots.read_end - slots.write_start, slots.read_end
kv = step.cache.kv[0]
qt = torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16)
views = (qt.transpose(0, 1)[None], kv[0, :S].transpose(0, 1)[None], kv[1, :S].transpose(0, 1)[None])
contig = tuple(t.contiguous() for t in views)
ctx = step.cache.kv[1, :, :512]
cviews = (views[0], ctx[0].transpose(0, 1)[None], ctx[1].transpose(0, 1)[None])
ccontig = tuple(t.contiguous() for t in cviews)
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.no_grad():
    for name, args in (("self, token-major views", views), ("self, head-major contiguous", contig),
                       ("cross, token-major views", cviews), ("cross, head-major contiguous", ccontig)):
        out = F.scaled_dot_product_attention(*args)
        t = cuda_time(lambda: F.scaled_dot_product_attention(*args), iters=10) * 1e3
        print(f"  sdpa {name:30s} {t:6.3f} ms x {L} = {t * L:6.1f} ms; output strides {out.stride()}")
