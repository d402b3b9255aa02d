"""The 4-step schedule: warped timesteps against SF's formula in float64, x0 / re-noise maths in place."""
import math

import pytest
import torch

from sdvg_rt.schedule import Schedule, renoise_, shifted_timesteps, warp_timesteps, x0_from_flow_


def _sf_timestep(step: int, shift: float) -> float:
    # Independent float64 form of SF's FlowMatchScheduler(shift, extra_one_step=True) + warp:
    # index i = 1000 - step, s = 1 - i/1000, sigma = shift*s/(1+(shift-1)*s), t = 1000*sigma.
    s = 1 - (1000 - step) / 1000
    return 1000 * shift * s / (1 + (shift - 1) * s)


def test_paper_timesteps():
    ts = warp_timesteps([1000, 750, 500, 250], 5.0)
    # The spec's table (wan-models.md §4): [1000, 937.5, 833.33, 625]; 937.5 and 625 are exact in fp32,
    # 833.333 is the fp32 rounding of 2500/3 (SF computes the table in float32): tolerance 1e-4.
    assert ts[0] == 1000.0 and ts[1] == 937.5 and ts[3] == 625.0
    assert ts[2] == pytest.approx(2500 / 3, abs=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
def test_warp_matches_formula(shift):
    steps = [1000, 757, 522, 250, 3]
    got = warp_timesteps(steps, shift)
    for s, t in zip(steps, got):
        # float32 table vs float64 formula: relative 1e-6 (fp32 epsilon 1.2e-7, a few ops)
        assert t == pytest.approx(_sf_timestep(s, shift), rel=1e-6)
    if shift == 1.0:  # no shift: the warp is the identity (up to the fp32 table)
        assert got == pytest.approx([float(s) for s in steps], rel=1e-6)


def test_table_is_decreasing_and_bounded():
    t = shifted_timesteps(5.0)
    assert t.shape == (1000,) and t[0] == 1000.0
    assert bool((t[1:] < t[:-1]).all()) and float(t[-1]) > 0


def test_schedule_object():
    s = Schedule.from_steps([1000, 750, 500, 250], 5.0)
    assert s.num_steps == 4
    assert s.sigmas == tuple(t / 1000 for t in s.timesteps)
    tab = s.timestep_table(3, "cpu")
    assert tab.shape == (5, 3) and tab.dtype == torch.float32
    assert torch.equal(tab[-1], torch.zeros(3))  # the commit row: t = 0
    assert torch.equal(tab[1], torch.full((3,), 937.5))


def test_x0_and_renoise_round_trip():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 16, 3, 4, 4, generator=g)
    eps = torch.randn(1, 16, 3, 4, 4, generator=g)
    sigma = 0.8333333
    xt = torch.empty(1, 16, 3, 4, 4)
    work = torch.empty_like(xt)
    ptr = xt.data_ptr()
    renoise_(xt, x0, eps, sigma, work)
    assert xt.data_ptr() == ptr  # in place
    ref = (1 - sigma) * x0.double() + sigma * eps.double()
    assert torch.allclose(xt.double(), ref, atol=1e-6)  # fp32 maths vs fp64: a few ulps
    # the flow target of the model is v = eps - x0, so x0 = x_t - sigma*v recovers x0
    out = torch.empty_like(x0)
    x0_from_flow_(out, xt, eps - x0, sigma)
    assert torch.allclose(out, x0, atol=1e-5)


def test_fp32_work_buffer_with_bf16_inputs():
    # x0 maths runs in the fp32 work buffer even for bf16 latents (SF computes it in float64)
    g = torch.Generator().manual_seed(2)
    xt = torch.randn(2, 8, generator=g).bfloat16()
    v = torch.randn(2, 8, generator=g).bfloat16()
    out = torch.empty(2, 8)
    x0_from_flow_(out, xt, v, 0.9375)
    ref = xt.double() - 0.9375 * v.double()
    assert torch.allclose(out.double(), ref, atol=1e-6)
    assert not math.isnan(float(out.sum()))
