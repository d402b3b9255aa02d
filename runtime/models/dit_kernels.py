"""Triton kernels for the DiT's memory-bound groups (GPU fast path; ``wan_dit.DiTKernels(triton=True)``).

Each kernel computes the same maths as its eager group in ``wan_dit`` (the definition), in fp32 with one
rounding to the model dtype where the eager code rounds the residual stream or an output:

- ``qk_to_cache``: RMSNorm + 3D RoPE of q and k, straight from the q/k GEMM's output into q and the
  layer's key slots: one pass that replaces two norm+RoPE kernels and a cache copy (the compiled
  norm+RoPE reached about 1.1 TB/s because of the pair shuffle). Each 32-bit word of a 16-bit row holds
  one rotated pair, unpacked with bit operations (no shuffles); a row's words (weights too) are read as
  two power-of-two chunks, the first unmasked, so no lane is padding and the accesses vectorise, and the
  cos/sin row of the token serves every head (word ``w`` rotates by angle ``w % (head_dim/2)``). (V needs
  no kernel: its GEMM writes the value slots, ``WanSelfAttention.write_kv``.) At 14B shapes it runs about as
  fast as a plain copy of the q/k bytes, 4.9x the first kernel's ``[heads padded to 64, pairs]`` tile
  (``tools/probes/qk_kernel.py``, H200: 58 against 287 us, the copy 56 us; docs/PERFORMANCE.md).
- ``residual_ln``: ``x + y * gate`` (each part optional), then a LayerNorm (affine or modulated by
  ``* (1 + scale) + shift``, per frame), returning the new residual and the normalised input of the next
  GEMM. It covers norm1 of the first layer, the residual+norm3, the residual+norm2 and the FFN residual
  fused with the next layer's norm1 (or the head's).

One program per token row, held in registers as two power-of-two chunks, the first unmasked (5120 =
4096 + 1024 for the 14B, 1536 = 1024 + 512 for the 1.3B: no padded lanes; at 14B shapes 1.34x the first
kernel's one 8192-lane tile as it was launched, 1.15x its best launch, ``tools/probes/ln_quant.py``); rows of a ``[F, tpf, dim]`` activation
belong to frame ``row // tpf``, whose gate/shift/scale rows are read with their own frame strides (they
are views into the ``[F, 6, dim]`` or ``[F, 2, dim]`` modulation).
The kernels also run under Triton's CPU interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""
from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the GPU image and the test extra have it
    triton = None

AVAILABLE = triton is not None


def two_chunks(n: int) -> tuple[int, int]:
    """A row of ``n`` elements (or words) as two power-of-two chunks: ``A``, the largest power of two <= n
    (read unmasked), and ``B``, masked to the rest (1, fully masked, when n is a power of two)."""
    a = 1 << (n.bit_length() - 1)
    return a, triton.next_power_of_2(max(1, n - a))


def residual_ln_warps(dim: int) -> int:
    """Warps of a ``residual_ln`` program (one row of ``dim`` elements): one per 1,024-2,047 elements, at least
    2: 4 for the 14B's 5120 and 2 for the 1.3B's 1536, the fastest for both in ``tools/probes/ln_quant.py``."""
    return max(2, min(16, 1 << max(0, (dim // 1024).bit_length() - 1)))


if AVAILABLE:

    @triton.jit
    def _unpack(word, dt: tl.constexpr):
        """A 32-bit word of a 16-bit row -> its two elements in fp32 (little-endian: element 2i low)."""
        lo = (word & 0xFFFF).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
        hi = (word >> 16).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
        return lo, hi

    @triton.jit
    def _pack(lo, hi, dt: tl.constexpr):
        """Two fp32 values rounded to ``dt`` and packed into one 32-bit word (inverse of ``_unpack``)."""
        a = lo.to(dt).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        b = hi.to(dt).to(tl.int16, bitcast=True).to(tl.int32)
        return a | (b << 16)

    @triton.jit
    def _qk_kernel(q_ptr, k_ptr, in_stride, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_out, k_out, eps,
                   DT: tl.constexpr, HALF: tl.constexpr, WORDS: tl.constexpr, A: tl.constexpr, B: tl.constexpr):
        """One token row of q or k (program axis 1). Every pointer but cos/sin is an int32 view: each word
        holds the pair (2i, 2i+1) that RoPE rotates. A row's ``WORDS`` words are two power-of-two chunks,
        ``A <= WORDS`` (unmasked, so its accesses vectorise) and ``B`` (masked to ``WORDS - A``): no lane is
        padding for the 14B's 2560 words (2048 + 512) or the 1.3B's 768 (512 + 256)."""
        row = tl.program_id(0).to(tl.int64)
        if tl.program_id(1) == 0:
            src, w_ptr, dst = q_ptr + row * in_stride, wq_ptr, q_out + row * WORDS
        else:
            src, w_ptr, dst = k_ptr + row * in_stride, wk_ptr, k_out + row * WORDS
        oa = tl.arange(0, A)
        ob = A + tl.arange(0, B)
        mb = ob < WORDS
        xa0, xa1 = _unpack(tl.load(src + oa), DT)
        xb0, xb1 = _unpack(tl.load(src + ob, mask=mb, other=0), DT)
        wa0, wa1 = _unpack(tl.load(w_ptr + oa), DT)
        wb0, wb1 = _unpack(tl.load(w_ptr + ob, mask=mb, other=0), DT)
        rstd = tl.rsqrt((tl.sum(xa0 * xa0 + xa1 * xa1, axis=0) + tl.sum(xb0 * xb0 + xb1 * xb1, axis=0))
                        / (2 * WORDS) + eps)
        # Wan RMSNorm: normalise in fp32, cast back, times the weight in the model dtype (the fp32 product
        # of two model-dtype values is exact, so rounding it equals the model-dtype multiply); RoPE in fp32
        # with the angle of pair (word % HALF) of the head (one table row per token, for all heads)
        ya0 = ((xa0 * rstd).to(DT).to(tl.float32) * wa0).to(DT).to(tl.float32)
        ya1 = ((xa1 * rstd).to(DT).to(tl.float32) * wa1).to(DT).to(tl.float32)
        yb0 = ((xb0 * rstd).to(DT).to(tl.float32) * wb0).to(DT).to(tl.float32)
        yb1 = ((xb1 * rstd).to(DT).to(tl.float32) * wb1).to(DT).to(tl.float32)
        ca = tl.load(cos_ptr + row * HALF + oa % HALF)
        sa = tl.load(sin_ptr + row * HALF + oa % HALF)
        cb = tl.load(cos_ptr + row * HALF + ob % HALF, mask=mb, other=0.0)
        sb = tl.load(sin_ptr + row * HALF + ob % HALF, mask=mb, other=0.0)
        tl.store(dst + oa, _pack(ya0 * ca - ya1 * sa, ya0 * sa + ya1 * ca, DT))
        tl.store(dst + ob, _pack(yb0 * cb - yb1 * sb, yb0 * sb + yb1 * cb, DT), mask=mb)

    @triton.jit
    def _ld(ptr, offs, m, MASKED: tl.constexpr):
        if MASKED:
            v = tl.load(ptr + offs, mask=m, other=0.0)
        else:
            v = tl.load(ptr + offs)
        return v

    @triton.jit
    def _st(ptr, offs, v, m, MASKED: tl.constexpr):
        if MASKED:
            tl.store(ptr + offs, v, mask=m)
        else:
            tl.store(ptr + offs, v)

    @triton.jit
    def _ln_residual(x_ptr, y_ptr, g_ptr, x_out, offs, m, HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr,
                     MASKED: tl.constexpr):
        """One chunk of ``x + y * gate`` (rounded to the model dtype, stored), returned in fp32."""
        x = _ld(x_ptr, offs, m, MASKED)
        if HAS_Y:
            y = _ld(y_ptr, offs, m, MASKED).to(tl.float32)
            if HAS_GATE:
                y = y * _ld(g_ptr, offs, m, MASKED).to(tl.float32)
            x = (x.to(tl.float32) + y).to(x.dtype)  # the residual stream is kept in the model dtype
            _st(x_out, offs, x, m, MASKED)
        return x.to(tl.float32)

    @triton.jit
    def _ln_out(xc, rstd, w_ptr, b_ptr, sh_ptr, sc_ptr, h_out, qs, offs, m, AFFINE: tl.constexpr,
                MODULATED: tl.constexpr, FP8: tl.constexpr, MASKED: tl.constexpr):
        """One chunk of the normalised output: affine or modulated, stored in the model dtype or e4m3."""
        h = xc * rstd
        if AFFINE:
            h = h * _ld(w_ptr, offs, m, MASKED).to(tl.float32) + _ld(b_ptr, offs, m, MASKED).to(tl.float32)
        if MODULATED:
            h = h * (1.0 + _ld(sc_ptr, offs, m, MASKED).to(tl.float32)) + _ld(sh_ptr, offs, m, MASKED).to(tl.float32)
        if FP8:  # fp8 hook (models.fp8): h quantized with the static scale of the GEMM it feeds
            _st(h_out, offs, tl.clamp(h / qs, -448.0, 448.0).to(h_out.dtype.element_ty), m, MASKED)
        else:
            _st(h_out, offs, h.to(h_out.dtype.element_ty), m, MASKED)

    @triton.jit
    def _residual_ln_kernel(x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, x_out, h_out,
                            tpf, gate_stride, shift_stride, scale_stride, eps, qs_ptr, rs_out,
                            HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, AFFINE: tl.constexpr,
                            MODULATED: tl.constexpr, DIM: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                            FP8: tl.constexpr = False, ROWSCALE: tl.constexpr = False):
        """One token row: ``DIM`` elements as two power-of-two chunks, ``A <= DIM`` (unmasked) and ``B``
        (masked to ``DIM - A``): 4096 + 1024 for the 14B's 5120, 1024 + 512 for the 1.3B's 1536."""
        row = tl.program_id(0).to(tl.int64)
        frame = row // tpf
        base = row * DIM
        oa = tl.arange(0, A)
        ob = A + tl.arange(0, B)
        mb = ob < DIM
        gp = gate_ptr + frame * gate_stride
        xa = _ln_residual(x_ptr + base, y_ptr + base, gp, x_out + base, oa, mb, HAS_Y, HAS_GATE, False)
        xb = _ln_residual(x_ptr + base, y_ptr + base, gp, x_out + base, ob, mb, HAS_Y, HAS_GATE, True)
        mean = (tl.sum(xa, axis=0) + tl.sum(xb, axis=0)) / DIM
        xa = xa - mean
        xb = tl.where(mb, xb - mean, 0.0)
        rstd = tl.rsqrt((tl.sum(xa * xa, axis=0) + tl.sum(xb * xb, axis=0)) / DIM + eps)
        qs = 1.0
        if FP8:
            qs = tl.load(qs_ptr)
            if ROWSCALE:
                tl.store(rs_out + row, qs)
        sh = shift_ptr + frame * shift_stride
        sc = scale_ptr + frame * scale_stride
        _ln_out(xa, rstd, w_ptr, b_ptr, sh, sc, h_out + base, qs, oa, mb, AFFINE, MODULATED, FP8, False)
        _ln_out(xb, rstd, w_ptr, b_ptr, sh, sc, h_out + base, qs, ob, mb, AFFINE, MODULATED, FP8, True)


    @triton.jit
    def _combine_splits_kernel(o_ptr, lse_ptr, out_ptr, rows, heads, lq, o_split, lse_split,
                               S: tl.constexpr, D: tl.constexpr, R: tl.constexpr):
        """``R`` rows (query, head) of the attention over ``S`` key ranges merged: ``o [S, lq, heads, D]`` (each
        range's normalised output), ``lse [S, heads, lq]`` (fp32, natural log) -> ``out [lq, heads, D]``."""
        r = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
        mr = r < rows
        lse_off = (r % heads) * lq + r // heads
        m = tl.full((R,), float("-inf"), tl.float32)
        for s in tl.static_range(S):
            m = tl.maximum(m, tl.load(lse_ptr + s * lse_split + lse_off, mask=mr, other=0.0))
        cols = tl.arange(0, D)[None, :]
        acc = tl.zeros((R, D), tl.float32)
        den = tl.zeros((R,), tl.float32)
        for s in tl.static_range(S):
            w = tl.exp(tl.load(lse_ptr + s * lse_split + lse_off, mask=mr, other=0.0) - m)
            o = tl.load(o_ptr + s * o_split + r[:, None] * D + cols, mask=mr[:, None], other=0.0)
            acc += w[:, None] * o.to(tl.float32)
            den += w
        tl.store(out_ptr + r[:, None] * D + cols, (acc / den[:, None]).to(out_ptr.dtype.element_ty), mask=mr[:, None])

# Whether the kernels were defined under Triton's CPU interpreter (Triton reads TRITON_INTERPRET when a
# ``triton.jit`` decorator runs): then they take CPU tensors, else CUDA tensors only (also ``vae_kernels``')
if AVAILABLE:
    from triton.runtime.interpreter import InterpretedFunction

    INTERPRETED = isinstance(_qk_kernel, InterpretedFunction)
else:
    INTERPRETED = False


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device), e.g. a runtime on cuda:1."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, found {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous, strides {t.stride()}")


