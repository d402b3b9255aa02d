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


def _part(item: str) -> str:
    """The part a ``memory_plan`` item belongs to (its device holds it)."""
    for part, prefix in (("drafter", "drafter"), ("target", "target"), ("vae", "VAE"), ("scorer", "ImageReward")):
        if item.startswith(prefix):
            return part
    raise KeyError(item)


def device_plans(profile: Profile, placement=None) -> dict[str, dict[str, int]]:
    """``memory_plan`` split per device of ``placement`` (default: one device, named "device"), each with
    its activation reserve: every device in use runs its parts' forwards and holds their graphs."""
    plan = memory_plan(profile)
    v = profile.video
    reserve = int(ACTIVATION_RESERVE_BYTES_832x480 * (v.latent_height * v.latent_width) / (60 * 104))
    if placement is None:
        return {"device": {**plan, "activations and graph pool (reserve)": reserve}}
    out = {}
    for dev in placement.devices:
        parts = placement.parts_on(dev)
        out[str(dev)] = {**{k: b for k, b in plan.items() if _part(k) in parts},
                         "activations and graph pool (reserve)": reserve}
    return out


def check_fits(profile: Profile, free_bytes: int | dict[str, int], *, text_encoder: bool = True,
               placement=None) -> dict[str, int]:
    """Before anything is loaded: do the profile's weights, caches, states and activations fit in
    ``free_bytes``? Two peaks are checked: loading (weights plus the text encoder, which is freed before
    the caches are allocated) and generating (weights, caches, states, activations). With ``placement``
    (``placement.Placement``) the plan is made per device, ``free_bytes`` then maps each device's name to
    its free bytes, and the text encoder loads on the drafter side's device. Raises ``OutOfMemoryError``
    with the table of every device; returns the plan (every item once, the devices' reserves added up)."""
    plans = device_plans(profile, placement if placement is not None and len(placement.devices) > 1 else None)
    if not isinstance(free_bytes, dict):
        free_bytes = {name: free_bytes for name in plans}
    elif len(plans) == 1:
        free_bytes = {"device": next(iter(free_bytes.values()))}
    te = 0
    te_path = Path(profile.checkpoints.text_encoder)
    if text_encoder and te_path.is_file():
        te = te_path.stat().st_size  # bf16 on disk, bf16 on the device
    verdicts, fail = [], False
    for i, (name, plan) in enumerate(plans.items()):
        weights = sum(b for k, b in plan.items() if "weights" in k)
        te_here = te if i == 0 else 0  # the drafter side's device (home) comes first
        need_load, need_run, free = weights + te_here, sum(plan.values()), free_bytes[name]
        fits = max(need_load, need_run) <= free
        fail = fail or not fits
        verdicts.append((name, plan, need_load, need_run, free, te_here, fits))
    if fail:
        if len(verdicts) == 1:
            _, plan, need_load, need_run, free, te_here, _ = verdicts[0]
            rows = "\n    ".join(f"{k:40s} {b / 2**30:7.2f} GiB" for k, b in plan.items())
            raise OutOfMemoryError(
                f"profile {profile.name!r} does not fit this device: generating needs {need_run / 2**30:.1f} GiB "
                f"and loading (weights + text encoder {te_here / 2**30:.1f} GiB) {need_load / 2**30:.1f} GiB, but "
                f"{free / 2**30:.1f} GiB are free.\n    {rows}\n  Use a smaller cache window "
                f"(cache.window_frames with a sink), a lower resolution, or a GPU with more memory")
        tables = []
        for name, plan, need_load, need_run, free, te_here, fits in verdicts:
            parts = ", ".join(placement.parts_on(torch.device(name)))
            rows = "\n      ".join(f"{k:40s} {b / 2**30:7.2f} GiB" for k, b in plan.items())
            tables.append(f"{name} ({parts}): generating needs {need_run / 2**30:.1f} GiB and loading (weights"
                          f"{f' + text encoder {te_here / 2**30:.1f} GiB' if te_here else ''}) "
                          f"{need_load / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free"
                          f"{'' if fits else ': DOES NOT FIT'}\n      {rows}")
        raise OutOfMemoryError(
            f"profile {profile.name!r} does not fit its devices (devices: {placement.describe()}):\n    "
            + "\n    ".join(tables) + "\n  Use a smaller cache window (cache.window_frames with a sink), a lower "
            "resolution, GPUs with more memory, or another split of the parts (devices.<part>)")
    merged: dict[str, int] = {}
    for _, plan, *_ in verdicts:  # each item once; the reserves of all devices added up
        for k, b in plan.items():
            merged[k] = merged.get(k, 0) + b
    return merged


def _meta_dit(cfg):
    from .models.wan_dit import WanDiT

    with torch.device("meta"):
        return WanDiT(cfg)


def oom_message(profile: Profile, where, what: str) -> str:
    """The out-of-memory message: what each part needs, per device of ``where`` (a ``placement.Placement``
    or one device), with each CUDA device's size and free memory now."""
    from .placement import Placement

    pl = where if isinstance(where, Placement) else Placement.one(where)

    def free(dev, label):
        if dev.type != "cuda":
            return ""
        f, t = torch.cuda.mem_get_info(dev)
        return f" {label} has {t / 2**30:.1f} GiB ({f / 2**30:.1f} GiB free now)."
    if len(pl.devices) == 1:
        lines = "; ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in memory_plan(profile).items())
        needs = f"Needs: {lines} (plus activations; the text encoder is freed before caches are allocated)."
        needs += free(pl.home, "The device")
    else:
        per = []
        for (name, plan), dev in zip(device_plans(profile, pl).items(), pl.devices):
            lines = "; ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in plan.items() if not k.startswith("activations"))
            per.append(f"on {name} ({', '.join(pl.parts_on(dev))}): {lines}.{free(dev, name)}")
        needs = ("Needs, per device (plus activations; the text encoder is freed before caches are allocated): "
                 + " ".join(per))
    return (f"out of device memory while {what}. {needs} Use a profile with a smaller cache window "
            f"(cache.window_frames) or resolution, or a GPU with more memory")
