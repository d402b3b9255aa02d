"""Wan2.1 DiT checkpoints: formats, key maps, architecture from shapes, loading and synthetic writers.

Formats (wan-models.md §7):

- ``self_forcing_pt``   Self-Forcing ``.pt``: torch pickle of ``{"generator_ema", "generator", "critic"}``
                         (any subset); each a state dict whose keys carry the ``model.`` prefix; may be fp32.
- ``krea_safetensors``  Krea Realtime 14B ``.safetensors``: one flat dict with the ``model.`` prefix.
- ``wan_folder``        original Wan2.1 folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` or
                         shards ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + ``...safetensors.index.json``;
                         original key names.
- ``diffusers_folder``  diffusers ``WanTransformer3DModel`` folder (``config.json`` ``_class_name``), diffusers key
                         names (``TRANSFORMER_KEYS_RENAME_DICT``), same shard conventions.

Everything is read with safetensors or ``torch.load(weights_only=True)`` (checkpoints.core), tensor by
tensor onto the target device, and loaded into a model built on the meta device (``assign=True``),
so a 14B model never exists twice in memory.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.wan_dit import PRESETS, WanDiT, WanDiTConfig
from .core import check_tensors, key_generator, read_json, read_state_dict, strict_check

FORMATS = ("self_forcing_pt", "krea_safetensors", "wan_folder", "diffusers_folder")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 10_000_000_000  # diffusers' default "10GB"

# --------------------------------------------------------------------------------------------------
# Key maps: original Wan <-> diffusers WanTransformer3DModel

# DIFF scripts/convert_wan_to_diffusers.py TRANSFORMER_KEYS_RENAME_DICT (T2V part), applied in order as
# substring replacements. The three norm entries swap norm2 and norm3 through a placeholder.
TRANSFORMER_KEYS_RENAME_DICT = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
    "modulation": "scale_shift_table",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm2": "norm__placeholder",
    "norm3": "norm2",
    "norm__placeholder": "norm3",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
}

# The inverse, in an order that is unambiguous on diffusers names ("scale_shift_table" is handled first:
# top level -> head.modulation, inside a block -> modulation).
_DIFFUSERS_TO_WAN = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("proj_out", "head.head"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    ("attn1.to_out.0", "self_attn.o"),
    ("attn1.to_q", "self_attn.q"),
    ("attn1.to_k", "self_attn.k"),
    ("attn1.to_v", "self_attn.v"),
    ("attn1.norm_q", "self_attn.norm_q"),
    ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.to_out.0", "cross_attn.o"),
    ("attn2.to_q", "cross_attn.q"),
    ("attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "cross_attn.v"),
    ("attn2.norm_q", "cross_attn.norm_q"),
    ("attn2.norm_k", "cross_attn.norm_k"),
]


def wan_key_to_diffusers(key: str) -> str:
    """Original Wan key (no ``model.`` prefix) -> diffusers ``WanTransformer3DModel`` key."""
    for old, new in TRANSFORMER_KEYS_RENAME_DICT.items():
        key = key.replace(old, new)
    return key


def diffusers_key_to_wan(key: str) -> str:
    """Diffusers ``WanTransformer3DModel`` key -> original Wan key (inverse of ``wan_key_to_diffusers``)."""
    if key == "scale_shift_table":
        return "head.modulation"
    key = re.sub(r"^(blocks\.\d+\.)scale_shift_table$", r"\1modulation", key)
    for old, new in _DIFFUSERS_TO_WAN:
        key = key.replace(old, new)
    return key


def diffusers_to_wan(sd: Mapping[str, torch.Tensor]) -> dict:
    return {diffusers_key_to_wan(k): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# Architecture

def expected_shapes(cfg: WanDiTConfig) -> dict[str, tuple]:
    """Key -> shape of a ``WanDiT(cfg)`` state dict (built on meta: free even for 14B)."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _preset_table() -> str:
    return "; ".join(f"{c.name}: dim {c.dim}, ffn {c.ffn_dim}, layers {c.num_layers}, heads {c.num_heads}, "
                     f"text_dim {c.text_dim}" for c in PRESETS.values())


