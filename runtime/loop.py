"""The speculative loop (sdvg-runtime.md §3), one prompt at a time.

    prepare(prompt): text K/V of both models, ImageReward tokens, fresh VAE stream, noise seed
    for block b:
      if the drafter proposes b (sdvg: b > 0; draft mode: every block):
          xd = drafter.denoise(b)
          sdvg: frames_d = vae.decode_scratch(xd); s = block_score(imagereward(frames_d))  (worst frame)
      SYNC (the only one of the block): read the decision inputs (scores, finiteness)
      decision = decide(mode, b, s, tau, finite)
      accepted: drafter.commit(b, xd); target.commit(b, xd) (sdvg) lazily or now; vae.keep_scratch()
      forced / rejected: target.commit(pending accepted blocks); x = target.denoise(b);
                         target.commit(b, x); drafter.commit(b, x) (sdvg); frames = vae.decode_commit(x)
      draft mode: drafter.commit(b, xd); frames = vae.decode_commit(xd)
      emit(b, frames, record)

Syncs: exactly one per block, at its decision point (after scoring in sdvg blocks, before denoising
otherwise), plus one after the per-prompt preparation (to read its times) and one at the end. Each sync
also completes everything the previous block enqueued, so block b-1's frames (copied to the host
asynchronously) and its record (CUDA-event times) are emitted after it: once an accepted block's commit
and decode are enqueued (the GPU works while the caller takes the frames), before a target block's work
otherwise. Its committed latents and frames are checked for NaN/inf (``NumericalError`` naming the
block). Commits of the last block are never run (nothing reads them); with lazy commits, accepted blocks
reach the target's cache only when the target is next needed, and those still pending at the end are
skipped.

With the target on a device of its own (the profile's ``devices``: ``placement``), the loop's buffers and
its sync live on the drafter's side. A committed block crosses to the target (accepted) or from it
(target block) in one async copy, and an accepted block's target commit is enqueued as soon as it is
decided, so it runs while the drafter's side works on the next block. The per-block sync waits for the
drafter's side only; the target's queue is waited for where its output is needed (a target block) and
by the prepare and final syncs (``placement.CrossDevice``). On one device the work runs in the order
above.

Noise comes only from the (seed, block, step) stream of each denoiser, so decisions never shift it and
``sdvg`` with tau = +inf reproduces ``target`` bit for bit.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .components import Decoder, Denoiser, Scorer
from .decide import ACCEPTED, CommitQueue, Decision, block_score, check_mode, check_tau, decide, drafts, scores
from .errors import NumericalError
from .models.imagereward import quantise_frames
from .placement import Placement, link_for
from .stats import BlockRecord, Timer, summarize


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready for generation: its text and its umT5 context [1, T, text_dim] (host or device)."""

    text: str
    context: torch.Tensor


@dataclass(frozen=True)
class BlockOutput:
    """One committed block: its index, uint8 frames [f, H, W, 3] (host numpy) and its record."""

    block: int
    frames: np.ndarray
    record: BlockRecord


DecideFn = Callable[..., Decision]  # (mode, block, score, tau, finite) -> Decision, as ``decide.decide``


class Status:
    """Slots of the loop's status vector, read on the host at each sync."""

    LATENTS = 0  # fp32 sum of the committed latents of the block in flight (finite iff they are)
    FRAMES = 1  # fp32 sum of its committed frames
    DRAFT = 2  # fp32 sum of the current draft
    SCORES = 3  # the draft's per-frame scores, from here on


def _finite_sum(x: torch.Tensor, out: torch.Tensor) -> None:
    """Sum of ``x`` in fp32 into the 0-dim ``out`` (a status slot): non-finite iff ``x`` holds NaN or inf (or
    values so large that they overflow fp32 summed, which a working model never produces). One reduction,
    no temporary the size of ``x``; read on the host after the block's sync."""
    torch.sum(x, dim=tuple(range(x.dim())), dtype=torch.float32, out=out)


