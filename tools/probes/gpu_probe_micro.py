"""GPU probe, micro-benchmarks at the 14B / 1.3B block shapes (4680 tokens):
1. variants of the q/k/v epilogue kernel (RMSNorm + RoPE + cache writes) against a plain copy of the same
   bytes, and their agreement with the eager composition ("e" is the first landed kernel, which also
   copied V; the others are the measured alternatives of docs/PERFORMANCE.md, kept so the numbers can be
   re-made);
2. GEMM weight layouts: F.linear (weight [out, in]) vs addmm with a pre-transposed [in, out] weight (the
   floor's layout), with bias and with the GELU epilogue;
3. cuDNN SDPA with the cache's token-major views vs head-major contiguous tensors."""
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdvg_rt.floor import copy_bandwidth, cuda_time
from sdvg_rt.models import wan_dit as W


@triton.jit
def qkv_a(q_ptr, k_ptr, v_ptr, in_stride, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_out, k_out, v_out,
          dim, half_d, eps, BLOCK_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    p = tl.arange(0, BLOCK_P)
    offs = p[:, None] * 2 + tl.arange(0, 2)[None, :]
    m = offs < dim
    src = row * in_stride + offs
    dst = row * dim + offs
    if part == 2:
        tl.store(v_out + dst, tl.load(v_ptr + src, mask=m), mask=m)
    else:
        if part == 0:
            x = tl.load(q_ptr + src, mask=m, other=0.0)
            w = tl.load(wq_ptr + offs, mask=m, other=0.0)
        else:
            x = tl.load(k_ptr + src, mask=m, other=0.0)
            w = tl.load(wk_ptr + offs, mask=m, other=0.0)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(tl.sum(xf * xf, axis=1), axis=0) / dim + eps)
        y = ((xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)).to(x.dtype).to(tl.float32)
        j = p % half_d
        c = tl.load(cos_ptr + row * half_d + j)
        s = tl.load(sin_ptr + row * half_d + j)
        y0, y1 = tl.split(y)
        out = tl.join(y0 * c - y1 * s, y0 * s + y1 * c).to(x.dtype)
        if part == 0:
            tl.store(q_out + dst, out, mask=m)
        else:
            tl.store(k_out + dst, out, mask=m)


@triton.jit
def qkv_b(q_ptr, k_ptr, v_ptr, in_stride, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_out, k_out, v_out,
          heads, dim, eps, HALF: tl.constexpr, H_PAD: tl.constexpr, P_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    hh = tl.arange(0, H_PAD)[:, None, None]
    pp = tl.arange(0, P_PAD)[None, :, None]
    ee = tl.arange(0, 2)[None, None, :]
    offs = hh * (2 * HALF) + pp * 2 + ee
    m = (hh < heads) & (pp < HALF) & (ee < 2)
    src = row * in_stride + offs
    dst = row * dim + offs
    if part == 2:
        tl.store(v_out + dst, tl.load(v_ptr + src, mask=m), mask=m)
    else:
        if part == 0:
            x = tl.load(q_ptr + src, mask=m, other=0.0)
            w = tl.load(wq_ptr + offs, mask=m, other=0.0)
        else:
            x = tl.load(k_ptr + src, mask=m, other=0.0)
            w = tl.load(wk_ptr + offs, mask=m, other=0.0)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(tl.sum(tl.sum(xf * xf, axis=2), axis=1), axis=0) / dim + eps)
        y = ((xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)).to(x.dtype).to(tl.float32)
        pr = tl.arange(0, P_PAD)
        c = tl.load(cos_ptr + row * HALF + pr, mask=pr < HALF, other=0.0)[None, :]
        s = tl.load(sin_ptr + row * HALF + pr, mask=pr < HALF, other=0.0)[None, :]
        y0, y1 = tl.split(y)
        out = tl.join(y0 * c - y1 * s, y0 * s + y1 * c).to(x.dtype)
        if part == 0:
            tl.store(q_out + dst, out, mask=m)
        else:
            tl.store(k_out + dst, out, mask=m)


