"""The torch backend: one step per part, each a thin adapter over the part's module with the engine's I/O
signature (``io_spec``), so ``components`` run the same recipe on torch or TensorRT.

- ``TorchDiTStep``: ``WanDiT.prepare_context`` (``<dit>.context``), ``WanDiT.forward`` / ``write_kv`` on the
  cache slots of a block (``<dit>.step``); spans of blocks with the block-causal mask (fused commits).
- ``TorchVAEStep``: ``WanVAEDecoder.decode`` from one state of the pair into the other.
- ``TorchScoreStep``: ``ImageReward.score_frames`` (GPU preprocessing inside).

Each step runs its calls under the Runtime's ``MathFlags`` (TF32, cuDNN autotuning); the models hold their
own kernel choices (``configure``). Nothing here changes process state outside a step's call.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import io_spec
from ..components import Decoder
from ..kv_cache import KVCache
from ..vae_state import VAEStatePair


FLAGS_LOCK = threading.RLock()  # torch's math flags are one per process; so is what guards them (MathFlags)


@dataclass(frozen=True)
class MathFlags:
    """torch's math flags that a torch step's calls run under: TF32 tensor cores for fp32 matmuls and
    convolutions (``tf32``; the fp32 scorer: ~1e-3 relative error, far below what separates decisions at
    tau) and cuDNN autotuning (``cudnn_benchmark``; the VAE's 3D convolutions: the fastest algorithm is
    picked on a shape's first call). None leaves a flag as it is (``MathFlags()`` changes nothing).

    torch keeps these flags per process: ``scope`` sets them for the duration of one call and restores
    the previous values after it (host-side setters: no host sync, no allocation on the device). They only
    change CUDA kernels. Under CUDA graphs the captured kernels keep the flags of the capture. A scope that
    sets flags holds ``FLAGS_LOCK`` (one per process, like the flags) for its call, so steps of Runtimes
    with different flags in two threads take turns enqueueing their kernels instead of seeing each other's
    flags; code outside sdvg-rt that changes these flags meanwhile is not guarded."""

    tf32: bool | None = None
    cudnn_benchmark: bool | None = None

    @classmethod
    def from_profile(cls, profile) -> MathFlags:
        """The torch backend's flags for a profile: ``performance.tf32``, cuDNN autotuning on."""
        return cls(tf32=profile.performance.tf32, cudnn_benchmark=True)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        # the legacy setters keep torch's old and new precision views consistent (as torch.backends.cudnn.flags)
        if self.tf32 is None and self.cudnn_benchmark is None:
            yield
            return
        mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        with FLAGS_LOCK:
            saved = mm.allow_tf32, cudnn.allow_tf32, cudnn.benchmark
            if self.tf32 is not None:
                mm.allow_tf32 = cudnn.allow_tf32 = self.tf32
            if self.cudnn_benchmark is not None:
                cudnn.benchmark = self.cudnn_benchmark
            try:
                yield
            finally:
                mm.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = saved


class TorchDiTStep:
    """``WanDiT`` as the ``<dit>.step`` / ``<dit>.context`` engines."""

    fused_commits = True

    def __init__(self, model, math: MathFlags = MathFlags()):
        self.model, self.cfg, self.math = model, model.cfg, math

    def bind(self, cache: KVCache, context: torch.Tensor, ctx_kv: torch.Tensor, x: torch.Tensor,
             num_blocks: int) -> None:
        self.cache, self.context_in, self.ctx_kv = cache, context, ctx_kv

    def context(self) -> None:
        with self.math.scope():
            self.model.prepare_context(self.context_in, out=self.ctx_kv)

    def flow(self, block: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with self.math.scope():
            return self.model(x, t, self.ctx_kv, self.cache.kv, self.cache.slots(block))

    def write_kv(self, block: int, x: torch.Tensor, t: torch.Tensor, blocks: int = 1) -> None:
        mask = self.cache.span_mask(block, blocks) if blocks > 1 else None
        with self.math.scope():
            self.model.write_kv(x, t, self.ctx_kv, self.cache.kv, self.cache.slots(block, blocks), mask=mask)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}


class TorchVAEStep:
    """``WanVAEDecoder.decode`` as the ``vae.first`` / ``vae.step`` engines (states in the model's layout)."""

    def __init__(self, model, convention: str = "reference", math: MathFlags = MathFlags()):
        self.model, self.convention, self.math = model, convention, math
        self.memory_format = model.memory_format

    def bind(self, states: VAEStatePair, z: torch.Tensor, frames: dict[bool, torch.Tensor]) -> None:
        self.states = states.states

    def decode(self, z: torch.Tensor, first: bool, src: int, dst: int) -> torch.Tensor:
        with self.math.scope():
            return self.model.decode(z, None if first else self.states[src], self.states[dst], first,
                                     self.convention)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}


class TorchScoreStep:
    """``ImageReward.score_frames`` as the ``scorer`` engine."""

    def __init__(self, model, math: MathFlags = MathFlags()):
        self.model, self.math = model, math

    def bind(self, ids: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor) -> None:
        self.ids, self.mask = ids, mask

    def score(self, frames: torch.Tensor) -> torch.Tensor:
        with self.math.scope():
            return self.model.score_frames(frames[0].transpose(0, 1), self.ids, self.mask)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}


def vae_decoder(model, h: int, w: int, dtype: torch.dtype | None = None, device=None, *,
                convention: str = "reference", frames_per_block: int = 1, graphs: bool = False) -> Decoder:
    """A ``Decoder`` over a torch VAE for an ``h x w`` latent (dtype and device default to the model's);
    ``frames_per_block`` sizes the static buffers that CUDA graphs use."""
    p = next(model.parameters())
    dtype, device = dtype or p.dtype, device or p.device
    geo = io_spec.Geometry(frames_per_block, h, w, frames_per_block, frames_per_block, 0)
    ios = [io_spec.vae_io(model.config, geo, dtype, first, convention) for first in (True, False)]
    return Decoder(TorchVAEStep(model, convention), *ios, device, graphs=graphs)


def configure(prof, dev: torch.device, models: dict) -> None:
    """The torch backend's GPU fast path (profile section ``performance``), chosen once when a Runtime is
    constructed and held by each model: the attention implementation (every device), and on CUDA one q/k
    GEMM per layer (v's GEMM writes the cache) and the elementwise groups of the DiTs (Triton kernels, the
    rest compiled) and of the VAE (the norms that feed its convolutions as a Triton kernel, the rest compiled;
    sub-pixel upsampling and padded convolutions "auto": on for CUDA tensors) as single kernels. On CPU the
    models keep their eager kernels. (TF32 and cuDNN autotuning are the steps' ``MathFlags``.)"""
    from ..models.attention import Attention
    from ..models.wan_dit import DiTKernels
    from ..models.wan_vae import VAEKernels

    perf = prof.performance
    dits = [models[k] for k in ("drafter", "target") if k in models]
    attention = Attention(perf.attention, dev)  # one kernel choice, held by the models
    for model in dits:
        model.set_attention(attention)
    if dev.type != "cuda":
        return
    kernels = DiTKernels(triton=perf.compile, compile=perf.compile)
    for model in dits:
        model.fuse_qk().set_kernels(kernels)
    if "vae" in models:
        models["vae"].set_kernels(VAEKernels(compile=perf.compile, triton=perf.compile))