class SpeculativeLoop:
    """Runs one video at a time over the four components and the loop's own preallocated buffers."""

    def __init__(self, drafter: Denoiser, target: Denoiser, decoder: Decoder, scorer: Scorer, *, num_blocks: int,
                 frames_per_block: int, latent_hw: tuple[int, int], pixel_hw: tuple[int, int], latent_channels: int,
                 dtype: torch.dtype, device, lazy_commit: bool = True, fused_commits: bool = False,
                 decide: DecideFn = decide, placement: Placement | None = None):
        self.drafter, self.target, self.decoder, self.scorer = drafter, target, decoder, scorer
        self.decide = decide
        self.num_blocks, self.frames_per_block = num_blocks, frames_per_block
        self.device = torch.device(device)
        self.lazy_commit, self.fused_commits = lazy_commit, fused_commits
        h, w = latent_hw
        H, W = pixel_hw
        self.max_frames = 4 * frames_per_block  # decoded frames of a block after block 0
        cuda = self.device.type == "cuda"
        # committed latents of the video, one contiguous [1, C, F, h, w] per block
        self.latents = torch.zeros(num_blocks, 1, latent_channels, frames_per_block, h, w, dtype=dtype,
                                   device=device)
        # read at each sync: fp32 sums of the committed latents, committed frames and draft (each finite iff
        # its tensor is), then the draft's per-frame scores (slots: ``Status``)
        self.status = torch.zeros(Status.SCORES + self.max_frames, dtype=torch.float32, device=device)
        self.status_host = torch.zeros(Status.SCORES + self.max_frames, dtype=torch.float32, pin_memory=cuda)
        self.frames_dev = torch.zeros(self.max_frames, H, W, 3, dtype=torch.uint8, device=device)
        self.frames_host = torch.zeros(self.max_frames, H, W, 3, dtype=torch.uint8, pin_memory=cuda)
        self.timer = Timer(self.device)
        # uint8 quantisation of a block's frames computes here (float32 [frames, H, W, 3]), not in temporaries
        self.frames_levels = torch.zeros(self.max_frames, H, W, 3, dtype=torch.float32, device=device)
        self._sync_hook: Callable[[Callable[[], None]], None] | None = None  # ``sync_hook``
        # where the target runs: the latents it commits, how blocks cross, its timer (one device: the loop's)
        self.placement = Placement.one(self.device) if placement is None else placement
        self.link = link_for(self.placement, self.latents, self.timer)
        self.target_timer = self.link.timer

    @property
    def defers_target_commits(self) -> bool:
        """Whether accepted drafts wait in the lazy queue (one device with ``lazy_commit``)."""
        return self.lazy_commit and self.link.defers_target_commits

    # ---- per prompt ------------------------------------------------------------------------------
    def prepare(self, prompt: PreparedPrompt, seed: int) -> dict[str, float]:
        """Per-prompt work outside the block loop; returns its times (ms) per component."""
        times = {}
        self.link.begin()
        for name, comp, timer in (("drafter", self.drafter, self.timer), ("target", self.target, self.target_timer)):
            with timer.span(name):
                comp.prepare(prompt.context)
                comp.set_seed(seed)
        with self.timer.span("scorer"):
            self.scorer.prepare(prompt.text)
        self.decoder.reset()
        self.link.join()
        self._sync()
        times.update(self.timer.collect(-1))
        times.update(self.target_timer.collect(-1))
        self.timer.mark_origin()
        self.target_timer.mark_origin()
        return times

    def _sync(self) -> None:
        """The host sync (named: the one place the loop waits for the device), through ``sync_hook``'s hook."""
        if self._sync_hook is None:
            self._wait()
        else:
            self._sync_hook(self._wait)

    def _wait(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @contextlib.contextmanager
    def sync_hook(self, hook: Callable[[Callable[[], None]], None]) -> Iterator[None]:
        """Within: each named host sync of the loop runs as ``hook(sync)``, where ``sync()`` waits for the
        device (the hook must call it once). E.g. the benchmark relaxes torch's sync debug mode around it, so
        that any other host sync of the block loop raises."""
        if self._sync_hook is not None:
            raise RuntimeError("a sync hook is already set on this loop; hooks do not nest")
        self._sync_hook = hook
        try:
            yield
        finally:
            self._sync_hook = None

    # ---- one video -------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, prompt: PreparedPrompt, *, mode: str, tau: float, seed: int, max_blocks: int | None = None,
            decide: DecideFn | None = None) -> Iterator[BlockOutput]:
        """Generate one video block by block; yields each committed block once its frames are on the host.
        ``decide`` replaces the loop's decision function for this video (e.g. the benchmark's fixed
        acceptance patterns, ``bench.pattern_decisions``).

        The generator's return value (``StopIteration.value``, or ``self.summary`` after exhaustion) is the
        video's summary dict (spec §3 totals).
        """
        mode, tau = check_mode(mode), check_tau(tau)
        decide = self.decide if decide is None else decide
        t0 = time.perf_counter()
        cuda = [d for d in self.placement.devices if d.type == "cuda"]
        for d in cuda:
            torch.cuda.reset_peak_memory_stats(d)
        self.timer.clear()
        self.target_timer.clear()
        prepare_ms = self.prepare(prompt, seed)
        queue = CommitQueue(lazy=self.defers_target_commits)
        n = self.num_blocks if max_blocks is None else min(max_blocks, self.num_blocks)
        records: list[BlockRecord] = []
        pending: BlockRecord | None = None  # block whose frames are in flight to the host
        for b in range(n):
            rec = BlockRecord(b)
            last = b == n - 1
            frames_d = None
            # 1. draft (+ scratch decode and score in sdvg mode)
            if drafts(mode, b):
                with self.timer.span("draft_denoise", b):
                    xd = self.drafter.denoise_block(b)
                _finite_sum(xd, out=self.status[Status.DRAFT])
                if scores(mode, b):
                    with self.timer.span("vae_decode_scratch", b):
                        frames_d = self.decoder.decode_scratch(xd, b)
                    with self.timer.span("score", b):
                        s = self.scorer.score(frames_d)
                    self.status[Status.SCORES:Status.SCORES + s.shape[0]].copy_(s)
            # 2. the block's one sync: completes block b-1 and reads b's decision inputs
            host = self._host_frames(pending)
            self._sync_status()
            st = self.status_host
            if frames_d is not None:
                rec.scores = [float(x) for x in st[Status.SCORES:Status.SCORES + frames_d.shape[2]].tolist()]
                rec.min_score = block_score(rec.scores)
            d = decide(mode, b, rec.min_score, tau,
                       finite=math.isfinite(float(st[Status.DRAFT])) if drafts(mode, b) else True)
            rec.decision, rec.reason = d.kind, d.reason
            # 3. execute the decision. Block b-1 is handed out while the GPU runs an accepted block's
            # commit and decode; before a target block, whose large graph launch can hold the host for
            # much of its run
            if pending is not None and d.kind != ACCEPTED:
                yield self._emit(pending, records, host)
                pending = None
            if d.kind == ACCEPTED:
                self.latents[b].copy_(xd)
                to_target = queue.on_accept(b) if mode == "sdvg" and not last else []
                self.link.to_target(to_target)  # target apart: the block leaves for its device now
                if not last:
                    with self.timer.span("draft_commit", b):
                        self.drafter.commit_block(b, self.latents[b])
                if mode == "sdvg":
                    self._commit_target(to_target, rec, b)
                    self.decoder.keep_scratch()
                    frames = frames_d
                else:  # draft mode
                    with self.timer.span("vae_decode_commit", b):
                        frames = self.decoder.decode_commit(self.latents[b], b)
            else:  # forced or rejected: the target generates the block
                self._commit_target(queue.due(), rec, b)
                with self.target_timer.span("target_denoise", b):
                    x = self.target.denoise_block(b)
                xt = self.link.from_target(b, x)  # latents[b] = x; xt: the target's own view of it
                if not last:
                    with self.target_timer.span("target_commit", b):
                        self.target.commit_block(b, xt)
                    rec.target_commits.append(b)
                    if mode == "sdvg":
                        with self.timer.span("draft_commit", b):
                            self.drafter.commit_block(b, self.latents[b])
                with self.timer.span("vae_decode_commit", b):
                    frames = self.decoder.decode_commit(self.latents[b], b)
            if pending is not None:  # before block b's frames are copied into the host buffer
                yield self._emit(pending, records, host)
                pending = None
            # 4. committed frames -> uint8 on the device -> host (async); checked at the next sync
            nf = frames.shape[2]
            rec.frames = nf
            _finite_sum(self.latents[b], out=self.status[Status.LATENTS])
            _finite_sum(frames, out=self.status[Status.FRAMES])
            self.frames_dev[:nf].copy_(quantise_frames(frames[0].permute(1, 2, 3, 0), out=self.frames_levels[:nf]))
            self.frames_host[:nf].copy_(self.frames_dev[:nf], non_blocking=True)
            pending = rec
        # 5. the final sync (after the target's queue too): emit the last block, summarise
        self.link.join()
        host = self._host_frames(pending)
        self._sync_status()
        if pending is not None:
            yield self._emit(pending, records, host)
        for r in records:  # target apart: its times, complete only now
            r.times_ms.update(self.target_timer.collect(r.block))
        skipped = queue.skipped()
        peak = max(torch.cuda.max_memory_allocated(d) for d in cuda) if cuda else None
        self.summary = summarize(records, wall_s=time.perf_counter() - t0, prepare_ms=prepare_ms,
                                 skipped_target_commits=skipped, peak_gpu_memory_bytes=peak)
        return self.summary

    def _commit_target(self, blocks: list[int], rec: BlockRecord, b: int) -> None:
        if not blocks:
            return
        with self.target_timer.span("target_commit", b):
            self.target.commit_blocks(blocks, self.link.target_latents[blocks[0]:blocks[-1] + 1],
                                      fused=self.fused_commits)
        rec.target_commits.extend(blocks)

    def _sync_status(self) -> None:
        self.status_host.copy_(self.status, non_blocking=True)
        self._sync()

    def _host_frames(self, rec: BlockRecord | None) -> np.ndarray | None:
        """The caller's array for block ``rec``'s frames, made before the sync that completes them, while the
        device still works: its pages are mapped now (one write per page), so that the copy out of the pinned
        buffer after the sync is a plain memcpy. Page faults on a fresh array took about 6 ms for a block of
        12 frames at 832x480, during which a target block's GPU waited."""
        if rec is None:
            return None
        out = np.empty(self.frames_host[:rec.frames].shape, dtype=np.uint8)
        out.reshape(-1)[::4096] = 0
        return out

    def _emit(self, rec: BlockRecord, records: list[BlockRecord], host: np.ndarray) -> BlockOutput:
        """After a sync: check block ``rec.block``'s committed latents/frames, collect its times, hand it out
        (its frames copied into ``host``, from ``_host_frames``)."""
        st = self.status_host
        if not math.isfinite(float(st[Status.LATENTS])):
            raise NumericalError(
                f"block {rec.block}: the committed latents ({rec.decision}) contain NaN or inf. The model "
                "diverged; check the checkpoints and the precision (fp16 overflows more easily than bf16)")
        if not math.isfinite(float(st[Status.FRAMES])):
            raise NumericalError(
                f"block {rec.block}: the decoded frames contain NaN or inf although the latents are finite; "
                "check the VAE checkpoint and precision")
        rec.times_ms = self.timer.collect(rec.block)
        records.append(rec)
        # the caller owns its frames: a copy out of the pinned buffer (torch's copy runs on all intra-op
        # threads; before a target block the GPU waits for it)
        torch.from_numpy(host).copy_(self.frames_host[:rec.frames])
        return BlockOutput(rec.block, host, rec)

    def committed_latents(self, blocks: int | None = None) -> torch.Tensor:
        """The committed latents [1, C, blocks*F, h, w] (a copy, for saving)."""
        n = self.num_blocks if blocks is None else blocks
        x = self.latents[:n]
        return x.permute(1, 2, 0, 3, 4, 5).reshape(1, x.shape[2], n * self.frames_per_block, *x.shape[-2:]).clone()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every preallocated tensor of the loop and its components (memory accounting, tests)."""
        out = {"loop.latents": self.latents, "loop.status": self.status, "loop.status_host": self.status_host,
               "loop.frames_dev": self.frames_dev, "loop.frames_levels": self.frames_levels,
               "loop.frames_host": self.frames_host, **self.link.state_tensors()}
        for name, comp in (("drafter", self.drafter), ("target", self.target), ("vae", self.decoder),
                           ("scorer", self.scorer)):
            out.update({f"{name}.{k}": v for k, v in comp.state_tensors().items()})
        return out
