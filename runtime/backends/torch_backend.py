"""The torch backend: one object per component, everything preallocated at load.

- ``TorchDenoiser``: one DiT (drafter or target) with its ``KVCache``, its text K/V (``ctx_kv``), its
  noise stream and its block buffers. ``denoise_block(b)`` runs the 4-step schedule with re-noise
  (noise from the (seed, block, step) stream), ``commit_block(b, x)`` the t=0 forward whose only effect
  is writing the block's clean K/V, ``commit_blocks`` several consecutive blocks (one forward with the
  block-causal span mask, or one forward per block).
- ``TorchDecoder``: the VAE over ``VAEStream`` (committed + scratch states; ``keep_scratch`` is a swap).
- ``TorchScorer``: GPU preprocessing + ImageReward, prompt ids/mask in preallocated buffers.

Per-block work lives inside these methods with shapes fixed per block index and no host syncs, so the
CUDA-graph capture (one graph per model and block index) can be added inside them without touching the
loop. Each method returns views of the component's own buffers: valid until the next call.
"""
from __future__ import annotations

import torch

from ..kv_cache import KVCache
from ..noise import NoiseStream
from ..schedule import Schedule, renoise_, x0_from_flow_
from .graphs import CudaGraphs


class TorchDenoiser:
    """One block-causal DiT with its preallocated state (``kind`` is "drafter" or "target")."""

    def __init__(self, model, kind: str, *, latent_shape: tuple[int, int, int], window_frames: int,
                 sink_frames: int, schedule: Schedule, device, dtype: torch.dtype, graphs: bool = False):
        cfg = model.cfg
        frames, h, w = latent_shape  # per block
        self.model, self.kind, self.schedule = model, kind, schedule
        self.device, self.dtype = torch.device(device), dtype
        self.frames_per_block = frames
        tpf = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
        self.cache = KVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, tpf, frames, window_frames,
                             sink_frames, dtype=dtype, device=device)
        T = cfg.text_len
        self.context = torch.zeros(1, T, cfg.text_dim, dtype=dtype, device=device)
        self.ctx_kv = torch.zeros(cfg.num_layers, 2, T, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
        shape = (1, cfg.in_dim, frames, h, w)
        self.x = torch.zeros(shape, dtype=dtype, device=device)  # x_t, the model input
        self.x0 = torch.zeros(shape, dtype=torch.float32, device=device)  # x0 work buffer (fp32 maths)
        self.work = torch.zeros(shape, dtype=torch.float32, device=device)
        self.out = torch.zeros(shape, dtype=dtype, device=device)  # the block's clean latent
        self.commit_in = torch.zeros(shape, dtype=dtype, device=device)  # static input of the commit graphs
        self.graphs = CudaGraphs(graphs, self.device)
        self.noise = NoiseStream(shape, schedule.num_steps, device)
        self.t = schedule.timestep_table(frames, device)  # [steps + 1, F]; last row: t = 0 (commit)
        self.t_commit = torch.zeros(frames * self.cache.window_blocks, dtype=torch.float32, device=device)
        self.sigmas = schedule.sigmas

    # ---- per prompt ------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, context: torch.Tensor) -> None:
        """context [1, T, text_dim] (host or device, padding rows zero) -> ctx_kv, once per prompt."""
        if tuple(context.shape) != tuple(self.context.shape):
            raise ValueError(f"{self.kind}: context must be {tuple(self.context.shape)}, "
                             f"found {tuple(context.shape)} (is the text encoder the one of this model?)")
        self.context.copy_(context, non_blocking=True)
        self.model.prepare_context(self.context, out=self.ctx_kv)

    def set_seed(self, seed: int) -> None:
        self.noise.set_seed(seed)

    # ---- per block -------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise_block(self, block: int) -> torch.Tensor:
        """4 denoising steps of ``block`` (noise from (seed, block, step)) -> clean latent [1, 16, F, h, w].

        Each step writes the block's noisy K/V into its cache slots (overwritten by the commit later).
        Returns ``self.out`` (valid until the next call). One CUDA graph per block index on the GPU.
        """
        self.graphs.run(("denoise", block), lambda: self._denoise(block))
        return self.out

    def _denoise(self, block: int) -> None:
        slots = self.cache.slots(block)
        eps = self.noise.fill(block)  # [steps, 1, 16, F, h, w] fp32
        self.x.copy_(eps[0])
        last = len(self.sigmas) - 1
        for k, sigma in enumerate(self.sigmas):
            # 1. flow prediction at t_k, 2. x0 = x_t - sigma_k * v, 3. re-noise to sigma_{k+1} with fresh noise
            v = self.model(self.x, self.t[k], self.ctx_kv, self.cache.kv, slots)
            x0_from_flow_(self.x0, self.x, v, sigma)
            if k < last:
                renoise_(self.x, self.x0, eps[k + 1], self.sigmas[k + 1], self.work)
        self.out.copy_(self.x0)

    @torch.no_grad()
    def commit_block(self, block: int, x: torch.Tensor) -> None:
        """t = 0 forward on the clean latent x [1, 16, F, h, w]: writes the block's clean K/V (output unused).
        One CUDA graph per block index on the GPU (x is copied into its static input first)."""
        if not self.graphs.enabled:
            self.model.write_kv(x, self.t[-1], self.ctx_kv, self.cache.kv, self.cache.slots(block))
            return
        self.commit_in.copy_(x)
        self.graphs.run(("commit", block), lambda: self.model.write_kv(self.commit_in, self.t[-1], self.ctx_kv,
                                                                       self.cache.kv, self.cache.slots(block)))

    @torch.no_grad()
    def commit_blocks(self, blocks: list[int], xs: torch.Tensor, fused: bool = False) -> None:
        """Commit consecutive ``blocks`` whose latents are ``xs`` [k, 1, 16, F, h, w].

        ``fused``: one forward over all k blocks with the block-causal span mask (only while the span stays
        inside the cache window; otherwise, or if not fused, one forward per block). The fused path computes
        the same K/V up to floating-point reassociation (different matmul shapes) and needs a dense
        [k*n, read_end] mask, so it pays only when launch overhead dominates; per-block commits are
        bit-identical to eager commits.
        """
        if not blocks:
            return
        assert blocks == list(range(blocks[0], blocks[0] + len(blocks))), f"blocks must be consecutive: {blocks}"
        k = len(blocks)
        if fused and k > 1 and blocks[0] + k <= self.cache.window_blocks:
            F = self.frames_per_block
            x = xs[:k].permute(1, 2, 0, 3, 4, 5).reshape(1, xs.shape[2], k * F, *xs.shape[-2:])
            slots = self.cache.slots(blocks[0], k)
            mask = self.cache.span_mask(blocks[0], k)
            self.model.write_kv(x, self.t_commit[: k * F], self.ctx_kv, self.cache.kv, slots, mask=mask)
            return
        for i, b in enumerate(blocks):
            self.commit_block(b, xs[i])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every preallocated state tensor (for memory accounting and tests)."""
        return {"kv": self.cache.kv, "context": self.context, "ctx_kv": self.ctx_kv, "x": self.x, "x0": self.x0,
                "work": self.work, "out": self.out, "commit_in": self.commit_in, "noise": self.noise.out, "noise_key": self.noise.key,
                "t": self.t, "t_commit": self.t_commit}


class TorchDecoder:
    """Streaming VAE decode with a committed and a scratch state (``VAEStream``).

    On the GPU each decode is a CUDA graph keyed by (block 0?, which state is committed): the two
    preallocated states swap roles on ``keep_scratch``, so four graphs cover a video. Latents are copied into
    a static input and frames come back in static per-kind output buffers (valid until the next decode).
    """

    def __init__(self, stream, graphs: bool = False):
        self.stream = stream
        dec = stream.decoder
        dev = next(dec.parameters()).device
        self.graphs = CudaGraphs(graphs, dev)
        self.z_in = self.frames_out = None
        cfg, z = dec.config, stream.committed.slots[0]  # slot 0 is [1, z_dim, 2, h, w]
        _, c, _, h, w = z.shape
        self._shape = (c, h, w, cfg, z.dtype, dev)

    def reset(self) -> None:
        self.stream.reset()

    def _static(self, z: torch.Tensor) -> None:
        c, h, w, cfg, dtype, dev = self._shape
        if self.z_in is None:
            f = z.shape[2]
            self.z_in = torch.zeros(1, c, f, h, w, dtype=dtype, device=dev)
            s = cfg.spatial_scale
            self.frames_out = {first: torch.zeros(1, 3, cfg.frames_out(f, first, self.stream.convention), h * s, w * s,
                                                  dtype=dtype, device=dev) for first in (True, False)}
        self.z_in.copy_(z)

    @torch.no_grad()
    def decode_scratch(self, z: torch.Tensor, block: int) -> torch.Tensor:
        """Decode a draft from the committed state into the scratch state; the committed state is untouched."""
        if not self.graphs.enabled:
            return self.stream.decode_scratch(z, block)
        self._static(z)
        first = block == 0
        out = self.frames_out[first]
        self.graphs.run(("decode", first, self.stream.parity),
                        lambda: out.copy_(self.stream.decode_scratch(self.z_in, block)))
        self.stream.scratch_ready = True  # a replay skips decode_scratch's host-side bookkeeping
        return out

    def keep_scratch(self) -> None:
        """Accept: the scratch state becomes the committed one (a swap of references, no copy)."""
        self.stream.keep_scratch()

    @torch.no_grad()
    def decode_commit(self, z: torch.Tensor, block: int) -> torch.Tensor:
        frames = self.decode_scratch(z, block)
        self.keep_scratch()
        return frames

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = self.stream.state_tensors()
        if self.z_in is not None:
            out.update({"z_in": self.z_in, **{f"frames_out_{k}": v for k, v in self.frames_out.items()}})
        return out


class TorchScorer:
    """ImageReward on decoded frames: ``score(frames [1, 3, N, H, W]) -> [N] float32`` (device)."""

    def __init__(self, model, tokenizer, device, graphs: bool = False):
        self.model, self.tokenizer = model, tokenizer
        n = model.cfg.text_length
        self.ids = torch.zeros(1, n, dtype=torch.int64, device=device)
        self.mask = torch.zeros(1, n, dtype=torch.int64, device=device)
        self.graphs = CudaGraphs(graphs, device)
        self.out: dict = {}  # static outputs per captured input (frames buffers are static: the decoder's)

    def prepare(self, prompt: str) -> None:
        ids, mask = self.tokenizer(prompt)  # host, [1, 35] each
        self.ids.copy_(ids, non_blocking=True)
        self.mask.copy_(mask, non_blocking=True)

    @torch.no_grad()
    def score(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [1, 3, N, H, W] in [-1, 1] (the decoder's output) -> per-frame rewards [N] float32.
        On the GPU one CUDA graph per input buffer (the decoder's few static frame buffers)."""
        if not self.graphs.enabled:
            return self.model.score_frames(frames[0].transpose(0, 1), self.ids, self.mask)
        key = (frames.data_ptr(), tuple(frames.shape))
        if key not in self.out:
            self.out[key] = torch.zeros(frames.shape[2], dtype=torch.float32, device=frames.device)
        out = self.out[key]
        self.graphs.run(key, lambda: out.copy_(self.model.score_frames(frames[0].transpose(0, 1), self.ids, self.mask)))
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "mask": self.mask}
