"""GPU probe: residual_ln launch configurations at the 14B / 1.3B block shapes, and the
QKV GEMM split as QK + V (V straight into a cache slot) vs one fused QKV GEMM."""
import torch
import triton

from sdvg_rt.floor import cuda_time
from sdvg_rt.models import dit_kernels as K

n, tpf = 4680, 1560
for dim in (5120, 1536):
    x, y = (torch.randn(3, tpf, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mods = torch.randn(3, 6, dim, device="cuda", dtype=torch.bfloat16).unsqueeze(2).unbind(1)
    xo, h = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(dim)
    nbytes = 4 * x.numel() * 2
    for nw in (2, 4, 8, 16, 32):
        f = lambda: K._residual_ln_kernel[(n,)](x, y, mods[5], x, x, mods[0], mods[1], xo, h, tpf,
                                                mods[5].stride(0), mods[0].stride(0), mods[1].stride(0), dim, 1e-6,
                                                HAS_Y=True, HAS_GATE=True, AFFINE=False, MODULATED=True,
                                                BLOCK=block, num_warps=nw)
        f()
        t = cuda_time(f, iters=20)
        print(f"dim {dim} residual_ln (gated, modulated) nw={nw:2d}: {t * 1e6:6.0f} us ({nbytes / t / 1e12:.2f} TB/s)")

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
