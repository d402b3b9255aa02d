"""Decisions and the lazy-commit queue on plain host data, with hand-made scores (like vLLM's scheduler
tests): NaN, +-inf, ties at tau, block 0, every mode."""
import math

import pytest

from sdvg_rt.decide import (
    ACCEPTED, FORCED, REJECTED, CommitQueue, check_mode, check_tau, decide, drafts, scores,
)

INF, NAN = math.inf, math.nan


def test_block0_is_forced_in_sdvg_whatever_the_score():
    for s in (None, 10.0, -10.0, NAN):
        d = decide("sdvg", 0, s, -0.7)
        assert d.kind == FORCED and d.target_generates
    assert not drafts("sdvg", 0) and not scores("sdvg", 0)  # block 0 is never drafted nor scored


@pytest.mark.parametrize("score,tau,kind", [
    (0.5, -0.7, ACCEPTED),
    (-0.7, -0.7, ACCEPTED),       # a tie at tau is accepted (score >= tau)
    (-0.7000001, -0.7, REJECTED),
    (-5.0, -INF, ACCEPTED),       # tau = -inf accepts every finite score
    (5.0, INF, REJECTED),         # tau = +inf rejects every finite score: sdvg == target
    (NAN, -INF, REJECTED),        # NaN counts as a reject even at tau = -inf
    (INF, -0.7, REJECTED),        # +inf is not a real score: reject
    (-INF, -INF, REJECTED),
])
def test_sdvg_decisions(score, tau, kind):
    d = decide("sdvg", 3, score, tau)
    assert d.kind == kind
    if not math.isfinite(score):
        assert "non-finite" in d.reason or "NaN" in d.reason


def test_nonfinite_latents_reject_and_say_so():
    d = decide("sdvg", 2, 3.0, -1.0, finite=False)
    assert d.kind == REJECTED and "not finite" in d.reason


def test_modes():
    assert [decide("target", b, None, 0.0).kind for b in range(3)] == [FORCED] * 3
    assert [decide("draft", b, None, 0.0).kind for b in range(3)] == [ACCEPTED] * 3
    assert [drafts("draft", b) for b in range(3)] == [True] * 3
    assert [scores("draft", b) for b in range(3)] == [False] * 3  # draft mode is not scored
    assert [drafts("target", b) for b in range(3)] == [False] * 3
    assert [drafts("sdvg", b) for b in range(3)] == [False, True, True]
    with pytest.raises(ValueError, match="mode must be one of"):
        check_mode("fast")
    with pytest.raises(ValueError, match="needs a score"):
        decide("sdvg", 1, None, 0.0)


def test_tau_checks():
    assert check_tau("-inf") == -INF and check_tau(1) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        check_tau(NAN)
    with pytest.raises(ValueError, match="number"):
        check_tau("high")


def _simulate(kinds, lazy):
    """Feed a decision sequence through the queue the way the loop does; returns target commits per block."""
    q = CommitQueue(lazy=lazy)
    commits = []
    n = len(kinds)
    for b, k in enumerate(kinds):
        last = b == n - 1
        if k == ACCEPTED:
            commits.append(q.on_accept(b) if not last else [])
        else:  # the target is needed: pending first, then its own block (not the last one)
            commits.append(q.due() + ([b] if not last else []))
    return commits, q.skipped()


def test_lazy_queue_commits_pending_before_the_target_runs():
    kinds = [FORCED, ACCEPTED, ACCEPTED, REJECTED, ACCEPTED, ACCEPTED, ACCEPTED]
    commits, skipped = _simulate(kinds, lazy=True)
    assert commits == [[0], [], [], [1, 2, 3], [], [], []]
    assert skipped == [4, 5]  # accepted at the end: never needed, never run (6 is the last block)
    eager, skipped_e = _simulate(kinds, lazy=False)
    assert eager == [[0], [1], [2], [3], [4], [5], []] and skipped_e == []
    # both orders commit the same blocks before any target use: every block the target reads exists
    done = set()
    for b, (k, c) in enumerate(zip(kinds, commits)):
        done.update(c)
        if k != ACCEPTED:
            assert set(range(b)) <= done


def test_queue_all_rejected_has_nothing_pending():
    commits, skipped = _simulate([FORCED, REJECTED, REJECTED], lazy=True)
    assert commits == [[0], [1], []] and skipped == []


def test_queue_pending_must_be_consecutive():
    q = CommitQueue()
    q.on_accept(1)
    with pytest.raises(AssertionError):
        q.on_accept(3)


def test_block_score_is_the_worst_frame_and_non_finite_frames_win():
    from sdvg_rt.decide import block_score

    assert block_score([0.5, -0.25, 1.0]) == -0.25
    assert math.isnan(block_score([0.5, math.inf, math.nan, -math.inf]))  # NaN before +-inf
    assert block_score([0.5, math.inf]) == math.inf  # a +inf frame makes the block +inf: decide rejects it
    assert block_score([0.5, -math.inf]) == -math.inf
    assert decide("sdvg", 1, block_score([2.0, math.inf]), tau=0.0).kind == REJECTED
