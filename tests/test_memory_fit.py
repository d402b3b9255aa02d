"""The pre-load memory check: the paper profile's plan, and the error that names every part."""
from pathlib import Path

import pytest

from sdvg_rt.memory import check_fits
from sdvg_rt.errors import OutOfMemoryError
from sdvg_rt.profiles import load_profile

PAPER = Path(__file__).resolve().parents[1] / "profiles" / "paper-832x480.yaml"
GiB = 2**30


def test_paper_profile_plan_fits_80gb_and_lists_every_part():
    plan = check_fits(load_profile(PAPER), 79 * GiB, text_encoder=False)
    assert plan["target KV cache"] == 40 * 2 * 32760 * 5120 * 2  # 26.84 GB (wan-models.md §9)
    assert plan["drafter KV cache"] == 30 * 2 * 32760 * 1536 * 2  # 6.04 GB
    assert abs(plan["target weights"] - 14_288_491_584 * 2) < 1e6
    assert 60 * GiB < sum(plan.values()) < 76 * GiB


def test_too_small_device_fails_before_loading_with_the_numbers():
    with pytest.raises(OutOfMemoryError) as e:
        check_fits(load_profile(PAPER), 40 * GiB, text_encoder=False)
    msg = str(e.value)
    assert "does not fit" in msg and "40.0 GiB are free" in msg
    for part in ("target weights", "target KV cache", "VAE states", "ImageReward weights", "activations"):
        assert part in msg
    assert "cache.window_frames" in msg  # says what to do


def test_a_window_with_a_sink_shrinks_the_caches():
    full = check_fits(load_profile(PAPER), 79 * GiB, text_encoder=False)
    small = check_fits(load_profile(PAPER, latent_frames=42, window_frames=9, sink_frames=3), 79 * GiB,
                       text_encoder=False)
    assert small["target KV cache"] == full["target KV cache"] * 9 // 21
