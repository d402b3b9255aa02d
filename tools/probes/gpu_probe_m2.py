"""GPU probe: the 14B layer GEMMs at M = 4680 (one block) twice vs M = 9360 (two blocks in
one call): what one forward over two blocks (a commit fused with the next block's first step) would save
in GEMM time per layer."""
import torch
import torch.nn.functional as F

from sdvg_rt.floor import cuda_time

d, f = 5120, 13824
shapes = (("qkv", d, 3 * d), ("o", d, d), ("cross q", d, d), ("cross o", d, d), ("ffn in", d, f), ("ffn out", f, d))
tot1 = tot2 = 0.0
for name, k, n in shapes:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    x1 = torch.randn(4680, k, device="cuda", dtype=torch.bfloat16)
    x2 = torch.randn(9360, k, device="cuda", dtype=torch.bfloat16)
    if name == "ffn in":
        t1 = cuda_time(lambda: torch._addmm_activation(b, x1, w.t(), use_gelu=True), iters=20)
        t2 = cuda_time(lambda: torch._addmm_activation(b, x2, w.t(), use_gelu=True), iters=20)
    else:
        t1 = cuda_time(lambda: F.linear(x1, w, b), iters=20)
        t2 = cuda_time(lambda: F.linear(x2, w, b), iters=20)
    tot1 += 2 * t1
    tot2 += t2
    print(f"{name:8s} 2 x M=4680: {2 * t1 * 1e6:7.0f} us   M=9360: {t2 * 1e6:7.0f} us")
print(f"per layer: {tot1 * 1e3:.3f} ms vs {tot2 * 1e3:.3f} ms; x 40 layers: saves {(tot1 - tot2) * 40 * 1e3:.1f} ms per pair")
