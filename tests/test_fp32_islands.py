"""The DiT's fp32 islands (wan-models.md §8: RoPE tables in float64, the rotation and the RMSNorm statistic in
fp32) checked at magnitudes where bf16 arithmetic would be visibly wrong, against references computed here
in float64 from the spec's formulas."""
import math

import torch

from sdvg_rt.models.wan_dit import WanDiTConfig, WanRMSNorm, WanRoPE, apply_rope

CFG = WanDiTConfig.from_name("wan2.1-14b")


def _spec_angles(frames: int, h: int, w: int, offset: int) -> torch.Tensor:
    """Wan's rope_params: per axis 1 / 10000^(2i/d) with d = 128 - 4*21 (t), 2*21 (h), 2*21 (w); [n, 64]."""
    d = CFG.head_dim
    dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    inv = [1.0 / 10000.0 ** (torch.arange(0, k, 2, dtype=torch.float64) / k) for k in dims]
    t, y, x = torch.meshgrid(torch.arange(offset, offset + frames, dtype=torch.float64),
                             torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                             indexing="ij")
    return torch.cat([t.reshape(-1, 1) * inv[0], y.reshape(-1, 1) * inv[1], x.reshape(-1, 1) * inv[2]], dim=1)


def test_rope_factors_stay_exact_at_late_frames_in_a_bf16_model():
    rope = WanRoPE(CFG).to(torch.bfloat16)  # a cast of the model must not cast the tables
    offset, frames, h, w = 1000, 3, 6, 5  # frame angles near 1000 rad: bf16 cannot even hold the angle
    cos, sin = rope.factors(frames, h, w, offset)
    ang = _spec_angles(frames, h, w, offset)
    assert cos.dtype == torch.float32 and cos.shape == (frames * h * w, 1, CFG.head_dim // 2)
    torch.testing.assert_close(cos[:, 0].double(), torch.cos(ang), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0].double(), torch.sin(ang), rtol=0, atol=1e-6)
    # what bf16 angles would give: far outside that tolerance (the check above can fail)
    assert (torch.cos(ang.bfloat16().double()) - torch.cos(ang)).abs().max() > 1e-2


def test_rope_rotation_is_computed_in_fp32_and_rounded_once():
    g = torch.Generator().manual_seed(0)
    n, heads = 90, 4
    ang = _spec_angles(3, 6, 5, 700)
    cos, sin = torch.cos(ang).float()[:, None], torch.sin(ang).float()[:, None]
    x = (300.0 * torch.randn(n, heads, CFG.head_dim, generator=g)).bfloat16()
    out = apply_rope(x, cos, sin)
    xd = x.double().unflatten(-1, (-1, 2))
    c, s = cos.double(), sin.double()
    ref = torch.stack([xd[..., 0] * c - xd[..., 1] * s, xd[..., 0] * s + xd[..., 1] * c], -1).flatten(-2)
    exact = (out == ref.bfloat16()).double().mean().item()
    assert out.dtype == torch.bfloat16 and exact > 0.995, exact  # one rounding, at the end
    # the same rotation in bf16 arithmetic rounds every product: most elements land elsewhere
    xb = x.unflatten(-1, (-1, 2))
    cb, sb = cos.bfloat16(), sin.bfloat16()
    bf = torch.stack([xb[..., 0] * cb - xb[..., 1] * sb, xb[..., 0] * sb + xb[..., 1] * cb], -1).flatten(-2)
    assert (bf == ref.bfloat16()).double().mean().item() < 0.9


def test_rms_norm_statistic_is_fp32_for_bf16_inputs():
    g = torch.Generator().manual_seed(1)
    norm = WanRMSNorm(CFG.dim, CFG.eps).to(torch.bfloat16)
    # a few large outliers on a small background (as trained activations have): the mean of squares is
    # dominated by the outliers, whose bf16 squares are rounded at 2^-9
    x = 0.05 * torch.randn(8, CFG.dim, generator=g)
    x[:, :7] = 400.0 + torch.rand(8, 7, generator=g)
    x = x.bfloat16()
    out = norm(x)
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + CFG.eps)
    exact = (out == ref.bfloat16()).double().mean().item()
    assert out.dtype == torch.bfloat16 and exact > 0.99, exact
    # the statistic taken in bf16 (squares, mean and rsqrt rounded): a visible share of outputs move
    xb = x
    bf = xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + CFG.eps)
    assert (bf == ref.bfloat16()).double().mean().item() < 0.9
    assert math.isfinite(out.float().abs().max().item())
