"""Wan2.1 VAE decoder with streaming state: parity with diffusers, double buffering, memory arithmetic.

Reference: diffusers ``AutoencoderKLWan.decode`` of the whole latent sequence (one latent per decoder call
with its hidden feature cache), built from a tiny config with every parameter randomised (norm gammas
included) and mapped to the official names through ``checkpoints.wan_vae``'s key map.

Speed: CPU conv3d is slow here, so the latent is 2x3 (16x24 pixels) and the diffusers reference is
computed once per module.
"""
import copy
import math
import os
import shutil
import types

import pytest
import torch
import torch.nn.functional as F
from sdvg_rt.checkpoints.wan_vae import from_diffusers
from sdvg_rt.models import wan_vae
from sdvg_rt.backends.torch_backend import vae_decoder
from sdvg_rt.models.wan_vae import (
    VAE_PRESETS,
    VAEKernels,
    VAEState,
    WanVAEConfig,
    WanVAEDecoder,
    subpixel_weight,
)
from sdvg_rt.vae_state import VAEStatePair

H, W = 2, 3  # latent size of the tests
N_LAT = 9  # latents in the test video


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: a decode is ~30 small ops, where OpenMP's 2-thread barriers cost more
    than the work (and 10x more when the cores are shared with other jobs). One thread, restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["off", "3x3", "2x2"])
def subpixel(request):
    """Kernels with each sub-pixel upsample mode (the same function); a test gives them to its model with
    ``_with``."""
    return VAEKernels(subpixel=request.param)


def _with(model, kernels):
    """A copy of a (module-scoped) decoder that computes with ``kernels``; the original keeps its own."""
    return copy.deepcopy(model).set_kernels(kernels)


