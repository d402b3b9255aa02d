"""ONNX export of the engine graphs, from the same modules the torch backend runs.

Graphs (I/O in ``sdvg_rt.io_spec``): ``<dit>.step`` and ``<dit>.context`` for the drafter and the
target, ``vae.first`` and ``vae.step``, ``scorer``. Each graph module below only rearranges I/O
around the runtime's own modules; the maths is theirs:

- ``DiTStepGraph`` runs ``WanDiT._embed``, every ``WanAttentionBlock.forward`` (so the real
  ``WanSelfAttention.forward``, norms, RoPE and ``attention``), the head and ``_unpatchify``. Only the
  cache storage is replaced: ``_CacheSegments`` stands in for ``kv[i]`` and turns the model's own
  "write K/V into the slots, read the valid prefix" into "output the new K/V, attend over
  concat(head, new, tail)" (the zero-copy KV contract of io_spec). RoPE factors are inputs, so one
  engine serves every block position (the model computes them from a Python int).
- ``DiTContextGraph`` is ``WanDiT.prepare_context``.
- ``VAEFirstGraph`` / ``VAEStepGraph`` are ``WanVAEDecoder.decode`` with the history slots as I/O.
- ``ScorerGraph`` is ``quantise_frames`` + the antialiased bicubic resize and centre crop of
  ``preprocess`` written as two constant matrix products + ``ImageReward.forward``. The matrices are
  torch's own ``interpolate(mode="bicubic", antialias=True)`` applied to the identity (the resize is
  linear and separable, so this is the same operator). Why not ONNX ``Resize(antialias=1)``: TensorRT's
  resize layer has no antialias option, and bf16 would quantise the uint8 levels (8 mantissa bits),
  so the whole preprocessing runs in fp32 in the graph.

Exporter and opset (tried here, torch 2.13, onnx 1.23, onnxruntime 1.31):
- TorchScript exporter (``dynamo=False``) at opset 20, its newest, then ``onnx.version_converter``
  to opset 22. The dynamo exporter also produced correct graphs for all parts, but took 7-20 s per
  tiny graph (decompositions) against 0.5-5 s, and needs no symbolic help; TorchScript needs two
  small symbolics registered during export (``aten::_upsample_nearest_exact2d`` -> ``Resize``
  nearest, half_pixel, round_prefer_ceil, which is exactly nearest-exact; ``aten::copy`` from the VAE's
  in-place history writes -> ``Expand``). Both exporters handle the zero-length past of block 0.
- Opset 22 because a strongly typed bf16 graph needs bf16 ``Conv`` (patch embedding, VAE, ViT),
  ``Cos``/``Sin``: opsets before 22 do not allow bf16 for them and ``onnx.checker`` rejects such graphs.
  TensorRT 10.x parses opset 22 (11.x up to 25); ONNX Runtime 1.31 runs it.
- float64 -> float32: the DiT's timestep sinusoid is float64 in torch; TensorRT has no FP64, so every
  double in the graph becomes float (t <= 1000: the argument error is ~6e-5 rad, far below bf16).
- Weights above 2 GB go to one external data file ``<name>.onnx.data`` with every initializer in
  ``raw_data`` (typed ``*_data`` fields are converted first: the external-data writer skips them).

Strong typing: the exported module is already in the graph dtype (``.to(bfloat16)`` by the loader),
so weights and activations are bf16 in the graph, and the fp32 islands of the model (RMSNorm
statistic, RoPE rotation, the VAE's norms and de-normalisation, the scorer's preprocessing) appear as
explicit Casts. No builder precision flag is needed (TensorRT 11 has none).
ONNX Runtime's CPU provider lacks bf16 kernels for most of these ops, so numerical parity is checked
on fp32 exports of the same graph modules (tests/test_export_onnx.py); bf16 graphs are checked with
``onnx.checker`` (full) and strict shape inference only.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdvg_rt.io_spec import EngineIO

EXPORTER = "torchscript"
EXPORT_OPSET = 20          # TorchScript exporter's newest opset
OPSET = 22                 # the graphs' opset after conversion (bf16 Conv/Cos/Sin)
EXTERNAL_DATA_BYTES = 1 << 31


# --------------------------------------------------------------------------------------------------
# DiT

class _CacheSegments:
    """Stands in for one layer's cache ``kv[i]`` ([2, S, H, D]) inside ``WanSelfAttention.forward``.

    The model writes ``kv_layer[j, ws:ws+n].copy_(k_or_v)`` and reads ``kv_layer[j, :read_end]``. Here
    the write records the new tensor (a graph output) and the read returns ``cat(head, new, tail)``:
    the same keys and values the cached torch path attends over (order does not matter; no mask).
    Any other access pattern fails loudly, so a change in the model cannot silently export wrong.
    """

    def __init__(self, head: tuple[torch.Tensor, torch.Tensor], tail: tuple[torch.Tensor, torch.Tensor]):
        self.head, self.tail = head, tail
        self.new: list[torch.Tensor | None] = [None, None]

    def __getitem__(self, idx):
        if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] in (0, 1) and isinstance(idx[1], slice)):
            raise TypeError(f"export: unexpected KV cache access kv_layer[{idx!r}]; update _CacheSegments")
        j, sl = idx
        if sl.start is not None:           # write slots [ws, ws + n)
            return _SlotWriter(self, j)
        if self.new[j] is None:            # read [:read_end] before this call's own K/V were written
            raise RuntimeError("export: the model read the KV cache before writing this block's K/V")
        return torch.cat([self.head[j], self.new[j], self.tail[j]], dim=0)


class _SlotWriter:
    def __init__(self, segs: _CacheSegments, j: int):
        self.segs, self.j = segs, j

    def copy_(self, src: torch.Tensor) -> torch.Tensor:
        self.segs.new[self.j] = src
        return src


class DiTStepGraph(nn.Module):
    """``(x, t, rope_cos, rope_sin, ctx_kv, *past) -> (flow, *new_kv)``; past per layer i is
    ``k_head.i, v_head.i, k_tail.i, v_tail.i`` and new_kv ``k_new.i, v_new.i`` (io_spec order)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, rope_cos, rope_sin, ctx_kv, *past):
        m = self.model
        # 1. patch + time embeddings (the model's own)
        z, grid, e, e0 = m._embed(x, t)
        # 2. blocks, each attending over concat(head, new, tail) of its layer and emitting its new K/V
        segs = [_CacheSegments(head=(past[4 * i], past[4 * i + 1]), tail=(past[4 * i + 2], past[4 * i + 3]))
                for i in range(len(m.blocks))]
        out = m.layers(z, e, e0, ctx_kv, (rope_cos, rope_sin), segs)
        # 3. unpatchify; the new K/V each layer wrote
        return (m._unpatchify(out, grid), *[t for kv in segs for t in kv.new])


