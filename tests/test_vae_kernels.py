"""The VAE's Triton norm kernel (``models.vae_kernels``) against the eager groups of ``wan_vae`` that define it:
the kernel alone (fp32 to rounding, fp16 to the bit but for a rare element, bf16 to a few ulps), strided
channel slices and partial programs, the frames of the buffer it must leave alone, the layouts it refuses
and the fallback of ``VAEKernels(triton=True)`` to the group.

On CPU machines the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py); on a GPU
it runs compiled.
"""
import pytest
import torch
from sdvg_rt.models import vae_kernels as K
from sdvg_rt.models import wan_vae as V

pytestmark = pytest.mark.skipif(not K.AVAILABLE, reason="needs triton (test extra)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last_3d


def _case(c, width, dtype, t=2, h=3, w=5):
    """x: channels ``[:c]`` of a channels-last ``width``-wide tensor (rows of stride ``width``); the output
    buffer ``[history | x | a frame after]`` filled with 7s (``out``: its ``x`` frames); gamma ``[c, 1, 1, 1]``,
    bias ``[c]``."""
    x = (3 * torch.randn(1, width, t, h, w, device=DEV)).to(dtype).contiguous(memory_format=CL)[:, :c]
    buf = torch.full((1, c, t + 3, h, w), 7.0, device=DEV, dtype=dtype).contiguous(memory_format=CL)
    gamma = (1 + 0.5 * torch.randn(c, 1, 1, 1, device=DEV)).to(dtype)
    bias = torch.randn(c, device=DEV).to(dtype)
    return x, buf, gamma, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# channels in two power-of-two chunks: 96 = 64 + 32, 40 = 32 + 8, 192 = 128 + 64, 384 = 256 + 128 (none masked),
# 44 = 32 + 12 of 16 (a masked second chunk), 8 = 8 + none; widths > c: a slice of a padded convolution output;
# 2 x 3 x 5 = 30 rows, not a whole number of programs (every program masks its rows); the decoder's widths also
# over whole programs, unmasked as at production shapes (64 rows: 2 programs of 32 rows of 96, 4 of 16 rows of
# 192; 16 rows: 2 programs of 8 rows of 384)
@pytest.mark.parametrize("c,width,grid", [(96, 128, (2, 3, 5)), (40, 40, (2, 3, 5)), (44, 48, (2, 3, 5)),
                                          (8, 8, (2, 3, 5)), (96, 128, (2, 4, 8)), (96, 96, (2, 4, 8)),
                                          (192, 192, (2, 4, 8)), (384, 384, (1, 2, 8))])
@pytest.mark.parametrize("with_bias", [False, True])
def test_norm_silu_into_matches_the_eager_group(dtype, c, width, grid, with_bias):
    t = grid[0]
    x, buf, gamma, bias = _case(c, width, dtype, *grid)
    scale = c**0.5
    out = buf[:, :, 2:2 + t]
    assert K.row_stride(x) == width and K.row_stride(out) == c and K.fits(x, out, gamma, bias)
    if with_bias:
        ref = V._bias_rms_norm_silu(x, bias, gamma, scale)
        K.norm_silu_into(x, bias, gamma, scale, out)
    else:
        ref = V._rms_norm_silu(x, gamma, scale)
        K.norm_silu_into(x, None, gamma, scale, out)
    assert (buf[:, :, :2] == 7).all() and (buf[:, :, 2 + t:] == 7).all()  # nothing written outside out
    got, ref = out.float(), ref.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)
    elif dtype == torch.float16 or DEV == "cuda":
        # rounded where the eager ops round: all but a rare element equal (the sum of squares is reduced in
        # another order), none more than 1 ulp away
        ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
        assert (got != ref).float().mean().item() <= 0.01
        assert ((got - ref).abs() <= ref.abs() * ulp + 2.0**-24).all()
    else:
        # Triton's CPU interpreter rounds fp32 -> bf16 by truncation, not to nearest, at each of the kernel's
        # four roundings: within 4 ulps at the output's scale
        assert (got - ref).abs().max().item() <= 4 * 2.0**-7 * max(1.0, ref.abs().max().item())


def test_row_stride_and_fits_name_what_the_kernel_takes():
    x = torch.randn(1, 8, 2, 3, 4, device=DEV)
    cl = x.contiguous(memory_format=CL)
    assert K.row_stride(x) is None  # channels-first
    assert K.row_stride(cl) == 8 and K.row_stride(cl[:, :5]) == 8
    assert K.row_stride(cl[:, :, :, :, 1:3]) is None  # rows not dense along w
    assert K.row_stride(cl[:, :, 1:]) == 8  # later frames: still dense
    assert K.row_stride(torch.randn(8, 3, 4)) is None  # not a video tensor
    g = torch.ones(8, 1, 1, 1, device=DEV)
    assert not K.fits(cl, x, g) and not K.fits(cl, cl.half(), g) and not K.fits(cl, cl[:, :, :1], g)
    assert K.fits(cl, cl, g) and K.fits(cl, cl, g, torch.ones(8, device=DEV))
    assert not K.fits(cl, cl, g.half()) and not K.fits(cl, cl, g[:4]) and not K.fits(cl, cl, g, torch.ones(4, device=DEV))


def test_norm_silu_into_refuses_bad_parameters():
    x, buf, gamma, bias = _case(8, 8, torch.float32)
    with pytest.raises(ValueError, match="gamma must be 8 contiguous"):
        K.norm_silu_into(x, None, gamma[:4], 1.0, buf[:, :, 2:4])
    with pytest.raises(ValueError, match="bias must be 8 contiguous"):
        K.norm_silu_into(x, bias.half(), gamma, 1.0, buf[:, :, 2:4])
    with pytest.raises(ValueError, match="channels-last rows"):
        K.norm_silu_into(x.contiguous(), None, gamma, 1.0, buf[:, :, 2:4])
    with pytest.raises(ValueError, match="one float dtype and shape"):
        K.norm_silu_into(x, None, gamma, 1.0, buf[:, :, 2:])


def test_vae_kernels_take_the_kernel_for_channels_last_and_the_group_otherwise(monkeypatch):
    calls = []
    real = K.norm_silu_into
    monkeypatch.setattr(K, "norm_silu_into", lambda *a: calls.append(a[1] is not None) or real(*a))
    kernels = V.VAEKernels(triton=True)
    assert kernels.triton and not kernels.eager and "triton=True" in repr(kernels)
    x, buf, gamma, bias = _case(8, 8, torch.float32)
    out = buf[:, :, 2:4]
    kernels["bias_rms_norm_silu_into"](x, bias, gamma, 8**0.5, out)
    kernels["rms_norm_silu_into"](x, gamma, 8**0.5, out)
    assert calls == [True, False]
    # a gamma the kernel does not take (another dtype) goes to the group too
    kernels["rms_norm_silu_into"](x, gamma.double(), 8**0.5, out)
    assert calls == [True, False]
    torch.testing.assert_close(out, V._rms_norm_silu(x, gamma.double(), 8**0.5).float())
    # channels-first tensors (the contiguous layout) go to the eager group, whose result they get
    xc, outc = x.contiguous(), torch.empty(x.shape, device=DEV)
    kernels["rms_norm_silu_into"](xc, gamma, 8**0.5, outc)
    assert calls == [True, False]
    assert torch.equal(outc, V._rms_norm_silu(xc, gamma, 8**0.5))
