"""Wan2.1 VAE decoder with an explicit, double-buffered streaming temporal state (wan-models.md §5).

Module names equal the official ``Wan2.1_VAE.pth`` keys (``conv2``, ``decoder.conv1``,
``decoder.middle.{0,1,2}``, ``decoder.upsamples.{0..14}``, ``decoder.head.{0,2}``), so the decoder part of
the official file loads strictly; the encoder is not built.

Streaming. Every causal conv with a temporal kernel of 3 (32 of them at the Wan2.1 size) keeps the last
2 time-slices of its input. Instead of the reference's hidden per-module cache (a list, a counter, a
"Rep" sentinel, one latent per call), the history lives in a ``VAEState``: one preallocated
``[1, C, 2, h_i, w_i]`` tensor per causal conv ("slot"), passed in explicitly. ``decode`` reads the
history from ``state_in``, convolves over ``[history | block]`` along time (a whole block per call, no
per-frame loop) and writes the last 2 input frames into ``state_out`` in place (``copy_``). Because
``state_in`` is only read, a draft can be decoded into a scratch state without touching the committed
one (the committed/scratch pair of ``sdvg_rt.vae_state``), and accepting it is a swap of references.

Why this equals the reference (diffusers ``AutoencoderKLWan._decode``, one latent per call):
- a cached causal conv fed frame by frame, starting from "no cache" (zero padding), computes exactly
  the causal conv over the whole frame sequence with 2 zero frames in front; keeping the last 2 input
  frames per call is therefore the full state, whatever the block size;
- the temporal upsample (``time_conv``) is special on the first chunk: the reference marks it "Rep" and
  skips it, so latent 0 stays 1 frame, and the "Rep" history is zeros, so latent 0's features never
  enter ``time_conv``'s history. ``first=True`` reproduces this: latent 0's frame bypasses
  ``time_conv``, the remaining frames run through it from a zero history (1 + 4 + 4 = 9 frames for a
  3-latent block 0; 4 frames per latent afterwards);
- attention and the spatial resampling are per frame (no temporal state).

The Self-Forcing demo convention (SF ``demo_utils/vae_block3.py``, KREA) starts from an all-zero cache
instead, so latent 0 also goes through ``time_conv`` (4 frames) and the first 3 pixel frames of block 0
are dropped: ``convention="self_forcing"`` (also 9 frames for a 3-latent block 0, but different ones).

Dtype policy (declared once): weights, activations and states in the model dtype; the RMS norms
accumulate the channel norm in fp32 for fp16/bf16 inputs; the latent de-normalisation constants stay fp32
(fp64 for a fp64 model) whatever the weights are cast to (``_apply``).

Layout: ``to_channels_last()`` puts weights, states and activations in channels-last (3D for the causal
convs, 2D per frame for the resample and attention convs), where frames <-> images reshapes are views.

Passes (GPU fast path). A causal conv's input ``[history | x]`` is written by the elementwise group that
produces ``x`` (the ``*_into`` groups store into the frames after the history: one kernel once compiled, no
concatenation copy); ``time_conv``'s bias is added by the kernel that interleaves its two halves into
frames; a residual block's shortcut bias is folded into its last bias add. The spatial 2x (nearest, then
3x3 conv) can run as a sub-pixel convolution (``VAEKernels.subpixel``; on by default for CUDA tensors):
one convolution of the low-resolution frames with the folded taps of the 4 output phases, then one
pixel-shuffle kernel that also adds the bias -- no 4x upsampled tensor. The norm + SiLU groups that feed
the causal convolutions can run as a Triton kernel (``VAEKernels.triton``, ``vae_kernels``), which reads the
padded convolutions' channel slices in place. Which kernels a decoder runs is
its ``VAEKernels`` (``WanVAEDecoder.set_kernels``; default eager), fixed at construction.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..vae_state import VAEState

CACHE_T = 2  # history frames kept per causal conv (temporal kernel 3, causal padding 2)
CONVENTIONS = ("reference", "self_forcing")

# Latent statistics of the Wan2.1 VAE (SF utils/wan_wrapper.py, diffusers AutoencoderKLWan defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


# --------------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class WanVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_upsample: tuple[bool, ...] = (True, True, False)  # per decoder stage (encoder's reversed)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self):
        if len(self.temporal_upsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig: temporal_upsample needs one flag per upsampling stage "
                f"({len(self.dim_mult) - 1}), got {self.temporal_upsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"WanVAEConfig: latents_mean/std need z_dim={self.z_dim} values, got "
                f"{len(self.latents_mean)}/{len(self.latents_std)}"
            )

    @classmethod
    def from_name(cls, name: str) -> WanVAEConfig:
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(VAE_PRESETS)}")
        return VAE_PRESETS[name]

    @property
    def dims(self) -> tuple[int, ...]:
        """Decoder channel widths: conv1/middle, then the output width of each stage (384, 384, 384, 192, 96)."""
        return tuple(self.base_dim * u for u in (self.dim_mult[-1],) + tuple(reversed(self.dim_mult)))

    @property
    def temporal_scale(self) -> int:
        return 2 ** sum(self.temporal_upsample)

    @property
    def spatial_scale(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def frames_out(self, num_latents: int, first: bool, convention: str = "reference") -> int:
        """Pixel frames that ``decode`` returns for a block of ``num_latents`` latents."""
        s = self.temporal_scale
        if first and convention == "reference":
            return 1 + s * (num_latents - 1)
        return s * num_latents - (s - 1 if first else 0)

    def state_slots(self) -> list[tuple[int, int]]:
        """(channels, spatial level) of every causal-conv history slot, in execution order.

        Level l means the slot is at ``(h * 2**l, w * 2**l)`` for an ``h x w`` latent. Order: conv1, the
        middle's 4 convs, per stage 2 per residual block then ``time_conv`` (temporal stages), the head.
        """
        dims = self.dims
        slots = [(self.z_dim, 0)] + [(dims[0], 0)] * 4
        level = 0
        for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
            cin = cin // 2 if i > 0 else cin  # Wan2.1: the previous stage's resample halves the width
            for _ in range(self.num_res_blocks + 1):
                slots += [(cin, level), (cout, level)]
                cin = cout
            if i != len(self.dim_mult) - 1:
                if self.temporal_upsample[i]:
                    slots.append((cout, level))  # time_conv runs before the spatial upsample
                level += 1
        slots.append((dims[-1], level))  # head conv
        return slots

    def state_shapes(self, h: int, w: int) -> list[tuple[int, int, int, int, int]]:
        """Shapes of the ``VAEState`` slots for an ``h x w`` latent (60 x 104 at 832x480)."""
        return [(1, c, CACHE_T, h << lv, w << lv) for c, lv in self.state_slots()]

    def state_nbytes(self, h: int, w: int, dtype: torch.dtype) -> int:
        """Bytes of one ``VAEState`` (1.76 GiB at 60x104 in fp16/bf16 for Wan2.1), before allocating."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(math.prod(s) for s in self.state_shapes(h, w)) * size


