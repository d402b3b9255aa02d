"""GPU probe (development): A/B of DiT fusions on one machine, interleaved repeats (14B forward, block 3)."""
import statistics

import torch
import torch.nn.functional as F

from gpu_common import dit_step, graph_of
from sdvg_rt.floor import cuda_time
from sdvg_rt.models import wan_dit
from sdvg_rt.models.attention import set_attention_backend

m, step, probe = dit_step("wan2.1-14b")
m.fuse_qkv()
wan_dit.compile_elementwise(True)
set_attention_backend("cudnn")
slots = step.cache.slots(3)
ffn_epi = wan_dit._ffn
ops_fused = dict(wan_dit._ops)
ga, ml = ops_fused["gated_add"], ops_fused["modulated_ln"]


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
        g = graph_of(step)
        graphs[name] = g
    for rep in range(4):
        for name, g in graphs.items():
            res[name].append(cuda_time(g.replay, iters=5, warmup=1) * 1e3)
floor = probe.forward(slots.read_end) * 1e3
print(f"floor {floor:.1f} ms")
for k, v in res.items():
    print(f"{k:24s} median {statistics.median(v):7.1f} ms  min {min(v):7.1f}  all {[round(a, 1) for a in v]}  ratio {statistics.median(v) / floor:.3f}")
