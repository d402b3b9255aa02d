"""The target-only estimate behind every ``speedup_estimate``, on hand-made records with a known answer."""
import pytest

from sdvg_rt.stats import BlockRecord, summarize, target_only_estimate_ms


def _records():
    return [
        BlockRecord(0, "forced", frames=1, target_commits=[0],
                    times_ms={"target_denoise": 10.0, "vae_decode_commit": 2.0, "target_commit": 3.0}),
        BlockRecord(1, "accepted", frames=4, times_ms={"draft_denoise": 1.0, "vae_decode_scratch": 4.0,
                                                         "score": 1.0, "draft_commit": 0.5}),
        BlockRecord(2, "rejected", frames=4, target_commits=[1, 2],
                    times_ms={"draft_denoise": 1.0, "vae_decode_scratch": 2.0, "score": 1.0,
                              "target_denoise": 12.0, "vae_decode_commit": 4.0, "target_commit": 9.0}),
    ]


def test_target_only_estimate_has_every_term():
    # prepare 4 + denoise (10, fitted 11, 12) + decode (2, 4, mean(2, 4) = 3) + commits 12 ms / 3 per block
    # for the 2 blocks a target-only run commits
    assert target_only_estimate_ms(_records(), prepare_target_ms=4.0) == pytest.approx(4 + 33 + 9 + 8)
    s = summarize(_records(), wall_s=0.05, prepare_ms={"target": 4.0}, skipped_target_commits=[],
                  peak_gpu_memory_bytes=None)
    assert s["target_only_estimate_s"] == pytest.approx(0.054)
    assert s["speedup_estimate"] == pytest.approx(0.054 / 0.05)
    assert s["acceptance_rate"] == 0.5 and (s["forced"], s["accepted"], s["rejected"]) == (1, 1, 1)


def test_target_only_estimate_is_none_without_target_times():
    assert target_only_estimate_ms([BlockRecord(0, "accepted", times_ms={"draft_denoise": 1.0})]) is None