VAE_PRESETS: dict[str, WanVAEConfig] = {
    "wan2.1": WanVAEConfig(),
    "tiny": WanVAEConfig(base_dim=8),
}


# --------------------------------------------------------------------------------------------------
# state (sdvg_rt.vae_state.VAEState)


class _Ctx(NamedTuple):
    """What one ``decode`` call threads through the modules."""

    hist: list[torch.Tensor] | None  # state_in slots; None = zero history (start of a video)
    new: list[torch.Tensor]  # state_out slots, written in place
    bypass: bool  # reference block 0: latent 0 skips the temporal upsamples
    mf: torch.memory_format
    kernels: VAEKernels  # the decoder's (``WanVAEDecoder.set_kernels``)


def causal_conv(conv: nn.Conv3d, x: torch.Tensor, slot: int, ctx: _Ctx) -> torch.Tensor:
    """``conv`` over ``[2 history frames | x]`` along time (no temporal padding of its own).

    Writes the last 2 input frames into ``ctx.new[slot]`` (in place). Safe when state_in is state_out:
    the history is copied into the concatenation before the slot is overwritten.
    """
    return _conv(conv, _with_history(x, slot, ctx), bias=True)


def _with_history(x: torch.Tensor, slot: int, ctx: _Ctx) -> torch.Tensor:
    """``[2 history frames | x]`` along time; the last 2 frames become the slot's new history (in place).
    A copy of ``x``: used where ``x`` is not made by an elementwise group (conv1, ``time_conv``); the
    others build the concatenation in their own kernel (``_group_with_history``)."""
    new = ctx.new[slot]
    hist = new.zero_() if ctx.hist is None else ctx.hist[slot]
    xin = torch.cat([hist, x], dim=2)
    new.copy_(xin[:, :, -CACHE_T:])
    return xin


def _group_with_history(name: str, slot: int, ctx: _Ctx, x: torch.Tensor, *args) -> torch.Tensor:
    """``[2 history frames | group(x, *args)]`` for a causal conv, ``group`` = ``ctx.kernels[name]``: its
    ``*_into`` form stores the result straight into the frames after the history of a new buffer (in the
    model's layout); the history (zeros when ``ctx.hist`` is None, i.e. a first block) is copied in front
    (2 frames). Then the last 2 frames become the slot's new history (in place, after the read of the
    history: state_in may be state_out). An output argument rather than ``cat`` inside a compiled group:
    Inductor lowers a ``cat`` of a norm's output to a pointwise concatenation and materialises the norm
    in fp32 first (3x the traffic, measured), but stores straight into a mutated input. While exporting
    ONNX (which cannot store into part of a buffer) it is ``_with_history`` of the group's result."""
    if torch.onnx.is_in_onnx_export():
        return _with_history(ctx.kernels[name](x, *args), slot, ctx)
    b, c, t, h, w = x.shape
    xin = torch.empty((b, c, CACHE_T + t, h, w), dtype=x.dtype, device=x.device, memory_format=ctx.mf)
    if ctx.hist is None:
        xin[:, :, :CACHE_T].zero_()
    else:
        xin[:, :, :CACHE_T].copy_(ctx.hist[slot])
    ctx.kernels[name + "_into"](x, *args, xin[:, :, CACHE_T:])
    ctx.new[slot].copy_(xin[:, :, -CACHE_T:])
    return xin


