"""GPU probe: the fp8 forward's memory-bound kernels at the DiTs' block shapes (4680 tokens): the
residual/LayerNorm kernel (``dit_kernels.residual_ln``) and the fp8 cast and GELU+cast (``fp8.quantize_kernel``),
each as it is now at several launch configurations against its first layout, timed as CUDA-graph replays (as
the runtime runs them), with the bandwidth of the bytes each must move and a plain copy of as many bytes.

    python3 tools/probes/ln_quant.py [--json out/ln_quant.json]    # after source tools/device_env.sh

First layouts (kept here as the baseline): ``residual_ln`` as one power-of-two tile per row (5120 padded to
8192 lanes for the 14B, 1536 to 2048 for the 1.3B; 16 and 8 warps); the cast as a ``[row, 4096-column
tile]`` grid (13,824 FFN columns = 3.4 tiles: a last tile mostly idle) at 8 warps. Now: a row as two
power-of-two chunks, the first unmasked; the cast over the flat tensor in equal blocks. Each output is
compared with the first layout's (the residual and the e4m3 codes): the maths is the same, the sums of the
LayerNorm are reduced in another order, so a rare code may differ by one step."""
import argparse
import json

import torch
import triton
import triton.language as tl

from gpu_common import graph_of
from sdvg_rt.floor import cuda_time
from sdvg_rt.models import dit_kernels as K
from sdvg_rt.models import fp8

E4M3 = torch.float8_e4m3fn


@triton.jit
def first_residual_ln(x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, x_out, h_out, tpf, gate_stride,
                      shift_stride, scale_stride, dim, eps, qs_ptr, rs_out, HAS_Y: tl.constexpr,
                      HAS_GATE: tl.constexpr, AFFINE: tl.constexpr, MODULATED: tl.constexpr, BLOCK: tl.constexpr,
                      FP8: tl.constexpr, ROWSCALE: tl.constexpr):
    """The first layout of ``dit_kernels._residual_ln_kernel``: the row in one ``BLOCK`` tile, masked to dim."""
    row = tl.program_id(0).to(tl.int64)
    frame = row // tpf
    offs = tl.arange(0, BLOCK)
    m = offs < dim
    x = tl.load(x_ptr + row * dim + offs, mask=m, other=0.0)
    dtype = x.dtype
    if HAS_Y:
        y = tl.load(y_ptr + row * dim + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(gate_ptr + frame * gate_stride + offs, mask=m, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + y).to(dtype)
        tl.store(x_out + row * dim + offs, x, mask=m)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / dim
    xc = tl.where(m, xf - mean, 0.0)
    h = xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / dim + eps)
    if AFFINE:
        h = h * tl.load(w_ptr + offs, mask=m).to(tl.float32) + tl.load(b_ptr + offs, mask=m).to(tl.float32)
    if MODULATED:
        sc = tl.load(scale_ptr + frame * scale_stride + offs, mask=m).to(tl.float32)
        sh = tl.load(shift_ptr + frame * shift_stride + offs, mask=m).to(tl.float32)
        h = h * (1.0 + sc) + sh
    if FP8:
        qs = tl.load(qs_ptr)
        tl.store(h_out + row * dim + offs, tl.clamp(h / qs, -448.0, 448.0).to(h_out.dtype.element_ty), mask=m)
        if ROWSCALE:
            tl.store(rs_out + row, qs)
    else:
        tl.store(h_out + row * dim + offs, h.to(dtype), mask=m)


@triton.jit
def first_quant(x_ptr, y_ptr, rs_ptr, s_ptr, K, GELU: tl.constexpr, ROWSCALE: tl.constexpr, BLOCK: tl.constexpr):
    """The first layout of ``fp8._quant_kernel``: grid ``(rows, cdiv(K, BLOCK))``."""
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = col < K
    s = tl.load(s_ptr)
    x = tl.load(x_ptr + row * K + col, mask=m, other=0.0).to(tl.float32)
    if GELU:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))
    tl.store(y_ptr + row * K + col, tl.clamp(x / s, -448.0, 448.0).to(y_ptr.dtype.element_ty), mask=m)
    if ROWSCALE:
        if tl.program_id(1) == 0:
            tl.store(rs_ptr + row, s)


def timed(f):
    """(seconds per graph replay, the outputs of one replay)."""
    out = {}

    def g():
        out["v"] = f()
    g()
    graph = graph_of(g)
    graph.replay()
    torch.cuda.synchronize()
    return cuda_time(graph.replay, iters=40, inner=5), out["v"]


