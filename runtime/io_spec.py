"""The single source of engine I/O: names, dtypes, shapes and dynamic-axis ranges, from a profile.

Read by the ONNX export (input/output names, dynamic axes), the engine build (one optimization
profile: min/opt/max per input) and the TensorRT backend (buffer planning, shapes per block).

Engines per part (``PARTS``); ``n = F*tpf`` tokens per block, ``tpf = (h/2)*(w/2)``:

``<dit>.step`` (dit = drafter | target), one denoising or commit forward of one block:
    in   x [1, 16, F, h, w] (model dtype)   t [F] f32   rope_cos, rope_sin [n, 1, D/2] f32
         ctx_kv [L, 2, T, H, D]             k_head.i, v_head.i [P_head, H, D]   k_tail.i, v_tail.i [P_tail, H, D]
    out  flow [1, 16, F, h, w]              k_new.i, v_new.i [n, H, D]          (i = 0 .. L-1)
  The zero-copy KV contract with the ``KVCache`` layout ``kv [L, 2, S, H, D]``: for block slots
  (write_start ws, read_end re) the runtime binds ``k_head.i`` to ``kv[i, 0, :ws]``, ``k_new.i`` to
  ``kv[i, 0, ws:ws+n]`` and ``k_tail.i`` to ``kv[i, 0, ws+n:re]`` (same for v with ``kv[i, 1]``): each
  is one contiguous region of the cache, so nothing is copied in or out. Per-layer, per-K/V tensors
  are needed because ``kv[i, :, a:b]`` is not contiguous across i or K/V. Two past segments (head,
  tail) cover the ring phase, where the block's slots sit inside the window: attention reads
  ``concat(head, new, tail)`` (key order does not matter; keys carry absolute RoPE). While the video
  fits the window ``P_tail = 0``; block 0 has ``P_head = P_tail = 0`` (empty tensors).
``<dit>.context``: ``context [1, T, text_dim]`` -> ``ctx_kv [L, 2, T, H, D]``, once per prompt.
``vae.first`` / ``vae.step``: ``z [1, 16, F, h, w]`` (+ ``state_in.j`` for step) -> ``frames
  [1, 3, F_out, 8h, 8w]`` and ``state_out.j`` (every causal-conv history slot ``[1, C_j, 2, h_j, w_j]``).
``scorer``: ``frames [1, 3, N, 8h, 8w]`` in [-1, 1] (the VAE's output buffer), ``ids``, ``mask``
  [1, 35] int64 -> ``rewards [N]`` f32; the preprocessing (uint8 levels, antialiased bicubic resize,
  crop, CLIP normalisation) is inside the graph. N ranges over the frames one block decodes to.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .manifest import sha256_json

PARTS = ("drafter", "target", "vae", "scorer")
PART_ALIASES = {"imagereward": "scorer"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Axis:
    """A dynamic axis and its optimization-profile range."""

    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self):
        assert 0 <= self.min <= self.opt <= self.max, self


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                          # torch dtype name without "torch.": "bfloat16", "float32", "int64"
    shape: tuple[int | str, ...]        # ints are static, strings name an Axis of the engine

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        try:
            return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)
        except KeyError as e:
            raise KeyError(f"{self.name}: no value for axis {e.args[0]!r} (given {dict(dims)})") from None


@dataclass(frozen=True)
class EngineIO:
    """The I/O of one engine: inputs, outputs, dynamic axes (with ranges) and the graph dtype."""

    name: str                           # e.g. "drafter.step"
    part: str                           # drafter | target | vae | scorer
    dtype: str                          # graph (weights and activations) dtype
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: tuple[Axis, ...] = ()

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def axis(self, name: str) -> Axis:
        for a in self.axes:
            if a.name == name:
                return a
        raise KeyError(f"{self.name} has no axis {name!r}")

    def dims(self, which: str) -> dict[str, int]:
        """The ``min`` / ``opt`` / ``max`` value of every axis."""
        return {a.name: getattr(a, which) for a in self.axes}

    def shapes(self, dims: Mapping[str, int] | None = None) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every input and output for these axis values (checked against ranges;
        ``None``: the max of every axis)."""
        dims = self.dims("max") if dims is None else dict(dims)
        for a in self.axes:
            v = dims.get(a.name)
            if v is not None and not a.min <= v <= a.max:
                raise ValueError(f"{self.name}: axis {a.name}={v} is outside the engine's range "
                                 f"[{a.min}, {a.max}]; rebuild the engines for this profile")
        return {t.name: t.resolve(dims) for t in self.tensors}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimization profile: input name -> (min, opt, max) shapes (dynamic inputs only)."""
        lo, opt, hi = (self.shapes(self.dims(w)) for w in ("min", "opt", "max"))
        return {t.name: (lo[t.name], opt[t.name], hi[t.name])
                for t in self.inputs if any(isinstance(d, str) for d in t.shape)}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export`` style: tensor name -> {axis index: axis name}."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in self.tensors if any(isinstance(d, str) for d in t.shape)}

    def nbytes(self, dims: Mapping[str, int] | None = None) -> dict[str, int]:
        """Bytes of every tensor for these axis values (default: the max of every axis)."""
        shapes = self.shapes(self.dims("max") if dims is None else dims)
        return {t.name: math.prod(shapes[t.name]) * t.torch_dtype.itemsize for t in self.tensors}

    def allocate(self, names, dims: Mapping[str, int] | None = None, device="cpu") -> dict[str, torch.Tensor]:
        """Preallocate buffers for ``names`` at the axis values ``dims`` (default: the max of every
        axis, so one allocation serves every shape: a smaller call binds a prefix view)."""
        shapes = self.shapes(self.dims("max") if dims is None else dims)
        spec = {t.name: t for t in self.tensors}
        return {n: torch.empty(shapes[n], dtype=spec[n].torch_dtype, device=device) for n in names}

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def hash(self) -> str:
        return sha256_json(self.to_json())



# --------------------------------------------------------------------------------------------------
# Geometry shared by all parts

@dataclass(frozen=True)
class Geometry:
    """Video and cache geometry of a profile (``profile_geometry``); the window is the one allocated."""

    frames_per_block: int               # F, latent frames per block
    latent_height: int                  # h
    latent_width: int                   # w
    latent_frames: int                  # frames of a whole video
    window_frames: int                  # KV window (latent frames)
    sink_frames: int

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // 2) * (self.latent_width // 2)

    @property
    def tokens_per_block(self) -> int:
        return self.frames_per_block * self.tokens_per_frame

    @property
    def num_blocks(self) -> int:
        return self.latent_frames // self.frames_per_block

    def pixel_frames(self, block: int) -> int:
        """Frames a block decodes to: the first latent of the video gives 1 frame, every other one 4."""
        return 4 * self.frames_per_block - (3 if block == 0 else 0)

    def kv_cache(self, cfg):
        """A ``KVCache`` on the meta device: its slot arithmetic without allocating anything."""
        from .kv_cache import KVCache

        return KVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, self.tokens_per_frame,
                       self.frames_per_block, self.window_frames, self.sink_frames,
                       dtype=torch.bfloat16, device="meta")

    def dit_segments(self, cache, block: int) -> dict[str, int]:
        """Past-segment lengths of block ``block``: P_head = ws, P_tail = re - ws - n."""
        s = cache.slots(block)
        n = self.tokens_per_block
        return {"P_head": s.write_start, "P_tail": s.read_end - s.write_start - n}


# --------------------------------------------------------------------------------------------------
# Per part

def past_axes(geo: Geometry, cache) -> tuple[Axis, Axis]:
    """``P_head`` / ``P_tail`` ranges: min and max over the blocks of a video (so the profile, and the
    activation memory TensorRT sizes from its max, covers only lengths some block reaches: with a window
    covering the video ``P_tail`` is always 0), opt at the median block."""
    segs = [geo.dit_segments(cache, b) for b in range(geo.num_blocks)]
    mid = segs[geo.num_blocks // 2]
    return tuple(Axis(k, min(s[k] for s in segs), mid[k], max(s[k] for s in segs))  # type: ignore[return-value]
                 for k in ("P_head", "P_tail"))


def dit_step_io(part: str, cfg, geo: Geometry, dtype: str) -> EngineIO:
    """One block forward of a DiT (drafter or target) with the zero-copy KV contract (module doc)."""
    dt = _dtype_name(dtype)
    L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
    F, h, w, n = geo.frames_per_block, geo.latent_height, geo.latent_width, geo.tokens_per_block
    cache = geo.kv_cache(cfg)
    axes = past_axes(geo, cache)
    inputs = [
        TensorSpec("x", dt, (1, cfg.in_dim, F, h, w)),
        TensorSpec("t", "float32", (F,)),
        TensorSpec("rope_cos", "float32", (n, 1, D // 2)),
        TensorSpec("rope_sin", "float32", (n, 1, D // 2)),
        TensorSpec("ctx_kv", dt, (L, 2, cfg.text_len, H, D)),
    ]
    for i in range(L):
        inputs += [TensorSpec(f"k_head.{i}", dt, ("P_head", H, D)), TensorSpec(f"v_head.{i}", dt, ("P_head", H, D)),
                   TensorSpec(f"k_tail.{i}", dt, ("P_tail", H, D)), TensorSpec(f"v_tail.{i}", dt, ("P_tail", H, D))]
    outputs = [TensorSpec("flow", dt, (1, cfg.out_dim, F, h, w))]
    for i in range(L):
        outputs += [TensorSpec(f"k_new.{i}", dt, (n, H, D)), TensorSpec(f"v_new.{i}", dt, (n, H, D))]
    return EngineIO(f"{part}.step", part, dt, tuple(inputs), tuple(outputs), axes)


def dit_context_io(part: str, cfg, dtype: str) -> EngineIO:
    """Text MLP and every layer's cross-attention K/V, once per prompt (``WanDiT.prepare_context``)."""
    dt = _dtype_name(dtype)
    return EngineIO(
        f"{part}.context", part, dt,
        (TensorSpec("context", dt, (1, cfg.text_len, cfg.text_dim)),),
        (TensorSpec("ctx_kv", dt, (cfg.num_layers, 2, cfg.text_len, cfg.num_heads, cfg.head_dim)),),
    )