def _conv(conv: nn.Conv3d, x: torch.Tensor, bias: bool) -> torch.Tensor:
    """The convolution, with or without its bias (without: the caller folds the bias into the next fused
    elementwise kernel; cuDNN's channels-last 3D convolution adds a bias in a separate, slow pass)."""
    return F.conv3d(x, conv.weight, conv.bias if bias else None, conv.stride, conv.padding)


def _to_images(x: torch.Tensor) -> torch.Tensor:
    """[b, c, t, h, w] -> [b*t, c, h, w] (a view for channels-last-3d input, a copy otherwise)."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _to_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    """[b*t, c, h, w] -> [b, c, t, h, w] (a view)."""
    bt, c, h, w = x.shape
    return x.view(b, bt // b, c, h, w).permute(0, 2, 1, 3, 4)


# --------------------------------------------------------------------------------------------------
# modules, leaves to root


def _rms_norm(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    # = F.normalize(x, dim=1) * sqrt(C) * gamma, with the channel norm accumulated in fp32 (at least)
    # but without an fp32 copy of x: the per-position factor is C times smaller than x. For bf16
    # this rounds the factor once instead of each normalised element (same bf16-level error) and
    # needs 3 passes over x instead of about 8.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=acc).clamp_min(1e-12).reciprocal()
    return x * (inv * scale).to(x.dtype) * gamma


def _rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    return F.silu(_rms_norm(x, gamma, scale))


def _bias_rms_norm_silu(x: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """SiLU(norm(x + bias)): the previous convolution's bias folded into the norm's kernel."""
    return _rms_norm_silu(x + bias.view(1, -1, 1, 1, 1), gamma, scale)


def _bias_residual(x: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + bias + h: a residual block's last convolution bias and its residual in one pass."""
    return x + bias.view(1, -1, 1, 1, 1) + h


