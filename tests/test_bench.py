"""The benchmark's host logic: fixed acceptance patterns and the loop's benchmark-only override."""
import pytest

from sdvg_rt.bench import accept_pattern


@pytest.mark.parametrize("rate,blocks,accepts", [(1.0, 7, 6), (0.8, 7, 5), (0.5, 7, 3), (0.0, 7, 0), (0.8, 3, 2)])
def test_accept_pattern_counts(rate, blocks, accepts):
    pat = accept_pattern(rate, blocks)
    assert len(pat) == blocks
    assert sum(pat[1:]) == accepts  # block 0 is forced whatever the pattern says


def test_accept_pattern_spreads_rejects():
    rejects = [i for i, ok in enumerate(accept_pattern(0.5, 7)) if not ok]
    assert len(rejects) == 3 and all(1 <= i <= 6 for i in rejects)
    assert len({b - a for a, b in zip(rejects, rejects[1:])}) == 1  # evenly spaced
