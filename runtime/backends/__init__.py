"""Execution backends, chosen per part in the profile (``backends.<part>: torch | tensorrt``).

A backend supplies one *step* per part with the engine's I/O signature (``io_spec``): torch steps adapt
the modules (``torch_backend``), TensorRT steps enqueue engines (``tensorrt_backend``). The per-block
recipe around a step is written once, in ``sdvg_rt.components``. This module makes the choice, in one
place: ``check`` (before anything is loaded), ``torch_parts`` (which weights to load), ``configure`` (the torch
fast path, held by the loaded models), ``math_flags`` (TF32 and cuDNN autotuning around the torch parts'
calls), ``build`` (the steps).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import BackendUnavailableError
from ..io_spec import PARTS


def tensorrt_status() -> tuple[bool, str]:
    """(usable, detail) from ``tensorrt_backend.tensorrt_module`` (a bare import can succeed on a stub)."""
    from .tensorrt_backend import flavour_status

    return flavour_status()


def check_backend(component: str, name: str) -> None:
    """The gate, before anything is loaded: ``torch`` is always usable; ``tensorrt`` needs an importable
    TensorRT with a ``Builder`` (its engines and manifest are checked when they are opened)."""
    if name == "torch":
        return
    usable, detail = tensorrt_status()
    if not usable:
        raise BackendUnavailableError(
            f"backends.{component} is '{name}' but TensorRT is not usable here: {detail}. Install TensorRT "
            f"(pip install 'sdvg-rt[trt]' tensorrt) and build the engines (make engines PROFILE=<profile>), or "
            f"set backends.{component}: torch in the profile (or pass backends__{component}='torch')")


def check(profile) -> None:
    """Every part's backend is usable here (``check_backend``)."""
    for part in PARTS:
        check_backend(part, getattr(profile.backends, part))


def torch_parts(profile) -> list[str]:
    """The parts that run on torch (their weights are loaded; TensorRT parts live in their engines)."""
    return [p for p in PARTS if getattr(profile.backends, p) == "torch"]


def configure(profile, models: dict, device) -> None:
    """The torch fast-path choices of the profile's ``performance`` section, given to the loaded torch
    modules (``torch_backend.configure``: each model holds its own), once, when a Runtime is constructed."""
    from .torch_backend import configure as configure_torch

    configure_torch(profile, torch.device(device), models)


def math_flags(profile):
    """The torch math flags (TF32, cuDNN autotuning) that the torch parts' calls run under
    (``torch_backend.MathFlags``)."""
    from .torch_backend import MathFlags

    return MathFlags.from_profile(profile)


def build(profile, models: dict, placement, *, engines_dir=None) -> dict[str, Any]:
    """One step per part, torch or TensorRT as the profile says: ``drafter``, ``target`` (DiT steps),
    ``vae`` (VAE step), ``scorer`` (score step). ``models`` holds the loaded torch modules (each on its
    part's device); ``placement`` is a ``placement.Placement`` or one device for every part. TensorRT
    parts are opened per device, each device's engines sharing one activation allocation."""
    import contextlib

    from ..placement import Placement
    from .tensorrt_backend import build_steps
    from .torch_backend import TorchDiTStep, TorchScoreStep, TorchVAEStep

    pl = placement if isinstance(placement, Placement) else Placement.one(placement)
    on_torch = torch_parts(profile)
    steps: dict[str, Any] = {}
    for dev in pl.devices:
        parts = [p for p in PARTS if p not in on_torch and p in pl.parts_on(dev)]
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            steps.update(build_steps(profile, parts, dev, engines_dir=engines_dir))
    math = math_flags(profile)
    for kind in ("drafter", "target"):
        if kind in on_torch:
            steps[kind] = TorchDiTStep(models[kind], math)
    if "vae" in on_torch:
        steps["vae"] = TorchVAEStep(models["vae"], math=math)
    if "scorer" in on_torch:
        steps["scorer"] = TorchScoreStep(models["scorer"], math)
    return steps