@triton.jit
def qkv_e(q_ptr, k_ptr, v_ptr, in_stride, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_out, k_out, v_out,
          heads, dim, eps, HALF: tl.constexpr, H_PAD: tl.constexpr, P_PAD: tl.constexpr):
    """bf16 pairs packed in int32 words (pointers and in_stride in int32 units)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    hh = tl.arange(0, H_PAD)[:, None]
    pp = tl.arange(0, P_PAD)[None, :]
    offs = hh * HALF + pp
    m = (hh < heads) & (pp < HALF)
    src = row * in_stride + offs
    dst = row * (dim // 2) + offs
    if part == 2:
        tl.store(v_out + dst, tl.load(v_ptr + src, mask=m), mask=m)
    else:
        if part == 0:
            p = tl.load(q_ptr + src, mask=m, other=0)
            w = tl.load(wq_ptr + offs, mask=m, other=0)
        else:
            p = tl.load(k_ptr + src, mask=m, other=0)
            w = tl.load(wk_ptr + offs, mask=m, other=0)
        x0 = (p << 16).to(tl.float32, bitcast=True)
        x1 = (p & -65536).to(tl.float32, bitcast=True)
        w0 = (w << 16).to(tl.float32, bitcast=True)
        w1 = (w & -65536).to(tl.float32, bitcast=True)
        rstd = tl.rsqrt(tl.sum(tl.sum(x0 * x0 + x1 * x1, axis=1), axis=0) / dim + eps)
        y0 = ((x0 * rstd).to(tl.bfloat16).to(tl.float32) * w0).to(tl.bfloat16).to(tl.float32)
        y1 = ((x1 * rstd).to(tl.bfloat16).to(tl.float32) * w1).to(tl.bfloat16).to(tl.float32)
        pr = tl.arange(0, P_PAD)
        c = tl.load(cos_ptr + row * HALF + pr, mask=pr < HALF, other=0.0)[None, :]
        s = tl.load(sin_ptr + row * HALF + pr, mask=pr < HALF, other=0.0)[None, :]
        b0 = (y0 * c - y1 * s).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 65535
        b1 = (y0 * s + y1 * c).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
        out = b0 | (b1 << 16)
        if part == 0:
            tl.store(q_out + dst, out, mask=m)
        else:
            tl.store(k_out + dst, out, mask=m)


@triton.jit
def qkv_f(q_ptr, k_ptr, v_ptr, in_stride, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_out, k_out, v_out,
          heads, dim, eps, n, HALF: tl.constexpr, H_PAD: tl.constexpr, P_PAD: tl.constexpr, ROWS: tl.constexpr,
          PARTS: tl.constexpr):
    """e with ROWS rows per program; PARTS=3: one program does q, k and v of its rows (grid n/ROWS), else
    grid (n/ROWS, 3)."""
    dt = wq_ptr.dtype.element_ty
    hh = tl.arange(0, H_PAD)[:, None]
    pp = tl.arange(0, P_PAD)[None, :]
    offs = hh * HALF + pp
    m = (hh < heads) & (pp < HALF)
    pr = tl.arange(0, P_PAD)
    for r in tl.static_range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + r
        mr = (hh < tl.where(row < n, heads, 0)) & (pp < HALF)
        mc = pr < tl.where(row < n, HALF, 0)
        for pi in tl.static_range(3 if PARTS == 3 else 1):
            part = pi if PARTS == 3 else tl.program_id(1)
            src = row * in_stride + offs
            dst = row * (dim // 2) + offs
            if part == 2:
                tl.store(v_out + dst, tl.load(v_ptr + src, mask=mr), mask=mr)
            else:
                if part == 0:
                    word = tl.load(q_ptr + src, mask=mr, other=0)
                    w0 = tl.load(wq_ptr + 2 * offs, mask=m, other=0.0).to(tl.float32)
                    w1 = tl.load(wq_ptr + 2 * offs + 1, mask=m, other=0.0).to(tl.float32)
                else:
                    word = tl.load(k_ptr + src, mask=mr, other=0)
                    w0 = tl.load(wk_ptr + 2 * offs, mask=m, other=0.0).to(tl.float32)
                    w1 = tl.load(wk_ptr + 2 * offs + 1, mask=m, other=0.0).to(tl.float32)
                x0 = (word & 0xFFFF).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
                x1 = (word >> 16).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
                rstd = tl.rsqrt(tl.sum(tl.sum(x0 * x0 + x1 * x1, axis=1), axis=0) / dim + eps)
                y0 = ((x0 * rstd).to(dt).to(tl.float32) * w0).to(dt).to(tl.float32)
                y1 = ((x1 * rstd).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
                c = tl.load(cos_ptr + row * HALF + pr, mask=mc, other=0.0)[None, :]
                s = tl.load(sin_ptr + row * HALF + pr, mask=mc, other=0.0)[None, :]
                o0 = (y0 * c - y1 * s).to(dt).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                o1 = (y0 * s + y1 * c).to(dt).to(tl.int16, bitcast=True).to(tl.int32)
                out = o0 | (o1 << 16)
                if part == 0:
                    tl.store(q_out + dst, out, mask=mr)
                else:
                    tl.store(k_out + dst, out, mask=mr)


def run_variant(name, nw, q, k, v, wq, wk, cos, sin, heads, kvs):
    n, dim = q.shape
    q_out = torch.empty(n, dim, dtype=q.dtype, device="cuda")
    ko, vo = kvs[0], kvs[1]
    half = dim // heads // 2
    hp, pp = triton.next_power_of_2(heads), triton.next_power_of_2(half)
    if name == "a":
        bp = triton.next_power_of_2(dim // 2)
        f = lambda: qkv_a[(n, 3)](q, k, v, q.stride(0), wq, wk, cos, sin, q_out, ko, vo, dim, half, 1e-6,
                                  BLOCK_P=bp, num_warps=nw)
    elif name == "b":
        f = lambda: qkv_b[(n, 3)](q, k, v, q.stride(0), wq, wk, cos, sin, q_out, ko, vo, heads, dim, 1e-6,
                                  HALF=half, H_PAD=hp, P_PAD=pp, num_warps=nw)
    elif name.startswith("f"):
        rows, parts = int(name[1]), int(name[2])
        i32 = lambda t: t.view(torch.int32)
        grid = (triton.cdiv(n, rows),) if parts == 3 else (triton.cdiv(n, rows), 3)
        f = lambda: qkv_f[grid](i32(q), i32(k), i32(v), q.stride(0) // 2, wq, wk, cos, sin,
                                i32(q_out), i32(ko), i32(vo), heads, dim, 1e-6, n,
                                HALF=half, H_PAD=hp, P_PAD=pp, ROWS=rows, PARTS=parts, num_warps=nw)
    else:  # "e": the first landed kernel (q, k and v by one kernel); now dit_kernels._qk_kernel does q and k
        i32 = lambda t: t.view(torch.int32)
        f = lambda: qkv_e[(n, 3)](i32(q), i32(k), i32(v), q.stride(0) // 2, i32(wq), i32(wk), cos, sin,
                                  i32(q_out), i32(ko), i32(vo), heads, dim, 1e-6,
                                  HALF=half, H_PAD=hp, P_PAD=pp, num_warps=nw)
    f()
    return f, q_out


def main():
    print(f"copy bandwidth {copy_bandwidth():.2f} TB/s (read + write)")
    for dim, heads in ((5120, 40), (1536, 12)):
        n = 4680
        qkv = torch.randn(n, 3 * dim, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.chunk(3, -1)
        wq, wk = (torch.randn(dim, device="cuda").bfloat16() for _ in range(2))
        rope = W.WanRoPE(W.WanDiTConfig("p", dim=dim, ffn_dim=8, num_heads=heads, num_layers=1)).cuda()
        cos, sin = rope.factors(3, 30, 52, frame_offset=9)
        kv_ref = torch.zeros(2, n, heads, dim // heads, device="cuda", dtype=torch.bfloat16)
        q_ref = W._qk_to_cache(q, k, wq, wk, 1e-6, cos, sin, heads, kv_ref, 0).reshape(n, dim)
        kv_ref[1].copy_(v.view(n, heads, dim // heads))
        nbytes = 2 * 3 * n * dim * 2
        dst = torch.empty(3 * n * dim, device="cuda", dtype=torch.bfloat16)
        tcopy = cuda_time(lambda: dst.copy_(qkv.view(-1)), iters=20) * 1e3
        print(f"dim {dim}: plain copy of the same bytes {tcopy * 1e3:.0f} us ({nbytes / tcopy / 1e9:.2f} TB/s)")
        for name in ("a", "b", "e", "f11", "f21", "f41", "f13", "f23"):
            for nw in (4, 8, 16):
                kvs = torch.zeros(2, n, dim, device="cuda", dtype=torch.bfloat16)
                try:
                    f, q_out = run_variant(name, nw, q, k, v, wq, wk, cos, sin, heads, kvs)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"  {name} nw={nw}: failed {type(e).__name__}: {str(e)[:200]}")
                    continue
                t = cuda_time(f, iters=20) * 1e3
                err = max((q_out - q_ref).abs().max().item(), (kvs[0] - kv_ref[0].reshape(n, dim)).abs().max().item(),
                          (kvs[1] - kv_ref[1].reshape(n, dim)).abs().max().item())
                print(f"  {name} nw={nw:2d}: {t * 1e3:6.0f} us ({nbytes / t / 1e9:.2f} TB/s) max|diff| vs eager {err:.3g}")

    if "--kernels-only" in sys.argv:
        return
    print("GEMMs, M=4680 (us): F.linear [out,in] | addmm [in,out] | mm no bias [out,in].t() | mm no bias [in,out]")
    M = 4680
    x5 = torch.randn(M, 5120, device="cuda", dtype=torch.bfloat16)
    x13 = torch.randn(M, 13824, device="cuda", dtype=torch.bfloat16)
    for name, x, N in (("qkv 5120->15360", x5, 15360), ("o 5120->5120", x5, 5120), ("ffn1 5120->13824", x5, 13824),
                       ("ffn2 13824->5120", x13, 5120), ("1.3b qkv 1536->4608", x5[:, :1536].contiguous(), 4608),
                       ("1.3b ffn1 1536->8960", x5[:, :1536].contiguous(), 8960)):
        K = x.shape[1]
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        wt = w.t().contiguous()
        b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        ts = [cuda_time(fn, iters=10) * 1e6 for fn in (lambda: F.linear(x, w, b), lambda: torch.addmm(b, x, wt),
                                                       lambda: x @ w.t(), lambda: x @ wt)]
        line = f"  {name:22s} " + " | ".join(f"{t:7.0f}" for t in ts)
        if "ffn1" in name:
            g1 = cuda_time(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True), iters=10) * 1e6
            g2 = cuda_time(lambda: torch._addmm_activation(b, x, wt, use_gelu=True), iters=10) * 1e6
            line += f"   gelu epilogue: [out,in] {g1:7.0f} | [in,out] {g2:7.0f}"
        print(line)

    H, D, n, S = 40, 128, 4680, 18720
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.no_grad():
        qt = torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16)
        cache = torch.randn(2, 32760, H, D, device="cuda", dtype=torch.bfloat16)
        views = (qt.transpose(0, 1)[None], cache[0, :S].transpose(0, 1)[None], cache[1, :S].transpose(0, 1)[None])
        contig = tuple(t.contiguous() for t in views)
        cviews = (views[0], cache[0, :512].transpose(0, 1)[None], cache[1, :512].transpose(0, 1)[None])
        ccontig = tuple(t.contiguous() for t in cviews)
        for name, args in (("self, token-major views", views), ("self, head-major contiguous", contig),
                           ("cross, token-major views", cviews), ("cross, head-major contiguous", ccontig)):
            out = F.scaled_dot_product_attention(*args)
            t = cuda_time(lambda: F.scaled_dot_product_attention(*args), iters=10) * 1e3
            print(f"  sdpa {name:30s} {t:6.3f} ms x 40 = {t * 40:6.1f} ms; output strides {out.stride()}")


if __name__ == "__main__":
    main()