def config_from_shapes(shapes: Mapping[str, tuple], path, heads: int | None = None) -> WanDiTConfig:
    """Infer the architecture from tensor shapes (and ``heads`` from a config.json) and match a preset."""
    def need(key, ndim):
        if key not in shapes:
            sample = ", ".join(sorted(shapes)[:3]) or "none"
            raise CheckpointError(
                "cannot infer the DiT architecture: a key it needs is absent; is this a Wan2.1 DiT "
                f"checkpoint (found keys such as: {sample})?", path=path, key=key, expected="present",
                found="absent")
        s = tuple(shapes[key])
        if len(s) != ndim:
            raise CheckpointError("tensor has the wrong number of dimensions for a Wan2.1 DiT",
                                  path=path, key=key, expected=f"{ndim}-D", found=s)
        return s

    pe = need("patch_embedding.weight", 5)
    dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
    text_dim = need("text_embedding.0.weight", 2)[1]
    freq_dim = need("time_embedding.0.weight", 2)[1]
    ffn_dim = need("blocks.0.ffn.0.weight", 2)[0]
    head_out = need("head.head.weight", 2)[0]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_dim = head_out // math.prod(patch)
    found = dict(dim=dim, ffn_dim=ffn_dim, num_layers=layers, text_dim=text_dim, freq_dim=freq_dim,
                 in_dim=in_dim, out_dim=out_dim, patch_size=patch)
    for cfg in PRESETS.values():
        if all(getattr(cfg, k) == v for k, v in found.items()):
            if heads is not None and heads != cfg.num_heads:
                continue
            return cfg
    desc = ", ".join(f"{k} {v}" for k, v in found.items()) + (f", heads {heads} (config.json)" if heads else "")
    raise CheckpointError(
        f"the checkpoint's architecture ({desc}) matches no WanDiT preset; presets are: {_preset_table()}",
        path=path)


# --------------------------------------------------------------------------------------------------
# Format detection and reading

