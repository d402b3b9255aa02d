"""Per-block records, component timers and the per-video summary (sdvg-runtime.md §3 "Output").

Timers never sync: on CUDA each span records a pair of events that is read only after the loop's one
sync per block has passed them; on CPU (synchronous) a span is wall time.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch



class Timer:
    """Named spans per block without host syncs: ``with timer.span("score", b): ...``, then
    ``collect(b)`` once a sync has passed them (CUDA events are read only then). On CUDA each span's
    events are recorded on the current stream of the timer's ``device``.

    ``timeline = True`` (the benchmark) also keeps each collected span as ``(block, name, start_ms,
    end_ms)`` in ``spans``, in ms after the origin that ``mark_origin`` records (after a sync, when the
    device is idle; timers of two devices marked then share a time base up to microseconds)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._done: list[tuple[int, str, object, object]] = []
        self.timeline = False
        self.spans: list[tuple[int, str, float, float]] = []
        self._origin = None

    def span(self, name: str, block: int = -1) -> _Span:
        return _Span(self, name, block)

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def mark_origin(self) -> None:
        """The timeline's zero (only with ``timeline``)."""
        if self.timeline:
            self._origin = self._now()

    def collect(self, block: int = -1) -> dict[str, float]:
        """Milliseconds per name over the spans of ``block`` (they must be complete: call after a sync)."""
        out: dict[str, float] = {}
        keep = []
        for item in self._done:
            blk, name, a, b = item
            if blk != block:
                keep.append(item)
                continue
            ms = self._ms(a, b)
            out[name] = out.get(name, 0.0) + ms
            if self.timeline and self._origin is not None:
                start = self._ms(self._origin, a)
                self.spans.append((blk, name, start, start + ms))
        self._done = keep
        return out

    def clear(self) -> None:
        self._done.clear()
        self.spans.clear()
        self._origin = None


class _Span:
    def __init__(self, timer: Timer, name: str, block: int):
        self.timer, self.name, self.block = timer, name, block

    def __enter__(self):
        self.start = self.timer._now()
        return self

    def __exit__(self, *exc):
        self.timer._done.append((self.block, self.name, self.start, self.timer._now()))


@dataclass
class BlockRecord:
    """What happened to one block (plain data; ``to_dict`` gives the JSON record)."""

    block: int
    decision: str = ""
    reason: str = ""
    min_score: float | None = None
    scores: list[float] | None = None  # per decoded draft frame, when scored
    frames: int = 0  # video frames this block contributes
    target_commits: list[int] = field(default_factory=list)  # blocks committed to the target during it
    times_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _fit(points: dict[int, float], blocks: int) -> list[float] | None:
    """Measured value per block, missing ones from a least-squares line in the block index (the DiT cost
    grows linearly with the context), or the mean when fewer than two blocks were measured."""
    if not points:
        return None
    xs, ys = list(points), list(points.values())
    if len(xs) >= 2:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
        line = lambda b: my + slope * (b - mx)  # noqa: E731
    else:
        line = lambda b: ys[0]  # noqa: E731
    return [points.get(b, max(0.0, line(b))) for b in range(blocks)]


def target_only_estimate_ms(records: list[BlockRecord], prepare_target_ms: float = 0.0) -> float | None:
    """What target-only generation would have cost, from this run's own component times.

    Per block: the target's denoise time (measured where the target ran, else fitted over the measured
    blocks), plus the block's VAE decode (one decode per block in target mode), plus a target commit for
    every block but the last (mean measured commit time per block). None if the target never ran.
    """
    n = len(records)
    den = _fit({r.block: r.times_ms["target_denoise"] for r in records if "target_denoise" in r.times_ms}, n)
    if den is None:
        return None
    dec_points = {}
    for r in records:
        d = [r.times_ms[k] for k in ("vae_decode_scratch", "vae_decode_commit") if k in r.times_ms]
        if d:
            dec_points[r.block] = sum(d) / len(d)
    dec = _fit(dec_points, n) or [0.0] * n
    commit_ms = sum(r.times_ms.get("target_commit", 0.0) for r in records)
    commits = sum(len(r.target_commits) for r in records)
    per_commit = commit_ms / commits if commits else 0.0
    return prepare_target_ms + sum(den) + sum(dec) + per_commit * max(0, n - 1)


def summarize(records: list[BlockRecord], *, wall_s: float, prepare_ms: dict[str, float],
              skipped_target_commits: list[int], peak_gpu_memory_bytes: int | None) -> dict:
    """Totals of one video: decisions, acceptance rate (accepted / drafted-and-scored blocks), component
    times, wall time, peak GPU memory and the target-only estimate with the speedup it implies."""
    counts = {k: sum(r.decision == k for r in records) for k in ("forced", "accepted", "rejected")}
    judged = counts["accepted"] + counts["rejected"]
    times: dict[str, float] = {}
    for r in records:
        for k, v in r.times_ms.items():
            times[k] = times.get(k, 0.0) + v
    est = target_only_estimate_ms(records, prepare_ms.get("target", 0.0))
    return {
        "blocks": len(records),
        "frames": sum(r.frames for r in records),
        **counts,
        "acceptance_rate": counts["accepted"] / judged if judged else None,
        "times_ms": times,
        "prepare_ms": prepare_ms,
        "target_commits_skipped": skipped_target_commits,
        "wall_time_s": wall_s,
        "peak_gpu_memory_bytes": peak_gpu_memory_bytes,
        "target_only_estimate_s": est / 1e3 if est is not None else None,
        "speedup_estimate": (est / 1e3) / wall_s if est is not None and wall_s > 0 else None,
    }
