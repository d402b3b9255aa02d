"""Wan2.1 VAE checkpoints (wan-models.md §5, §7).

Formats:
- ``wan_pth``: ``Wan2.1_VAE.pth``, a flat torch pickle of the whole official ``WanVAE_`` state dict
  (``encoder.*``, ``conv1.*`` = quant conv, ``conv2.*`` = post-quant conv, ``decoder.*``). The loader
  takes ``decoder.*`` and ``conv2.*``, ignores ``encoder.*`` and ``conv1.*`` and is strict on the rest.
  A ``.safetensors`` file with the same keys is read the same way.
- ``diffusers_folder``: an ``AutoencoderKLWan`` folder, ``config.json`` +
  ``diffusion_pytorch_model.safetensors`` with diffusers' key names. The loader maps them to the
  official names (below), taking ``decoder.*`` and ``post_quant_conv.*``.

Key map (official -> diffusers), as diffusers' ``convert_wan_vae_to_diffusers`` does it, written for any
``num_res_blocks`` (``n``; 2 for Wan2.1):

| official | diffusers |
|---|---|
| ``conv1`` / ``conv2`` (top level) | ``quant_conv`` / ``post_quant_conv`` |
| ``{encoder,decoder}.conv1`` | ``{encoder,decoder}.conv_in`` |
| ``{..}.middle.0`` / ``.1`` / ``.2`` | ``{..}.mid_block.resnets.0`` / ``.attentions.0`` / ``.resnets.1`` |
| ``{..}.head.0.gamma`` / ``head.2`` | ``{..}.norm_out.gamma`` / ``conv_out`` |
| ``encoder.downsamples.i`` | ``encoder.down_blocks.i`` (same flat index) |
| ``decoder.upsamples.i``, ``s, r = divmod(i, n + 2)`` | ``decoder.up_blocks.s.resnets.r`` (r <= n), ``up_blocks.s.upsamplers.0`` (r = n + 1) |
| residual block ``residual.{0,2,3,6}``, ``shortcut`` | ``norm1``, ``conv1``, ``norm2``, ``conv2``, ``conv_shortcut`` |
| resample ``resample.1``, ``time_conv``; attention ``norm``, ``to_qkv``, ``proj`` | unchanged |

The architecture is read from the shapes (``wan_pth``) or from ``config.json`` (diffusers), then every
key and shape is checked strictly against the model built from it.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.wan_vae import (
    VAE_PRESETS,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WanVAEConfig,
    WanVAEDecoder,
)
from .core import check_tensors, key_generator, read_json, read_state_dict, strict_check

FORMATS = ("wan_pth", "diffusers_folder")
FILE_NAME = "Wan2.1_VAE.pth"
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CLASS = "AutoencoderKLWan"

_RES = {  # official residual-block suffix -> diffusers
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}


# --------------------------------------------------------------------------------------------------
# shapes and key map


def decoder_shapes(cfg: WanVAEConfig) -> dict[str, tuple]:
    """Official names and shapes of what the runtime loads: ``conv2.*`` and ``decoder.*``."""
    with torch.device("meta"):
        model = WanVAEDecoder(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def encoder_shapes(cfg: WanVAEConfig) -> dict[str, tuple]:
    """Official names and shapes of ``encoder.*`` and the quant conv ``conv1.*`` (Wan ``Encoder3d``).

    Not loaded by the runtime; used to write complete synthetic files. Checked against diffusers'
    ``AutoencoderKLWan`` encoder through the key map in the tests.
    """
    shapes: dict[str, tuple] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, *k)
        shapes[f"{name}.bias"] = (cout,)

    def res(prefix, cin, cout):
        shapes[f"{prefix}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv(f"{prefix}.residual.2", cin, cout, (3, 3, 3))
        shapes[f"{prefix}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv(f"{prefix}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv(f"{prefix}.shortcut", cin, cout, (1, 1, 1))

    z2 = 2 * cfg.z_dim  # the encoder predicts mean and log-variance
    dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    temporal_down = tuple(reversed(cfg.temporal_upsample))
    conv("encoder.conv1", 3, dims[0], (3, 3, 3))
    i = 0
    for s, (cin, cout) in enumerate(itertools.pairwise(dims)):
        for _ in range(cfg.num_res_blocks):
            res(f"encoder.downsamples.{i}", cin, cout)
            cin, i = cout, i + 1
        if s != len(cfg.dim_mult) - 1:
            conv(f"encoder.downsamples.{i}.resample.1", cout, cout, (3, 3))
            if temporal_down[s]:
                conv(f"encoder.downsamples.{i}.time_conv", cout, cout, (3, 1, 1))
            i += 1
    c = dims[-1]
    res("encoder.middle.0", c, c)
    shapes["encoder.middle.1.norm.gamma"] = (c, 1, 1)
    conv("encoder.middle.1.to_qkv", c, 3 * c, (1, 1))
    conv("encoder.middle.1.proj", c, c, (1, 1))
    res("encoder.middle.2", c, c)
    shapes["encoder.head.0.gamma"] = (c, 1, 1, 1)
    conv("encoder.head.2", c, z2, (3, 3, 3))
    conv("conv1", z2, z2, (1, 1, 1))
    return shapes


def official_shapes(cfg: WanVAEConfig) -> dict[str, tuple]:
    """Every key of the official whole-VAE file (encoder, quant convs, decoder)."""
    return {**encoder_shapes(cfg), **decoder_shapes(cfg)}


def to_diffusers_key(key: str, num_res_blocks: int = 2) -> str | None:
    """Official key -> diffusers ``AutoencoderKLWan`` key (None if the key is not a Wan VAE key)."""
    part, _, rest = key.partition(".")
    if part in _TOP:
        return f"{_TOP[part]}.{rest}"
    if part not in ("encoder", "decoder"):
        return None
    name, _, rest = rest.partition(".")
    if name == "conv1":
        return f"{part}.conv_in.{rest}"
    idx, _, sub = rest.partition(".")
    if name == "head" and idx in ("0", "2"):
        return f"{part}.{'norm_out' if idx == '0' else 'conv_out'}.{sub}"
    if name == "middle" and idx in _MIDDLE:
        return f"{part}.{_MIDDLE[idx]}.{_RES.get(sub, sub)}"
    if not idx.isdigit():
        return None
    if name == "downsamples" and part == "encoder":
        return f"encoder.down_blocks.{idx}.{_RES.get(sub, sub)}"
    if name == "upsamples" and part == "decoder":
        s, r = divmod(int(idx), num_res_blocks + 2)
        if r <= num_res_blocks:
            return f"decoder.up_blocks.{s}.resnets.{r}.{_RES.get(sub, sub)}"
        return f"decoder.up_blocks.{s}.upsamplers.0.{sub}"
    return None


def diffusers_key_map(cfg: WanVAEConfig) -> dict[str, str]:
    """Official -> diffusers for every key of the whole VAE of ``cfg`` (invert it for the other way)."""
    return {k: to_diffusers_key(k, cfg.num_res_blocks) for k in official_shapes(cfg)}


def to_diffusers(sd: dict, cfg: WanVAEConfig) -> dict:
    """Rename an official state dict (whole VAE or decoder part) to diffusers names."""
    m = diffusers_key_map(cfg)
    return {m[k]: v for k, v in sd.items()}


def from_diffusers(sd: dict, cfg: WanVAEConfig) -> dict:
    """Rename a diffusers ``AutoencoderKLWan`` state dict (whole or part) to official names."""
    inv = {v: k for k, v in diffusers_key_map(cfg).items()}
    return {inv[k]: v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# detection and loading


def detect_vae_format(path: str | os.PathLike) -> str:
    """``"diffusers_folder"`` for a folder, ``"wan_pth"`` for a file (``.pth``/``.pt``/``.safetensors``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError("VAE checkpoint not found; check the path in your profile", path=p)
    if p.is_dir():
        if not (p / DIFFUSERS_CONFIG).exists() and (p / FILE_NAME).exists():
            raise CheckpointError(
                f"this is a folder holding {FILE_NAME}; give the file itself, not the folder", path=p
            )
        return "diffusers_folder"
    return "wan_pth"


def load_vae_state_dict(path: str | os.PathLike) -> tuple[WanVAEConfig, dict[str, torch.Tensor]]:
    """Read a VAE checkpoint of either format -> (config, decoder state dict with official names).

    The state dict holds exactly ``conv2.*`` and ``decoder.*`` and loads strictly into
    ``WanVAEDecoder(config)``. Raises ``CheckpointError`` naming the file, key and shapes.
    """
    p = Path(path)
    if detect_vae_format(p) == "diffusers_folder":
        return _load_diffusers_folder(p)
    raw = read_state_dict(p)
    check_tensors(raw, p, "the official VAE state dict")
    if "decoder.conv1.weight" not in raw and "decoder.conv_in.weight" in raw:
        raise CheckpointError(
            "this file has diffusers AutoencoderKLWan key names; give the diffusers folder (with "
            f"{DIFFUSERS_CONFIG}) instead, or the official {FILE_NAME}",
            path=p, key="decoder.conv_in.weight",
        )
    sd = {k: v for k, v in raw.items() if not (k.startswith(("encoder.", "conv1.")))}
    cfg = _config_from_shapes(sd, p)
    strict_check(decoder_shapes(cfg), sd, p, what="Wan VAE decoder")
    return cfg, sd


def load_vae_decoder(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32,
                     channels_last: bool = False) -> WanVAEDecoder:
    """Load a ``WanVAEDecoder`` (eval mode) from either format onto ``device`` in ``dtype``."""
    cfg, sd = load_vae_state_dict(path)
    with torch.device("meta"):
        model = WanVAEDecoder(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    return model.to_channels_last() if channels_last else model


def _need(sd: dict, key: str, path: Path, ndim: int) -> tuple:
    if key not in sd:
        raise CheckpointError(
            "Wan VAE checkpoint is missing a key needed to read its architecture; is it the Wan2.1 VAE "
            "(Wan2.1_VAE.pth)?", path=path, key=key, expected=f"{ndim}-d tensor", found="absent",
        )
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(
            "Wan VAE checkpoint has a tensor of the wrong rank", path=path, key=key,
            expected=f"{ndim}-d tensor", found=shape,
        )
    return shape


def _config_from_shapes(sd: dict, path: Path) -> WanVAEConfig:
    """Architecture from shapes: z_dim from decoder.conv1, base_dim from the head, the stage layout
    from which ``decoder.upsamples.i`` are resamples (and which have a ``time_conv``), dim_mult from each
    stage's first residual block. Everything is then checked strictly against the model built."""
    z_dim = _need(sd, "decoder.conv1.weight", path, 5)[1]
    base = _need(sd, "decoder.head.2.weight", path, 5)[1]
    ups = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.upsamples.") and k.split(".")[2].isdigit()})
    resamples = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.upsamples.") and ".resample.1." in k})
    bad = CheckpointError(
        "cannot read the Wan VAE decoder layout from decoder.upsamples.*: expected stages of residual "
        "blocks each followed by a resample (decoder.upsamples.{0..14} for Wan2.1)",
        path=path, key="decoder.upsamples", expected="stages of (n+1) blocks + 1 resample",
        found=f"indices {ups}, resamples at {resamples}",
    )
    if not ups or not resamples:
        raise bad
    nrb = resamples[0] - 1
    stages = len(resamples) + 1
    if nrb < 0 or resamples != [(nrb + 2) * s + nrb + 1 for s in range(stages - 1)] or ups != list(
        range((nrb + 2) * (stages - 1) + nrb + 1)
    ):
        raise bad
    temporal = tuple(f"decoder.upsamples.{i}.time_conv.weight" in sd for i in resamples)
    mult_rev = []
    for s in range(stages):
        cout = _need(sd, f"decoder.upsamples.{(nrb + 2) * s}.residual.6.weight", path, 5)[0]
        if cout % base:
            raise CheckpointError(
                "Wan VAE stage width is not a multiple of the base width (decoder.head.2 input)",
                path=path, key=f"decoder.upsamples.{(nrb + 2) * s}.residual.6.weight",
                expected=f"multiple of {base}", found=cout,
            )
        mult_rev.append(cout // base)
    return _make_config(base, z_dim, tuple(reversed(mult_rev)), nrb, temporal, None, None, path)


def _make_config(base, z_dim, dim_mult, nrb, temporal, mean, std, path) -> WanVAEConfig:
    if mean is None or std is None:
        if z_dim != len(WAN21_LATENTS_MEAN):
            raise CheckpointError(
                "no latent mean/std are known for this VAE's latent width (the Wan2.1 VAE has 16)",
                path=path, key="decoder.conv1.weight", expected=f"z_dim {len(WAN21_LATENTS_MEAN)}", found=z_dim,
            )
        mean, std = WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
    try:
        return WanVAEConfig(
            base_dim=int(base), z_dim=int(z_dim), dim_mult=tuple(int(m) for m in dim_mult),
            num_res_blocks=int(nrb), temporal_upsample=tuple(bool(t) for t in temporal),
            latents_mean=tuple(float(x) for x in mean), latents_std=tuple(float(x) for x in std),
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"inconsistent Wan VAE configuration: {e}", path=path) from e


def _load_diffusers_folder(folder: Path) -> tuple[WanVAEConfig, dict[str, torch.Tensor]]:
    cfg_path, weights = folder / DIFFUSERS_CONFIG, folder / DIFFUSERS_WEIGHTS
    for f in (cfg_path, weights):
        if not f.exists():
            raise CheckpointError(
                f"diffusers AutoencoderKLWan folder is incomplete: {f.name} is missing (expected "
                f"{DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS})", path=f,
            )
    c = read_json(cfg_path, f"{DIFFUSERS_CLASS} {DIFFUSERS_CONFIG}")
    if c.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise CheckpointError(
            f"{DIFFUSERS_CONFIG} is not an {DIFFUSERS_CLASS} config", path=cfg_path, key="_class_name",
            expected=DIFFUSERS_CLASS, found=c.get("_class_name"),
        )
    unsupported = {  # field: the only value this runtime's Wan2.1 decoder implements
        "is_residual": False, "patch_size": None, "in_channels": 3, "out_channels": 3, "attn_scales": [],
    }
    for k, ok in unsupported.items():
        if k in c and c[k] != ok:
            raise CheckpointError(
                "unsupported AutoencoderKLWan variant (this runtime implements the Wan2.1 VAE)",
                path=cfg_path, key=k, expected=ok, found=c[k],
            )
    base = c.get("base_dim", 96)
    if c.get("decoder_base_dim") not in (None, base):
        raise CheckpointError(
            "decoder_base_dim different from base_dim is not supported", path=cfg_path,
            key="decoder_base_dim", expected=base, found=c["decoder_base_dim"],
        )
    cfg = _make_config(
        base, c.get("z_dim", 16), c.get("dim_mult", [1, 2, 4, 4]), c.get("num_res_blocks", 2),
        tuple(reversed(c.get("temperal_downsample", [False, True, True]))),
        c.get("latents_mean"), c.get("latents_std"), cfg_path,
    )
    raw = read_state_dict(weights)
    sd = {k: v for k, v in raw.items() if not (k.startswith(("encoder.", "quant_conv.")))}
    m = {k: v for k, v in diffusers_key_map(cfg).items() if k.startswith(("decoder.", "conv2."))}
    shapes = decoder_shapes(cfg)
    strict_check({d: shapes[o] for o, d in m.items()}, sd, weights, what="diffusers AutoencoderKLWan decoder")
    inv = {d: o for o, d in m.items()}
    return cfg, {inv[k]: v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# synthetic checkpoints


def synthetic_vae_state_dict(cfg: WanVAEConfig, seed: int = 0, decoder_only: bool = False) -> dict[str, torch.Tensor]:
    """Random state dict with official names (fp32): the whole VAE, or ``conv2.*`` + ``decoder.*``.

    Each tensor has its own generator seeded from (seed, key), so a key gets the same values whichever
    part is generated. Conv weights ~ N(0, 1/fan_in) (variance-preserving), biases ~ N(0, 0.02^2), norm
    gammas ~ U(0.5, 1.5); the RMS norms renormalise every residual branch, so full-size random weights
    decode to finite values.
    """
    shapes = decoder_shapes(cfg) if decoder_only else official_shapes(cfg)
    sd = {}
    for k, shape in shapes.items():
        g = key_generator(seed, k)
        if k.endswith(".gamma"):
            t = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(".bias"):
            t = torch.randn(shape, generator=g) * 0.02
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        sd[k] = t
    return sd


def write_synthetic_vae(path: str | os.PathLike, preset: str | WanVAEConfig = "tiny", fmt: str = "wan_pth",
                        seed: int = 0) -> Path:
    """Write a random VAE in an official format: ``wan_pth`` (a torch pickle of the whole VAE, encoder
    included, like ``Wan2.1_VAE.pth``) or ``diffusers_folder`` (``config.json`` + safetensors with
    diffusers names). The same (preset, seed) gives the same weights in both formats."""
    cfg = preset if isinstance(preset, WanVAEConfig) else WanVAEConfig.from_name(preset)
    if fmt not in FORMATS:
        raise ValueError(f"unknown VAE format {fmt!r}; choose one of {FORMATS}")
    sd = synthetic_vae_state_dict(cfg, seed)
    p = Path(path)
    if fmt == "wan_pth":
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, p)
        return p
    from safetensors.torch import save_file

    p.mkdir(parents=True, exist_ok=True)
    config = {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": "0.33.0",
        "attn_scales": [],
        "base_dim": cfg.base_dim,
        "dim_mult": list(cfg.dim_mult),
        "dropout": 0.0,
        "latents_mean": list(cfg.latents_mean),
        "latents_std": list(cfg.latents_std),
        "num_res_blocks": cfg.num_res_blocks,
        "temperal_downsample": list(reversed(cfg.temporal_upsample)),
        "z_dim": cfg.z_dim,
    }
    (p / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.contiguous() for k, v in to_diffusers(sd, cfg).items()}, str(p / DIFFUSERS_WEIGHTS))
    return p


__all__ = [
    "FORMATS",
    "VAE_PRESETS",
    "decoder_shapes",
    "detect_vae_format",
    "diffusers_key_map",
    "encoder_shapes",
    "from_diffusers",
    "load_vae_decoder",
    "load_vae_state_dict",
    "official_shapes",
    "synthetic_vae_state_dict",
    "to_diffusers",
    "to_diffusers_key",
    "write_synthetic_vae",
]