def _resolve(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError("DiT checkpoint not found; check the path in your profile", path=p)
    # A whole diffusers pipeline folder: use its transformer/ subfolder.
    if p.is_dir() and not (p / "config.json").exists() and (p / "model_index.json").exists():
        p = p / "transformer"
    return p


def detect_dit_format(path) -> str:
    """One of ``FORMATS``, from the file suffix or the folder's config.json (reads no tensor data)."""
    p = _resolve(path)
    if p.is_file():
        if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            return "self_forcing_pt"
        if p.suffix == ".safetensors":
            return "krea_safetensors"
        raise CheckpointError(
            f"unrecognised DiT checkpoint file type {p.suffix!r}; expected a Self-Forcing .pt, a Krea "
            ".safetensors or a Wan2.1 / diffusers folder", path=p)
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(
            "DiT folder has no config.json; expected an original Wan2.1 folder or a diffusers "
            "WanTransformer3DModel folder (its transformer/ subfolder)", path=p)
    return "diffusers_folder" if read_json(cfg_path, "model config").get("_class_name") == "WanTransformer3DModel" else "wan_folder"


class _Source:
    """Lazy tensors of one checkpoint: original key -> (reader, raw key), with shapes and file names."""

    def __init__(self):
        self.shapes: dict[str, tuple] = {}
        self.where: dict[str, tuple[Callable[[str], torch.Tensor], str, Path]] = {}
        self.stack = contextlib.ExitStack()

    def add(self, key: str, raw: str, shape, reader, path: Path):
        if key in self.where:
            raise CheckpointError("two tensors map to the same key (duplicate or mixed prefixes)",
                                  path=path, key=key)
        self.shapes[key] = tuple(shape)
        self.where[key] = (reader, raw, path)

    def get(self, key: str) -> torch.Tensor:
        reader, raw, path = self.where[key]
        try:
            return reader(raw)
        except Exception as e:  # a data read that fails past a valid header (I/O error, bad pickle data)
            raise CheckpointError(f"cannot read tensor data (truncated or corrupt?): {e}", path=path,
                                  key=raw) from e


def _open_safetensors(src: _Source, p: Path, key_map: Callable[[str], str], device,
                      keys: Iterable[str] | None = None) -> None:
    from safetensors import SafetensorError, safe_open

    if not p.exists():
        raise CheckpointError("checkpoint shard listed in the index is missing", path=p)
    if p.stat().st_size == 0:
        raise CheckpointError("checkpoint file is empty (0 bytes); re-download or re-create it", path=p)
    try:
        f = src.stack.enter_context(safe_open(str(p), framework="pt", device=str(device)))
        names = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read safetensors file (truncated or corrupt?): {e}", path=p) from e
    if keys is not None:
        missing = sorted(set(keys) - set(names))
        if missing:
            raise CheckpointError("the shard lacks a tensor that the index assigns to it", path=p,
                                  key=missing[0], expected="present", found="absent")
    for k in names:
        src.add(key_map(k), k, shapes[k], f.get_tensor, p)


# Wrapper segments that training code leaves in key names: FSDP and activation-checkpoint wrappers
# (Self-Forcing's own inference.py strips '_fsdp_wrapped_module.' from the EMA keys) and torch.compile.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _strip_model(k: str) -> str:
    k = k.removeprefix("model.")
    for seg in _WRAPPER_SEGMENTS:
        k = k.replace(seg, "")
    return k


def _pick_generator(obj: dict, use_ema: bool, p: Path) -> dict:
    top = sorted(obj)
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj  # a flat state dict
    if use_ema:
        for name in ("generator_ema", "generator", "model"):
            if isinstance(obj.get(name), Mapping):
                if name != "generator_ema":
                    warnings.warn(f"{p}: no 'generator_ema' in the checkpoint; using '{name}' instead",
                                  stacklevel=3)
                return dict(obj[name])
    elif isinstance(obj.get("generator"), Mapping):
        return dict(obj["generator"])
    want = "'generator_ema' (or 'generator')" if use_ema else "'generator' (use_ema=False)"
    raise CheckpointError(f"Self-Forcing checkpoint has no {want} state dict; top-level keys: {top}"
                          + ("; pass use_ema=True to use 'generator_ema'" if "generator_ema" in obj else ""),
                          path=p, key="generator_ema" if use_ema else "generator")


def _source(path, use_ema: bool, device) -> tuple[str, _Source, int | None]:
    src = _Source()
    try:
        return _fill_source(src, path, use_ema, device)
    except BaseException:
        src.stack.close()  # close the shards opened before the failure
        raise


def _fill_source(src: _Source, path, use_ema: bool, device) -> tuple[str, _Source, int | None]:
    p = _resolve(path)
    fmt = detect_dit_format(p)
    heads = None
    if fmt == "self_forcing_pt":
        sd = _pick_generator(read_state_dict(p, map_location="cpu"), use_ema, p)
        check_tensors(sd, p, "the generator's state dict")
        for raw, v in sd.items():
            src.add(_strip_model(raw), raw, v.shape, sd.__getitem__, p)
    elif fmt == "krea_safetensors":
        _open_safetensors(src, p, _strip_model, device)
    else:
        conf = read_json(p / "config.json", "model config")
        key_map = diffusers_key_to_wan if fmt == "diffusers_folder" else (lambda k: k)
        heads = conf.get("num_attention_heads" if fmt == "diffusers_folder" else "num_heads")
        single, index = p / WEIGHTS_NAME, p / INDEX_NAME
        if index.exists():
            weight_map = read_json(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError("index has no 'weight_map'", path=index)
            by_shard: dict[str, list[str]] = {}
            for k, shard in weight_map.items():
                by_shard.setdefault(shard, []).append(k)
            for shard, keys in sorted(by_shard.items()):
                _open_safetensors(src, p / shard, key_map, device, keys)
        elif single.exists():
            _open_safetensors(src, single, key_map, device)
        else:
            raise CheckpointError(f"DiT folder has neither {WEIGHTS_NAME} nor {INDEX_NAME}", path=p)
    return fmt, src, heads


def load_dit_state_dict(path, use_ema: bool = True, *, expect: str | None = None,
                        device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None) -> tuple[WanDiTConfig, dict]:
    """Read a DiT checkpoint of any supported format -> (config, state dict with original key names).

    The architecture is inferred from the shapes (and config.json's heads for folders) and must match
    a preset; ``expect`` (a preset name, e.g. "wan2.1-14b") rejects any other. Keys and shapes are
    checked strictly. Tensors are moved one by one to ``device`` and cast to ``dtype`` (if given).
    """
    fmt, src, heads = _source(path, use_ema, device)
    with src.stack:
        p = Path(path)
        cfg = config_from_shapes(src.shapes, p, heads)
        if expect is not None and cfg.name != expect:
            want = WanDiTConfig.from_name(expect)
            raise CheckpointError(
                f"wrong model size: this is a {cfg.name} checkpoint (dim {cfg.dim}, {cfg.num_layers} "
                f"layers) but a {expect} checkpoint (dim {want.dim}, {want.num_layers} layers) is required "
                "here; check which file is given as drafter and which as target in your profile",
                path=p, key="patch_embedding.weight",
                expected=(want.dim, want.in_dim, *want.patch_size), found=src.shapes["patch_embedding.weight"])
        strict_check(expected_shapes(cfg), {k: torch.empty(s, device="meta") for k, s in src.shapes.items()},
                     p, what=f"{cfg.name} DiT ({fmt})")
        sd = {}
        for k in src.shapes:
            t = src.get(k)
            sd[k] = t.to(device=device, dtype=dtype if dtype is not None else t.dtype)
    return cfg, sd


def load_dit(path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, *,
             use_ema: bool = True, expect: str | None = None) -> WanDiT:
    """Build a ``WanDiT`` on the meta device and load a checkpoint into it (strict, ``assign=True``)."""
    cfg, sd = load_dit_state_dict(path, use_ema, expect=expect, device=device, dtype=dtype)
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.rope.build(device)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Synthetic checkpoints in the official formats

def synthetic_init(key: str, x: torch.Tensor, dim: int) -> torch.Tensor:
    """The synthetic init of a DiT parameter from a standard-normal draw ``x`` of its shape (the official
    init): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm weights ~ 1 + N(0, 0.1^2), modulation
    ~ N(0, 1/dim), so full-size random models keep O(1), finite bf16 activations. Shared by the
    checkpoint writer (``_synthetic_tensor``) and the benchmark's on-device init (``bench.random_init_``)."""
    if key.endswith("modulation"):
        return x / math.sqrt(dim)
    if key.endswith(".bias"):
        return x * 0.02
    if x.dim() == 1:  # norm_q / norm_k / norm3 weights
        return 1.0 + 0.1 * x
    return x / math.sqrt(math.prod(x.shape[1:]))


def _synthetic_tensor(key: str, shape: tuple, cfg: WanDiTConfig, seed: int) -> torch.Tensor:
    """Seeded fp32 tensor for ``key`` (``synthetic_init``), independent of every other key (so writing
    can stream)."""
    g = key_generator(seed, key)
    return synthetic_init(key, torch.randn(shape, generator=g, dtype=torch.float32), cfg.dim)


def synthetic_dit_state_dict(preset: str | WanDiTConfig, seed: int = 0,
                             dtype: torch.dtype = torch.float32) -> dict:
    """The state dict (original keys) that ``write_synthetic_dit`` writes for (preset, seed); in memory."""
    cfg = preset if isinstance(preset, WanDiTConfig) else WanDiTConfig.from_name(preset)
    return {k: _synthetic_tensor(k, s, cfg, seed).to(dtype) for k, s in expected_shapes(cfg).items()}


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_safetensors(path: Path, items: list[tuple[str, tuple]], dtype: torch.dtype,
                       make: Callable[[str], torch.Tensor]) -> None:
    """Stream a safetensors file: header from shapes/dtype, then each tensor made and written in turn."""
    elem = torch.empty((), dtype=dtype).element_size()
    header, off = {}, 0
    for k, shape in items:
        nb = math.prod(shape) * elem
        header[k] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for k, shape in items:
            t = make(k).to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), (k, t.shape, shape)
            f.write(memoryview(t.view(torch.uint8).numpy()))
    os.replace(tmp, path)


def _write_folder(folder: Path, items: list[tuple[str, tuple]], dtype, make, max_shard_bytes: int) -> None:
    elem = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for k, shape in items:
        nb = math.prod(shape) * elem
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((k, shape))
        size += nb
    if len(shards) == 1:
        _write_safetensors(folder / WEIGHTS_NAME, items, dtype, make)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(folder / name, shard, dtype, make)
        weight_map.update({k: name for k, _ in shard})
    total = sum(math.prod(s) for _, s in items) * elem
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))