def copy_time(nbytes):
    """A graph replay of a plain copy that reads nbytes / 2 and writes as many."""
    src = torch.randn(nbytes // 8, device="cuda")
    dst = torch.empty_like(src)
    return cuda_time(graph_of(lambda: dst.copy_(src)).replay, iters=40, inner=5)


def codes_differ(a, b):
    return (a.view(torch.uint8) != b.view(torch.uint8)).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows, tpf = 4680, 1560
    table = []

    def report(shape, name, t, nbytes, note=""):
        table.append(dict(shape=shape, variant=name, us=t * 1e6, tbps=nbytes / t / 1e12, note=note))
        print(f"  {name:28s} {t * 1e6:7.1f} us {nbytes / t / 1e12:5.2f} TB/s {note}", flush=True)

    for preset, dim, ffn in (("14B", 5120, 13824), ("1.3B", 1536, 8960)):
        g = torch.Generator(device="cuda").manual_seed(0)
        x, y = (torch.randn(3, tpf, dim, device="cuda", generator=g).bfloat16() for _ in range(2))
        mods = (0.3 * torch.randn(3, 6, dim, device="cuda", generator=g)).bfloat16().unsqueeze(2).unbind(1)
        w, b = torch.randn(dim, device="cuda", generator=g).bfloat16(), torch.randn(dim, device="cuda").bfloat16()
        qs = torch.tensor(0.02, device="cuda")
        for case, parts in (("gated+modulated", (y, mods[5], None, None, mods[0], mods[1])),
                            ("add+affine", (y, None, w, b, None, None))):
            shape = f"{preset} residual_ln {case} -> e4m3 [{rows}, {dim}]"
            print(shape, flush=True)
            nbytes = rows * dim * (2 + 2 + 2 + 1)  # x, y in; x out (bf16); h out (e4m3)
            report(shape, "copy of as many bytes", copy_time(nbytes), nbytes)
            yy, gate, ww, bb, shift, scale = parts
            block = triton.next_power_of_2(dim)
            xo0, h0 = torch.empty_like(x), torch.empty_like(x, dtype=E4M3)
            rs0 = torch.empty(rows, 1, device="cuda")
            for nw in (8, 16):
                def f(nw=nw):
                    first_residual_ln[(rows,)](x, yy, gate if gate is not None else x, ww if ww is not None else x,
                                               bb if bb is not None else x, shift if shift is not None else x,
                                               scale if scale is not None else x, xo0, h0, tpf,
                                               gate.stride(0) if gate is not None else 0,
                                               shift.stride(0) if shift is not None else 0,
                                               scale.stride(0) if scale is not None else 0, dim, 1e-6, qs, rs0,
                                               HAS_Y=True, HAS_GATE=gate is not None, AFFINE=ww is not None,
                                               MODULATED=scale is not None, BLOCK=block, FP8=True, ROWSCALE=True,
                                               num_warps=nw)
                    return xo0, h0
                t, _ = timed(f)
                report(shape, f"first layout nw={nw}", t, nbytes)
            for nw in (2, 4, 8, 16):
                t, (xo, h, rs) = timed(lambda nw=nw: K.residual_ln(x, yy, gate, ww, bb, shift, scale, 1e-6,
                                                                   out_scale=qs, rowwise=True, num_warps=nw))
                report(shape, f"runtime nw={nw}", t, nbytes,
                       f"residual equal {torch.equal(xo, xo0)}, codes differing {100 * codes_differ(h, h0):.4f}%, "
                       f"row scales equal {torch.equal(rs, rs0)}")
        for case, k, gelu in (("cast", dim, False), ("GELU+cast", ffn, True)):
            a = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
            shape = f"{preset} {case} [{rows}, {k}] -> e4m3"
            print(shape, flush=True)
            nbytes = rows * k * 3
            report(shape, "copy of as many bytes", copy_time(nbytes), nbytes)
            y0, rs0 = torch.empty_like(a, dtype=E4M3), torch.empty(rows, 1, device="cuda")
            blk = min(4096, triton.next_power_of_2(k))

            def f0():
                first_quant[(rows, triton.cdiv(k, blk))](a, y0, rs0, qs, k, GELU=gelu, ROWSCALE=True, BLOCK=blk,
                                                         num_warps=8)
                return y0
            t, _ = timed(f0)
            report(shape, "first layout", t, nbytes)
            for block in (1024, 2048, 4096, 8192):
                for nw in (4, 8, 16):
                    if block // (32 * nw) < 4:
                        continue
                    t, act = timed(lambda block=block, nw=nw: fp8.quantize_kernel(a, qs, True, gelu, block=block,
                                                                                  num_warps=nw))
                    report(shape, f"runtime block={block} nw={nw}", t, nbytes,
                           f"codes differing {100 * codes_differ(act.data, y0):.4f}%, "
                           f"row scales equal {torch.equal(act.scale, rs0)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=table), fh, indent=1)


if __name__ == "__main__":
    main()