class DiTContextGraph(nn.Module):
    """``context [1, T, text_dim] -> ctx_kv [L, 2, T, H, D]``: ``WanDiT.prepare_context`` (the text MLP,
    then every layer's ``cross_attn.context_kv``), with one fresh ``[2, T, H, D]`` per layer stacked at
    the end: the TorchScript exporter drops in-place writes into slices of a slice of the one
    preallocated ``out`` that ``prepare_context`` fills (the graph came out constant), while a write
    into a fresh tensor exports exactly (checked against ``prepare_context`` in the tests)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, context):
        m, cfg = self.model, self.model.cfg
        c = m.text_embedding(context[0].to(m.dtype))
        per_layer = []
        for block in m.blocks:
            out = c.new_empty(2, c.shape[0], cfg.num_heads, cfg.head_dim)
            block.cross_attn.context_kv(c, out)
            per_layer.append(out)
        return torch.stack(per_layer)


# --------------------------------------------------------------------------------------------------
# VAE

class VAEFirstGraph(nn.Module):
    """Block 0: ``z -> (frames, *state_out)`` from a zero history (``decode(first=True)``)."""

    def __init__(self, vae, convention: str = "reference"):
        super().__init__()
        self.vae, self.convention = vae, convention

    def forward(self, z):
        from sdvg_rt.models.wan_vae import VAEState

        new = VAEState([z.new_zeros(s) for s in self.vae.config.state_shapes(z.shape[3], z.shape[4])])
        frames = self.vae.decode(z, None, new, True, self.convention)
        return (frames, *new.slots)


class VAEStepGraph(nn.Module):
    """Later blocks: ``(z, *state_in) -> (frames, *state_out)`` (``decode(first=False)``)."""

    def __init__(self, vae, convention: str = "reference"):
        super().__init__()
        self.vae, self.convention = vae, convention

    def forward(self, z, *state_in):
        from sdvg_rt.models.wan_vae import VAEState

        new = VAEState([z.new_zeros(s.shape) for s in state_in])
        frames = self.vae.decode(z, VAEState(list(state_in)), new, False, self.convention)
        return (frames, *new.slots)


# --------------------------------------------------------------------------------------------------
# Scorer

def resize_matrix(n_in: int, n_out: int, start: int, size: int) -> torch.Tensor:
    """Rows ``start .. start+size`` of the ``[n_out, n_in]`` matrix of torch's 1-D antialiased bicubic
    resize (``interpolate(mode="bicubic", antialias=True, align_corners=False)``), float32.

    Built by resizing the ``n_in x n_in`` identity image along its rows only (the column axis keeps
    its size, which is an exact identity): column j is the response to a unit impulse at input j.
    """
    eye = torch.eye(n_in, dtype=torch.float64).reshape(1, 1, n_in, n_in)
    r = F.interpolate(eye, size=(n_out, n_in), mode="bicubic", align_corners=False, antialias=True)
    return r[0, 0, start:start + size].to(torch.float32).contiguous()


class ScorerGraph(nn.Module):
    """``(frames [1, 3, N, H, W] in [-1, 1], ids, mask [1, 35]) -> rewards [N]`` float32.

    ``pixels`` is ``models.imagereward.preprocess`` with its two antialiased bicubic passes (horizontal,
    then vertical, each back to uint8 levels with floor(x + 0.5) and clipping, as PIL) written as
    matrix products, the centre crop folded into the matrices (rounding is elementwise and each pass
    is separable, so cropping first is exact); a pass is skipped when its side already has the size,
    as in ``preprocess``. The tests compare ``pixels`` with ``preprocess``. Steps 1-3 run in fp32
    whatever the model dtype; step 4 is ``ImageReward.forward``.
    """

    def __init__(self, model, height: int, width: int):
        super().__init__()
        from sdvg_rt.models.imagereward import resize_geometry

        cfg = model.cfg
        self.model, self.size = model, cfg.image_size
        rh, rw, top, left = resize_geometry(height, width, cfg.image_size)
        self.resize_h, self.resize_w = rh != height, rw != width
        self.crop = (top, left)
        self.register_buffer("mh", resize_matrix(height, rh, top, cfg.image_size), persistent=False)
        self.register_buffer("mw_t", resize_matrix(width, rw, left, cfg.image_size).t().contiguous(),
                             persistent=False)
        std = torch.tensor(cfg.pixel_std, dtype=torch.float64)
        mean = torch.tensor(cfg.pixel_mean, dtype=torch.float64)
        self.register_buffer("scale", (1.0 / (255.0 * std)).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (mean / std).float().view(1, 3, 1, 1), persistent=False)

    def pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [N, 3, H, W] in [-1, 1] -> normalised pixels [N, 3, 224, 224] float32."""
        from sdvg_rt.models.imagereward import quantise_frames

        s, (top, left) = self.size, self.crop
        # 1. uint8 levels (fp32)
        x = quantise_frames(frames)
        # 2. horizontal pass (or crop), then vertical pass (or crop), each back to uint8 levels
        if self.resize_w:
            x = torch.floor(torch.matmul(x, self.mw_t) + 0.5).clamp(0.0, 255.0)
        else:
            x = x[:, :, :, left:left + s]
        if self.resize_h:
            x = torch.floor(torch.matmul(self.mh, x) + 0.5).clamp(0.0, 255.0)
        else:
            x = x[:, :, top:top + s, :]
        # 3. /255 and CLIP mean/std
        return x * self.scale - self.shift

    def forward(self, frames, ids, mask):
        # [1, 3, N, H, W] (the decoder's output) -> [N, 3, H, W], preprocessing, the scorer
        return self.model(self.pixels(frames[0].transpose(0, 1)), ids, mask)