def write_synthetic_dit(path, preset: str | WanDiTConfig, fmt: str, seed: int = 0,
                        dtype: torch.dtype = torch.bfloat16, *, max_shard_bytes: int | None = None,
                        with_critic: bool = False) -> Path:
    """Write a seeded random DiT of ``preset`` in format ``fmt`` (one of ``FORMATS``); returns the path.

    Safetensors formats stream tensor by tensor (never the whole model in memory; 14B bf16 is 28.6 GB);
    folders shard at ``max_shard_bytes`` (default 10 GB). The weights equal
    ``synthetic_dit_state_dict(preset, seed)``; for ``self_forcing_pt`` that is ``generator_ema``, while
    ``generator`` uses seed+1 and the optional ``critic`` seed+2 (the .pt is built in memory).
    """
    cfg = preset if isinstance(preset, WanDiTConfig) else WanDiTConfig.from_name(preset)
    if fmt not in FORMATS:
        raise ValueError(f"unknown DiT format {fmt!r}; one of {FORMATS}")
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype must be one of {list(_ST_DTYPES)}, found {dtype}")
    shapes = expected_shapes(cfg)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "self_forcing_pt":
        def sd(s):
            return {"model." + k: _synthetic_tensor(k, shp, cfg, s).to(dtype) for k, shp in shapes.items()}
        obj = {"generator_ema": sd(seed), "generator": sd(seed + 1)}
        if with_critic:
            obj["critic"] = sd(seed + 2)
        tmp = p.with_name(p.name + ".partial")
        torch.save(obj, tmp)
        os.replace(tmp, p)
        return p
    if fmt == "krea_safetensors":
        items = [("model." + k, s) for k, s in sorted(shapes.items())]
        _write_safetensors(p, items, dtype, lambda k: _synthetic_tensor(k[6:], shapes[k[6:]], cfg, seed))
        return p
    p.mkdir(parents=True, exist_ok=True)
    for old in [p / "config.json", p / INDEX_NAME, *p.glob("diffusion_pytorch_model*.safetensors")]:
        old.unlink(missing_ok=True)  # a rewrite must not leave a stale index or shards behind
    limit = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    if fmt == "wan_folder":
        conf = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
                "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
                "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim, "text_len": cfg.text_len,
                "in_dim": cfg.in_dim, "out_dim": cfg.out_dim, "patch_size": list(cfg.patch_size),
                "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True, "eps": cfg.eps}
        items = sorted(shapes.items())

        def make(k):
            return _synthetic_tensor(k, shapes[k], cfg, seed)
    else:  # diffusers_folder
        conf = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0",
                "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads,
                "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim, "out_channels": cfg.out_dim,
                "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim,
                "num_layers": cfg.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
                "eps": cfg.eps, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": cfg.rope_len,
                "pos_embed_seq_len": None}
        to_wan = {wan_key_to_diffusers(k): k for k in shapes}
        items = sorted((d, shapes[w]) for d, w in to_wan.items())

        def make(k):
            return _synthetic_tensor(to_wan[k], shapes[to_wan[k]], cfg, seed)
    _write_folder(p, items, dtype, make, limit)
    (p / "config.json").write_text(json.dumps(conf, indent=2))
    return p