def vae_io(cfg, geo: Geometry, dtype: str, first: bool, convention: str = "reference") -> EngineIO:
    """One block of the streaming VAE decoder with every temporal history slot as explicit I/O.

    ``vae.first`` (block 0: zero history, nothing to read) has no state inputs; ``vae.step`` reads
    ``state_in.i`` (bound to the committed state) and both write ``state_out.i`` (bound to the
    scratch state): accepting a draft swaps the two, nothing is copied.
    """
    dt = _dtype_name(dtype)
    F, h, w = geo.frames_per_block, geo.latent_height, geo.latent_width
    s = cfg.spatial_scale
    frames = cfg.frames_out(F, first, convention)
    states = cfg.state_shapes(h, w)
    inputs = [TensorSpec("z", dt, (1, cfg.z_dim, F, h, w))]
    if not first:
        inputs += [TensorSpec(f"state_in.{i}", dt, tuple(sh)) for i, sh in enumerate(states)]
    outputs = [TensorSpec("frames", dt, (1, 3, frames, s * h, s * w))]
    outputs += [TensorSpec(f"state_out.{i}", dt, tuple(sh)) for i, sh in enumerate(states)]
    return EngineIO("vae.first" if first else "vae.step", "vae", dt, tuple(inputs), tuple(outputs))


