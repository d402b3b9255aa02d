"""The one place tests reach the runtime's internal classes and hooks (renames are fixed here).

Public API first (``sdvg_rt.Runtime``, the loop); the component classes, the loop's decision hook and the
graph runner are reached only through these helpers.
"""
from __future__ import annotations

import torch

from sdvg_rt.api import Runtime
from sdvg_rt import components as _components
from sdvg_rt import decide as _decide
from sdvg_rt.backends import torch_backend
from sdvg_rt.backends.graphs import CudaGraphs
from sdvg_rt.checkpoints.synthetic import make_synthetic_set
from sdvg_rt.placement import Placement
from sdvg_rt.profiles import demo_profile

COMPONENTS = ("drafter", "target", "decoder", "scorer")


def tiny_set(tmp_path_factory):
    """The synthetic tiny set, written once per session (make_synthetic_set skips finished parts)."""
    d = tmp_path_factory.getbasetemp() / "sdvg-rt-tiny-set"
    make_synthetic_set(d, "tiny", 0, log=None)
    return d


def tiny_runtime(tmp_path_factory, prompts=("a red fox running through fresh snow",), **geometry) -> Runtime:
    """An allocated CPU Runtime on the tiny synthetic set with ``geometry`` overrides (demo_profile names)."""
    geo = dict(width=32, height=32, latent_frames=3, frames_per_block=1, window_frames=3)
    geo.update(geometry)
    r = Runtime.from_profile(demo_profile(tiny_set(tmp_path_factory), **geo), "cpu")
    r.prompts = r.encode_prompts(list(prompts))
    r.release_text_encoder()
    r.allocate()
    return r


def split_twin(rt) -> Runtime:
    """An allocated Runtime over ``rt``'s models (and prompts) whose target runs through the two-device
    path (``Placement.split``) with both sides on ``rt``'s device: on the CPU, the cross-device copies,
    the target's mirror of the latents and its commits enqueued when decided, with no-op streams."""
    twin = Runtime(rt.profile, rt.device, rt.models, None, 0.0, placement=Placement.split(rt.device, rt.device))
    twin.prompts = rt.prompts
    twin.allocate()
    return twin


def components(rt) -> dict:
    """The loop's four components by role."""
    lp = rt.loop
    return {"drafter": lp.drafter, "target": lp.target, "decoder": lp.decoder, "scorer": lp.scorer}


def models(rt) -> dict:
    """The loaded models (drafter, target, vae, scorer, scorer_tokenizer)."""
    return rt.models


def make_denoiser(model, kind: str, *, latent_shape, window_frames: int, sink_frames: int, schedule,
                  dtype=torch.float32, device="cpu"):
    """A fresh denoiser component (the class the runtime builds for torch-backed DiTs)."""
    return _components.Denoiser(torch_backend.TorchDiTStep(model), kind, latent_shape=latent_shape,
                                window_frames=window_frames, sink_frames=sink_frames, schedule=schedule,
                                device=device, dtype=dtype)


def set_decide(loop, fn) -> None:
    """Replace the loop's per-block decision (``fn(mode, block, score, tau, finite) -> Decision``)."""
    loop.decide = fn


def clear_decide(loop) -> None:
    loop.decide = _decide.decide


class StandInGraph:
    """A CUDA-graph stand-in: ``capture(fn)`` records the call, ``replay()`` re-runs the recorded call, so it
    writes into whatever buffers the captured closure bound (as a real graph replays into its static
    addresses: a path that hands fresh tensors to the graph instead of its static inputs/outputs breaks)."""

    replays = 0

    def capture(self, fn) -> None:
        self.fn = fn

    def replay(self) -> None:
        StandInGraph.replays += 1
        self.fn()


def use_standin_graphs(rt) -> list:
    """Give every component of ``rt`` a graph runner built on ``StandInGraph`` (enabled on CPU)."""
    runners = []
    for c in components(rt).values():
        if hasattr(c, "graphs"):
            c.graphs = CudaGraphs(True, c.graphs.device, graph_factory=StandInGraph)
            runners.append(c.graphs)
    return runners


def use_eager(rt) -> None:
    for c in components(rt).values():
        if hasattr(c, "graphs"):
            c.graphs = CudaGraphs(False, c.graphs.device)
