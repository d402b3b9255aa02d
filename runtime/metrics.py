"""Quality metrics of a generated video, for sweeps: a small interface, a registry, and the built-ins.

A metric turns one video's frames (uint8 [F, H, W, 3]) into a few named numbers. Reference metrics
(``needs_reference``) compare them with the target-only video of the same prompt and seed::

    class VisionReward:                           # a user's metric (any object with these members)
        name = "visionreward"
        columns = ("visionreward",)
        needs_reference = False
        ratio = True                              # positive scores: report quality as % of target-only
        def __call__(self, frames, *, prompt, reference=None) -> dict[str, float]: ...

    sdvg_rt.metrics.register("visionreward", lambda ctx: VisionReward(ctx.device))

or, from an installed package, an entry point in the group ``sdvg_rt.metrics`` naming the same
factory (``factory(ctx: MetricContext) -> QualityMetric``). ``sdvg-rt sweep --metrics a,b`` picks them;
``--metrics-module mypkg.metrics`` imports a module that calls ``register`` first.

Built-ins: ``imagereward`` (the runtime's own ImageReward implementation and checkpoint, mean and worst
frame), ``psnr`` (video PSNR from the mean squared error over all frames, and the worst frame's) and
``ssim`` (scikit-image's structural similarity, Gaussian-weighted as in Wang et al. 2004, mean and worst
frame; the optional ``sweep`` extra).
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import DependencyError, SdvgError

ENTRY_POINT_GROUP = "sdvg_rt.metrics"
DEFAULT_METRICS = ("imagereward", "psnr", "ssim")


@runtime_checkable
class QualityMetric(Protocol):
    """``__call__(frames uint8 [F, H, W, 3], prompt=..., reference=uint8 [F, H, W, 3] or None)`` returns
    one float per name in ``columns``. ``ratio``: whether "quality retention" of a setting is the ratio
    of its mean to target-only's (positive scores) rather than the difference."""

    name: str
    columns: tuple[str, ...]
    needs_reference: bool
    ratio: bool

    def __call__(self, frames: np.ndarray, *, prompt: str, reference: np.ndarray | None = None) -> dict[str, float]:
        ...


@dataclass(frozen=True)
class MetricContext:
    """What a metric factory may use: the sweep's profile (checkpoint paths, precision) and torch device."""

    profile: object
    device: object


_REGISTRY: dict[str, Callable[[MetricContext], QualityMetric]] = {}


def register(name: str, factory: Callable[[MetricContext], QualityMetric]) -> None:
    """Make ``name`` available to ``build`` (a later registration of the same name replaces it)."""
    _REGISTRY[name] = factory


def available() -> dict[str, Callable[[MetricContext], QualityMetric]]:
    """Registered factories plus the installed packages' entry points (group ``sdvg_rt.metrics``)."""
    from importlib.metadata import entry_points

    out = dict(_REGISTRY)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, ep.load)  # loaded only when built
    return out


def import_plugins(modules: list[str]) -> None:
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise SdvgError(f"--metrics-module {mod!r} cannot be imported ({e}); give an importable module that "
                            f"calls sdvg_rt.metrics.register(name, factory)") from None


def build(names: list[str] | tuple[str, ...], ctx: MetricContext) -> list[QualityMetric]:
    """The metrics named, built once (a factory may load a model)."""
    known = available()
    out = []
    for name in names:
        if name not in known:
            raise SdvgError(f"unknown quality metric {name!r}; available: {', '.join(sorted(known))} (add one with "
                            f"sdvg_rt.metrics.register or an entry point in the group {ENTRY_POINT_GROUP!r})")
        factory = known[name]
        if factory is not _REGISTRY.get(name):  # an entry point: load() gives the factory
            factory = factory()
        metric = factory(ctx)
        if not isinstance(metric, QualityMetric):
            raise SdvgError(f"quality metric {name!r}: its factory returned {type(metric).__name__}, which lacks "
                            "name, columns, needs_reference, ratio or __call__ (see sdvg_rt.metrics.QualityMetric)")
        out.append(metric)
    return out


