"""The loop's components, written once for every backend: ``Denoiser``, ``Decoder``, ``Scorer``.

A component owns a part's per-video state and its per-block recipe; a backend *step* (``backends``)
only runs one forward with the engine's I/O signature (``io_spec``):

- ``Denoiser``: one DiT (drafter or target) with its ``KVCache``, its text K/V (``ctx_kv``), its noise
  stream and its block buffers. ``denoise_block(b)`` runs the 4-step schedule with re-noise (noise from
  the (seed, block, step) stream), ``commit_block(b, x)`` the t = 0 forward whose only effect is writing
  the block's clean K/V, ``commit_blocks`` several consecutive blocks.
- ``Decoder``: the streaming VAE over a committed/scratch ``VAEStatePair``; ``keep_scratch`` is a swap.
- ``Scorer``: ImageReward on decoded frames, prompt ids/mask in preallocated buffers.

Every buffer is allocated at construction from ``io_spec`` shapes. Per-block work has shapes fixed per
block index and no host syncs; on the GPU each runs as a CUDA graph (``backends.graphs.CudaGraphs``)
keyed by what it bakes in: ("denoise", block), ("commit", block) for a denoiser, ("decode", block 0?,
parity) for the decoder, (frames, source address) for the scorer. Methods return views of the
component's (or its step's) buffers, valid until the next call of the same kind.

Each component lives on its own device (the profile's ``devices``: the target may have a GPU of its
own) and makes that device current for its per-prompt and per-block work (``on_own_device``): Triton
and FlashAttention-4 kernels, TensorRT enqueues and graph captures run on the current device.
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch

from . import io_spec
from .backends.graphs import CudaGraphs
from .kv_cache import KVCache
from .noise import NoiseStream
from .schedule import Schedule, renoise_, x0_from_flow_
from .vae_state import VAEState, VAEStatePair


# --------------------------------------------------------------------------------------------------
# What a backend supplies per part (torch: module adapters; TensorRT: engine enqueues)

class DiTStep(Protocol):
    """One DiT forward of one block (``<dit>.step``) and the per-prompt text K/V (``<dit>.context``)."""

    cfg: object
    fused_commits: bool  # whether write_kv takes a span of blocks with its block-causal mask

    def bind(self, cache: KVCache, context: torch.Tensor, ctx_kv: torch.Tensor, x: torch.Tensor,
             num_blocks: int) -> None: ...
    def context(self) -> None: ...  # context -> ctx_kv
    def flow(self, block: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def write_kv(self, block: int, x: torch.Tensor, t: torch.Tensor, blocks: int = 1) -> None: ...
    def state_tensors(self) -> dict[str, torch.Tensor]: ...


class VAEStep(Protocol):
    """One block of the streaming VAE (``vae.first`` / ``vae.step``): z and the history in ``src`` ->
    frames, the new history in ``dst``."""

    memory_format: torch.memory_format

    def bind(self, states: VAEStatePair, z: torch.Tensor, frames: dict[bool, torch.Tensor]) -> None: ...
    def decode(self, z: torch.Tensor, first: bool, src: int, dst: int) -> torch.Tensor: ...
    def state_tensors(self) -> dict[str, torch.Tensor]: ...


class ScoreStep(Protocol):
    """ImageReward (``scorer``): frames [1, 3, N, H, W], ids, mask -> rewards [N] float32."""

    def bind(self, ids: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor) -> None: ...
    def score(self, frames: torch.Tensor) -> torch.Tensor: ...
    def state_tensors(self) -> dict[str, torch.Tensor]: ...


# --------------------------------------------------------------------------------------------------
# Components

def on_own_device(method):
    """Run a component method with the component's CUDA device current (nothing to do on the CPU)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self.device.type != "cuda":
            return method(self, *args, **kwargs)
        with torch.cuda.device(self.device):
            return method(self, *args, **kwargs)
    return run