def _tiny_diffusers(dtype):
    from diffusers import AutoencoderKLWan

    cfg = VAE_PRESETS["tiny"]
    ref = AutoencoderKLWan(
        base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(reversed(cfg.temporal_upsample)),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # everything random, norm gammas included
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return ref.to(dtype).eval()


def _mine_from(ref, dtype):
    cfg = VAE_PRESETS["tiny"]
    part = {k: v for k, v in ref.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    model = WanVAEDecoder(cfg)
    model.load_state_dict(from_diffusers(part, cfg), strict=True)  # strict: every key mapped, none left over
    return model.to(dtype).eval()


def _denorm(z, cfg):
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float64).view(1, -1, 1, 1, 1)
    return (z.double() * std + mean).to(z.dtype)


@pytest.fixture(scope="module")
def parity64():
    """(reference diffusers model, my decoder, z, reference frames) in float64."""
    ref = _tiny_diffusers(torch.float64)
    mine = _mine_from(ref, torch.float64)
    z = torch.randn(1, 16, N_LAT, H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        frames = ref.decode(_denorm(z, mine.config)).sample
    return ref, mine, z, frames


@pytest.fixture(scope="module")
def tiny32():
    """A random tiny decoder (fp32) and a latent video for the stream-mechanics tests."""
    torch.manual_seed(3)
    model = WanVAEDecoder(VAE_PRESETS["tiny"]).eval()
    z = torch.randn(1, 16, N_LAT, H, W, generator=torch.Generator().manual_seed(4))
    return model, z


def _split(z, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(z[:, :, i:i + n])
        i += n
    assert i == z.shape[2]
    return out


# --------------------------------------------------------------------------------------------------
# parity with the reference decode


@pytest.mark.parametrize("sizes, counts", [((3, 3, 3), [9, 12, 12]), ((1, 2, 3, 3), [1, 8, 12, 12])])
def test_streaming_blocks_match_diffusers_whole_sequence(parity64, sizes, counts, subpixel):
    _, mine, z, ref_frames = parity64
    mine = _with(mine, subpixel)
    assert ref_frames.shape == (1, 3, 1 + 4 * (N_LAT - 1), 8 * H, 8 * W)
    stream = vae_decoder(mine, H, W)
    outs = [stream.decode_commit(zb, b) for b, zb in enumerate(_split(z, sizes))]
    assert [o.shape[2] for o in outs] == counts
    assert [mine.config.frames_out(n, b == 0) for b, n in enumerate(sizes)] == counts
    got = torch.cat(outs, dim=2)
    # float64 on both sides. The tolerance is set by diffusers, not by us: its WanUpsample casts the
    # activations to float32 for the nearest upsample (3 times), so the reference carries fp32 rounding
    # (~1e-7 relative); measured max difference 2e-7. A wrong history frame or a missed bypass gives
    # differences of order 0.1.
    torch.testing.assert_close(got, ref_frames, rtol=0, atol=1e-6)
    # the comparison is not vacuous: most values are not clamped at +-1
    assert (ref_frames.abs() < 1).float().mean() > 0.5


def test_self_forcing_convention_matches_zero_cache_reference(parity64, subpixel):
    """SF demo: zero-initialised cache for block 0 (no "Rep" bypass), first 3 pixel frames dropped.

    Independent path: diffusers' decoder fed one latent per call with a feature cache pre-filled with
    zeros (exactly SF's ZERO_VAE_CACHE), frames 3.. kept."""
    ref, mine, z, _ = parity64
    mine = _with(mine, subpixel)
    z = z[:, :, :6]
    zero_state = mine.new_state(H, W)
    feat = [t.clone() for t in zero_state.slots] + [None]  # diffusers counts 33 convs (shortcut included)
    with torch.no_grad():
        x = ref.post_quant_conv(_denorm(z, mine.config))
        ref_frames = torch.cat(
            [ref.decoder(x[:, :, i:i + 1], feat_cache=feat, feat_idx=[0]) for i in range(z.shape[2])], dim=2
        ).clamp(-1, 1)[:, :, 3:]
    stream = vae_decoder(mine, H, W, convention="self_forcing")
    outs = [stream.decode_commit(zb, b) for b, zb in enumerate(_split(z, (3, 3)))]
    assert [o.shape[2] for o in outs] == [9, 12]
    assert mine.config.frames_out(3, True, "self_forcing") == 9
    torch.testing.assert_close(torch.cat(outs, 2), ref_frames, rtol=0, atol=1e-6)  # fp64, see above
    # and it really differs from the reference convention on block 0
    ref_conv = vae_decoder(mine, H, W).decode_commit(z[:, :, :3], 0)
    assert (ref_conv - outs[0]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# double buffering


def test_scratch_decode_leaves_committed_bit_identical(tiny32):
    model, z = tiny32
    stream = vae_decoder(model, H, W)
    stream.decode_commit(z[:, :, :3], 0)
    before = stream.committed.clone()
    scratch_before = stream.scratch.clone()
    stream.decode_scratch(z[:, :, 3:6] + 1.0, 1)
    for a, b in zip(stream.committed.slots, before.slots):
        assert torch.equal(a, b)
    # the scratch state was written (every slot)
    assert all(not torch.equal(a, b) for a, b in zip(stream.scratch.slots, scratch_before.slots))


def test_keep_scratch_is_a_swap_of_references(tiny32):
    model, z = tiny32
    stream = vae_decoder(model, H, W)
    ptrs_c, ptrs_s = stream.committed.data_ptrs(), stream.scratch.data_ptrs()
    stream.decode_scratch(z[:, :, :3], 0)
    new_history = stream.scratch.clone()
    stream.keep_scratch()
    assert stream.committed.data_ptrs() == ptrs_s and stream.scratch.data_ptrs() == ptrs_c
    assert all(torch.equal(a, b) for a, b in zip(stream.committed.slots, new_history.slots))
    assert stream.parity == 1
    with pytest.raises(AssertionError):
        stream.keep_scratch()  # nothing new to keep


def test_reject_path_equals_fresh_decode_and_states_are_never_reallocated(tiny32):
    model, z = tiny32
    z0, z1, z2 = _split(z, (3, 3, 3))
    draft = z1 * 0.5 - 0.3

    fresh = vae_decoder(model, H, W)
    want = [fresh.decode_commit(zb, b) for b, zb in enumerate((z0, z1, z2))]

    stream = vae_decoder(model, H, W)
    ptrs = sorted(stream.committed.data_ptrs() + stream.scratch.data_ptrs())
    got = [stream.decode_commit(z0, 0)]
    frames_d = stream.decode_scratch(draft, 1)  # the draft: decoded, scored, rejected (never kept)
    assert not torch.equal(frames_d, want[1])
    got.append(stream.decode_commit(z1, 1))  # the target block, from the committed state
    got.append(stream.decode_commit(z2, 2))
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # same ops on the same inputs: bit-identical
    # an accepted draft continues from the draft's history (the swap took it in)
    stream.decode_scratch(z0 + 0.1, 3)
    stream.keep_scratch()
    assert sorted(stream.committed.data_ptrs() + stream.scratch.data_ptrs()) == ptrs
    stream.reset()
    assert stream.parity == 0 and all(not t.any() for t in stream.committed.slots)
    assert torch.equal(stream.decode_commit(z0, 0), want[0])


def test_in_place_state_and_functional_forward(tiny32):
    """decode(state_in is state_out) and the export form forward(z, *history) agree with the stream."""
    model, z = tiny32
    z0, z1 = z[:, :, :3], z[:, :, 3:6]
    stream = vae_decoder(model, H, W)
    stream.decode_commit(z0, 0)
    hist = stream.committed.clone()
    want = stream.decode_commit(z1, 1)
    state = hist.clone()
    assert torch.equal(model.decode(z1, state, state, first=False), want)
    assert all(torch.equal(a, b) for a, b in zip(state.slots, stream.committed.slots))
    frames, *new = model(z1, *hist.slots)
    assert torch.equal(frames, want)
    assert all(torch.equal(a, b) for a, b in zip(new, stream.committed.slots))


def test_channels_last_matches_contiguous(tiny32, subpixel):
    model, z = tiny32
    model = _with(model, subpixel)
    cl = WanVAEDecoder(model.config).eval().set_kernels(subpixel)
    cl.load_state_dict(model.state_dict())
    cl.to_channels_last()
    a, b = vae_decoder(model, H, W), vae_decoder(cl, H, W)
    assert b.committed.slots[0].is_contiguous(memory_format=torch.channels_last_3d)
    for blk, zb in enumerate(_split(z[:, :, :6], (3, 3))):
        # fp32, same maths in another memory layout: the conv kernels may sum in another order (~1e-7
        # relative per layer), hence a small atol rather than equality.
        torch.testing.assert_close(b.decode_commit(zb, blk), a.decode_commit(zb, blk), rtol=0, atol=1e-5)


def test_bf16_decode_is_as_accurate_as_diffusers_bf16(parity64, subpixel):
    """The production dtype: bf16 weights/state, fp32 norm accumulation, fp32 de-normalisation
    constants. Judged against the fp64 reference: our bf16 error must be no worse than diffusers' own
    bf16 decode of the same weights (measured: mean 8.2e-3 vs 7.8e-3, max 0.07 vs 0.10)."""
    ref, mine, z, want = parity64
    z = z[:, :, :6]
    want = want[:, :, :21]  # causal: the first 6 latents' frames do not depend on later latents
    m16 = _with(mine, subpixel).to(torch.bfloat16)
    assert m16.latents_std.dtype == torch.float32 and m16.latents_std[0, 0, 0, 0, 0] == 2.8184
    stream = vae_decoder(m16, H, W)
    assert stream.committed.slots[0].dtype == torch.bfloat16
    got = torch.cat([stream.decode_commit(zb.to(torch.bfloat16), b) for b, zb in enumerate(_split(z, (3, 3)))], 2)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    with torch.no_grad():
        theirs = copy.deepcopy(ref).to(torch.bfloat16).decode(_denorm(z, mine.config).to(torch.bfloat16)).sample
    err_ours = (got.double() - want).abs().mean()
    err_theirs = (theirs.double() - want).abs().mean()
    assert err_ours < 1.5 * err_theirs and err_ours < 2e-2


# --------------------------------------------------------------------------------------------------
# fewer passes: sub-pixel upsample, history written by the producing group


@pytest.mark.parametrize("h, w", [(3, 4), (5, 7), (4, 1), (1, 1)])
@pytest.mark.parametrize("mode", ["3x3", "2x2"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_conv_equals_nearest_upsample_then_conv(h, w, mode, channels_last):
    """One conv of the low-resolution image with the folded taps + pixel shuffle == nearest-exact 2x then
    the 3x3 conv (padding 1), in fp64; the result lands in the layout asked for."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, h, w, generator=g, dtype=torch.float64)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        conv.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
        want = conv(torch.nn.Upsample(scale_factor=2.0, mode="nearest-exact")(x))
        k = subpixel_weight(conv.weight, mode)
        assert k.shape == ((20, 6, 3, 3) if mode == "3x3" else (20, 6, 2, 2))
        mf = torch.channels_last if channels_last else torch.contiguous_format
        y = F.conv2d(x.contiguous(memory_format=mf), k.contiguous(memory_format=mf), None, 1, 1)
        z = wan_vae._bias_pixel_shuffle(y, conv.bias, mode == "2x2", channels_last)
        got = wan_vae._phases_to_images(z, channels_last)
    assert got.shape == want.shape == (3, 5, 2 * h, 2 * w)
    assert (got - want).abs().max() < 1e-10
    assert got.is_contiguous(memory_format=mf)


def test_subpixel_phase_map_on_a_single_pixel():
    """Nearest 2x of a one-hot image is a 2x2 block; the fold must put each 3x3 tap where that block
    sends it: checked tap by tap against the upsample, for every output phase."""
    for t in range(9):
        wt = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
        wt.view(-1)[t] = 1.0
        x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
        x[0, 0, 1, 1] = 1.0
        want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"), wt, padding=1)
        y = F.conv2d(x, subpixel_weight(wt, "3x3"), padding=1)
        z = wan_vae._bias_pixel_shuffle(y, torch.zeros(1, dtype=torch.float64), False, False)
        got = wan_vae._phases_to_images(z, False)
        assert torch.equal(got, want), t


def test_subpixel_fold_follows_weight_changes(tiny32):
    """The folded weights are cached; loading other weights (in place) or casting must refold them."""
    model, z = tiny32
    m = _with(model, VAEKernels(subpixel="3x3"))
    a = vae_decoder(m, H, W).decode_commit(z[:, :, :3], 0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, wan_vae.Resample):
                mod.resample[1].weight.mul_(-0.5)  # in place: same storage, new version
    b = vae_decoder(m, H, W).decode_commit(z[:, :, :3], 0)
    assert not torch.equal(a, b)
    off = vae_decoder(m.set_kernels(VAEKernels(subpixel="off")), H, W).decode_commit(z[:, :, :3], 0)
    torch.testing.assert_close(b, off, rtol=0, atol=1e-5)
    m64 = m.double().set_kernels(VAEKernels(subpixel="3x3"))  # new storages
    c = vae_decoder(m64, H, W).decode_commit(z[:, :, :3].double(), 0)
    assert c.dtype == torch.float64
    torch.testing.assert_close(c, b.double(), rtol=0, atol=1e-5)


def test_subpixel_mode_switch():
    """"auto" (the default): sub-pixel 2x2 on CUDA tensors only; unknown modes are refused."""
    auto = WanVAEDecoder.kernels
    assert auto.subpixel == "auto" and auto.eager
    assert auto.subpixel_mode(torch.zeros(1)) == "off"
    assert auto.subpixel_mode(torch.zeros(1, device="meta")) == "off"
    assert auto.subpixel_mode(types.SimpleNamespace(is_cuda=True)) == "2x2"  # (only .is_cuda is read)
    assert VAEKernels(subpixel="3x3").subpixel_mode(torch.zeros(1)) == "3x3"
    with pytest.raises(ValueError, match="sub-pixel"):
        VAEKernels(subpixel="4x4")
    with pytest.raises(ValueError, match="no elementwise group named"):
        VAEKernels(ops={"rms_nrom": wan_vae._EAGER["rms_norm"]})


def _conv_input_layouts(model, z, monkeypatch):
    """Decode 2 blocks (zero history, then the state's); return (whether every 3D conv input was
    channels-last-3d, frames of both blocks). The CPU convolutions return contiguous tensors whatever
    their input; here they return channels-last ones like cuDNN does on the GPU, so that what is checked
    is the layout that our own ops (the ``*_into`` groups' buffers, the concatenations, the reshapes)
    produce."""
    seen = []
    conv2d, conv3d = F.conv2d, F.conv3d

    def conv3d_cl(x, *args, **kwargs):
        seen.append(x.is_contiguous(memory_format=torch.channels_last_3d))
        return conv3d(x, *args, **kwargs).contiguous(memory_format=torch.channels_last_3d)

    def conv2d_cl(x, *args, **kwargs):
        return conv2d(x, *args, **kwargs).contiguous(memory_format=torch.channels_last)

    with monkeypatch.context() as mp:
        mp.setattr(F, "conv3d", conv3d_cl)
        mp.setattr(F, "conv2d", conv2d_cl)
        stream = vae_decoder(model, H, W)
        frames = [stream.decode_commit(zb, b) for b, zb in enumerate(_split(z[:, :, :6], (3, 3)))]
    assert len(seen) == 2 * (1 + 32 + 1)  # conv2, the 32 causal convs (wan-models.md §5), the shortcut
    return all(seen), frames


def _no_cxx():
    return shutil.which(os.environ.get("CXX", "g++")) is None


def test_causal_conv_inputs_stay_channels_last(tiny32, subpixel, monkeypatch):
    """The causal convs' inputs ``[history | x]`` stay channels-last-3d (zero history on block 0, the
    state's history after), in every sub-pixel mode (eager)."""
    model, z = tiny32
    ok, _ = _conv_input_layouts(_with(model, subpixel).to_channels_last(), z, monkeypatch)
    assert ok


@pytest.mark.slow  # torch.compile on CPU: about a minute on 2 cores
@pytest.mark.skipif(_no_cxx(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_groups_keep_layout_and_equal_eager(tiny32, monkeypatch):
    """Compiled (Inductor on CPU here) with the GPU's sub-pixel mode ("2x2"): the causal convs' inputs
    stay channels-last-3d and the frames equal the eager decode's."""
    model, z = tiny32
    cl = _with(model, VAEKernels(subpixel="2x2")).to_channels_last()
    ok, want = _conv_input_layouts(cl, z, monkeypatch)
    assert ok
    torch._dynamo.reset()
    compiled = VAEKernels(compile=True, subpixel="2x2")
    assert not compiled.eager and WanVAEDecoder.kernels.eager
    cl.set_kernels(compiled)
    try:
        # the tiny sizes coincide (t = w = 3), so dynamo's duck sizing adds graphs that the full size does not
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 32)
        ok, got = _conv_input_layouts(cl, z, monkeypatch)
        # the 2x2 form's pixel shuffle (a gather), compiled
        y = torch.randn(4, 12, 3, 5).contiguous(memory_format=torch.channels_last)
        b = torch.randn(3)
        for shift in (True, False):
            a, e = (k["bias_pixel_shuffle"](y, b, shift, True) for k in (compiled, WanVAEDecoder.kernels))
            assert a.is_contiguous() and a.shape == e.shape and torch.equal(a, e)
    finally:
        torch._dynamo.reset()
    assert ok
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.skipif(not wan_vae.VAEKernels(triton=True).triton, reason="needs triton (test extra)")
def test_triton_norms_decode_the_eager_frames(tiny32, monkeypatch):
    """With the Triton norm kernel (``VAEKernels(triton=True)``: compiled on a GPU, Triton's interpreter on CPU)
    every norm that feeds a causal conv runs the kernel (14 residual blocks x 2 + the head, per block), the
    convs' inputs stay channels-last-3d, and two streamed blocks equal the eager decode's frames (fp32: to
    rounding)."""
    from sdvg_rt.models import vae_kernels

    model, z = tiny32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cl = _with(model, VAEKernels(subpixel="2x2")).to_channels_last().to(dev)
    z = z.to(dev)
    calls = []
    real = vae_kernels.norm_silu_into
    # fp32 convolutions without TF32 (cuDNN's default on a GPU), whose input rounding would turn the norms'
    # last-bit differences into 1e-4 ones
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        _, want = _conv_input_layouts(cl, z, monkeypatch)
        monkeypatch.setattr(vae_kernels, "norm_silu_into", lambda *a: calls.append(1) or real(*a))
        cl.set_kernels(VAEKernels(triton=True, subpixel="2x2"))
        ok, got = _conv_input_layouts(cl, z, monkeypatch)
    assert ok and len(calls) == 2 * (14 * 2 + 1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_decode_rejects_a_state_of_another_size(tiny32):
    model, z = tiny32
    good, bad = model.new_state(H, W), model.new_state(H + 1, W)
    with pytest.raises(ValueError, match="new_state"):
        model.decode(z[:, :, :3], bad, good, first=False)
    with pytest.raises(ValueError, match="z of shape"):
        model.decode(z[0], None, good, first=True)


# --------------------------------------------------------------------------------------------------
# structure and memory arithmetic (full size, built on the meta device)


def test_full_size_module_names_and_parameter_count():
    with torch.device("meta"):
        model = WanVAEDecoder(WanVAEConfig.from_name("wan2.1"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # wan-models.md §5: decoder 73,295,331 parameters + conv2 272
    assert sum(math.prod(s) for s in shapes.values()) == 73_295_331 + 272
    assert shapes["conv2.weight"] == (16, 16, 1, 1, 1)
    assert shapes["decoder.conv1.weight"] == (384, 16, 3, 3, 3)
    assert shapes["decoder.middle.1.to_qkv.weight"] == (1152, 384, 1, 1)
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert shapes["decoder.upsamples.4.shortcut.weight"] == (384, 192, 1, 1, 1)
    assert shapes["decoder.upsamples.7.resample.1.weight"] == (192, 384, 3, 3)
    assert shapes["decoder.upsamples.11.resample.1.weight"] == (96, 192, 3, 3)
    assert "decoder.upsamples.11.time_conv.weight" not in shapes
    assert shapes["decoder.head.0.gamma"] == (96, 1, 1, 1)
    assert shapes["decoder.head.2.weight"] == (3, 96, 3, 3, 3)
    assert max(int(k.split(".")[2]) for k in shapes if k.startswith("decoder.upsamples.")) == 14


def test_state_slots_and_nbytes_match_the_spec():
    cfg = WanVAEConfig.from_name("wan2.1")
    # wan-models.md §5, SF ZERO_VAE_CACHE at 832x480
    spec = (
        [(1, 16, 2, 60, 104)] + [(1, 384, 2, 60, 104)] * 11
        + [(1, 192, 2, 120, 208)] + [(1, 384, 2, 120, 208)] * 6
        + [(1, 192, 2, 240, 416)] * 6 + [(1, 96, 2, 480, 832)] * 7
    )
    assert cfg.state_shapes(60, 104) == spec
    n = cfg.state_nbytes(60, 104, torch.float16)
    assert n == sum(math.prod(s) for s in spec) * 2
    assert 1.75 < n / 2**30 < 1.78  # "about 1.76 GiB in fp16"
    assert VAEStatePair.nbytes_for(cfg, 60, 104, torch.bfloat16) == 2 * n
    with torch.device("meta"):
        model = WanVAEDecoder(cfg)
        state = model.new_state(60, 104, torch.float16)
    assert isinstance(state, VAEState) and state.nbytes == n
    assert cfg.frames_out(3, True) == 9 and cfg.frames_out(3, False) == 12


def test_output_padding_is_the_same_function(tiny32, monkeypatch):
    """Convolutions computed with zero-weight extra outputs (sliced off) decode the same frames; the tiny
    model's 8-wide last stage stands in for the full model's 96 (``PADDED_OUTPUTS``)."""
    model, z = tiny32
    monkeypatch.setitem(wan_vae.PADDED_OUTPUTS, 8, 24)  # 24: no natural width of the tiny model
    calls = []
    real = F.conv3d
    monkeypatch.setattr(wan_vae.F, "conv3d", lambda x, w, *a: calls.append(w.shape[0]) or real(x, w, *a))
    plain = vae_decoder(_with(model, VAEKernels(pad="off")), H, W).decode_commit(z[:, :, :3], 0)
    assert 24 not in calls
    auto = _with(model, VAEKernels(pad="auto"))  # CPU: off
    assert torch.equal(vae_decoder(auto, H, W).decode_commit(z[:, :, :3], 0), plain)
    assert 24 not in calls
    padded = vae_decoder(_with(model, VAEKernels(pad="on")), H, W).decode_commit(z[:, :, :3], 0)
    assert 24 in calls
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="output padding mode"):
        VAEKernels(pad="always")