def score(metrics: list[QualityMetric], frames: np.ndarray, prompt: str, reference: np.ndarray) -> dict[str, float]:
    """Every metric's columns for one video (reference: the target-only frames of the same prompt and seed)."""
    out: dict[str, float] = {}
    for m in metrics:
        vals = m(frames, prompt=prompt, reference=reference if m.needs_reference else None)
        missing = set(m.columns) - set(vals)
        if missing:
            raise SdvgError(f"quality metric {m.name!r} did not return {sorted(missing)}")
        out.update({k: float(vals[k]) for k in m.columns})
    return out


def _check_pair(frames: np.ndarray, reference: np.ndarray | None, name: str) -> None:
    if reference is None or reference.shape != frames.shape:
        raise SdvgError(f"{name} compares a video with its target-only reference of the same shape; got "
                        f"{frames.shape} against {None if reference is None else reference.shape}")


# ---- built-ins ---------------------------------------------------------------------------------------
class ImageRewardMetric:
    """ImageReward v1.0 of every output frame against the prompt (the runtime's implementation, the
    profile's scorer checkpoint and precision): mean over frames and the worst frame."""

    name = "imagereward"
    columns = ("imagereward_mean", "imagereward_min")
    needs_reference = False
    ratio = False  # rewards are normalised around 0 and can be negative: report the difference

    def __init__(self, model, tokenizer, device, batch: int = 12):
        self.model, self.tokenizer, self.device, self.batch = model, tokenizer, device, batch

    @classmethod
    def from_context(cls, ctx: MetricContext) -> ImageRewardMetric:
        from .checkpoints.imagereward import load_imagereward
        from .io_spec import DTYPES

        prof = ctx.profile
        model, tok = load_imagereward(prof.checkpoints.scorer, device=ctx.device, dtype=DTYPES[prof.scorer_precision])
        return cls(model, tok, ctx.device)

    def __call__(self, frames, *, prompt, reference=None):
        import torch

        ids, mask = (t.to(self.device) for t in self.tokenizer(prompt))
        scores = []
        with torch.no_grad():
            for i in range(0, len(frames), self.batch):
                x = torch.from_numpy(np.ascontiguousarray(frames[i:i + self.batch])).to(self.device)
                x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # [N, 3, H, W] in [-1, 1]
                scores.append(self.model.score_frames(x, ids, mask).float().cpu())
        s = torch.cat(scores).numpy().astype(np.float64)
        return {"imagereward_mean": float(s.mean()), "imagereward_min": float(s.min())}


def psnr(frames: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(video PSNR in dB from the mean squared error over all frames, worst frame's PSNR); inf if equal."""
    err = (frames.astype(np.float64) - reference.astype(np.float64)) ** 2
    per_frame = err.reshape(len(err), -1).mean(axis=1)

    def db(mse):
        return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)
    return db(per_frame.mean()), db(per_frame.max())


class PSNRMetric:
    name = "psnr"
    columns = ("psnr_db", "psnr_min_db")
    needs_reference = True
    ratio = False

    def __call__(self, frames, *, prompt, reference=None):
        _check_pair(frames, reference, "psnr")
        video, worst = psnr(frames, reference)
        return {"psnr_db": video, "psnr_min_db": worst}


class SSIMMetric:
    """Per-frame SSIM (scikit-image, RGB, Gaussian window sigma 1.5, population covariance: the settings of
    Wang et al. 2004) against the target-only frames; mean and worst frame."""

    name = "ssim"
    columns = ("ssim", "ssim_min")
    needs_reference = True
    ratio = True  # 1.0 is the target-only video itself

    def __init__(self):
        try:
            from skimage.metrics import structural_similarity
        except ImportError:
            raise DependencyError("the ssim metric needs scikit-image: pip install 'sdvg-rt[sweep]' (or leave ssim "
                                  "out of --metrics)") from None
        self._ssim = structural_similarity

    def __call__(self, frames, *, prompt, reference=None):
        _check_pair(frames, reference, "ssim")
        s = [self._ssim(a, b, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                        use_sample_covariance=False) for a, b in zip(frames, reference)]
        return {"ssim": float(np.mean(s)), "ssim_min": float(np.min(s))}


register("imagereward", ImageRewardMetric.from_context)
register("psnr", lambda ctx: PSNRMetric())
register("ssim", lambda ctx: SSIMMetric())
