"""FP8 (e4m3) linear layers for the Wan DiT with static, calibrated activation scales.

One recipe, applied to a loaded ``WanDiT`` by ``quantize_dit`` (the model object carries the choice; nothing
global changes):

- **Weights** are stored in ``float8_e4m3fn`` with one fp32 scale per output channel (``weight_scaling
  "channel"``, the default) or one per tensor (``"tensor"``), ``w ~ w8 * scale``, quantized once at load
  (round to nearest, saturated at +-448).
- **Activations** are quantized with a **static** per-layer scale ``amax / 448`` from a calibration file
  (``sdvg-rt calibrate``): no per-call reduction, so no extra pass and nothing data-dependent inside a CUDA
  graph. The quantization is fused into the kernel that produces each GEMM's input: the residual/LayerNorm
  kernel of ``dit_kernels`` emits fp8 for the q/k/v, cross-attention q and FFN-in GEMMs; the FFN's GELU and
  its quantization are one Triton kernel over the hidden; the two attention outputs take one Triton cast
  kernel each (FlashAttention-4 and SDPA write bf16).
- **GEMM**: ``torch._scaled_mm`` with fp32 scales, bias in the epilogue, bf16 out. Channel weight scales
  use the rowwise form (``scale_a [M, 1]`` holding the static activation scale, written by the producing
  kernel, ``scale_b [1, N]``); tensor scales the tensorwise form (two 0-dim scales). Accumulation in
  Hopper's fast mode by default (``fast_accum``): at the 14B's shapes the rowwise GEMMs go from 1.59x to
  1.80x of bf16, and the GEMM's own error from 1.7e-3 to 3.3e-3 of its fp32 product, beside the 2.7e-2 of
  e4m3's rounding of its inputs (``tools/probes/fp8_gemm.py``).

Per block the quantized GEMMs are q/k (one fused GEMM) and v (sharing one input scale), the self-attention
output, the cross-attention q and output and both FFN GEMMs. Always bf16: the patch embedding, the time and
text embeddings, the modulation, the head and the cross-attention K/V (they run once per prompt); by default
also the first and the last transformer block (``keep_first``/``keep_last``); the text K/V weights can be
stored in fp8 too (``cross_kv``: memory only, they run once per prompt). The KV cache stays bf16.

Where fp8 GEMMs cannot run (CPU, tracing) the layer computes the **dequantized reference**: the same fp8
values times the same scales in fp32, so the CPU tests check the maths the GPU runs. ``observe=True``
builds the same layers around the bf16 weights, recording each GEMM input's amax (calibration).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackendUnavailableError, CheckpointError
from . import dit_kernels

E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0
FORMAT = "sdvg-rt fp8 activation amax"
FORMAT_VERSION = "1"
WEIGHT_SCALINGS = ("channel", "tensor")
QUANT_BLOCK, QUANT_WARPS = 4096, 4  # the cast's and GELU+cast's launch: the fastest in tools/probes/ln_quant.py

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the GPU image and the test extra have it
    triton = None


@dataclass(frozen=True)
class Fp8Config:
    keep_first: int = 1  # transformer blocks kept in bf16 at the start ...
    keep_last: int = 1  # ... and at the end
    weight_scaling: str = "channel"  # per output channel (rowwise GEMM) or per tensor (tensorwise GEMM)
    cross_kv: bool = False  # also the cross-attention K/V projections (once per prompt: memory, not speed)
    fast_accum: bool = True  # the GEMMs accumulate in the tensor cores' fast mode | with fp32 promotion

    def quantized_blocks(self, num_layers: int) -> list[int]:
        return [i for i in range(num_layers) if self.keep_first <= i < num_layers - self.keep_last]


def fp8_supported(device) -> bool:
    """fp8 tensor-core GEMMs: CUDA compute capability >= 8.9 (Ada, Hopper and newer)."""
    d = torch.device(device)
    return d.type == "cuda" and torch.cuda.get_device_capability(d) >= (8, 9)


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _fast(t: torch.Tensor) -> bool:
    return t.is_cuda and not _exporting()


class _QDQ(torch.autograd.Function):
    """Fake quantization of an activation; exports as ONNX ``QuantizeLinear -> DequantizeLinear`` with an
    e4m3 zero point (the form NVIDIA's ModelOpt writes and TensorRT fuses into fp8 GEMMs)."""

    @staticmethod
    def forward(ctx, x, scale):
        return (quantize_ref(x, scale).float() * scale.float()).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale):
        zp = g.op("Constant", value_t=torch.zeros((), dtype=E4M3))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp), scale, zp)