def _rms_norm_silu_into(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """``out = SiLU(norm(x))``: a causal conv's input frames, stored by the norm's kernel once compiled."""
    out.copy_(_rms_norm_silu(x, gamma, scale))


def _bias_rms_norm_silu_into(x: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, scale: float,
                             out: torch.Tensor) -> None:
    """``out = SiLU(norm(x + bias))`` (the previous convolution's bias folded in)."""
    out.copy_(_bias_rms_norm_silu(x, bias, gamma, scale))


def _bias_interleave(y: torch.Tensor, bias: torch.Tensor, lead: torch.Tensor | None,
                     channels_last: bool) -> torch.Tensor:
    """``time_conv``'s output ``[b, (2, c), t, h, w]`` without its bias -> frames ``[b, c, 2t, h, w]``
    (frame 2i + s is half s of time step i), bias added, ``lead`` (a frame that bypasses ``time_conv``)
    in front: one kernel once compiled (eagerly: bias add, one copy, and the concatenation if ``lead``)."""
    b, c2, t, h, w = y.shape
    c = c2 // 2
    y = y + bias.view(1, -1, 1, 1, 1)
    if channels_last:  # physical [b, t, h, w, (2, c)] -> [b, (t, 2), h, w, c]
        y = y.permute(0, 2, 3, 4, 1).unflatten(-1, (2, c)).permute(0, 1, 4, 2, 3, 5)
        y = y.reshape(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3)
    else:
        y = y.unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
    return y if lead is None else torch.cat([lead, y], dim=2)


def _bias_pixel_shuffle(y: torch.Tensor, bias: torch.Tensor, shift: bool, channels_last: bool) -> torch.Tensor:
    """The sub-pixel convolution's output ``[n, (2, 2, c), h + shift, w + shift]`` plus ``bias``, in pixel
    order: ``[n, i, a, j, b, k]`` (channels-last) or ``[n, k, i, a, j, b]``, contiguous, so that
    ``_phases_to_images`` makes it ``[n, c, 2h, 2w]`` images with views. Output pixel ``(2i + a, 2j + b)``
    of channel ``k`` is channel ``(2a + b) * c + k`` at ``(i + shift * a, j + shift * b)`` (``shift``: the
    2x2 form, whose phase-1 windows start one row/column later). One kernel once compiled (eagerly: one
    copy and the bias add). The 2D views stay outside (Inductor's dynamic shapes fail on them, torch
    2.13); the ONNX exporter has no ``as_strided``, so it gets an equivalent gather (a stack of the 4
    windows would cost Inductor an extra pass, and its gather with dynamic sizes is 15x slower)."""
    n, c4, hp, wp = y.shape
    shift = int(shift)  # a bool: a constant for torch.compile (an int argument would be symbolic)
    c, h, w = c4 // 4, hp - shift, wp - shift
    z = y.permute(0, 2, 3, 1).unflatten(-1, (2, 2, c))  # [n, i', j', a, b, k] (a view of y, any layout)
    if not shift:
        z = z.permute(0, 1, 3, 2, 4, 5)  # [n, i, a, j, b, k]
    elif not torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export():  # no as_strided in ONNX
        ph = torch.arange(2, device=y.device)
        rows = torch.arange(h, device=y.device).view(h, 1, 1, 1) + ph.view(1, 2, 1, 1)
        cols = torch.arange(w, device=y.device).view(1, 1, w, 1) + ph.view(1, 1, 1, 2)
        z = z[:, rows, cols, ph.view(1, 2, 1, 1), ph.view(1, 1, 1, 2)]  # [n, i, a, j, b, k]
    else:  # phase (a, b) at (i + a, j + b): one strided view (an affine load once compiled)
        sn, sh, sw, sa, sb, sk = z.stride()
        z = z.as_strided((n, h, 2, w, 2, c), (sn, sh, sh + sa, sw, sw + sb, sk))
    if channels_last:
        return z.contiguous() + bias
    return z.permute(0, 5, 1, 2, 3, 4).contiguous() + bias.view(-1, 1, 1, 1, 1)


def _phases_to_images(z: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``_bias_pixel_shuffle``'s result -> images ``[n, c, 2h, 2w]`` (views; channels-last or contiguous)."""
    if channels_last:
        return z.flatten(3, 4).flatten(1, 2).permute(0, 3, 1, 2)
    return z.flatten(4, 5).flatten(2, 3)


_EAGER = {"rms_norm": _rms_norm, "rms_norm_silu": _rms_norm_silu, "bias_rms_norm_silu": _bias_rms_norm_silu,
          "bias_residual": _bias_residual, "rms_norm_silu_into": _rms_norm_silu_into,
          "bias_rms_norm_silu_into": _bias_rms_norm_silu_into, "bias_interleave": _bias_interleave,
          "bias_pixel_shuffle": _bias_pixel_shuffle}
SUBPIXEL_MODES = ("auto", "off", "3x3", "2x2")
PAD_MODES = ("auto", "off", "on")
# cuDNN's channels-last 3D convolutions with 96 outputs (the last stage, 12 x 480 x 832) run a 64-wide
# output tile twice: 6.39 ms, 373 TFLOP/s; with 128 outputs, 32 of them zero weights never read: 5.16 ms
# (H100, bf16; 192 -> 256 was slower, 4.07 vs 4.40 ms)
PADDED_OUTPUTS = {96: 128}


def _triton_ops(table: Mapping[str, Callable]) -> dict:
    """The groups with a Triton kernel (``vae_kernels.norm_silu_into``), same signatures as ``_EAGER``; tensors
    the kernel does not take (``vae_kernels.fits``) go to ``table``'s group."""
    from . import vae_kernels as K

    plain, biased = table["rms_norm_silu_into"], table["bias_rms_norm_silu_into"]

    def rms_norm_silu_into(x, gamma, scale, out):
        if not K.fits(x, out, gamma):
            return plain(x, gamma, scale, out)
        K.norm_silu_into(x, None, gamma, scale, out)

    def bias_rms_norm_silu_into(x, bias, gamma, scale, out):
        if not K.fits(x, out, gamma, bias):
            return biased(x, bias, gamma, scale, out)
        K.norm_silu_into(x, bias, gamma, scale, out)

    return {"rms_norm_silu_into": rms_norm_silu_into, "bias_rms_norm_silu_into": bias_rms_norm_silu_into}


class VAEKernels:
    """How one VAE decoder computes, fixed at construction (``WanVAEDecoder.set_kernels``; the default,
    ``VAEKernels()``, is eager with both modes "auto"). Every choice computes the same function.

    - ``compile``: each elementwise group (each norm (+SiLU), the bias folds, the interleave, the pixel
      shuffle) as one ``torch.compile`` kernel (GPU fast path). The activations are the largest tensors of
      the pipeline (up to 12 frames x 96 x 480 x 832), so each pass saved is worth about a millisecond.
      Compiled with dynamic shapes: the decoder meets about twenty (channels, frames, height, width)
      combinations, more than dynamo's recompile limit.
    - ``subpixel``: how ``Resample`` computes nearest 2x + 3x3 conv. ``"off"``: as written
      (``nn.Upsample`` then the conv on the 4x larger frames); ``"3x3"``: sub-pixel, one 3x3 conv
      (padding 1) of the low-resolution frames with ``4 * Cout`` outputs (the folded taps of the 4 output
      phases), then one pixel-shuffle + bias kernel; ``"2x2"``: the same with each phase's 2x2 non-zero
      taps only, a 2x2 conv (padding 1, output ``(h+1) x (w+1)``) whose phase (a, b) is read at offset
      (a, b) -- 4/9 of the 3x3 form's FLOPs; ``"auto"``: ``"2x2"`` for CUDA tensors (the fastest on the
      GPU, docs/PERFORMANCE.md), ``"off"`` elsewhere.
    - ``pad``: whether the residual blocks' convolutions with ``PADDED_OUTPUTS`` widths compute padded
      outputs (zero weights, sliced off): ``"auto"`` on CUDA tensors, ``"on"``, ``"off"``.
    - ``triton``: the norm + SiLU groups that feed the causal convolutions (``*rms_norm_silu_into``) as the
      Triton kernel of ``vae_kernels`` (where Triton is importable), for row-dense channels-last tensors on
      a GPU (or under Triton's interpreter); other tensors take the eager or compiled group.
    - ``ops``: replacements for some groups (name -> a function with the eager group's signature), e.g.
      a probe's variants; applied over the eager, compiled and Triton table.
    """

    def __init__(self, *, compile: bool = False, triton: bool = False, subpixel: str = "auto", pad: str = "auto",
                 ops: Mapping[str, Callable] | None = None):
        if subpixel not in SUBPIXEL_MODES:
            raise ValueError(f"unknown sub-pixel upsample mode {subpixel!r}; choose one of {SUBPIXEL_MODES}")
        if pad not in PAD_MODES:
            raise ValueError(f"unknown output padding mode {pad!r}; choose one of {PAD_MODES}")
        unknown = sorted(set(ops or {}) - set(_EAGER))
        if unknown:
            raise ValueError(f"VAEKernels: no elementwise group named {unknown}; the groups are {sorted(_EAGER)}")
        if compile:
            # Inductor's value-range analysis of the dynamic shapes logs harmless warnings (an unsupported
            # pow_by_natural range) while compiling; nothing a user can act on
            logging.getLogger("torch.utils._sympy.interp").setLevel(logging.ERROR)
        table = {name: torch.compile(fn, dynamic=True, fullgraph=True) if compile else fn
                 for name, fn in _EAGER.items()}
        if triton:
            from . import vae_kernels
            triton = vae_kernels.AVAILABLE
        if triton:
            table.update(_triton_ops(table))
        table.update(ops or {})
        self.compile, self.triton, self.subpixel, self.pad = compile, triton, subpixel, pad
        self.replaced = frozenset(ops or ())
        self.ops: Mapping[str, Callable] = MappingProxyType(table)

    @property
    def eager(self) -> bool:
        """Whether every group is its eager definition (what the ONNX export traces)."""
        return all(self.ops[name] is fn for name, fn in _EAGER.items())

    def __getitem__(self, name: str):
        return self.ops[name]

    def __repr__(self) -> str:
        ops = f", ops={sorted(self.replaced)}" if self.replaced else ""
        return (f"VAEKernels(compile={self.compile}, triton={self.triton}, subpixel={self.subpixel!r}, "
                f"pad={self.pad!r}{ops})")

    def subpixel_mode(self, x: torch.Tensor) -> str:
        """The sub-pixel form for frames ``x`` ("auto" resolved by the tensor's device; host-side only)."""
        return ("2x2" if x.is_cuda else "off") if self.subpixel == "auto" else self.subpixel

    def pads(self, x: torch.Tensor) -> bool:
        """Whether convolutions of ``x`` with ``PADDED_OUTPUTS`` widths compute padded outputs."""
        return self.pad == "on" or (self.pad == "auto" and x.is_cuda)


def _derived_weight(owner: nn.Module, w: torch.Tensor, extra: tuple, make) -> torch.Tensor:
    """``make(w)`` cached on ``owner`` per (weight storage and version, dtype, device, shape, ``extra``):
    loading other weights in place or casting the module derives it again."""
    try:
        version = w._version
    except RuntimeError:  # an inference-mode tensor has no version counter: derive every call
        version = None
    key = (w.data_ptr(), version, w.dtype, w.device, tuple(w.shape), extra)
    cache = owner.__dict__.setdefault("_derived", {})
    hit = cache.get(extra)
    if hit is None or version is None or hit[0] != key:
        hit = cache[extra] = (key, w.detach(), make(w.detach()))  # the source kept alive: its address stays unique
    return hit[2]


def _conv_padded(conv: nn.Conv3d, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """``_conv(conv, x, bias=False)``, computed with ``PADDED_OUTPUTS`` outputs where that applies and the
    decoder's kernels say so (the result is a channel slice of the wider output)."""
    n = PADDED_OUTPUTS.get(conv.out_channels)
    if n is None or not ctx.kernels.pads(x):
        return _conv(conv, x, bias=False)
    mf = ctx.mf

    def pad(w):
        p = torch.cat([w, w.new_zeros(n - w.shape[0], *w.shape[1:])])
        return p.contiguous(memory_format=mf)

    w = _derived_weight(conv, conv.weight, ("pad", n, mf), pad)
    return F.conv3d(x, w, None, conv.stride, conv.padding)[:, :conv.out_channels]


def subpixel_weight(weight: torch.Tensor, mode: str = "3x3") -> torch.Tensor:
    """Fold a 3x3 conv that follows a nearest 2x upsample into a conv of the low-resolution input.

    Output row ``2i + a`` (phase ``a``) reads upsampled rows ``2i + a + k - 1`` (tap ``k``), i.e. input
    row ``i + (a + k - 1) // 2``: phase 0 puts tap 0 on offset -1 and taps 1, 2 on offset 0; phase 1 puts
    taps 0, 1 on offset 0 and tap 2 on offset +1 (the same along columns; the zero padding of the
    upsampled frame is the zero padding of the input). Returns ``[(2, 2, Cout), Cin, 3, 3]`` (taps on
    offsets -1..1) for ``"3x3"``, ``[(2, 2, Cout), Cin, 2, 2]`` (phase a's offsets ``a-1, a``) for
    ``"2x2"``; summed in fp32 (fp64 for fp64 weights), then cast to the weight's dtype."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    fold = torch.zeros(2, 3, 3, dtype=acc, device=weight.device)  # [phase, low-res offset + 1, tap]
    for a, k in itertools.product(range(2), range(3)):
        fold[a, (a + k - 1) // 2 + 1, k] = 1
    taps = torch.einsum("amk,bnl,oikl->aboimn", fold, fold, weight.to(acc))  # [a, b, Cout, Cin, 3, 3]
    if mode == "2x2":
        taps = torch.stack([torch.stack([taps[a, b, :, :, a:a + 2, b:b + 2] for b in range(2)]) for a in range(2)])
    elif mode != "3x3":
        raise ValueError(f"subpixel_weight: mode {mode!r} is not '3x3' or '2x2'")
    return taps.flatten(0, 2).to(weight.dtype)


def _static_channels(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mark the channel count of a compiled group's input static (one graph per width, like the groups
    whose width comes from a parameter): with it symbolic, every element's index needs divisions by
    runtime sizes, which made the pixel shuffle 6x slower than a copy on the H100. Eagerly a no-op."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static(t, dim)
    return t


class RMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalise over channels, times sqrt(C) and ``gamma`` (no bias)."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.gamma, self.scale)  # the eager definition (the decoder applies its kernels')


class ResidualBlock(nn.Module):
    """``residual`` = RMS_norm, SiLU, CausalConv3d k3, RMS_norm, SiLU, Dropout, CausalConv3d k3 (indices
    0..6 as in the official file; only 0, 2, 3, 6 have parameters); ``shortcut`` is a 1x1x1 conv when
    the width changes. Uses history slots ``slot`` and ``slot + 1``."""

    def __init__(self, in_dim: int, out_dim: int, slot: int):
        super().__init__()
        self.slot = slot
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            nn.Conv3d(in_dim, out_dim, 3, padding=(0, 1, 1)),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Identity(),  # Dropout(0.0) at inference
            nn.Conv3d(out_dim, out_dim, 3, padding=(0, 1, 1)),
        )
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        r = self.residual
        # the shortcut's bias joins the last conv's (added once, in step 3)
        if self.shortcut is None:
            h, bias = x, r[6].bias
        else:
            h, bias = _conv(self.shortcut, x, bias=False), _static_channels(r[6].bias + self.shortcut.bias, 0)
        # 1. norm, SiLU into [history | .], causal conv (its bias is added inside the next norm's kernel)
        x = _conv_padded(r[2], _group_with_history("rms_norm_silu", self.slot, ctx, x, r[0].gamma, r[0].scale),
                         ctx)
        # 2. bias, norm, SiLU, (dropout) into [history | .], causal conv
        x = _group_with_history("bias_rms_norm_silu", self.slot + 1, ctx, x, r[2].bias, r[3].gamma, r[3].scale)
        x = _conv_padded(r[6], x, ctx)
        # 3. biases and residual in one pass
        return ctx.kernels["bias_residual"](x, bias, h)


class AttentionBlock(nn.Module):
    """Per-frame single-head spatial self-attention: RMS_norm, 1x1 conv to q/k/v, SDPA, 1x1 proj.

    SDPA is called directly rather than through ``models.attention``: this is one head of width C (384)
    over the h*w positions of each frame, a shape the DiT's backend choice (e.g. cuDNN only) may not
    support; SDPA picks a kernel that can run it.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        b, c, t, h, w = x.shape
        identity = x
        # 1. frames as images, norm, q/k/v: [b*t, 1, h*w, c] each
        y = ctx.kernels["rms_norm"](_to_images(x), self.norm.gamma, self.norm.scale)
        qkv = self.to_qkv(y).reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)  # (channels-last: qkv is already contiguous, no copy)
        # 2. attention over the h*w positions of each frame
        y = F.scaled_dot_product_attention(q, k, v)
        # 3. back to images, projection, residual
        y = self.proj(y[:, 0].permute(0, 2, 1).reshape(b * t, c, h, w))  # not squeeze(1): no If in ONNX
        return _to_frames(y, b).add_(identity)


class Resample(nn.Module):
    """Wan's upsample3d (``time_conv`` 2x in time, then 2x nearest + 3x3 conv per frame) or upsample2d
    (no ``time_conv``). ``resample.1`` halves the width. The spatial part runs as a sub-pixel
    convolution when the decoder's ``VAEKernels.subpixel`` says so (folded weights cached, parameters
    unchanged)."""

    def __init__(self, dim: int, temporal: bool, slot: int | None):
        super().__init__()
        self.slot = slot
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
            nn.Conv2d(dim, dim // 2, 3, padding=1),
        )
        self.time_conv = nn.Conv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def _subpixel_weight(self, mode: str, mf: torch.memory_format) -> torch.Tensor:
        """``subpixel_weight`` of the conv, folded once per (weight tensor and version, mode, layout)."""

        def fold(w):
            k = subpixel_weight(w, mode)
            return k.contiguous(memory_format=torch.channels_last) if mf == torch.channels_last_3d else k

        return _derived_weight(self, self.resample[1].weight, ("subpixel", mode, mf), fold)

    def forward(self, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        b = x.shape[0]
        cl = ctx.mf == torch.channels_last_3d
        if self.time_conv is not None:
            # 1. temporal 2x: causal conv to 2C, the two halves become consecutive frames (bias added in
            #    the same kernel). On the reference block 0 the first frame (latent 0's) passes through
            #    unchanged, placed in front by that kernel too.
            lead = x[:, :, :1] if ctx.bypass else None
            xs = x[:, :, 1:] if ctx.bypass else x
            if xs.shape[2] == 0:  # a 1-latent block 0: nothing to upsample in time; history stays zero
                ctx.new[self.slot].zero_()
            else:
                y = _static_channels(_conv(self.time_conv, _with_history(xs, self.slot, ctx), bias=False))
                x = ctx.kernels["bias_interleave"](y, self.time_conv.bias, lead, cl)
        # 2. spatial 2x nearest and 3x3 conv, per frame
        images = _to_images(x)
        mode = ctx.kernels.subpixel_mode(images)
        if mode == "off":
            return _to_frames(self.resample(images), b)
        conv = self.resample[1]
        y = _static_channels(F.conv2d(images, self._subpixel_weight(mode, ctx.mf), None, 1, 1))
        shuffled = ctx.kernels["bias_pixel_shuffle"](y, conv.bias, mode == "2x2", cl)
        return _to_frames(_phases_to_images(shuffled, cl), b)


class Decoder3d(nn.Module):
    """conv1, middle (res, attention, res), upsamples (stages of res blocks and a resample), head."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims, nrb = cfg.dims, cfg.num_res_blocks
        self.conv1 = nn.Conv3d(cfg.z_dim, dims[0], 3, padding=(0, 1, 1))
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], slot=1), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0], slot=3)
        )
        ups, slot = [], 5
        for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
            cin = cin // 2 if i > 0 else cin
            for _ in range(nrb + 1):
                ups.append(ResidualBlock(cin, cout, slot))
                slot, cin = slot + 2, cout
            if i != len(cfg.dim_mult) - 1:
                temporal = cfg.temporal_upsample[i]
                ups.append(Resample(cout, temporal, slot if temporal else None))
                slot += int(temporal)
        self.upsamples = nn.Sequential(*ups)
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), nn.Conv3d(dims[-1], 3, 3, padding=(0, 1, 1))
        )
        self.head_slot = slot
        assert slot + 1 == len(cfg.state_slots()), "slot numbering out of step with WanVAEConfig.state_slots"

    def forward(self, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        # 1. conv1 (latent resolution)
        x = causal_conv(self.conv1, x, 0, ctx)
        # 2. middle: residual, per-frame attention, residual
        x = self.middle[0](x, ctx)
        x = self.middle[1](x, ctx)
        x = self.middle[2](x, ctx)
        # 3. upsampling stages
        for layer in self.upsamples:
            x = layer(x, ctx)
        # 4. head: norm, SiLU into [history | .], causal conv to RGB
        x = _group_with_history("rms_norm_silu", self.head_slot, ctx, x, self.head[0].gamma, self.head[0].scale)
        return _conv(self.head[2], x, bias=True)


class WanVAEDecoder(nn.Module):
    """``conv2`` (the post-quant 1x1x1 conv) and ``decoder``; streaming state passed explicitly; ``kernels``:
    how it computes (``set_kernels``)."""

    kernels = VAEKernels()  # default: eager, "auto" modes; an instance attribute once set

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        self.config = config
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        self.memory_format = torch.contiguous_format
        self._init_buffers(torch.device("cpu"))

    # ---- dtype policy and layout

    def _init_buffers(self, device: torch.device) -> None:
        # De-normalisation constants: fp32 (fp64 for a fp64 model), never rounded to bf16.
        dt = torch.float64 if self.conv2.weight.dtype == torch.float64 else torch.float32
        shape = (1, self.config.z_dim, 1, 1, 1)
        for name, vals in (("latents_mean", self.config.latents_mean), ("latents_std", self.config.latents_std)):
            self.register_buffer(name, torch.tensor(vals, dtype=dt, device=device).view(shape), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._init_buffers(self.latents_mean.device)
        return self

    def to_channels_last(self) -> WanVAEDecoder:
        """Channels-last weights (3D and 2D), states and activations: the fast cuDNN layout for bf16."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last_3d
        return self

    def set_kernels(self, kernels: VAEKernels) -> WanVAEDecoder:
        """The kernels and modes this decoder computes with (chosen once, at load; default eager)."""
        self.kernels = kernels
        return self

    # ---- state

    def new_state(self, h: int, w: int, dtype: torch.dtype | None = None, device=None) -> VAEState:
        """Preallocate (zeros) the history of every causal conv for an ``h x w`` latent."""
        return VAEState.zeros(self.config.state_shapes(h, w), dtype or self.conv2.weight.dtype,
                              device or self.conv2.weight.device, self.memory_format)

    # ---- decode

    @torch.no_grad()
    def decode(self, z: torch.Tensor, state_in: VAEState | None, state_out: VAEState, first: bool,
               convention: str = "reference") -> torch.Tensor:
        """Decode one block. z ``[1, 16, F, h, w]`` normalised latents -> frames ``[1, 3, F_out, 8h, 8w]``
        in [-1, 1] (``F_out = config.frames_out(F, first, convention)``).

        ``first=True`` starts a video: zero history (``state_in`` is not read and may be None); with the
        reference convention latent 0 bypasses the temporal upsamples. Otherwise the history comes from
        ``state_in``. The new history always goes to ``state_out`` (in place; it may be ``state_in``).
        No host sync; shapes depend only on (F, h, w, first, convention).
        """
        # 0. host-side shape checks (no sync)
        cfg = self.config
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown VAE convention {convention!r}; choose one of {CONVENTIONS}")
        if z.dim() != 5 or z.shape[0] != 1 or z.shape[1] != cfg.z_dim:
            raise ValueError(f"VAE decode expects z of shape [1, {cfg.z_dim}, F, h, w], got {tuple(z.shape)}")
        want = cfg.state_shapes(z.shape[3], z.shape[4])
        for st in (state_out,) if first else (state_in, state_out):
            if st is None or [tuple(t.shape) for t in st.slots] != want:
                raise ValueError(
                    f"VAE state does not fit a {z.shape[3]}x{z.shape[4]} latent: allocate it with "
                    f"new_state({z.shape[3]}, {z.shape[4]})"
                )
        ctx = _Ctx(
            hist=None if first else state_in.slots,
            new=state_out.slots,
            bypass=first and convention == "reference",
            mf=self.memory_format,
            kernels=self.kernels,
        )
        # 1. de-normalise (z * std + mean) in fp32, then model dtype and layout
        x = z.to(self.latents_std.dtype) * self.latents_std + self.latents_mean
        x = x.to(dtype=self.conv2.weight.dtype).contiguous(memory_format=self.memory_format)
        # 2. post-quant conv (1x1x1, no temporal state)
        x = self.conv2(x)
        # 3. decoder: causal convs over [history | block]
        x = self.decoder(x, ctx)
        # 4. clamp to [-1, 1]; the Self-Forcing convention drops block 0's leading frames
        x = x.clamp_(-1.0, 1.0)
        if first and convention == "self_forcing":
            x = x[:, :, cfg.temporal_scale - 1:]
        return x

    def forward(self, z: torch.Tensor, *history: torch.Tensor, first: bool = False):
        """Functional form ``(z, *history) -> (frames, *new_history)`` (the export wraps ``decode`` in its own
        graphs, ``export/onnx_export.py``)."""
        new = VAEState([torch.empty_like(t) for t in history])
        frames = self.decode(z, None if first else VAEState(list(history)), new, first)
        return (frames, *new.slots)
