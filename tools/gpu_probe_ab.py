"""GPU probe (development): A/B of DiT fusions on one machine, interleaved repeats (14B forward, block 3)."""
import statistics

import torch
import torch.nn.functional as F

import sdvg_rt  # noqa: F401
from sdvg_rt.bench import random_init_
from sdvg_rt.floor import FloorProbe, cuda_time
from sdvg_rt.kv_cache import KVCache
from sdvg_rt.models import wan_dit
from sdvg_rt.models.attention import set_attention_backend
from sdvg_rt.models.wan_dit import WanDiT, WanDiTConfig

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
ffn_epi = wan_dit._ffn
ops_fused = dict(wan_dit._ops)
ga, ml, ln = ops_fused["gated_add"], ops_fused["modulated_ln"], None


def split_gated_add_ln(x, y, gate, w, b, eps):
    x = ga(x, y, gate)
    return x, F.layer_norm(x, (x.shape[-1],), w, b, eps)


def split_add_modulated_ln(x, y, shift, scale, eps):
    x = x + y
    return x, ml(x, shift, scale, eps)


variants = {
    "all fused": (ffn_epi, {}),
    "plain ffn": (lambda f, x: f(x), {}),
    "split LN groups": (ffn_epi, {"gated_add_ln": split_gated_add_ln, "add_modulated_ln": split_add_modulated_ln}),
    "plain ffn + split LN": (lambda f, x: f(x), {"gated_add_ln": split_gated_add_ln,
                                                 "add_modulated_ln": split_add_modulated_ln}),
}
res = {k: [] for k in variants}
graphs = {}
with torch.no_grad():
    for name, (ffn, ops) in variants.items():
        wan_dit._ffn = ffn
        wan_dit._ops.clear(); wan_dit._ops.update(ops_fused); wan_dit._ops.update(ops)
        fn = lambda: m(x, t, ctx_kv, cache.kv, slots)
        fn(); fn()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            fn()
        graphs[name] = g
    for rep in range(4):
        for name, g in graphs.items():
            res[name].append(cuda_time(g.replay, iters=5, warmup=1) * 1e3)
floor = FloorProbe(c.dim, c.ffn_dim, c.num_layers, c.num_heads, 4680).forward(slots.read_end) * 1e3
print(f"floor {floor:.1f} ms")
for k, v in res.items():
    print(f"{k:24s} median {statistics.median(v):7.1f} ms  min {min(v):7.1f}  all {[round(a, 1) for a in v]}  ratio {statistics.median(v) / floor:.3f}")