def scorer_io(cfg, geo: Geometry, dtype: str, frames_dtype: str) -> EngineIO:
    """ImageReward on the frames of one block, preprocessing in the graph; N frames dynamic.

    ``frames [1, 3, N, H, W]`` is the VAE's output layout and dtype, so the scorer binds the decoder's
    output buffer directly; the graph itself runs in ``dtype`` (``scorer_precision``).
    """
    dt = _dtype_name(dtype)
    n_lo, n_hi = sorted((geo.pixel_frames(0), geo.pixel_frames(1)))
    H, W = 8 * geo.latent_height, 8 * geo.latent_width
    return EngineIO(
        "scorer", "scorer", dt,
        (TensorSpec("frames", _dtype_name(frames_dtype), (1, 3, "N", H, W)),
         TensorSpec("ids", "int64", (1, cfg.text_length)),
         TensorSpec("mask", "int64", (1, cfg.text_length))),
        (TensorSpec("rewards", "float32", ("N",)),),
        (Axis("N", n_lo, geo.pixel_frames(1), n_hi),),
    )


# --------------------------------------------------------------------------------------------------
# From a profile

def model_configs(profile) -> dict:
    """Architecture configs of the four parts from the profile's presets (no checkpoint is read)."""
    from .models.imagereward import ImageRewardConfig
    from .models.wan_dit import WanDiTConfig
    from .models.wan_vae import WanVAEConfig

    m = profile.models
    return {"drafter": WanDiTConfig.from_name(m.drafter), "target": WanDiTConfig.from_name(m.target),
            "vae": WanVAEConfig.from_name(m.vae), "scorer": ImageRewardConfig.preset(m.scorer)}