class _DQWeight(torch.autograd.Function):
    """An fp8 weight ``[N, K]`` dequantized with its scales (``[N]``: per output channel, axis 0; or 0-dim);
    exports as ``DequantizeLinear`` on the fp8 initializer."""

    @staticmethod
    def forward(ctx, w8, ws, like):
        return (w8.float() * (ws.float().reshape(-1, 1) if ws.dim() else ws.float())).to(like.dtype)

    @staticmethod
    def symbolic(g, w8, ws, like):
        zp = g.op("Constant", value_t=torch.zeros(ws.type().sizes(), dtype=E4M3))
        return g.op("DequantizeLinear", w8, ws, zp, axis_i=0)


class Fp8Act:
    """An fp8 activation and the scale its GEMM needs: ``[M, 1]`` fp32 rows (rowwise GEMMs) or a 0-dim
    fp32 tensor. ``value ~ data * scale``. Views keep the scale (it belongs to the rows, whatever the view)."""

    __slots__ = ("data", "scale")

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        self.data, self.scale = data, scale

    @property
    def shape(self):
        return self.data.shape

    def view(self, *shape) -> Fp8Act:
        return Fp8Act(self.data.view(*shape), self.scale)

    reshape = view

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        s = self.scale.float()
        d = self.data.float()
        if s.dim():
            return (d.reshape(-1, d.shape[-1]) * s).view(d.shape).to(dtype)
        return (d * s).to(dtype)


# --------------------------------------------------------------------------------------------------
# Kernels: the cast and the GELU+cast (the residual/LayerNorm kernel's fp8 output is in dit_kernels)

