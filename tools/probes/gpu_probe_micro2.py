"""GPU probe: the QKV GEMM split as QK + V (V straight into a cache slot) vs one fused QKV GEMM at the
14B's block shape. (Its first part, the first ``residual_ln`` layout's launch configurations, is in the
history; ``ln_quant.py`` measures the kernel now.)"""
import torch

from sdvg_rt.floor import cuda_time

n = 4680
x = torch.randn(n, 5120, device="cuda", dtype=torch.bfloat16)
w = torch.randn(15360, 5120, device="cuda", dtype=torch.bfloat16) * 0.02
b = torch.zeros(15360, device="cuda", dtype=torch.bfloat16)
cache = torch.empty(2, 32760, 5120, device="cuda", dtype=torch.bfloat16)
wqk, wv, bqk, bv = w[:10240], w[10240:], b[:10240], b[10240:]
t1 = cuda_time(lambda: torch.nn.functional.linear(x, w, b), iters=20)
t2 = cuda_time(lambda: torch.nn.functional.linear(x, wqk, bqk), iters=20)
slot = cache[1, 14040:14040 + n]
t3 = cuda_time(lambda: torch.addmm(bv, x, wv.t(), out=slot), iters=20)
print(f"QKV GEMM {t1 * 1e6:.0f} us; QK {t2 * 1e6:.0f} + V into the cache slot {t3 * 1e6:.0f} = {(t2 + t3) * 1e6:.0f} us")
