"""Triton kernels for the VAE decoder's norm groups (GPU fast path; ``wan_vae.VAEKernels(triton=True)``).

``norm_silu_into``: ``out = SiLU(RMS_norm(x [+ bias]))`` over the channels of every position, the input of
each causal convolution of a residual block and of the head, stored straight into the frames after the
history of the convolution's ``[history | x]`` buffer. The same maths as the eager groups of ``wan_vae``
(``_rms_norm_silu_into``, ``_bias_rms_norm_silu_into``: the definition), rounded where they round: the bias
sum, the factor ``(scale / ||x||)``, the two products and the SiLU each to the model dtype; the channel norm
accumulates in fp32.

Layout: channels-last 3D, where a position's channels are one row. The input may be a channel slice of a
wider convolution output (the 96-wide convolutions computed with 128 outputs, ``wan_vae.PADDED_OUTPUTS``):
rows are read with their own stride. A program holds ``R`` rows, each as two power-of-two chunks of channels
(96 = 64 + 32, 192 = 128 + 64, 384 = 256 + 128: no padded lanes), 3,072 elements a program. On the
H200 (``tools/probes/vae_norms.py``, graph replays) it moves 3.0-3.7 TB/s at the decoder's shapes: 0.50 ms at
the last stage (96 of 128 channels, 12 x 480 x 832) against 1.96 ms (2.44 with the bias) for the compiled
groups, which read the padded slice in a looped reduction; the block decode 92.4 -> 87.2 ms (88.5 in a second
run).

The kernels also run under Triton's CPU interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""
from __future__ import annotations

import torch

from .dit_kernels import AVAILABLE, INTERPRETED, _on, two_chunks

if AVAILABLE:
    import triton
    import triton.language as tl

    from .dit_kernels import _ld, _st

    @triton.jit
    def _chunk_in(x_ptr, b_ptr, rows_off, cols, m, cm, HAS_BIAS: tl.constexpr, MASKED: tl.constexpr,
                  CMASKED: tl.constexpr):
        """One chunk of rows: ``x [+ bias]`` rounded to the model dtype (as the eager add), in fp32; masked
        lanes 0."""
        x = _ld(x_ptr, rows_off + cols[None, :], m, MASKED)
        if HAS_BIAS:
            x = (x.to(tl.float32) + _ld(b_ptr, cols, cm, CMASKED).to(tl.float32)[None, :]).to(x.dtype)
        x = x.to(tl.float32)
        if CMASKED:
            x = tl.where(m, x, 0.0)
        return x

    @triton.jit
    def _chunk_out(x, f, g_ptr, out_ptr, rows_off, cols, m, cm, DT: tl.constexpr, MASKED: tl.constexpr,
                   CMASKED: tl.constexpr):
        """One chunk of ``SiLU(x * f * gamma)``, each product rounded to ``DT`` (as the eager ops)."""
        y = (x * f[:, None]).to(DT).to(tl.float32)
        y = (y * _ld(g_ptr, cols, cm, CMASKED).to(tl.float32)[None, :]).to(DT).to(tl.float32)
        y = y / (1.0 + tl.exp(-y))
        _st(out_ptr, rows_off + cols[None, :], y.to(DT), m, MASKED)

    @triton.jit
    def _norm_silu_kernel(x_ptr, x_rs, b_ptr, g_ptr, out_ptr, out_rs, rows, scale, HAS_BIAS: tl.constexpr,
                          DT: tl.constexpr, C: tl.constexpr, A: tl.constexpr, B: tl.constexpr, R: tl.constexpr,
                          EVEN_R: tl.constexpr):
        """``R`` rows of ``C`` channels, as chunks ``A`` and ``B`` (``B`` masked to ``C - A`` when ``A + B != C``);
        when ``rows % R`` (``EVEN_R`` false) every program masks its rows, the loads and stores of both
        chunks."""
        r = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
        ca = tl.arange(0, A)
        cb = A + tl.arange(0, B)
        cma = ca < C
        cmb = cb < C
        rm = r[:, None] < rows
        ma = rm & cma[None, :]
        mb = rm & cmb[None, :]
        MB_C: tl.constexpr = A + B != C
        MB: tl.constexpr = (not EVEN_R) or MB_C
        xa = _chunk_in(x_ptr, b_ptr, r[:, None] * x_rs, ca, ma, cma, HAS_BIAS, not EVEN_R, False)
        xb = _chunk_in(x_ptr, b_ptr, r[:, None] * x_rs, cb, mb, cmb, HAS_BIAS, MB, MB_C)
        # eager: inv = 1 / max(||x||, 1e-12) in fp32, the factor inv * scale rounded to the model dtype
        n = tl.sqrt_rn(tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1))
        if not EVEN_R:
            n = tl.where(r < rows, n, 1.0)  # rows past the end: no overflow in their (unstored) factor
        f = (tl.div_rn(tl.full(n.shape, 1.0, tl.float32), tl.maximum(n, 1e-12)) * scale).to(DT).to(tl.float32)
        _chunk_out(xa, f, g_ptr, out_ptr, r[:, None] * out_rs, ca, ma, cma, DT, not EVEN_R, False)
        _chunk_out(xb, f, g_ptr, out_ptr, r[:, None] * out_rs, cb, mb, cmb, DT, MB, MB_C)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} if AVAILABLE else {}


def block_rows(c: int) -> int:
    """Rows of ``c`` channels a program holds by default: 4096 lanes of chunks, i.e. 3,072 elements for the
    decoder's widths (32 rows of 96, 16 of 192, 8 of 384)."""
    return max(1, 4096 // triton.next_power_of_2(c))


def norm_warps(c: int) -> int:
    """Warps of a program by default: 4 up to 128 channels, 2 above (on the H200, ``tools/probes/vae_norms.py``:
    96 channels 0.474 ms at 4 warps, 0.479 at 2; 192: 0.254 at 2, 0.292 at 4; 384: 0.071 at 2, 0.077 at 4)."""
    return 4 if c <= 128 else 2


def row_stride(t: torch.Tensor) -> int | None:
    """The row stride of a ``[b, c, t, h, w]`` tensor whose positions are rows of contiguous channels laid
    out densely in (b, t, h, w) order (channels-last 3D, or a channel slice of it); None otherwise."""
    if t.dim() != 5 or (t.shape[1] > 1 and t.stride(1) != 1):
        return None
    sizes = [t.shape[d] for d in (0, 2, 3, 4)]
    strides = [t.stride(d) for d in (0, 2, 3, 4)]
    rs = next((s for n, s in zip(reversed(sizes), reversed(strides)) if n > 1), t.shape[1])
    if rs < t.shape[1]:
        return None
    expected = rs
    for n, s in zip(reversed(sizes), reversed(strides)):
        if n > 1 and s != expected:
            return None
        expected *= n
    return rs


def _problem(x: torch.Tensor, out: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why ``norm_silu_into`` does not take these tensors, or None."""
    if not AVAILABLE:
        return "Triton is not installed"
    if x.dtype != out.dtype or x.dtype not in _TL_DTYPES or tuple(x.shape) != tuple(out.shape):
        return (f"x {tuple(x.shape)} {x.dtype} and out {tuple(out.shape)} {out.dtype} must be one float dtype "
                "and shape")
    if x.device != out.device or not (x.is_cuda or INTERPRETED):
        return f"x and out must be on one CUDA device (found {x.device}, {out.device})"
    if row_stride(x) is None or row_stride(out) is None:
        return f"x {x.stride()} and out {out.stride()} must be channels-last rows (channels contiguous)"
    c = x.shape[1]
    for name, t in (("gamma", gamma), ("bias", bias)):
        if t is not None and (t.numel() != c or not t.is_contiguous() or t.dtype != x.dtype or t.device != x.device):
            return f"{name} must be {c} contiguous {x.dtype} values on {x.device}, found {tuple(t.shape)} {t.dtype}"
    return None


def fits(x: torch.Tensor, out: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``norm_silu_into`` takes these tensors (else the caller runs its group): ``x`` and ``out``
    row-dense channels-last of one float dtype and shape, on a CUDA device (or any device under Triton's
    interpreter, which the tests use), ``gamma`` (and ``bias``) ``C`` contiguous values of that dtype."""
    return _problem(x, out, gamma, bias) is None


def norm_silu_into(x: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor, scale: float,
                   out: torch.Tensor, rows_per_program: int | None = None, num_warps: int | None = None) -> None:
    """``out = SiLU(RMS_norm(x + bias))`` (``bias`` None: no bias) for ``x``/``out`` ``[b, C, t, h, w]``
    row-dense channels-last (``fits``), ``gamma`` ``C`` values (``[C, 1, 1, 1]``), ``bias`` ``[C]``. ``out``
    may be ``x`` itself, not a partial overlap. The launch: ``rows_per_program`` (default ``block_rows(C)``)
    and ``num_warps`` (default ``norm_warps(C)``), the fastest measured (``tools/probes/vae_norms.py``)."""
    problem = _problem(x, out, gamma, bias)
    if problem:
        raise ValueError(f"norm_silu_into: {problem}")
    c = x.shape[1]
    rows = x.numel() // c
    if rows == 0:
        return
    a, b = two_chunks(c)
    r = rows_per_program or block_rows(c)
    with _on(x.device):
        _norm_silu_kernel[(triton.cdiv(rows, r),)](
            x, row_stride(x), bias if bias is not None else gamma, gamma, out, row_stride(out), rows, float(scale),
            HAS_BIAS=bias is not None, DT=_TL_DTYPES[x.dtype], C=c, A=a, B=b, R=r, EVEN_R=rows % r == 0,
            num_warps=num_warps or norm_warps(c))