# --------------------------------------------------------------------------------------------------
# Graphs of a part, with example inputs for tracing

@dataclass
class Graph:
    io: EngineIO
    module: nn.Module
    example: tuple[torch.Tensor, ...]


def example_dims(io: EngineIO) -> dict[str, int]:
    """Small distinct sizes inside each axis range for tracing (not 0 or 1: no specialisation)."""
    out = {}
    for i, a in enumerate(io.axes):
        out[a.name] = max(a.min, min(a.max, 5 + 2 * i))
    return out


def example_inputs(io: EngineIO, device, dims=None, seed: int = 0, vocab: int | None = None) -> tuple:
    """Random inputs of the right shapes and dtypes (frames in [-1, 1], ids < vocab, mask a prefix)."""
    g = torch.Generator().manual_seed(seed)
    shapes = io.shapes(example_dims(io) if dims is None else dims)
    out = []
    for t in io.inputs:
        shape = shapes[t.name]
        if t.name == "ids":
            v = torch.randint(1, vocab or 100, shape, generator=g)
            v[:, 0] = 101
        elif t.name == "mask":
            v = torch.zeros(shape, dtype=torch.int64)
            v[:, : max(2, shape[1] // 3)] = 1
        elif t.name == "frames":
            v = torch.rand(shape, generator=g) * 2 - 1
        elif t.name == "t":
            v = torch.full(shape, 937.5)
        else:
            v = torch.randn(shape, generator=g) * 0.5
        out.append(v.to(device=device, dtype=t.torch_dtype))
    return tuple(out)


def part_graphs(part: str, ios: dict[str, EngineIO], model, *, height: int | None = None,
                width: int | None = None, convention: str = "reference") -> list[Graph]:
    """The graphs of ``part`` around its loaded model (already on its device and in its dtype), which runs
    its eager elementwise groups (the default of a loaded model: the tracer cannot see into Triton or
    compiled kernels)."""
    kernels = getattr(model, "kernels", None)
    if kernels is not None and not kernels.eager:
        raise ValueError(f"the {part} model runs {kernels!r}, but the export traces the eager groups: export a "
                         "model as loaded (without set_kernels), not one configured by a Runtime")
    device = next(model.parameters()).device
    graphs = []
    for name, io in ios.items():
        if io.part != part:
            continue
        if name.endswith(".step") and part in ("drafter", "target"):
            module = DiTStepGraph(model)
        elif name.endswith(".context"):
            module = DiTContextGraph(model)
        elif name == "vae.first":
            module = VAEFirstGraph(model, convention)
        elif name == "vae.step":
            module = VAEStepGraph(model, convention)
        elif name == "scorer":
            module = ScorerGraph(model, height, width).to(device)
        else:
            raise ValueError(f"no graph for engine {name}")
        vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
        graphs.append(Graph(io, module.eval(), example_inputs(io, device, vocab=vocab)))
    return graphs


# --------------------------------------------------------------------------------------------------
# Export, conversion, checks

def export_graph(graph: Graph, path: str | os.PathLike, *, opset: int = OPSET) -> Path:
    """Export one graph to ``path`` (plus ``path.data`` above 2 GB) and check it; returns ``path``."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    io = graph.io
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp, _symbolics(), torch.no_grad(), \
            warnings.catch_warnings():
        # the TorchScript exporter is chosen deliberately (module doc); its deprecation notice and the
        # tracer's notes on the models' host-side shape checks are noise here
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            graph.module, graph.example, str(raw), dynamo=False, opset_version=EXPORT_OPSET,
            input_names=io.input_names, output_names=io.output_names, dynamic_axes=io.dynamic_axes(),
            do_constant_folding=True,
        )
        model = onnx.load(str(raw))
    model = convert_opset(model, opset)
    float64_to_float32(model)
    check_io(model, io, set_shapes=True)
    save_onnx(model, path)
    del model
    check_onnx(path, io)
    return path


@contextlib.contextmanager
def _symbolics():
    """TorchScript symbolics registered only while exporting: the two ops its exporter lacks, and
    attention with its scale as a constant (``_sdpa_symbolic``)."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    # name -> (symbolic, opset it is registered from: at least the built-in one it replaces)
    names = {"aten::_upsample_nearest_exact2d": (_nearest_exact_symbolic, 9), "aten::copy": (_copy_symbolic, 9),
             "aten::scaled_dot_product_attention": (_sdpa_symbolic, 14)}
    for n, (fn, opset) in names.items():
        register_custom_op_symbolic(n, fn, opset)
    try:
        yield
    finally:
        for n, (_, opset) in names.items():
            unregister_custom_op_symbolic(n, opset)


def _nearest_exact_symbolic(g, input, output_size, *args):
    # nearest-exact: src = floor((dst + 0.5) * in/out) == Resize(nearest, half_pixel, round_prefer_ceil)
    from torch.onnx import symbolic_helper as sh

    scale_factors = args[0] if len(args) == 1 else None
    if scale_factors is None or sh._is_none(scale_factors):
        raise RuntimeError("export: nearest-exact upsampling by output size is not supported; "
                           "use scale_factor (the Wan VAE does)")
    sf = sh._maybe_get_const(scale_factors, "fs")
    roi = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    scales = g.op("Constant", value_t=torch.tensor([1.0, 1.0, *sf], dtype=torch.float32))
    # TensorRT does not run Resize in bf16/fp16 (NVIDIA's demoDiffusion casts around it): resize in fp32,
    # exact for nearest-neighbour whatever the dtype
    low = input.type().scalarType() in ("BFloat16", "Half")
    x = g.op("Cast", input, to_i=sh._type_utils.JitScalarType.FLOAT.onnx_type()) if low else input
    y = g.op("Resize", x, roi, scales, coordinate_transformation_mode_s="half_pixel",
             mode_s="nearest", nearest_mode_s="round_prefer_ceil")
    return g.op("Cast", y, to_i=sh._type_utils.JitScalarType.from_value(input).onnx_type()) if low else y


def _sdpa_symbolic(g, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """Unmasked attention as ``MatMul(Q * c, K^T) -> Softmax -> MatMul(., V)`` with ``c = 1/sqrt(D)`` a
    constant of Q's dtype (one rounding of the exact value). torch's own symbolic works the scale out
    from ``Shape(Q)`` in Q's dtype and multiplies Q and K by its square root: in bf16 the logits come
    out about 0.3 % low. Q scaled alone is one of the patterns TensorRT fuses into one attention kernel."""
    from torch.onnx import symbolic_helper as sh
    from torch.onnx._internal.torchscript_exporter import symbolic_opset14

    sizes = sh._get_tensor_sizes(query)
    d = sizes[-1] if sizes else None
    plain = (sh._is_none(attn_mask) and not sh._maybe_get_const(is_causal, "b")
             and float(sh._maybe_get_const(dropout_p, "f")) == 0.0 and sh._is_none(scale) and isinstance(d, int))
    if not plain:
        return symbolic_opset14.scaled_dot_product_attention(g, query, key, value, attn_mask, dropout_p,
                                                             is_causal, scale, enable_gqa)
    dtype = sh._type_utils.JitScalarType.from_value(query).dtype()
    c = g.op("Constant", value_t=torch.tensor(1.0 / math.sqrt(d), dtype=torch.float64).to(dtype))
    rank = sh._get_tensor_rank(key)
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    logits = g.op("MatMul", g.op("Mul", query, c), g.op("Transpose", key, perm_i=perm))
    return g.op("MatMul", g.op("Softmax", logits, axis_i=-1), value)


def _copy_symbolic(g, self, src, non_blocking):
    # functional aten::copy (from an in-place copy_ into a fresh tensor): src broadcast to self's
    # shape, in self's dtype
    from torch.onnx import symbolic_helper as sh

    out = g.op("Expand", src, g.op("Shape", self))
    if self.type().scalarType() != src.type().scalarType():
        out = g.op("Cast", out, to_i=sh._type_utils.JitScalarType.from_value(self).onnx_type())
    return out


def convert_opset(model, opset: int):
    """``onnx.version_converter`` on the graph structure only: each initializer's bytes are moved out and
    the tensor becomes a weightless external stub during the conversion (the converter serialises the
    whole proto, which protobuf cannot do above 2 GB), then the bytes are moved back. Peak memory stays
    about one copy of the weights."""
    from onnx import TensorProto, version_converter

    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current == opset:
        return model
    _raw_initializers(model)
    saved: dict[str, bytes] = {}
    for t in model.graph.initializer:
        saved[t.name] = t.raw_data
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", "stub"
    converted = version_converter.convert_version(model, opset)
    del model
    for t in converted.graph.initializer:
        if t.name in saved:
            t.raw_data = saved.pop(t.name)
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]
    if opset >= 21:  # opsets 21-22 belong to IR version 10 (the converter keeps the exporter's 9)
        converted.ir_version = max(converted.ir_version, 10)
    return converted


def _raw_initializers(model) -> int:
    """Every in-memory initializer stored in ``raw_data`` (typed ``*_data`` fields converted); returns
    the total bytes. The external-data writer skips typed fields, which could leave a proto > 2 GB."""
    from onnx import TensorProto, numpy_helper

    total = 0
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and not t.HasField("raw_data"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
        total += len(t.raw_data)
    return total


def float64_to_float32(model) -> None:
    """Every double in the graph becomes float (TensorRT has no FP64). In place."""
    from onnx import TensorProto, numpy_helper

    D, Fl = TensorProto.DOUBLE, TensorProto.FLOAT

    def fix_tensor(t):
        if t.data_type == D:
            arr = numpy_helper.to_array(t).astype("float32")
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    for t in model.graph.initializer:
        fix_tensor(t)
    for node in model.graph.node:
        for a in node.attribute:
            if a.name == "to" and node.op_type == "Cast" and a.i == D:
                a.i = Fl
            if a.HasField("t"):
                fix_tensor(a.t)
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.type.tensor_type.elem_type == D:
            vi.type.tensor_type.elem_type = Fl


def save_onnx(model, path: Path) -> None:
    """Save, with one external data file when the weights pass 2 GB (every initializer in raw_data)."""
    import onnx

    total = _raw_initializers(model)
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        if p.exists():
            p.unlink()
    if total >= EXTERNAL_DATA_BYTES - (64 << 20):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024, convert_attribute=True)
    else:
        onnx.save_model(model, str(path))


_ONNX_DTYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10,
                "float64": 11, "bfloat16": 16}


def check_io(model, io: EngineIO, set_shapes: bool = False) -> None:
    """The graph's inputs/outputs have exactly io's names, dtypes and static dims.

    ``set_shapes``: also write io's shapes into the declarations (static dims as values, dynamic dims
    by axis name), where the exporter left a dim unnamed or auto-named (e.g. after a Resize); strict
    shape inference (``check_onnx``) then fails if the graph computes anything else.
    """
    for kind, got, want in (("input", model.graph.input, io.inputs), ("output", model.graph.output, io.outputs)):
        names = [v.name for v in got]
        if names != [t.name for t in want]:
            raise RuntimeError(f"{io.name}: exported {kind}s {names} differ from the I/O spec "
                               f"{[t.name for t in want]}")
        for v, t in zip(got, want):
            tt = v.type.tensor_type
            if tt.elem_type != _ONNX_DTYPES[t.dtype]:
                raise RuntimeError(f"{io.name}: {kind} {t.name} has ONNX type {tt.elem_type}, the spec says {t.dtype}")
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            bad = len(dims) != len(t.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(dims, t.shape))
            if bad or (not set_shapes and any(isinstance(s, int) and d != s for d, s in zip(dims, t.shape))):
                raise RuntimeError(f"{io.name}: {kind} {t.name} has shape {dims}, the spec says {list(t.shape)}")
            if set_shapes:
                for d, s in zip(tt.shape.dim, t.shape):
                    if isinstance(s, int):
                        d.dim_value = s
                    else:
                        d.dim_param = s


def check_onnx(path: Path, io: EngineIO | None = None) -> None:
    """``onnx.checker`` (full, i.e. with strict shape inference) on the file, no float64 left, and the
    inferred output shapes equal to the spec (path-based: works above 2 GB)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    control = [f"{n.op_type} {n.name}" for n in model.graph.node if n.op_type in ("If", "Loop", "Scan")]
    if control:  # TensorRT needs equal-rank If branches; none of these graphs should branch at all
        raise RuntimeError(f"{path}: control flow left in the graph (a shape-dependent op such as squeeze(dim) "
                           f"traced into an If): {control[:5]}")
    del model
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".infer-") as tmp:
        out = Path(tmp) / "inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(path), str(out), check_type=True, strict_mode=True)
        inferred = onnx.load(str(out), load_external_data=False)
    doubles = [n.name or n.op_type for n in inferred.graph.node
               if any(a.name == "to" and a.i == onnx.TensorProto.DOUBLE for a in n.attribute)]
    doubles += [v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE]
    if doubles:
        raise RuntimeError(f"{path}: float64 left in the graph (TensorRT has no FP64): {doubles[:5]}")
    if io is not None:
        check_io(inferred, io)


def export_part(part: str, ios: dict[str, EngineIO], model, out_dir: str | os.PathLike, *,
                height: int | None = None, width: int | None = None, names: Sequence[str] | None = None,
                convention: str = "reference", progress=print) -> dict[str, Path]:
    """Export the engines of ``part`` (or only ``names``) to ``out_dir/<engine>.onnx``."""
    out = {}
    for g in part_graphs(part, ios, model, height=height, width=width, convention=convention):
        if names is not None and g.io.name not in names:
            continue
        progress(f"  exporting {g.io.name} (ONNX opset {OPSET}, {g.io.dtype}) ...")
        out[g.io.name] = export_graph(g, Path(out_dir) / f"{g.io.name}.onnx")
    return out
