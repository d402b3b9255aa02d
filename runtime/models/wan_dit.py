"""Block-causal Wan2.1 DiT (Self-Forcing ``CausalWanModel`` semantics), drafter and target alike.

Module names equal the official Wan2.1 keys (wan-models.md §7), so a checkpoint with the ``model.``
prefix stripped loads strictly. Ordered leaves to root: config, RMSNorm, RoPE, attentions, block,
head, model.

Precision follows Self-Forcing (wan-models.md §2.10): everything in the model dtype (bf16 in
production: modulation, gates, residual stream, LayerNorms), except the RMSNorm statistic (fp32, then
cast), the timestep sinusoid (float64, then cast) and RoPE (tables built in float64; the rotation is
applied in fp32 and cast back: fp32 rounding, ~6e-8 relative, is far below bf16's 4e-3 half-ulp).

Geometry: x ``[1, 16, F, h, w]`` -> ``F*(h/2)*(w/2)`` tokens, frame-major. Batch is always 1.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from ..kv_cache import BlockSlots
from .attention import Attention

# --------------------------------------------------------------------------------------------------
# Config

@dataclass(frozen=True)
class WanDiTConfig:
    name: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_len: int = 1024   # positions per RoPE axis; caps a rollout at 1024 latent frames

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Head dims given to the (t, h, w) axes: d - 4*(d//6), 2*(d//6), 2*(d//6)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def shape_key(self) -> tuple:
        """Every field except the name (what two configs must share to load the same weights)."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "name")

    @classmethod
    def from_name(cls, name: str) -> WanDiTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown WanDiT preset {name!r}; presets: {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, WanDiTConfig] = {
    c.name: c for c in (
        WanDiTConfig("wan2.1-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
        WanDiTConfig("wan2.1-14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
        # Tiny CPU configs for tests; text_dim 64 matches the tiny umT5. Two different sizes so that
        # architecture detection from shapes is exercised.
        WanDiTConfig("tiny", dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=64),
        WanDiTConfig("tiny-target", dim=96, ffn_dim=192, num_heads=3, num_layers=3, text_dim=64),
    )
}


# --------------------------------------------------------------------------------------------------
# Leaves

class WanRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) over the full dim, in fp32, cast back, times the weight. (The attentions
    apply it through their ``kernels``; ``forward`` is the eager definition.)"""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t*w_k), sin(t*w_k)], w_k = 10000^(-k/half), cos first; float64 (cast by the caller)."""
    half = dim // 2
    t64 = t.to(torch.float64)
    w = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = t64[:, None] * w[None, :]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class WanRoPE(nn.Module):
    """3D RoPE tables (t, h, w axes) as non-persistent float64 buffers ``[rope_len, pairs]``.

    Adjacent elements (2i, 2i+1) of a head form a pair; pairs split t/h/w as ``rope_split``/2.
    The tables stay float64 whatever the model is cast to (``_apply`` rebuilds them).
    """

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.split = tuple(s // 2 for s in cfg.rope_split)  # pairs per axis
        self.rope_len = cfg.rope_len
        cos, sin = self._tables(None)  # the default device (meta when built on meta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device):
        per_axis = []
        pos = torch.arange(self.rope_len, dtype=torch.float64, device=device)
        for pairs in self.split:
            d = 2 * pairs
            inv = 1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
            per_axis.append(torch.outer(pos, inv))
        ang = torch.cat(per_axis, dim=1)  # [rope_len, D/2], float64
        return torch.cos(ang), torch.sin(ang)

    def build(self, device) -> None:
        """(Re)compute the tables on ``device`` (after building the model on the meta device)."""
        self.cos, self.sin = self._tables(torch.device(device) if device is not None else None)

    def _apply(self, fn, recurse=True):
        # .to(dtype) would cast the tables and .to_empty() would leave them uninitialised: after any
        # such call, rebuild them in float64 on the device they ended up on (cheap: rope_len x D/2).
        super()._apply(fn, recurse)
        self.build(self.cos.device)
        return self

    def factors(self, frames: int, h: int, w: int, frame_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[frames*h*w, 1, D/2]`` fp32 for frames ``frame_offset..frame_offset+frames-1``."""
        if frame_offset + frames > self.rope_len or h > self.rope_len or w > self.rope_len:
            raise ValueError(
                f"RoPE positions out of range: frames {frame_offset}..{frame_offset + frames - 1}, grid "
                f"{h}x{w}, but the tables hold {self.rope_len} positions per axis; use a shorter video "
                "or a smaller latent grid"
            )
        st, sh, sw = self.split
        out = []
        for table in (self.cos, self.sin):
            t_part, h_part, w_part = table.split([st, sh, sw], dim=1)
            grid = torch.cat([
                t_part[frame_offset:frame_offset + frames, None, None, :].expand(frames, h, w, st),
                h_part[None, :h, None, :].expand(frames, h, w, sh),
                w_part[None, None, :w, :].expand(frames, h, w, sw),
            ], dim=-1)
            out.append(grid.reshape(frames * h * w, 1, -1).to(torch.float32))
        return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x ``[n, H, D]`` by the angles of cos/sin ``[n, 1, D/2]`` (fp32)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


# --------------------------------------------------------------------------------------------------
# Elementwise groups: each is one function so that a model's ``DiTKernels`` can run it as a single kernel
# on the GPU (between the GEMMs and attention, which stay cuBLAS/cuDNN). Eager on CPU; the Triton,
# compiled and eager versions compute the same maths.

def _modulated_ln(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then ``* (1 + scale) + shift`` (norm1 / norm2 of a block, the head)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def _gated_add_modulated_ln(x, y, gate, shift, scale, eps: float):
    """The feed-forward residual ``x + y * gate`` and the next layer's norm1 (or the head's norm) of the
    result in one pass."""
    x = x + y * gate
    return x, _modulated_ln(x, shift, scale, eps)


def _gated_add_ln(x, y, gate, weight, bias, eps: float):
    """Residual ``x + y * gate`` and the affine LayerNorm of the result (norm3) in one pass."""
    x = x + y * gate
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _add_modulated_ln(x, y, shift, scale, eps: float):
    """Residual ``x + y`` and the modulated LayerNorm of the result (norm2) in one pass."""
    x = x + y
    return x, _modulated_ln(x, shift, scale, eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan RMSNorm: statistic in fp32, cast back, then times the weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
               heads: int) -> torch.Tensor:
    """RMSNorm over the full dim, head split, RoPE: ``[n, dim] -> [n, H, D]``."""
    return apply_rope(_rms_norm(x, weight, eps).unflatten(-1, (heads, -1)), cos, sin)


def _qk_to_cache(q, k, wq, wk, eps: float, cos, sin, heads: int, kv_layer, write_start: int, *,
                 norm_rope=_norm_rope):
    """The cached path's q/k epilogue: RMSNorm + RoPE of k written into the layer's key slots
    ``kv_layer[0, write_start:write_start+n]``; returns RMSNorm + RoPE of q. A composition of the
    ``norm_rope`` group (the kernels' own: compiled or eager) and a copy; one Triton kernel on the fast
    path."""
    n = q.shape[0]
    kv_layer[0, write_start:write_start + n].copy_(norm_rope(k, wk, eps, cos, sin, heads))
    return norm_rope(q, wq, eps, cos, sin, heads)


_EAGER = {"modulated_ln": _modulated_ln, "gated_add_ln": _gated_add_ln, "add_modulated_ln": _add_modulated_ln,
          "gated_add_modulated_ln": _gated_add_modulated_ln, "rms_norm": _rms_norm, "norm_rope": _norm_rope,
          "qk_to_cache": _qk_to_cache}
_COMPOSED = {"qk_to_cache"}  # writes into the cache at a host offset: composed of compiled groups instead


def _triton_ops(norm_rope) -> dict:
    """The groups that have a hand-written Triton kernel (``dit_kernels``), same signatures as ``_EAGER``.
    The q/k kernel takes 16-bit model dtypes; other dtypes (an fp32 model) compose ``norm_rope``."""
    from . import dit_kernels as K

    def qk_to_cache(q, k, *args):
        if q.element_size() != 2:
            return _qk_to_cache(q, k, *args, norm_rope=norm_rope)
        return K.qk_to_cache(q, k, *args)

    return {
        "modulated_ln": lambda x, shift, scale, eps: K.residual_ln(x, None, None, None, None, shift, scale, eps)[1],
        "gated_add_ln": lambda x, y, gate, w, b, eps: K.residual_ln(x, y, gate, w, b, None, None, eps),
        "add_modulated_ln": lambda x, y, shift, scale, eps: K.residual_ln(x, y, None, None, None, shift, scale, eps),
        "gated_add_modulated_ln":
            lambda x, y, gate, shift, scale, eps: K.residual_ln(x, y, gate, None, None, shift, scale, eps),
        "qk_to_cache": qk_to_cache,
    }


class DiTKernels:
    """The elementwise groups one DiT runs, fixed at construction (``WanDiT.set_kernels``): ``kernels[name]``
    is the function of group ``name`` (signatures of ``_EAGER``).

    ``DiTKernels()``: the eager functions (the definition: CPU, reference paths, ONNX export); the default
    of every model. ``triton``: the residual/LayerNorm groups and the q/k cache epilogue as the Triton
    kernels of ``dit_kernels`` (where Triton is importable; CUDA tensors, or Triton's CPU interpreter).
    ``compile``: every other group as one ``torch.compile`` kernel; shapes are static per model, so each
    compiles once per model size. The GPU fast path is both (``performance.compile``)."""

    def __init__(self, *, triton: bool = False, compile: bool = False):
        if triton:
            from . import dit_kernels
            triton = dit_kernels.AVAILABLE
        table = dict(_EAGER)
        if compile:
            # Each model size adds a few shapes per group (block tokens, text rows); fused multi-block
            # commits add one per span length. Past dynamo's default of 8 a fullgraph function raises
            # instead of recompiling. (dynamo's own configuration; only ever raised)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            for name, fn in _EAGER.items():
                if name not in _COMPOSED:
                    table[name] = torch.compile(fn, dynamic=False, fullgraph=True)
            table["qk_to_cache"] = functools.partial(_qk_to_cache, norm_rope=table["norm_rope"])
        self.triton, self.compile = triton, compile
        if self.triton:
            table.update(_triton_ops(table["norm_rope"]))
        self.ops: Mapping = MappingProxyType(table)

    @property
    def eager(self) -> bool:
        """Whether every group is its eager definition (what the ONNX export traces)."""
        return not (self.triton or self.compile)

    def __getitem__(self, name: str):
        return self.ops[name]

    def __repr__(self) -> str:
        parts = [p for p, on in (("triton", self.triton), ("compile", self.compile)) if on]
        return f"DiTKernels({'+'.join(parts) or 'eager'})"

    def __deepcopy__(self, memo) -> "DiTKernels":
        return self  # a fixed choice of functions: a copied model runs the same kernels

    def ln(self, name: str, out_scale, rowwise: bool, *args):
        """The residual/LayerNorm group ``name``; fp8 hook: with a static ``out_scale`` (set by
        ``models.fp8.quantize_dit``) its normalised output comes as the next GEMM's fp8 input."""
        if out_scale is None:
            return self.ops[name](*args)
        from . import fp8
        return fp8.residual_ln(name, out_scale, rowwise, self.ops, *args)


_EAGER_KERNELS = DiTKernels()  # every model's default


def _cuda_fast_path(x: torch.Tensor) -> bool:
    """CUDA tensors outside tracing/ONNX export: where the cuBLAS-only forms run (they have no ONNX
    conversion; the plain modules export)."""
    return x.is_cuda and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def _ffn(ffn: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Linear, GELU(tanh), Linear. On the CUDA fast path the GELU runs in the first GEMM's cuBLASLt
    epilogue (bias + tanh-GELU applied to the fp32 accumulator before rounding), which saves a pass over
    the 4x-wide activation; elsewhere the plain modules."""
    if getattr(ffn[0], "fp8", False):  # fp8 hook: a block quantized by models.fp8.quantize_dit
        from . import fp8
        return fp8.ffn(ffn, x)
    if not _cuda_fast_path(x):
        return ffn(x)
    x2 = x.reshape(-1, x.shape[-1])
    h = torch._addmm_activation(ffn[0].bias, x2, ffn[0].weight.t(), use_gelu=True)
    return ffn[2](h).view(*x.shape[:-1], -1)


# --------------------------------------------------------------------------------------------------
# Attentions

class _WanAttentionParams(nn.Module):
    """The parameters both attentions share (official names): q, k, v, o and the q/k RMSNorms (over the
    full dim, before the head split); ``attention`` is the kernel (``WanDiT.set_attention``), ``kernels``
    the elementwise groups (``WanDiT.set_kernels``)."""

    attention = Attention()  # default: SDPA with cuDNN first; an instance attribute once set
    kernels = _EAGER_KERNELS  # default: eager; an instance attribute once set

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)


def _qk_fp8(attn):
    """fp8 hook: the fused q/k ``Fp8Linear`` of a block quantized by ``models.fp8`` (q and k are then None)."""
    return attn._modules.get("qk_fp8")


class WanSelfAttention(_WanAttentionParams):
    """Self-attention over the block's tokens and the KV cache."""

    def fuse_qk(self) -> None:
        """Make the q and k weights and biases views into one [2*dim, dim] / [2*dim] tensor (no extra
        memory), so their projection is one GEMM. Parameter names (checkpoint keys) are unchanged. (v keeps
        its own GEMM: on the cached path it writes straight into the cache slots.)"""
        if _qk_fp8(self) is not None or self._qk_fused():
            return
        with torch.no_grad():
            w = torch.cat([self.q.weight, self.k.weight])
            b = torch.cat([self.q.bias, self.k.bias])
        d = self.q.weight.shape[0]
        for i, lin in enumerate((self.q, self.k)):
            lin.weight = nn.Parameter(w[i * d:(i + 1) * d], requires_grad=False)
            lin.bias = nn.Parameter(b[i * d:(i + 1) * d], requires_grad=False)
        self.qk_weight, self.qk_bias = w, b  # plain attributes: not in the state dict

    def _qk_fused(self) -> bool:
        """Whether the q and k weights and biases are still views of ``qk_weight``/``qk_bias``: a later
        ``load_state_dict(assign=True)`` or ``.to()`` replaces them, and then the two modules are the truth
        (and ``fuse_qk`` fuses them again)."""
        w, b = getattr(self, "qk_weight", None), getattr(self, "qk_bias", None)
        if w is None:
            return False
        d = self.q.weight.shape[0]
        return (self.q.weight.data_ptr() == w.data_ptr() and self.k.weight.data_ptr() == w[d:].data_ptr()
                and self.q.bias.data_ptr() == b.data_ptr() and self.k.bias.data_ptr() == b[d:].data_ptr())

    def project_qk(self, x: torch.Tensor):
        """q, k ``[n, dim]``: one GEMM while ``fuse_qk``'s fused tensors are current, else two."""
        if _qk_fp8(self) is not None:  # fp8 hook
            return self.qk_fp8(x).chunk(2, dim=-1)
        if self._qk_fused():
            return F.linear(x, self.qk_weight, self.qk_bias).chunk(2, dim=-1)
        return self.q(x), self.k(x)

    def forward(self, x, rope, kv_layer=None, write_start=0, read_end=0, mask=None):
        """x [n, dim]. With ``kv_layer`` ([2, S, H, D]) write K/V to [write_start, +n) and attend over
        [:read_end]; without it attend over this x only (reference path)."""
        n = x.shape[0]
        # 1. q/k RMSNorm over the full dim, head split, RoPE at absolute positions; cached: k and v go
        #    straight into this call's cache slots and attention reads the valid prefix (no concat)
        if kv_layer is not None:
            q = self.write_kv(x, rope, kv_layer, write_start)
            k, v = kv_layer[0, :read_end], kv_layer[1, :read_end]
        else:
            q, k = self.project_qk(x)
            q = self.kernels["norm_rope"](q, self.norm_q.weight, self.norm_q.eps, *rope, self.num_heads)
            k = self.kernels["norm_rope"](k, self.norm_k.weight, self.norm_k.eps, *rope, self.num_heads)
            v = self.v(x).view(n, self.num_heads, self.head_dim)
        # 2. attention and output projection
        return self.o(self.attention(q, k, v, mask).reshape(n, -1))

    def write_kv(self, x, rope, kv_layer, write_start):
        """The cache write of ``forward``: RoPE(norm(k)) and v into ``kv_layer[:, write_start:write_start+n]``;
        returns RoPE(norm(q)) ``[n, H, D]``. (Alone: the last layer of a commit, whose output nothing reads.)"""
        n = x.shape[0]
        q, k = self.project_qk(x)
        q = self.kernels["qk_to_cache"](q, k, self.norm_q.weight, self.norm_k.weight, self.norm_q.eps, *rope,
                                        self.num_heads, kv_layer, write_start)
        v_slot = kv_layer[1, write_start:write_start + n]
        if getattr(self.v, "fp8", False) and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            # fp8 hook: the fp8 GEMM writes the value slots too
            self.v(x, out=v_slot.view(n, -1))
        elif _cuda_fast_path(x):
            # the GEMM (bias in its epilogue) writes straight into the contiguous [n, H, D] slot
            torch.addmm(self.v.bias, x, self.v.weight.t(), out=v_slot.view(n, -1))
        else:
            v_slot.copy_(self.v(x).view(n, self.num_heads, self.head_dim))
        return q


class WanCrossAttention(_WanAttentionParams):
    """Text cross-attention; K (after norm_k) and V of the text come precomputed in ``ctx_kv``."""

    def context_kv(self, context: torch.Tensor, out: torch.Tensor) -> None:
        """context [T, dim] (after the text MLP) -> out [2, T, H, D]."""
        T = context.shape[0]
        k = self.kernels["rms_norm"](self.k(context), self.norm_k.weight, self.norm_k.eps)
        out[0].copy_(k.view(T, self.num_heads, self.head_dim))
        out[1].copy_(self.v(context).view(T, self.num_heads, self.head_dim))

    def forward(self, x: torch.Tensor, ctx_kv: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q = self.kernels["rms_norm"](self.q(x), self.norm_q.weight, self.norm_q.eps).view(n, self.num_heads, -1)
        return self.o(self.attention(q, ctx_kv[0], ctx_kv[1]).reshape(n, -1))


# --------------------------------------------------------------------------------------------------
# Block and head

class WanAttentionBlock(nn.Module):
    # fp8 hook (models.fp8.quantize_dit): static scales of the GEMM inputs this block's kernels produce
    # (norm3 -> cross-attention q, norm2 -> FFN, last norm -> next block's q/k/v); None: bf16
    fp8_out = (None, None, None)
    fp8_rowwise = True
    kernels = _EAGER_KERNELS  # the elementwise groups (``WanDiT.set_kernels``)

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        dim = cfg.dim
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)  # before cross-attn
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))

    def modulation_vectors(self, e0: torch.Tensor):
        """Per-frame modulation, six [F, 1, dim] vectors (model dtype, as Self-Forcing): shift, scale and
        gate of the self-attention, then of the feed-forward."""
        return (self.modulation + e0).unsqueeze(2).unbind(1)

    def forward(self, x, h, mod, next_mod, ctx_kv, rope, kv_layer=None, write_start=0, read_end=0, mask=None):
        """x [F, tpf, dim] (one frame per row, so per-frame modulation broadcasts): the residual stream;
        h: its norm1 (LayerNorm without affine, modulated by this layer's ``mod``), which the previous
        layer's last kernel produced. Returns the new residual and, in the same pass, its norm modulated
        by ``next_mod`` (shift, scale of the next layer's norm1 or of the head)."""
        Fr, tpf, dim = x.shape
        _, _, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod
        # 1. self-attention
        y = self.self_attn(h.view(Fr * tpf, dim), rope, kv_layer, write_start, read_end, mask)
        s3, s2, s_next = self.fp8_out
        ln = self.kernels.ln
        x, h = ln("gated_add_ln", s3, self.fp8_rowwise, x, y.view(Fr, tpf, dim), gate_msa, self.norm3.weight,
                   self.norm3.bias, self.norm3.eps)
        # 2. cross-attention on norm3(x) (affine LayerNorm; no modulation, no gate); then norm2 of the
        #    new residual (LayerNorm without affine, modulated) for the feed-forward
        y = self.cross_attn(h.view(Fr * tpf, dim), ctx_kv).view(Fr, tpf, dim)
        x, h = ln("add_modulated_ln", s2, self.fp8_rowwise, x, y, shift_ffn, scale_ffn, self.eps)
        # 3. feed-forward; its residual fused with the next norm
        return ln("gated_add_modulated_ln", s_next, self.fp8_rowwise, x, _ffn(self.ffn, h), gate_ffn, *next_mod,
                  self.eps)


class WanHead(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))

    def modulation_vectors(self, e: torch.Tensor):
        """e [F, dim] (the un-projected time embedding) -> shift, scale [F, 1, dim] of the head's norm."""
        return (self.modulation + e.unsqueeze(1)).unsqueeze(2).unbind(1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: the modulated LayerNorm of the last residual (made by the last layer) -> [F, tpf, 64]."""
        return self.head(h)


# --------------------------------------------------------------------------------------------------
# Model

class WanDiT(nn.Module):
    """Wan2.1 DiT with a block-causal KV-cached step (``forward``) and a reference path (``forward_full``)."""

    fp8_in = None  # fp8 hook: static scale of block 0's q/k/v input when block 0 is quantized
    fp8_rowwise = True
    kernels = _EAGER_KERNELS  # the elementwise groups (``set_kernels``)

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = WanHead(cfg)
        self.rope = WanRoPE(cfg)  # non-persistent buffers only: no state-dict keys

    @property
    def dtype(self) -> torch.dtype:
        return self.head.head.weight.dtype

    def set_attention(self, attention: Attention) -> "WanDiT":
        """The attention kernel of every self- and cross-attention of this model (chosen once, at load)."""
        for block in self.blocks:
            block.self_attn.attention = block.cross_attn.attention = attention
        return self

    @property
    def attention(self) -> Attention:
        return self.blocks[0].self_attn.attention

    def set_kernels(self, kernels: DiTKernels) -> "WanDiT":
        """The elementwise groups of every layer of this model (chosen once, at load; default eager)."""
        self.kernels = kernels
        for block in self.blocks:
            block.kernels = block.self_attn.kernels = block.cross_attn.kernels = kernels
        return self

    def fuse_qk(self) -> "WanDiT":
        """One q/k GEMM per layer (weights become views of one tensor; call after loading)."""
        for block in self.blocks:
            block.self_attn.fuse_qk()
        return self

    # ---- per prompt --------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_context(self, context: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """context ``[1, T, text_dim]`` (padding rows zero) -> ctx_kv ``[L, 2, T, H, D]``.

        Runs the text MLP and every layer's cross-attention k (after norm_k) and v, once per prompt.
        ``out`` may be a preallocated ctx_kv to fill in place.
        """
        cfg = self.cfg
        if context.dim() != 3 or context.shape[0] != 1 or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"context must be [1, T, {cfg.text_dim}] (batch 1, T={cfg.text_len} padded rows), "
                f"found {tuple(context.shape)}")
        T = context.shape[1]
        shape = (cfg.num_layers, 2, T, cfg.num_heads, cfg.head_dim)
        if out is None:
            out = torch.empty(shape, dtype=self.dtype, device=self.head.head.weight.device)
        elif tuple(out.shape) != shape:
            raise ValueError(f"ctx_kv buffer must be {shape}, found {tuple(out.shape)}")
        c = self.text_embedding(context[0].to(self.dtype))
        for i, block in enumerate(self.blocks):
            block.cross_attn.context_kv(c, out[i])
        return out

    # ---- per block step ----------------------------------------------------------------------
    def layers(self, z, e, e0, ctx_kv, rope, kv_layers, write_start=0, read_end=0, mask=None,
               kv_only: bool = False) -> torch.Tensor | None:
        """The transformer layers and the head: z [F, tpf, dim] -> [F, tpf, 64]. ``kv_layers[i]`` is layer
        i's cache (``[2, S, H, D]``) or None (reference path). Each layer's last kernel also makes the next
        layer's (or the head's) normalised input. ``kv_only``: stop once the last layer's K/V are written
        (a commit), return None."""
        mods = [block.modulation_vectors(e0) for block in self.blocks] + [self.head.modulation_vectors(e)]
        h = self.kernels.ln("modulated_ln", self.fp8_in, self.fp8_rowwise, z, mods[0][0], mods[0][1], self.cfg.eps)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if kv_only and i == last:
                block.self_attn.write_kv(h.view(-1, h.shape[-1]), rope, kv_layers[i], write_start)
                return None
            z, h = block(z, h, mods[i], mods[i + 1][:2], ctx_kv[i], rope, kv_layers[i], write_start, read_end,
                         mask)
        return self.head(h)

    def _embed(self, x: torch.Tensor, t: torch.Tensor):
        cfg = self.cfg
        if x.dim() != 5 or x.shape[0] != 1 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"x must be [1, {cfg.in_dim}, F, h, w], found {tuple(x.shape)}")
        if t.shape != (x.shape[2],):
            raise ValueError(f"t must be [F] = [{x.shape[2]}] (one timestep per latent frame), "
                             f"found {tuple(t.shape)}")
        # 1. patch embedding -> tokens [F, tpf, dim], frame-major, row-major over (h, w)
        z = self.patch_embedding(x.to(self.dtype))
        grid = tuple(z.shape[2:])  # (F, h/2, w/2)
        z = z.flatten(3).squeeze(0).permute(1, 2, 0).contiguous()  # [F, tpf, dim]
        # 2. per-frame time embedding: sinusoid in float64, cast, MLP -> e [F, dim], e0 [F, 6, dim]
        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim).to(self.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))
        return z, grid, e, e0

    def _unpatchify(self, out: torch.Tensor, grid) -> torch.Tensor:
        # [F, tpf, 64] -> (F, h2, w2, pt, ph, pw, C) -> (C, F, pt, h2, ph, w2, pw) -> [1, C, F, h, w]
        (Fr, h2, w2), (pt, ph, pw), C = grid, self.cfg.patch_size, self.cfg.out_dim
        out = out.view(Fr, h2, w2, pt, ph, pw, C).permute(6, 0, 3, 1, 4, 2, 5)
        return out.reshape(1, C, Fr * pt, h2 * ph, w2 * pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx_kv: torch.Tensor, kv: torch.Tensor,
                slots: BlockSlots, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One cached block step; returns the flow prediction, same shape as x (``_step``)."""
        return self._step(x, t, ctx_kv, kv, slots, mask)

    def write_kv(self, x: torch.Tensor, t: torch.Tensor, ctx_kv: torch.Tensor, kv: torch.Tensor,
                 slots: BlockSlots, mask: torch.Tensor | None = None) -> None:
        """The commit forward: the cache writes of ``forward`` (every layer's K/V, identical values) without
        the work nothing reads (the last layer after its K/V, the head)."""
        self._step(x, t, ctx_kv, kv, slots, mask, kv_only=True)

    def _step(self, x, t, ctx_kv, kv, slots: BlockSlots, mask=None, kv_only: bool = False):
        """One cached block step.

        x [1, 16, F, h, w] (F frames of one or several consecutive blocks), t [F] float32,
        ctx_kv [L, 2, T, H, D] from ``prepare_context``, kv [L, 2, S, H, D] (``KVCache.kv``), slots from
        ``KVCache.slots``; mask [n, read_end] bool only for multi-block commits (``KVCache.span_mask``).
        Every layer writes its K/V into ``kv[i, :, write_start:write_start+n]`` and attends over
        ``kv[i, :, :read_end]``. Shape checks only (host ints): no sync.
        """
        z, grid, e, e0 = self._embed(x, t)
        n = z.shape[0] * z.shape[1]
        ws, re = slots.write_start, slots.read_end
        if ws + n > kv.shape[2] or re < ws + n:
            raise ValueError(f"slots {slots} do not fit a call of {n} tokens in a cache of {kv.shape[2]}")
        if mask is not None and tuple(mask.shape) != (n, re):
            raise ValueError(f"mask must be [{n}, {re}], found {tuple(mask.shape)}")
        # 3. RoPE factors at absolute frame positions
        rope = self.rope.factors(*grid, frame_offset=slots.frame_offset)
        # 4. blocks, each writing its K/V into its cache slots; head; unpatchify
        out = self.layers(z, e, e0, ctx_kv, rope, kv, ws, re, mask, kv_only)
        return None if kv_only else self._unpatchify(out, grid)

    def forward_full(self, x: torch.Tensor, t: torch.Tensor, ctx_kv: torch.Tensor,
                     mask: torch.Tensor | None = None, frame_offset: int = 0) -> torch.Tensor:
        """Reference path (tests): self-attention over all tokens of x with a boolean [N, N] mask
        (True = may attend; None = full bidirectional attention, the original Wan). No cache."""
        z, grid, e, e0 = self._embed(x, t)
        n = z.shape[0] * z.shape[1]
        if mask is not None and tuple(mask.shape) != (n, n):
            raise ValueError(f"mask must be [{n}, {n}], found {tuple(mask.shape)}")
        rope = self.rope.factors(*grid, frame_offset=frame_offset)
        out = self.layers(z, e, e0, ctx_kv, rope, [None] * len(self.blocks), mask=mask)
        return self._unpatchify(out, grid)