if triton is not None:

    @triton.jit
    def _quant_kernel(x_ptr, y_ptr, rs_ptr, s_ptr, N, M, GELU: tl.constexpr, ROWSCALE: tl.constexpr,
                      BLOCK: tl.constexpr, EVEN: tl.constexpr):
        """``BLOCK`` consecutive elements of the flat ``[M, K]`` input (``N = M * K``; ``EVEN``: N is a
        multiple of BLOCK, no mask, as for every fp8 kernel input of a 14B block; the 1.3B's FFN hidden,
        4680 x 8960, takes the masked path); with ``ROWSCALE`` the first programs
        also write the ``[M, 1]`` rows of the scale that the rowwise GEMM takes."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        s = tl.load(s_ptr)
        if EVEN:
            x = tl.load(x_ptr + offs).to(tl.float32)
        else:
            x = tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
        if GELU:  # tanh GELU in fp32 (nn.GELU(approximate="tanh"))
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            x = 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))
        q = tl.clamp(x / s, -448.0, 448.0).to(y_ptr.dtype.element_ty)
        if EVEN:
            tl.store(y_ptr + offs, q)
        else:
            tl.store(y_ptr + offs, q, mask=offs < N)
        if ROWSCALE:
            if tl.program_id(0).to(tl.int64) * BLOCK < M:
                tl.store(rs_ptr + offs, s + tl.zeros([BLOCK], tl.float32), mask=offs < M)


def quantize_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 maths of the kernels: ``clamp(x / scale, +-448)`` rounded to e4m3 (nearest even)."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(E4M3)


def _row_scale(scale: torch.Tensor, rows: int, rowwise: bool) -> torch.Tensor:
    return scale.float().reshape(1, 1).expand(rows, 1).contiguous() if rowwise else scale


def quantize(x: torch.Tensor, scale: torch.Tensor, rowwise: bool, gelu: bool = False) -> Fp8Act:
    """x ``[..., K]`` (16-bit or fp32) -> ``Fp8Act`` with the static ``scale`` (0-dim fp32); ``gelu``
    applies tanh-GELU first. CUDA: one Triton pass (``quantize_kernel``); elsewhere the same maths in torch."""
    if _fast(x) and triton is not None:
        return quantize_kernel(x, scale, rowwise, gelu)
    xf = F.gelu(x.float(), approximate="tanh") if gelu else x
    return Fp8Act(quantize_ref(xf, scale), _row_scale(scale, x.numel() // x.shape[-1], rowwise))


def quantize_kernel(x: torch.Tensor, scale: torch.Tensor, rowwise: bool, gelu: bool = False,
                    block: int = QUANT_BLOCK, num_warps: int = QUANT_WARPS) -> Fp8Act:
    """``quantize`` as one Triton pass over the flat tensor (on the tensors' device; on a CPU tensor under
    Triton's interpreter, as the tests run it)."""
    M = x.numel() // x.shape[-1]
    x2 = x.contiguous()
    y = torch.empty(x.shape, dtype=E4M3, device=x.device)
    rs = torch.empty(M, 1, dtype=torch.float32, device=x.device) if rowwise else scale
    n = x2.numel()
    with dit_kernels._on(x.device):
        _quant_kernel[(triton.cdiv(n, block),)](x2, y, rs, scale, n, M, GELU=gelu, ROWSCALE=rowwise, BLOCK=block,
                                                EVEN=n % block == 0, num_warps=num_warps)
    return Fp8Act(y, rs)


def residual_ln(name: str, scale: torch.Tensor, rowwise: bool, ops, *args):
    """The residual/LayerNorm group ``name`` of ``wan_dit`` whose normalised output feeds an fp8 GEMM:
    returns ``(x, Fp8Act)`` (``modulated_ln``: only the Fp8Act). CUDA with Triton: the ``residual_ln``
    kernel writes fp8 directly; elsewhere the model's group (``ops[name]``, its ``DiTKernels.ops``) in fp32
    maths, then quantized."""
    x = args[0]
    if _exporting():  # the graph carries the group in the model dtype and the Q/DQ pair at the GEMM
        return ops[name](*args)
    if _fast(x) and dit_kernels.AVAILABLE:
        eps = args[-1]
        if name == "modulated_ln":
            parts = (x, None, None, None, None, args[1], args[2])
        elif name == "gated_add_ln":
            parts = (x, args[1], args[2], args[3], args[4], None, None)
        elif name == "add_modulated_ln":
            parts = (x, args[1], None, None, None, args[2], args[3])
        else:  # gated_add_modulated_ln
            parts = (x, args[1], args[2], None, None, args[3], args[4])
        xo, h, rs = dit_kernels.residual_ln(*parts, eps, out_scale=scale, rowwise=rowwise)
        act = Fp8Act(h, rs if rowwise else scale)
        return act if name == "modulated_ln" else (xo, act)
    # reference: the group in fp32 (as the kernel computes), the residual rounded to the model dtype
    out = ops[name](*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    if name == "modulated_ln":
        return quantize(out, scale, rowwise)
    xo, h = out
    return xo.to(x.dtype), quantize(h, scale, rowwise)


# --------------------------------------------------------------------------------------------------
# The layer

class Fp8Linear(nn.Module):
    """``y = x @ W.T + b`` with W in fp8 (per-channel or per-tensor scales) and x quantized with a static
    scale (``input_scale``, 0-dim fp32, shared with the kernel that produces x), bf16 (model dtype) out.

    ``observe``: the bf16 weights unchanged and ``amax`` (0-dim fp32) raised to each input's max |x|
    (in place on the device: no host sync, safe inside CUDA graphs). Calibration only."""

    fp8 = True  # the DiT's hooks route this layer's inputs through it (no cuBLAS shortcut)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                 weight_scaling: str = "channel", observe: bool = False, fast_accum: bool = True):
        super().__init__()
        if weight_scaling not in WEIGHT_SCALINGS:
            raise ValueError(f"weight_scaling must be one of {WEIGHT_SCALINGS}, got {weight_scaling!r}")
        self.out_features, self.in_features = weight.shape
        self.observe, self.rowwise, self.fast_accum = observe, weight_scaling == "channel", fast_accum
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        if observe:
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)
            self.register_buffer("amax", torch.zeros((), dtype=torch.float32, device=weight.device))
            self.input_scale = None
            return
        with torch.no_grad():
            w = weight.detach().float()
            amax = w.abs().amax(dim=1, keepdim=True) if self.rowwise else w.abs().amax()
            ws = (amax / FP8_MAX).clamp_min(1e-12)
            w8 = (w / ws).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
        self.register_buffer("weight", w8)
        self.register_buffer("weight_scale", ws.reshape(1, -1).contiguous() if self.rowwise else ws.reshape(()))
        self.register_buffer("input_scale", input_scale)
        self.out_dtype = weight.dtype
        self._bias_in_gemm = True

    def dequantized_weight(self) -> torch.Tensor:
        """W as the GEMM sees it, fp32 ``[N, K]``."""
        return self.weight.float() * (self.weight_scale.reshape(-1, 1) if self.rowwise else self.weight_scale)

    def forward(self, x, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.observe:
            torch.maximum(self.amax, x.detach().abs().amax().float(), out=self.amax)
            y = F.linear(x, self.weight, self.bias)
            return y if out is None else out.copy_(y.view(out.shape))
        if _exporting():
            return self._qdq_linear(x, out)
        if not isinstance(x, Fp8Act):
            x = quantize(x, self.input_scale, self.rowwise)
        lead = x.shape[:-1]
        a = x.data.reshape(-1, self.in_features)
        if _fast(a):
            y = self._gemm(a, x.scale, out)
        else:  # the dequantized reference: same fp8 values and scales, fp32 maths
            y = F.linear(Fp8Act(a, x.scale).dequantize(), self.dequantized_weight(),
                         None if self.bias is None else self.bias.float()).to(self.out_dtype)
            if out is not None:
                y = out.copy_(y.view(out.shape))
        return y.view(*lead, self.out_features)

    def _qdq_linear(self, x: torch.Tensor, out):
        """The ONNX form: Q/DQ of the input with the static scale, DQ of the fp8 weight, MatMul (+ bias);
        scales in the graph's dtype (QuantizeLinear takes the input's type)."""
        dt = x.dtype
        xq = _QDQ.apply(x, self.input_scale.to(dt))
        w = _DQWeight.apply(self.weight, self.weight_scale.reshape(-1).to(dt) if self.rowwise
                            else self.weight_scale.to(dt), x)
        y = F.linear(xq, w, None if self.bias is None else self.bias.to(dt))
        return y if out is None else out.copy_(y.view(out.shape))

    def _gemm(self, a, sa, out):
        kw = dict(scale_a=sa, scale_b=self.weight_scale, out_dtype=self.out_dtype, use_fast_accum=self.fast_accum)
        if out is not None:
            kw["out"] = out.view(-1, self.out_features)
        if self._bias_in_gemm and self.bias is not None:
            try:
                return torch._scaled_mm(a, self.weight.t(), bias=self.bias, **kw)
            except RuntimeError:  # this scale layout takes no bias in its epilogue: add it after
                if torch.cuda.is_current_stream_capturing():
                    raise
                self._bias_in_gemm = False
        y = torch._scaled_mm(a, self.weight.t(), **kw)
        return y.add_(self.bias) if self.bias is not None else y

    def extra_repr(self) -> str:
        mode = "observe" if self.observe else f"e4m3, {'channel' if self.rowwise else 'tensor'} weight scales"
        return f"in={self.in_features}, out={self.out_features}, {mode}"


def ffn(seq: nn.Sequential, x) -> torch.Tensor:
    """The FFN of a quantized block: fp8 GEMM (bias in the epilogue, bf16 out), tanh-GELU fused with the
    quantization of the hidden, fp8 GEMM."""
    first, last = seq[0], seq[2]
    h = first(x)
    if last.observe or _exporting():
        return last(F.gelu(h, approximate="tanh"))
    return last(quantize(h, last.input_scale, last.rowwise, gelu=True))


# --------------------------------------------------------------------------------------------------
# Applying it to a WanDiT

def layer_names(i: int, cross_kv: bool = False) -> list[str]:
    """The calibrated inputs of block i (q/k and v share one input: ``qkv``; the text K/V: ``cross_attn.kv``)."""
    p = f"blocks.{i}."
    names = ("self_attn.qkv", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2")
    return [p + n for n in names + (("cross_attn.kv",) if cross_kv else ())]


def quantize_dit(model, amax: dict | None, cfg: Fp8Config = Fp8Config()):
    """Swap the quantizable ``nn.Linear`` of ``cfg``'s blocks for ``Fp8Linear`` in place and wire the
    producing kernels' static scales; ``amax`` ``{layer name: 0-dim tensor}`` (``layer_names``), or None to
    observe (calibration). Frees the bf16 weights it replaces. Returns the model."""
    dev = model.head.head.weight.device
    blocks = cfg.quantized_blocks(len(model.blocks))
    observe = amax is None
    if not observe:
        missing = [n for i in blocks for n in layer_names(i, cfg.cross_kv) if n not in amax]
        if missing:
            raise KeyError(missing[0])

    def scale(name):
        if observe:
            return None
        return (amax[name].to(dev, torch.float32).reshape(()).clamp_min(1e-8) / FP8_MAX).contiguous()

    def make(lin, name, sc=None):
        # an nn.Linear, or an observed Fp8Linear (still holding the bf16 weight) after calibration
        return Fp8Linear(lin.weight, lin.bias, sc if sc is not None else scale(name), cfg.weight_scaling, observe,
                         cfg.fast_accum)

    with torch.no_grad():
        for i in blocks:
            b = model.blocks[i]
            sa, ca = b.self_attn, b.cross_attn
            p = f"blocks.{i}."
            s_qkv = scale(p + "self_attn.qkv")
            src = sa._modules.get("qk_fp8")  # an observed q/k layer after calibration, else the two bf16 ones
            w, bias = ((torch.cat([sa.q.weight, sa.k.weight]), torch.cat([sa.q.bias, sa.k.bias])) if src is None
                       else (src.weight, src.bias))
            qk = Fp8Linear(w, bias, s_qkv, cfg.weight_scaling, observe, cfg.fast_accum)
            sa.q = sa.k = None
            sa.__dict__.pop("qk_weight", None), sa.__dict__.pop("qk_bias", None)
            sa.qk_fp8 = qk
            sa.v = make(sa.v, None, s_qkv)
            sa.o = make(sa.o, p + "self_attn.o")
            ca.q = make(ca.q, p + "cross_attn.q")
            ca.o = make(ca.o, p + "cross_attn.o")
            b.ffn[0] = make(b.ffn[0], p + "ffn.0")
            b.ffn[2] = make(b.ffn[2], p + "ffn.2")
            if cfg.cross_kv:  # one input (the text embedding), one scale
                s_kv = scale(p + "cross_attn.kv")
                ca.k, ca.v = make(ca.k, None, s_kv), make(ca.v, None, s_kv)
            elif isinstance(ca.k, Fp8Linear):  # observed for calibration, kept bf16 now
                ca.k, ca.v = _plain(ca.k), _plain(ca.v)
        for i, b in enumerate(model.blocks):  # blocks observed earlier but kept in bf16: plain layers again
            if i not in blocks and b.self_attn._modules.get("qk_fp8") is not None:
                _restore_bf16(b)
        # the producing kernels: each block's norm3 -> cross q, norm2 -> ffn.0, last norm -> next block's qkv
        qset = set(blocks)
        rowwise = cfg.weight_scaling == "channel"
        for i, b in enumerate(model.blocks):
            b.fp8_rowwise = rowwise
            nxt = model.blocks[i + 1].self_attn._modules.get("qk_fp8") if i + 1 in qset else None
            if i in qset:
                b.fp8_out = (b.cross_attn.q.input_scale, b.ffn[0].input_scale, None if nxt is None else nxt.input_scale)
            else:
                b.fp8_out = (None, None, None if nxt is None else nxt.input_scale)
        first = model.blocks[0].self_attn.qk_fp8 if 0 in qset else None
        model.fp8_in = None if first is None else first.input_scale
        model.fp8_rowwise = rowwise
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return model


def _plain(obs, w=None, b=None) -> nn.Linear:
    """An ``nn.Linear`` sharing an observer's bf16 weight and bias (or ``w``, ``b``): no copies."""
    w, b = (obs.weight, obs.bias) if w is None else (w, b)
    lin = nn.Linear(w.shape[1], w.shape[0], device="meta")
    lin.weight, lin.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
    return lin


def _restore_bf16(block) -> None:
    """An observed block back to ``nn.Linear`` layers sharing the observers' bf16 weights (no copies)."""
    linear = _plain
    sa, ca = block.self_attn, block.cross_attn
    qk = sa._modules.pop("qk_fp8")
    d = qk.out_features // 2
    sa.q, sa.k = linear(None, qk.weight[:d], qk.bias[:d]), linear(None, qk.weight[d:], qk.bias[d:])
    sa.qk_weight, sa.qk_bias = qk.weight.data, qk.bias.data  # fuse_qk's form: q and k are views of these
    sa.v, sa.o, ca.q, ca.o = linear(sa.v), linear(sa.o), linear(ca.q), linear(ca.o)
    block.ffn[0], block.ffn[2] = linear(block.ffn[0]), linear(block.ffn[2])
    if isinstance(ca.k, Fp8Linear):
        ca.k, ca.v = linear(ca.k), linear(ca.v)


def collect_amax(model) -> dict[str, torch.Tensor]:
    """The observed amax per calibrated input (after running an observed model), on the host."""
    out = {}
    for i, b in enumerate(model.blocks):
        sa = b.self_attn
        if sa._modules.get("qk_fp8") is None or not sa.qk_fp8.observe:
            continue
        p = f"blocks.{i}."
        mods = {"self_attn.o": sa.o, "cross_attn.q": b.cross_attn.q, "cross_attn.o": b.cross_attn.o,
                "ffn.0": b.ffn[0], "ffn.2": b.ffn[2]}
        out[p + "self_attn.qkv"] = torch.maximum(sa.qk_fp8.amax, sa.v.amax).reshape(1).float().cpu()
        for k, m in mods.items():
            out[p + k] = m.amax.reshape(1).float().cpu()
        if isinstance(b.cross_attn.k, Fp8Linear):
            out[p + "cross_attn.kv"] = torch.maximum(b.cross_attn.k.amax, b.cross_attn.v.amax).reshape(1).float().cpu()
    return out


# --------------------------------------------------------------------------------------------------
# The calibration file

def scales_path(checkpoint: str | os.PathLike) -> Path:
    """Where the calibration of a checkpoint (file or folder) lives: next to it."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".fp8-scales.safetensors")


def checkpoint_sha256(checkpoint: str | os.PathLike) -> str:
    """sha256 of a checkpoint file (or of the sorted names and hashes of a folder's files), cached by size
    and mtime beside it (``manifest.HashCache``), so a later load costs a ``stat``."""
    from ..manifest import HASH_CACHE_NAME, HashCache, sha256_json

    p = Path(checkpoint)
    cache = HashCache((p.parent if p.is_file() else p) / HASH_CACHE_NAME)
    if p.is_file():
        h = cache.record(p).sha256
    else:
        h = sha256_json({str(f.relative_to(p)): cache.record(f).sha256 for f in sorted(p.rglob("*"))
                         if f.is_file() and f.name != HASH_CACHE_NAME})
    try:
        cache.save()
    except OSError:
        pass  # a read-only checkpoint folder only costs a re-hash next time
    return h


def _content_sha256(amax: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(amax):
        h.update(k.encode() + b"\0" + amax[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_scales(path, amax: dict, checkpoint_hash: str, meta: dict) -> Path:
    """Write the amax file atomically (safetensors; metadata: format, the checkpoint's and its own hash)."""
    from safetensors.torch import save

    from ..video import atomic_write_bytes

    md = {"format": FORMAT, "version": FORMAT_VERSION, "checkpoint_sha256": checkpoint_hash,
          "scales_sha256": _content_sha256(amax), **{k: str(v) for k, v in meta.items()}}
    return atomic_write_bytes(path, save({k: v.reshape(1).float().contiguous() for k, v in amax.items()}, md))


def load_scales(path, checkpoint_hash: str, remake: str) -> dict:
    """Read a calibration file made for the checkpoint with sha256 ``checkpoint_hash``; ``remake`` is the
    command that makes the right one (named in every error)."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"quantization fp8 needs the calibrated activation scales; make them with: {remake}",
                              path=p)
    try:
        with safe_open(str(p), "pt") as f:
            md = f.metadata() or {}
            amax = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the fp8 scales file ({e}); make it again with: {remake}", path=p) from e
    if md.get("format") != FORMAT or md.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"not an fp8 scales file of this version; make it again with: {remake}", path=p,
                              key="metadata.format", expected=f"{FORMAT} v{FORMAT_VERSION}",
                              found=f"{md.get('format')} v{md.get('version')}")
    if md.get("scales_sha256") != _content_sha256(amax):
        raise CheckpointError(f"the fp8 scales file is corrupt (its content hash differs); make it again with: "
                              f"{remake}", path=p, key="metadata.scales_sha256")
    if md.get("checkpoint_sha256") != checkpoint_hash:
        raise CheckpointError(f"the fp8 scales were calibrated for another checkpoint; make them for this one "
                              f"with: {remake}", path=p, key="metadata.checkpoint_sha256",
                              expected=checkpoint_hash, found=md.get("checkpoint_sha256"))
    bad = [k for k, v in amax.items() if not (torch.isfinite(v).all() and (v > 0).all())]
    if bad:
        raise CheckpointError(f"fp8 scales file has a non-positive or non-finite amax; make it again with: {remake}",
                              path=p, key=bad[0])
    return amax


def calibrate_command(profile, kind: str) -> str:
    where = f" --profile {profile.path}" if profile.path is not None else ""
    return f"sdvg-rt calibrate prompts.txt{where} --part {kind}"


def apply_quantization(prof, dev: torch.device, dits: dict, check_device: bool = True) -> None:
    """The profile's ``quantization`` section at load: each DiT marked fp8 is quantized with the scales
    calibrated for its checkpoint (``scales_path``), or a typed error says how to make them.
    ``check_device=False`` for ONNX export (the graph's GPU is the engine builder's)."""
    q = prof.quantization
    for kind, model in dits.items():
        if getattr(q, kind) != "fp8":
            continue
        if check_device and dev.type == "cuda" and not fp8_supported(dev):
            cc = ".".join(map(str, torch.cuda.get_device_capability(dev)))
            raise BackendUnavailableError(
                f"quantization.{kind}: fp8 needs a GPU of compute capability >= 8.9 (this one is {cc}); set "
                f"quantization.{kind}: bf16")
        ck = getattr(prof.checkpoints, kind)
        amax = load_scales(scales_path(ck), checkpoint_sha256(ck), calibrate_command(prof, kind))
        cfg = Fp8Config(q.keep_first, q.keep_last, q.weight_scaling, q.cross_kv, q.fast_accum)
        try:
            quantize_dit(model, amax, cfg)
        except KeyError as e:
            raise CheckpointError(f"the fp8 scales file lacks a layer that quantization.keep_first/keep_last "
                                  f"quantize; make it again with: {calibrate_command(prof, kind)}",
                                  path=scales_path(ck), key=e.args[0]) from None


def calibrate(prof, prompts: list[str], part: str = "target", blocks: int | None = None, device=None,
              log=print) -> Path:
    """Run ``part``'s bf16 DiT over ``prompts`` (every denoising step and commit of the first ``blocks``
    blocks, default all; ``target`` mode for the target, ``draft`` for the drafter), observe every block's
    GEMM inputs, and write their amax next to the checkpoint (``scales_path``). Returns the file."""
    from ..api import Runtime

    if part not in ("target", "drafter"):
        raise ValueError(f"part must be target or drafter, got {part!r}")
    prof = prof.replace(**{f"quantization__{part}": "bf16"})  # calibrate the bf16 model
    ck = getattr(prof.checkpoints, part)
    rt = Runtime.from_profile(prof, device)
    try:
        encoded = rt.encode_prompts(prompts)
        rt.release_text_encoder()
        model = rt.models[part]
        quantize_dit(model, None, Fp8Config(0, 0, cross_kv=True))  # observe everything any setting quantizes
        rt.allocate()
        n = prof.video.num_blocks if blocks is None else max(1, min(blocks, prof.video.num_blocks))
        for i, p in enumerate(encoded):
            for _ in rt.stream(p, mode="target" if part == "target" else "draft", seed=i, max_blocks=n):
                pass
            log(f"  calibrated on prompt {i + 1}/{len(encoded)}: {p.text[:60]!r}")
        amax = collect_amax(model)
    finally:
        rt.close()
    out = save_scales(scales_path(ck), amax, checkpoint_sha256(ck),
                      {"model": model.cfg.name, "part": part, "prompts": len(prompts), "blocks": n,
                       "steps": len(prof.schedule.steps)})
    log(f"fp8 scales of {len(amax)} GEMM inputs written to {out}")
    return out
