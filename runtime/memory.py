"""Device memory planning, before anything is loaded: bytes per part (weights, KV caches, VAE states),
whether a profile fits a device, and the out-of-memory message that names what needs what."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import OutOfMemoryError
from .io_spec import DTYPES
from .profiles import Profile


def memory_plan(profile: Profile) -> dict[str, int]:
    """Bytes each part of a profile needs on the device (weights, caches, VAE states), before loading."""
    from .kv_cache import KVCache
    from .models.wan_dit import WanDiTConfig
    from .models.wan_vae import WanVAEConfig
    from .vae_state import VAEStatePair

    dt = DTYPES[profile.precision]
    el = torch.empty((), dtype=dt).element_size()
    v = profile.video
    window, _ = profile.cache_geometry()
    out = {}
    for kind in ("drafter", "target"):
        try:
            cfg = WanDiTConfig.from_name(getattr(profile.models, kind))
        except ValueError:
            continue
        tpf = (v.latent_height // cfg.patch_size[1]) * (v.latent_width // cfg.patch_size[2])
        params = sum(p.numel() for p in _meta_dit(cfg).parameters())
        out[f"{kind} weights"] = params * el
        out[f"{kind} KV cache"] = KVCache.nbytes(cfg.num_layers, cfg.num_heads, cfg.head_dim, tpf, window, dt)
    try:
        vcfg = WanVAEConfig.from_name(profile.models.vae)
        out["VAE states (committed + scratch)"] = VAEStatePair.nbytes_for(vcfg, v.latent_height, v.latent_width, dt)
        out["VAE decoder weights"] = vcfg_params(vcfg) * el
    except ValueError:
        pass
    try:
        from .models.imagereward import ImageReward, ImageRewardConfig

        with torch.device("meta"):
            ir = ImageReward(ImageRewardConfig.preset(profile.models.scorer))
        out["ImageReward weights"] = sum(p.numel() for p in ir.parameters()) * \
            torch.empty((), dtype=DTYPES[profile.scorer_precision]).element_size()
    except ValueError:
        pass
    return out


def vcfg_params(vcfg) -> int:
    from .models.wan_vae import WanVAEDecoder

    with torch.device("meta"):
        return sum(p.numel() for p in WanVAEDecoder(vcfg).parameters())


# Activations and the shared CUDA-graph pool at 832x480 (measured on the H100: peak 66.8 GiB against
# 63.3 GiB of weights, caches and states, docs/PERFORMANCE.md), scaled by tokens per block.
ACTIVATION_RESERVE_BYTES_832x480 = 4 * 2**30


def check_fits(profile: Profile, free_bytes: int, *, text_encoder: bool = True) -> dict[str, int]:
    """Before anything is loaded: do the profile's weights, caches, states and activations fit in
    ``free_bytes``? Two peaks are checked: loading (weights plus the text encoder, which is freed before
    the caches are allocated) and generating (weights, caches, states, activations). Raises
    ``OutOfMemoryError`` with the table; returns the plan."""
    plan = dict(memory_plan(profile))
    v = profile.video
    plan["activations and graph pool (reserve)"] = int(
        ACTIVATION_RESERVE_BYTES_832x480 * (v.latent_height * v.latent_width) / (60 * 104))
    weights = sum(b for k, b in plan.items() if "weights" in k)
    te = 0
    te_path = Path(profile.checkpoints.text_encoder)
    if text_encoder and te_path.is_file():
        te = te_path.stat().st_size  # bf16 on disk, bf16 on the device
    need_load, need_run = weights + te, sum(plan.values())
    if max(need_load, need_run) > free_bytes:
        rows = "\n    ".join(f"{k:40s} {b / 2**30:7.2f} GiB" for k, b in plan.items())
        raise OutOfMemoryError(
            f"profile {profile.name!r} does not fit this device: generating needs {need_run / 2**30:.1f} GiB "
            f"and loading (weights + text encoder {te / 2**30:.1f} GiB) {need_load / 2**30:.1f} GiB, but "
            f"{free_bytes / 2**30:.1f} GiB are free.\n    {rows}\n  Use a smaller cache window "
            f"(cache.window_frames with a sink), a lower resolution, or a GPU with more memory")
    return plan


def _meta_dit(cfg):
    from .models.wan_dit import WanDiT

    with torch.device("meta"):
        return WanDiT(cfg)


def oom_message(profile: Profile, device: torch.device, what: str) -> str:
    plan = memory_plan(profile)
    lines = "; ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in plan.items())
    free = ""
    if device.type == "cuda":
        f, t = torch.cuda.mem_get_info(device)
        free = f" The device has {t / 2**30:.1f} GiB ({f / 2**30:.1f} GiB free now)."
    return (f"out of device memory while {what}. Needs: {lines} (plus activations; the text encoder is "
            f"freed before caches are allocated).{free} Use a profile with a smaller cache window "
            f"(cache.window_frames) or resolution, or a GPU with more memory")
