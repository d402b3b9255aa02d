"""The torch backend: one step per part, each a thin adapter over the part's module with the engine's I/O
signature (``io_spec``), so ``components`` run the same recipe on torch or TensorRT.

- ``TorchDiTStep``: ``WanDiT.prepare_context`` (``<dit>.context``), ``WanDiT.forward`` / ``write_kv`` on the
  cache slots of a block (``<dit>.step``); spans of blocks with the block-causal mask (fused commits).
- ``TorchVAEStep``: ``WanVAEDecoder.decode`` from one state of the pair into the other.
- ``TorchScoreStep``: ``ImageReward.score_frames`` (GPU preprocessing inside).
"""
from __future__ import annotations

import torch

from .. import io_spec
from ..components import Decoder
from ..kv_cache import KVCache
from ..vae_state import VAEStatePair


class TorchDiTStep:
    """``WanDiT`` as the ``<dit>.step`` / ``<dit>.context`` engines."""

    fused_commits = True

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg

    def bind(self, cache: KVCache, context: torch.Tensor, ctx_kv: torch.Tensor, x: torch.Tensor,
             num_blocks: int) -> None:
        self.cache, self.context_in, self.ctx_kv = cache, context, ctx_kv

    def context(self) -> None:
        self.model.prepare_context(self.context_in, out=self.ctx_kv)

    def flow(self, block: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, self.ctx_kv, self.cache.kv, self.cache.slots(block))

    def write_kv(self, block: int, x: torch.Tensor, t: torch.Tensor, blocks: int = 1) -> None:
        mask = self.cache.span_mask(block, blocks) if blocks > 1 else None
        self.model.write_kv(x, t, self.ctx_kv, self.cache.kv, self.cache.slots(block, blocks), mask=mask)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}


class TorchVAEStep:
    """``WanVAEDecoder.decode`` as the ``vae.first`` / ``vae.step`` engines (states in the model's layout)."""

    def __init__(self, model, convention: str = "reference"):
        self.model, self.convention = model, convention
        self.memory_format = model.memory_format

    def bind(self, states: VAEStatePair, z: torch.Tensor, frames: dict[bool, torch.Tensor]) -> None:
        self.states = states.states

    def decode(self, z: torch.Tensor, first: bool, src: int, dst: int) -> torch.Tensor:
        return self.model.decode(z, None if first else self.states[src], self.states[dst], first, self.convention)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}


class TorchScoreStep:
    """``ImageReward.score_frames`` as the ``scorer`` engine."""

    def __init__(self, model):
        self.model = model

    def bind(self, ids: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor) -> None:
        self.ids, self.mask = ids, mask

    def score(self, frames: torch.Tensor) -> torch.Tensor:
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


def configure(prof, dev: torch.device, dits: dict) -> None:
    """The torch backend's GPU fast path (profile section ``performance``), chosen once when a Runtime is
    constructed: the attention implementation, one q/k GEMM per layer (v's GEMM writes the cache), and the
    elementwise groups of the DiT and VAE compiled into single kernels. On CPU only the attention choice
    applies (everything else stays eager)."""
    from ..models import wan_dit, wan_vae
    from ..models.attention import Attention

    perf = prof.performance
    attention = Attention(perf.attention, dev)  # one kernel choice, held by the models
    for model in dits.values():
        model.set_attention(attention)
    if dev.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True  # the VAE's 3D convolutions: pick the fastest algorithm once
    # fp32 parts (the scorer by default) use TF32 tensor cores for matmuls: ~1e-3 relative error, far below
    # what separates decisions at tau
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for model in dits.values():
        model.fuse_qk()
    wan_dit.compile_elementwise(perf.compile)
    wan_vae.compile_elementwise(perf.compile)