class Denoiser:
    """One block-causal DiT with its preallocated state (``kind`` is "drafter" or "target")."""

    def __init__(self, step: DiTStep, kind: str, *, latent_shape: tuple[int, int, int], window_frames: int,
                 sink_frames: int, schedule: Schedule, device, dtype: torch.dtype, num_blocks: int = 0,
                 graphs: bool = False):
        cfg = self.cfg = step.cfg
        frames, h, w = latent_shape  # per block
        self.step, self.kind, self.schedule = step, kind, schedule
        self.device, self.dtype = torch.device(device), dtype
        self.frames_per_block = frames
        geo = io_spec.Geometry(frames, h, w, max(num_blocks * frames, window_frames), window_frames, sink_frames)
        shapes = {**io_spec.dit_step_io(kind, cfg, geo, dtype).shapes(),
                  **io_spec.dit_context_io(kind, cfg, dtype).shapes()}
        dev = self.device
        self.cache = KVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, geo.tokens_per_frame, frames,
                             window_frames, sink_frames, dtype=dtype, device=dev)
        self.context = torch.zeros(shapes["context"], dtype=dtype, device=dev)
        self.ctx_kv = torch.zeros(shapes["ctx_kv"], dtype=dtype, device=dev)
        shape = shapes["x"]
        self.x = torch.zeros(shape, dtype=dtype, device=dev)  # x_t, the model input
        self.x0 = torch.zeros(shape, dtype=torch.float32, device=dev)  # x0 work buffer (fp32 maths)
        self.work = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.out = torch.zeros(shape, dtype=dtype, device=dev)  # the block's clean latent
        self.commit_in = torch.zeros(shape, dtype=dtype, device=dev)  # static input of the commit graphs
        self.graphs = CudaGraphs(graphs, dev)
        self.noise = NoiseStream(shape, schedule.num_steps, dev)
        self.t = schedule.timestep_table(frames, dev)  # [steps + 1, F]; last row: t = 0 (commit)
        self.t_commit = torch.zeros(frames * self.cache.window_blocks, dtype=torch.float32, device=dev)
        self.sigmas = schedule.sigmas
        step.bind(self.cache, self.context, self.ctx_kv, self.x, num_blocks)

    # ---- per prompt ------------------------------------------------------------------------------
    @torch.no_grad()
    @on_own_device
    def prepare(self, context: torch.Tensor) -> None:
        """context [1, T, text_dim] (host or device, padding rows zero) -> ctx_kv, once per prompt."""
        if tuple(context.shape) != tuple(self.context.shape):
            raise ValueError(f"{self.kind}: context must be {tuple(self.context.shape)}, "
                             f"found {tuple(context.shape)} (is the text encoder the one of this model?)")
        self.context.copy_(context, non_blocking=True)
        self.step.context()

    def set_seed(self, seed: int) -> None:
        self.noise.set_seed(seed)

    # ---- per block -------------------------------------------------------------------------------
    @torch.no_grad()
    @on_own_device
    def denoise_block(self, block: int) -> torch.Tensor:
        """4 denoising steps of ``block`` (noise from (seed, block, step)) -> clean latent [1, 16, F, h, w].

        Each step writes the block's noisy K/V into its cache slots (overwritten by the commit later).
        Returns ``self.out`` (valid until the next call).
        """
        self.graphs.run(("denoise", block), lambda: self._denoise(block))
        return self.out

    def _denoise(self, block: int) -> None:
        eps = self.noise.fill(block)  # [steps, 1, 16, F, h, w] fp32
        self.x.copy_(eps[0])
        last = len(self.sigmas) - 1
        for k, sigma in enumerate(self.sigmas):
            # 1. flow prediction at t_k, 2. x0 = x_t - sigma_k * v, 3. re-noise to sigma_{k+1} with fresh noise
            v = self.step.flow(block, self.x, self.t[k])
            x0_from_flow_(self.x0, self.x, v, sigma)
            if k < last:
                renoise_(self.x, self.x0, eps[k + 1], self.sigmas[k + 1], self.work)
        self.out.copy_(self.x0)

    @torch.no_grad()
    @on_own_device
    def commit_block(self, block: int, x: torch.Tensor) -> None:
        """t = 0 forward on the clean latent x [1, 16, F, h, w]: writes the block's clean K/V (output unused).
        Under a CUDA graph x is first copied into the graph's static input."""
        if self.graphs.enabled:
            self.commit_in.copy_(x)
            x = self.commit_in
        self.graphs.run(("commit", block), lambda: self.step.write_kv(block, x, self.t[-1]))

    @torch.no_grad()
    @on_own_device
    def commit_blocks(self, blocks: list[int], xs: torch.Tensor, fused: bool = False) -> None:
        """Commit consecutive ``blocks`` whose latents are ``xs`` [k, 1, 16, F, h, w].

        ``fused`` (and a step that takes spans): one forward over all k blocks with the block-causal span
        mask, only while the span stays inside the cache window; otherwise one forward per block. The
        fused path computes the same K/V up to floating-point reassociation (other matmul shapes) and
        needs a dense [k*n, read_end] mask, so it pays only when launch overhead dominates; per-block
        commits are bit-identical to eager commits.
        """
        if not blocks:
            return
        assert blocks == list(range(blocks[0], blocks[0] + len(blocks))), f"blocks must be consecutive: {blocks}"
        k = len(blocks)
        if fused and self.step.fused_commits and k > 1 and blocks[0] + k <= self.cache.window_blocks:
            F = self.frames_per_block
            x = xs[:k].permute(1, 2, 0, 3, 4, 5).reshape(1, xs.shape[2], k * F, *xs.shape[-2:])
            self.step.write_kv(blocks[0], x, self.t_commit[: k * F], blocks=k)
            return
        for i, b in enumerate(blocks):
            self.commit_block(b, xs[i])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every preallocated state tensor (for memory accounting and tests)."""
        return {"kv": self.cache.kv, "context": self.context, "ctx_kv": self.ctx_kv, "x": self.x, "x0": self.x0,
                "work": self.work, "out": self.out, "commit_in": self.commit_in, "noise": self.noise.out,
                "noise_key": self.noise.key, "t": self.t, "t_commit": self.t_commit, **self.step.state_tensors()}


class Decoder:
    """Streaming VAE decode with a committed and a scratch state (``VAEStatePair``).

    Under CUDA graphs each decode is a graph keyed by (block 0?, parity): the two preallocated states swap
    roles on ``keep_scratch``, so four graphs cover a video; latents are copied into the static input
    ``z`` and frames come back in the static per-kind buffers ``frames[first]``. Without graphs the
    step's own output is returned. Either way valid until the next decode of the same kind.
    """

    def __init__(self, step: VAEStep, io_first: io_spec.EngineIO, io_step: io_spec.EngineIO, device,
                 graphs: bool = False):
        self.step, self.device = step, torch.device(device)
        shapes, first_shapes = io_step.shapes(), io_first.shapes()
        dt = io_step.inputs[0].torch_dtype
        n_states = sum(1 for t in io_step.inputs if t.name.startswith("state_in."))
        self.state = VAEStatePair([shapes[f"state_in.{j}"] for j in range(n_states)], dt, self.device,
                                  step.memory_format)
        self.z = torch.zeros(shapes["z"], dtype=dt, device=self.device)
        self.frames = {True: torch.zeros(first_shapes["frames"], dtype=dt, device=self.device),
                       False: torch.zeros(shapes["frames"], dtype=dt, device=self.device)}
        self.graphs = CudaGraphs(graphs, self.device)
        step.bind(self.state, self.z, self.frames)

    @property
    def committed(self) -> VAEState:
        return self.state.committed

    @property
    def scratch(self) -> VAEState:
        return self.state.scratch

    @property
    def parity(self) -> int:
        return self.state.parity

    def reset(self) -> None:
        self.state.reset()

    @torch.no_grad()
    @on_own_device
    def decode_scratch(self, z: torch.Tensor, block: int) -> torch.Tensor:
        """Decode a block from the committed state into the scratch state; the committed state is untouched."""
        first, src = block == 0, self.state.parity
        if self.graphs.enabled:
            self.z.copy_(z)
            out = self.frames[first]

            def run():
                f = self.step.decode(self.z, first, src, 1 - src)
                if f.data_ptr() != out.data_ptr():  # a TensorRT step writes into ``out`` itself
                    out.copy_(f)
            self.graphs.run(("decode", first, src), run)
        else:
            out = self.step.decode(z, first, src, 1 - src)
        self.state.wrote_scratch()
        return out

    def keep_scratch(self) -> None:
        """Accept: the scratch state becomes the committed one (a swap of references, no copy)."""
        self.state.keep()

    @torch.no_grad()
    def decode_commit(self, z: torch.Tensor, block: int) -> torch.Tensor:
        frames = self.decode_scratch(z, block)
        self.keep_scratch()
        return frames

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.state.state_tensors(), "z": self.z,
                **{f"frames_{'first' if k else 'step'}": v for k, v in self.frames.items()},
                **self.step.state_tensors()}


class Scorer:
    """ImageReward on decoded frames: ``score(frames [1, 3, N, H, W]) -> [N] float32`` (device)."""

    def __init__(self, step: ScoreStep, tokenizer, io: io_spec.EngineIO, device, graphs: bool = False):
        self.step, self.tokenizer, self.device = step, tokenizer, torch.device(device)
        shapes = io.shapes()  # N at its max
        self.ids = torch.zeros(shapes["ids"], dtype=torch.int64, device=self.device)
        self.mask = torch.zeros(shapes["mask"], dtype=torch.int64, device=self.device)
        self.rewards = torch.zeros(shapes["rewards"], dtype=torch.float32, device=self.device)
        self.graphs = CudaGraphs(graphs, self.device)
        step.bind(self.ids, self.mask, self.rewards)

    def prepare(self, prompt: str) -> None:
        ids, mask = self.tokenizer(prompt)  # host, [1, 35] each
        self.ids.copy_(ids, non_blocking=True)
        self.mask.copy_(mask, non_blocking=True)

    @torch.no_grad()
    @on_own_device
    def score(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [1, 3, N, H, W] in [-1, 1] (the decoder's output) -> per-frame rewards [N] float32.
        Under CUDA graphs one graph per input buffer (the decoder's static frame buffers)."""
        if not self.graphs.enabled:
            return self.step.score(frames)
        out = self.rewards[: frames.shape[2]]

        def run():
            r = self.step.score(frames)
            if r.data_ptr() != out.data_ptr():  # a TensorRT step writes into ``out`` itself
                out.copy_(r)
        self.graphs.run((frames.shape[2], frames.data_ptr()), run)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "mask": self.mask, "rewards": self.rewards, **self.step.state_tensors()}
