"""What to run, in plain host data (no torch): block decisions and the lazy target-commit queue.

The loop asks ``drafts(mode, block)`` / ``scores(mode, block)`` what to run for a block, ``block_score``
for the worst frame of a scored draft and ``decide(...)`` what to keep; ``CommitQueue`` says which
accepted drafts must reach the target's cache before the target is next used. Tested on CPU with
hand-made scores, the way vLLM tests its scheduler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ArgumentError

MODES = ("sdvg", "target", "draft")
FORCED, ACCEPTED, REJECTED = "forced", "accepted", "rejected"


@dataclass(frozen=True)
class Decision:
    """``kind``: forced (the target generates without a draft), accepted (the draft is committed) or
    rejected (the target regenerates). ``reason`` says why in words, for records and logs."""

    kind: str
    reason: str

    @property
    def target_generates(self) -> bool:
        return self.kind in (FORCED, REJECTED)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ArgumentError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def drafts(mode: str, block: int) -> bool:
    """Whether the drafter proposes ``block``: every block in draft mode, blocks after 0 in sdvg mode."""
    check_mode(mode)
    return mode == "draft" or (mode == "sdvg" and block > 0)


def scores(mode: str, block: int) -> bool:
    """Whether the draft of ``block`` is decoded to scratch and scored (sdvg mode, blocks after 0)."""
    return mode == "sdvg" and block > 0


def block_score(frame_scores: list[float]) -> float:
    """A draft's score: its worst frame. Any non-finite frame makes it non-finite, NaN taking precedence
    over +-inf (so one bad frame can never pass tau: a +inf minimum is rejected by ``decide``)."""
    bad = [x for x in frame_scores if not math.isfinite(x)]
    if bad:
        return math.nan if any(math.isnan(x) for x in bad) else min(bad)
    return min(frame_scores)


def decide(mode: str, block: int, score: float | None, tau: float, finite: bool = True) -> Decision:
    """The decision for one block.

    ``score`` is the minimum over frames of the draft's ImageReward scores (None where nothing was scored),
    ``finite`` whether the draft latents were all finite. NaN or +-inf scores and non-finite latents count
    as a reject, with the reason saying so. A score equal to tau is accepted (``score >= tau``).
    """
    check_mode(mode)
    if mode == "target":
        return Decision(FORCED, "target mode: the target generates every block")
    if mode == "draft":
        return Decision(ACCEPTED, "draft mode: the drafter generates every block, unscored")
    if block == 0:
        return Decision(FORCED, "block 0 is always the target's (it anchors the scene)")
    if not finite:
        return Decision(REJECTED, "draft latents are not finite (NaN/inf)")
    if score is None:
        raise ValueError(f"sdvg mode needs a score for block {block}")
    if math.isnan(score):
        return Decision(REJECTED, "score is NaN (non-finite scores count as a reject)")
    if math.isinf(score):
        return Decision(REJECTED, f"score is {score} (non-finite scores count as a reject)")
    if score >= tau:
        return Decision(ACCEPTED, f"score {score:.4f} >= tau {tau}")
    return Decision(REJECTED, f"score {score:.4f} < tau {tau}")


def check_tau(tau) -> float:
    """tau may be any real number or +-inf (+inf: always reject, i.e. target output; -inf: always accept)."""
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ArgumentError(f"tau must be a number (or +-inf); got {tau!r}") from None
    if math.isnan(tau):
        raise ArgumentError("tau must not be NaN (use inf to always reject, -inf to always accept)")
    return tau


@dataclass
class CommitQueue:
    """Accepted drafts whose target commit waits until the target is next needed (lazy commit).

    Pending blocks always form a run of consecutive blocks: the target is used (and its cache brought up
    to date) at every forced or rejected block, so only accepted blocks since the last one can wait.
    ``due()`` hands them over, oldest first, to be committed before the target denoises; whatever is
    still pending at the end of the video is ``skipped()`` (never needed, never run). With ``lazy=False``
    nothing waits: ``on_accept`` returns the block to commit right away.
    """

    lazy: bool = True
    pending: list[int] = field(default_factory=list)

    def on_accept(self, block: int) -> list[int]:
        """Record an accepted draft; returns the blocks to commit to the target now (eager) or []."""
        if not self.lazy:
            return [block]
        if self.pending and block != self.pending[-1] + 1:
            raise AssertionError(f"pending target commits must be consecutive: {self.pending} then {block}")
        self.pending.append(block)
        return []

    def due(self) -> list[int]:
        """The target is needed now: every pending block, oldest first (and the queue empties)."""
        out, self.pending = self.pending, []
        return out

    def skipped(self) -> list[int]:
        """End of the video: pending commits are never run."""
        out, self.pending = self.pending, []
        return out