def qk_to_cache(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float,
                cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_layer: torch.Tensor,
                write_start: int, num_warps: int | None = None) -> torch.Tensor:
    """q/k ``[n, dim]`` (rows may be strided, e.g. chunks of one q/k GEMM output), norm weights ``[dim]``,
    cos/sin ``[n, 1, D/2]`` fp32, kv_layer ``[2, S, H, D]``: writes RoPE(norm(k)) into
    ``kv_layer[0, write_start:write_start+n]`` and returns RoPE(norm(q)) ``[n, H, D]``.

    The kernel handles 16-bit model dtypes (bf16, fp16: the production path); other dtypes (the fp32
    reference) take the eager composition ``wan_dit._qk_to_cache``. ``num_warps``: the launch's (default 4,
    the fastest for both DiTs' rows in ``tools/probes/qk_kernel.py``)."""
    n, dim = q.shape
    if q.element_size() != 2:
        from .wan_dit import _qk_to_cache

        return _qk_to_cache(q, k, wq, wk, eps, cos, sin, heads, kv_layer, write_start)
    if dim % heads or (dim // heads) % 2:
        raise ValueError(f"qk_to_cache: {heads} heads must split dim {dim} into heads of an even size")
    half_d = dim // heads // 2
    _check("k", k, (n, dim))
    _check("wq", wq, (dim,))
    _check("wk", wk, (dim,))
    if q.stride(0) != k.stride(0) or q.stride(1) != 1:
        raise ValueError(f"q and k must share a row stride with contiguous rows: {q.stride()}, {k.stride()}")
    _check("cos", cos, (n, 1, half_d))
    _check("sin", sin, (n, 1, half_d))
    if not (cos.is_contiguous() and sin.is_contiguous() and cos.dtype == sin.dtype == torch.float32):
        raise ValueError("cos/sin must be contiguous float32 [n, 1, D/2]")
    if kv_layer.dim() != 4 or kv_layer.shape[1] < write_start + n or kv_layer.shape[2] != heads \
            or kv_layer.shape[2] * kv_layer.shape[3] != dim or not kv_layer[0].is_contiguous():
        raise ValueError(f"kv_layer must be a [2, S>={write_start + n}, H={heads}, D] cache layer with H*D={dim}, "
                         f"found shape {tuple(kv_layer.shape)} strides {kv_layer.stride()}")
    if wq.dtype != q.dtype or wk.dtype != q.dtype or kv_layer.dtype != q.dtype or q.stride(0) % 2:
        raise ValueError(f"qk_to_cache: q/k, the norm weights and the cache must share one dtype and rows "
                         f"must start at even offsets: {q.dtype}/{wq.dtype}/{wk.dtype}/{kv_layer.dtype}")
    if any(t.data_ptr() % 4 for t in (q, k, wq, wk, kv_layer)):
        raise ValueError("qk_to_cache: q, k, the norm weights and the cache must start at 4-byte aligned addresses")
    q_out = torch.empty(n, heads, dim // heads, dtype=q.dtype, device=q.device)
    k_out = kv_layer[0, write_start:write_start + n]
    words = dim // 2
    a, b = two_chunks(words)
    i32 = [t.view(torch.int32) for t in (q, k, wq, wk, q_out, k_out)]
    dt = tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16
    with _on(q.device):
        _qk_kernel[(n, 2)](*i32[:2], q.stride(0) // 2, *i32[2:4], cos, sin, *i32[4:], eps, DT=dt, HALF=half_d,
                           WORDS=words, A=a, B=b, num_warps=num_warps or 4)
    return q_out


def residual_ln(x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None,
                weight: torch.Tensor | None, bias: torch.Tensor | None,
                shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float,
                out_scale: torch.Tensor | None = None, rowwise: bool = False, num_warps: int | None = None):
    """x, y ``[F, tpf, dim]`` contiguous; gate/shift/scale per frame ``[F, 1, dim]`` (rows may be strided);
    weight/bias ``[dim]``. Returns ``(x + y * gate, LN(x + y * gate) [affine] [* (1 + scale) + shift])``
    (with ``y`` None: ``(x, LN(x)...)``).

    fp8 hook (``models.fp8``): with ``out_scale`` (0-dim fp32) the normalised output is written in e4m3 as
    ``clamp(h / out_scale, +-448)`` and a third value is returned: ``[F*tpf, 1]`` fp32 rows holding
    ``out_scale`` (the rowwise GEMM's ``scale_a``) when ``rowwise``, else None. ``num_warps``: the launch's
    (default ``residual_ln_warps(dim)``)."""
    Fr, tpf, dim = x.shape
    if not x.is_contiguous():
        raise ValueError(f"residual_ln: x must be contiguous, strides {x.stride()}")
    for t in (gate, shift, scale):
        if t is not None:
            _check("modulation", t, (Fr, 1, dim))
    if (shift is None) != (scale is None) or (weight is None) != (bias is None):
        raise ValueError("residual_ln: shift and scale (and weight and bias) come together")
    strides = [t.stride(0) if t is not None else 0 for t in (gate, shift, scale)]
    if y is not None and (tuple(y.shape) != tuple(x.shape) or not y.is_contiguous()):
        raise ValueError(f"residual_ln: y must be contiguous {tuple(x.shape)}, found {tuple(y.shape)} {y.stride()}")
    x_out = torch.empty_like(x) if y is not None else x
    fp8 = out_scale is not None
    h = torch.empty_like(x, dtype=torch.float8_e4m3fn) if fp8 else torch.empty_like(x)
    rs = torch.empty(Fr * tpf, 1, dtype=torch.float32, device=x.device) if fp8 and rowwise else None
    a, b = two_chunks(dim)
    with _on(x.device):
        _residual_ln_kernel[(Fr * tpf,)](
            x, y if y is not None else x, gate if gate is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, shift if shift is not None else x, scale if scale is not None else x,
            x_out, h, tpf, *strides, eps, out_scale if fp8 else x, rs if rs is not None else x,
            HAS_Y=y is not None, HAS_GATE=gate is not None, AFFINE=weight is not None,
            MODULATED=scale is not None, DIM=dim, A=a, B=b, FP8=fp8, ROWSCALE=rs is not None,
            num_warps=num_warps or residual_ln_warps(dim))
    return (x_out, h, rs) if fp8 else (x_out, h)


def combine_splits(o: torch.Tensor, lse: torch.Tensor, rows_per_program: int = 16, num_warps: int = 4) -> torch.Tensor:
    """Softmax attention over ``S`` disjoint key ranges merged into the attention over all of them:
    ``o [S, Lq, H, D]`` (each range's output, normalised over its own keys) and ``lse [S, H, Lq]`` (fp32,
    the natural log of each range's softmax denominator, scaled scores) -> ``[Lq, H, D]`` in ``o``'s dtype:
    ``sum_s exp(lse_s - lse) o_s`` with ``lse = log sum_s exp(lse_s)``, in fp32 (``attention``'s split-key
    FlashAttention-4 call). ``D`` a power of two."""
    S, lq, heads, d = o.shape
    if tuple(lse.shape) != (S, heads, lq) or lse.dtype != torch.float32 or not (o.is_contiguous() and lse.is_contiguous()):
        raise ValueError(f"combine_splits: o must be a contiguous [S, Lq, H, D] and lse a contiguous fp32 [S, H, Lq]; "
                         f"found {tuple(o.shape)} {o.stride()} and {tuple(lse.shape)} {lse.dtype} {lse.stride()}")
    if d & (d - 1):
        raise ValueError(f"combine_splits: head dim {d} is not a power of two")
    out = torch.empty(lq, heads, d, dtype=o.dtype, device=o.device)
    rows = lq * heads
    with _on(o.device):
        _combine_splits_kernel[(triton.cdiv(rows, rows_per_program),)](
            o, lse, out, rows, heads, lq, lq * heads * d, heads * lq, S=S, D=d, R=rows_per_program,
            num_warps=num_warps)
    return out