def profile_geometry(profile) -> Geometry:
    v = profile.video
    window, sink = profile.cache_geometry()  # the window actually allocated (cut to the video)
    return Geometry(v.frames_per_block, v.latent_height, v.latent_width, v.latent_frames, window, sink)


def engine_ios(profile, parts=PARTS) -> dict[str, EngineIO]:
    """Every engine of ``parts`` for this profile, by engine name."""
    cfgs, geo = model_configs(profile), profile_geometry(profile)
    dt = profile.precision
    out: dict[str, EngineIO] = {}
    for part in normalize_parts(parts):
        if part in ("drafter", "target"):
            for io in (dit_step_io(part, cfgs[part], geo, dt), dit_context_io(part, cfgs[part], dt)):
                out[io.name] = io
        elif part == "vae":
            for first in (True, False):
                io = vae_io(cfgs["vae"], geo, dt, first)
                out[io.name] = io
        else:
            out["scorer"] = scorer_io(cfgs["scorer"], geo, profile.scorer_precision, dt)
    return out


def normalize_parts(parts) -> list[str]:
    """``"drafter,vae"`` or a list -> known part names in canonical order; unknown names raise."""
    if isinstance(parts, str):
        parts = [p for p in parts.split(",") if p.strip()]
    names = {PART_ALIASES.get(p.strip(), p.strip()) for p in parts}
    unknown = sorted(names - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part {unknown[0]!r}; parts are {', '.join(PARTS)} "
                         f"(imagereward is an alias of scorer)")
    return [p for p in PARTS if p in names]


def engine_hashes(profile, ios: Mapping[str, EngineIO] | None = None) -> dict[str, str]:
    """Per engine, the hash of what in the profile changes it: its part's model config, its dtypes and
    I/O (geometry, window). Tau, seed, outputs, backends and the other parts do not count, so changing
    the target does not invalidate the drafter's engines."""
    cfgs = model_configs(profile)
    ios = engine_ios(profile) if ios is None else ios
    return {name: sha256_json({"config": _jsonable(cfgs[io.part]), "io": io.to_json(), **_fp8(profile, io.part)})
            for name, io in ios.items()}


def _fp8(profile, part: str) -> dict:
    """An fp8 DiT's quantization settings (nothing for bf16: earlier bf16 engine hashes stay valid)."""
    q = getattr(profile, "quantization", None)
    if part not in ("drafter", "target") or q is None or getattr(q, part) != "fp8":
        return {}
    return {"fp8": {"keep_first": q.keep_first, "keep_last": q.keep_last, "weight_scaling": q.weight_scaling}}


def profile_hash(profile) -> str:
    """Hash of everything in a profile that changes any engine (the folder-level summary)."""
    return sha256_json(engine_hashes(profile))


def engine_checkpoints(profile, part: str) -> dict[str, Path]:
    """The checkpoint files an engine of ``part`` is exported from, by role (recorded with sha256).

    A checkpoint folder (diffusers layout) contributes every file in it; the scorer contributes
    ImageReward.pt and med_config.json (vocab.txt is host-side tokenisation, not in the engine).
    """
    ck = profile.checkpoints
    if part == "scorer":
        from .checkpoints.imagereward import resolve_paths

        pt, med, _ = resolve_paths(ck.scorer)
        return {"scorer": Path(pt), "scorer.med_config": Path(med)}
    path = Path(getattr(ck, part))
    extra = {}
    if _fp8(profile, part):  # the calibrated scales are baked into the graph's Q/DQ nodes
        from .models.fp8 import scales_path

        extra = {f"{part}.fp8_scales": scales_path(path)}
    if path.is_dir():
        return {**{f"{part}/{f.relative_to(path)}": f for f in sorted(path.rglob("*"))
                   if f.is_file() and not f.name.startswith(".")}, **extra}
    return {part: path, **extra}


def _jsonable(obj) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if dtype in DTYPES:
        return str(DTYPES[dtype]).removeprefix("torch.")
    getattr(torch, dtype)  # raises for an unknown name
    return dtype
