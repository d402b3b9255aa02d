"""WanDiT: presets, parity with diffusers' WanTransformer3DModel, cached block steps vs the masked
reference path (block-causal, rolling window + sink, multi-block commits), attention call site.

Everything runs in fp32 on CPU with the tiny preset and a 6x8 latent grid (12 tokens per frame).
"""
import math

import pytest
import torch
from diffusers import WanTransformer3DModel
from sdvg_rt.checkpoints.wan_dit import diffusers_to_wan, synthetic_dit_state_dict
from sdvg_rt.kv_cache import KVCache, block_causal_mask
from sdvg_rt.models import attention as attn_mod
from sdvg_rt.models.wan_dit import PRESETS, WanDiT, WanDiTConfig, sinusoidal_embedding

H, W, TPF, FPB = 6, 8, 12, 3  # latent grid 6x8 -> 3x4 patches per frame; 3 frames per block
N_BLK = FPB * TPF


@pytest.fixture(scope="module")
def tiny():
    model = WanDiT(PRESETS["tiny"]).eval()
    model.load_state_dict(synthetic_dit_state_dict("tiny", seed=1), strict=True)
    return model


def _context(seed, cfg, used=20):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    ctx[:, used:] = 0  # padding rows are zero (umT5 output convention)
    return ctx


def _latents(seed, frames):
    return torch.randn(1, 16, frames, H, W, generator=torch.Generator().manual_seed(seed))


def _cache(model, window, sink=0):
    c = model.cfg
    return KVCache(c.num_layers, c.num_heads, c.head_dim, TPF, FPB, window, sink, torch.float32, "cpu")


def _block(x, b):
    return x[:, :, b * FPB:(b + 1) * FPB]


# --------------------------------------------------------------------------------------------------
# Config

def test_presets_match_spec():
    a, b = PRESETS["wan2.1-1.3b"], PRESETS["wan2.1-14b"]
    assert (a.dim, a.ffn_dim, a.num_heads, a.num_layers) == (1536, 8960, 12, 30)
    assert (b.dim, b.ffn_dim, b.num_heads, b.num_layers) == (5120, 13824, 40, 40)
    for c in (a, b):
        assert (c.head_dim, c.freq_dim, c.text_dim, c.text_len, c.patch_size, c.in_dim, c.out_dim, c.eps) == \
            (128, 256, 4096, 512, (1, 2, 2), 16, 16, 1e-6)
        assert c.rope_split == (44, 42, 42)
    assert PRESETS["tiny"].rope_split == (12, 10, 10) and PRESETS["tiny"].text_dim == 64
    assert PRESETS["tiny-target"].shape_key() != PRESETS["tiny"].shape_key()
    assert WanDiTConfig.from_name("tiny") is PRESETS["tiny"]
    with pytest.raises(ValueError, match="presets"):
        WanDiTConfig.from_name("wan2.1-7b")


@pytest.mark.parametrize("name,params,tensors", [("wan2.1-1.3b", 1_418_996_800, 825),
                                                 ("wan2.1-14b", 14_288_491_584, 1095)])
def test_full_size_parameter_counts(name, params, tensors):
    """Counts computed in wan-models.md §1 from the official module shapes (built on meta: free)."""
    with torch.device("meta"):
        model = WanDiT(PRESETS[name])
    sd = model.state_dict()
    assert len(sd) == tensors
    assert sum(v.numel() for v in sd.values()) == params
    assert not any("rope" in k for k in sd)  # RoPE tables are non-persistent


# --------------------------------------------------------------------------------------------------
# Parity with diffusers (independent implementation)

def _diffusers_tiny():
    c = PRESETS["tiny"]
    dm = WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
        in_channels=c.in_dim, out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim,
        ffn_dim=c.ffn_dim, num_layers=c.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=c.eps, rope_max_seq_len=c.rope_len).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # randomise every parameter, norms and scale_shift_tables included
        for name, p in dm.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.ndim == 1:
                p.copy_(1 + 0.2 * r)
            elif "scale_shift_table" in name:
                p.copy_(0.3 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))
    ours = WanDiT(c).eval()
    ours.load_state_dict(diffusers_to_wan(dm.state_dict()), strict=True)  # via our key map
    return dm, ours


# Tolerance: diffusers computes the timestep sinusoid in fp32 (argument error up to t*2^-24 ~ 6e-5 rad
# at t=1000) where we use float64 as Self-Forcing does, and applies RoPE in float64 where we use fp32;
# everything else is the same fp32 maths. Measured differences are ~5e-6 of the output scale.
def _close(out, ref):
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("t", [1000.0, 937.5, 0.0])
def test_parity_block0_cached_vs_diffusers(t):
    dm, ours = _diffusers_tiny()
    x, ctx = _latents(0, FPB), _context(0, ours.cfg)
    cache = _cache(ours, window=9)
    with torch.no_grad():
        ref = dm(x, torch.tensor([t]), ctx, return_dict=False)[0]  # 1-D timestep: one t for all
        out = ours(x, torch.full((FPB,), t), ours.prepare_context(ctx), cache.kv, cache.slots(0))
    assert out.shape == x.shape
    _close(out, ref)


def test_parity_per_frame_timestep_bidirectional_vs_diffusers():
    """Six frames, per-frame t, full attention: checks per-frame modulation and RoPE at frames 0..5
    (diffusers takes a 2-D timestep as per-token, so each frame's t is repeated over its tokens)."""
    dm, ours = _diffusers_tiny()
    x, ctx = _latents(1, 2 * FPB), _context(1, ours.cfg)
    t = torch.tensor([0.0, 0.0, 0.0, 1000.0, 937.5, 625.0])
    with torch.no_grad():
        ref = dm(x, t.repeat_interleave(TPF)[None], ctx, return_dict=False)[0]
        out = ours.forward_full(x, t, ours.prepare_context(ctx), mask=None)
    _close(out, ref)


# --------------------------------------------------------------------------------------------------
# Cached block steps vs the masked reference path

# Same maths on both sides; only the order of summation in attention differs (masked softmax over
# all keys vs a softmax over the cache slice), so agreement is at fp32 rounding level.
TOL = dict(rtol=1e-4, atol=1e-4)


def test_cached_blocks_match_block_causal_reference(tiny):
    """Per block: a noisy step (t=937.5) then the commit (t=0), which overwrites the noisy K/V. Each
    output equals forward_full with the block-causal mask over [clean blocks < b, this block]."""
    blocks = 4
    clean, noisy, ctx = _latents(2, blocks * FPB), _latents(3, blocks * FPB), _context(2, tiny.cfg)
    cache = _cache(tiny, window=blocks * FPB)
    with torch.no_grad():
        ctx_kv = tiny.prepare_context(ctx)
        for b in range(blocks):
            frames = (b + 1) * FPB
            mask = block_causal_mask(frames, TPF, FPB)
            for x_b, t_val in ((_block(noisy, b), 937.5), (_block(clean, b), 0.0)):
                out = tiny(x_b, torch.full((FPB,), t_val), ctx_kv, cache.kv, cache.slots(b))
                x_ref = torch.cat([clean[:, :, :b * FPB], x_b], dim=2)
                t_ref = torch.cat([torch.zeros(b * FPB), torch.full((FPB,), t_val)])
                ref = tiny.forward_full(x_ref, t_ref, ctx_kv, mask)[:, :, b * FPB:]
                torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("window,sink", [(9, 3), (6, 0)])
def test_rolling_window_matches_window_sink_reference(tiny, window, sink):
    """More blocks than the window holds: the ring cache (no mask) equals the window+sink mask."""
    blocks = 6
    clean, ctx = _latents(4, blocks * FPB), _context(4, tiny.cfg)
    cache = _cache(tiny, window=window, sink=sink)
    with torch.no_grad():
        ctx_kv = tiny.prepare_context(ctx)
        mask = block_causal_mask(blocks * FPB, TPF, FPB, window_frames=window, sink_frames=sink)
        ref = tiny.forward_full(clean, torch.zeros(blocks * FPB), ctx_kv, mask)
        for b in range(blocks):
            if b == blocks - 1:  # a noisy step on the last block, far past the window
                x_n = _block(_latents(5, blocks * FPB), b)
                out = tiny(x_n, torch.full((FPB,), 1000.0), ctx_kv, cache.kv, cache.slots(b))
                x_ref = torch.cat([clean[:, :, :b * FPB], x_n], dim=2)
                t_ref = torch.cat([torch.zeros(b * FPB), torch.full((FPB,), 1000.0)])
                ref_n = tiny.forward_full(x_ref, t_ref, ctx_kv, mask)[:, :, b * FPB:]
                torch.testing.assert_close(out, ref_n, **TOL)
            out = tiny(_block(clean, b), torch.zeros(FPB), ctx_kv, cache.kv, cache.slots(b))
            torch.testing.assert_close(out, _block(ref, b), **TOL)
    assert cache.slots(blocks - 1).read_end == window * TPF


def test_multi_block_commit_equals_one_by_one(tiny):
    blocks = 4
    clean, ctx = _latents(6, blocks * FPB), _context(6, tiny.cfg)
    one, multi = _cache(tiny, window=blocks * FPB), _cache(tiny, window=blocks * FPB)
    with torch.no_grad():
        ctx_kv = tiny.prepare_context(ctx)
        outs = [tiny(_block(clean, b), torch.zeros(FPB), ctx_kv, one.kv, one.slots(b)) for b in range(blocks)]
        tiny(_block(clean, 0), torch.zeros(FPB), ctx_kv, multi.kv, multi.slots(0))
        # blocks 1..3 pending (lazy commit), committed in one forward with a block-causal mask
        out = tiny(clean[:, :, FPB:], torch.zeros(3 * FPB), ctx_kv, multi.kv, multi.slots(1, 3),
                   mask=multi.span_mask(1, 3))
    torch.testing.assert_close(multi.kv, one.kv, **TOL)
    torch.testing.assert_close(out, torch.cat(outs[1:], dim=2), **TOL)
    assert one.kv[:, :, N_BLK:].abs().sum() > 0  # the compared slots were really written


def test_write_kv_writes_exactly_what_forward_writes(tiny):
    """The commit forward (``write_kv``) skips the last layer after its K/V and the head, yet every cache
    slot equals what a full forward writes, bit for bit; other slots stay untouched."""
    x, ctx = _latents(8, 2 * FPB), _context(8, tiny.cfg)
    full, commit = _cache(tiny, window=2 * FPB), _cache(tiny, window=2 * FPB)
    with torch.no_grad():
        ctx_kv = tiny.prepare_context(ctx)
        for b in range(2):
            tiny(_block(x, b), torch.zeros(FPB), ctx_kv, full.kv, full.slots(b))
            assert tiny.write_kv(_block(x, b), torch.zeros(FPB), ctx_kv, commit.kv, commit.slots(b)) is None
    assert torch.equal(commit.kv, full.kv)
    assert full.kv[-1].abs().sum() > 0  # the last layer's slots were written


def test_bf16_step_is_finite_and_keeps_float64_rope(tiny):
    model = WanDiT(tiny.cfg).eval()
    model.load_state_dict(tiny.state_dict())
    model = model.to(torch.bfloat16)
    assert model.rope.cos.dtype == torch.float64 and model.dtype == torch.bfloat16
    x, ctx = _latents(7, FPB), _context(7, tiny.cfg)
    cache = KVCache(2, 2, 32, TPF, FPB, 6, 0, torch.bfloat16, "cpu")
    with torch.no_grad():
        ctx_kv = model.prepare_context(ctx)
        out = model(x.bfloat16(), torch.full((FPB,), 937.5), ctx_kv, cache.kv, cache.slots(0))
        ref = tiny.forward_full(x, torch.full((FPB,), 937.5), tiny.prepare_context(ctx))
    assert ctx_kv.dtype == out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 end to end (Self-Forcing precision) stays within a few bf16 ulps of the fp32 result
    assert (out.float() - ref).norm() / ref.norm() < 3e-2


def test_time_embedding_and_rope_tables():
    t = torch.tensor([937.5])
    emb = sinusoidal_embedding(t, 256)
    k = torch.arange(128, dtype=torch.float64)
    arg = 937.5 * 10000.0 ** (-k / 128)
    torch.testing.assert_close(emb[0], torch.cat([arg.cos(), arg.sin()]), rtol=0, atol=1e-12)  # cos first
    rope = WanDiT(PRESETS["tiny"]).rope
    c0, s0 = rope.factors(6, 3, 4, frame_offset=0)
    c3, s3 = rope.factors(3, 3, 4, frame_offset=3)
    assert torch.equal(c0[3 * 12:], c3) and torch.equal(s0[3 * 12:], s3)  # absolute frame positions
    with pytest.raises(ValueError, match="RoPE positions out of range"):
        rope.factors(3, 3, 4, frame_offset=1022)


def test_forward_input_errors(tiny):
    x, ctx = _latents(8, FPB), _context(8, tiny.cfg)
    cache = _cache(tiny, window=6)
    with torch.no_grad():
        ctx_kv = tiny.prepare_context(ctx)
        with pytest.raises(ValueError, match="one timestep per latent frame"):
            tiny(x, torch.zeros(1), ctx_kv, cache.kv, cache.slots(0))
        with pytest.raises(ValueError, match="do not fit"):
            tiny(_latents(8, 2 * FPB), torch.zeros(2 * FPB), ctx_kv, cache.kv, cache.slots(1))
        with pytest.raises(ValueError, match="context must be"):
            tiny.prepare_context(torch.zeros(1, 512, 32))


# --------------------------------------------------------------------------------------------------
# Attention call site

def test_attention_matches_manual_softmax_and_backends():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(L, 2, 16, generator=g) for L in (5, 7, 7))
    mask = torch.rand(5, 7, generator=g) > 0.4
    mask[:, 0] = True
    scores = torch.einsum("qhd,khd->hqk", q, k) / 4.0
    ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    for name in ("math", "auto", "flash", "efficient"):
        a = attn_mod.Attention(name)
        assert a.name == name
        torch.testing.assert_close(a(q, k, v, mask), ref, rtol=1e-5, atol=1e-5)
    full = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    torch.testing.assert_close(attn_mod.Attention("math")(q, k, v), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn_mod.Attention("flash3")


def test_fused_qk_keeps_keys_and_outputs():
    """fuse_qk: one q/k GEMM, same outputs (fp32), same state-dict keys and values, no extra parameters."""
    tiny = WanDiT(PRESETS["tiny"]).eval()  # own instance: fuse_qk changes the module
    tiny.load_state_dict(synthetic_dit_state_dict("tiny", seed=1), strict=True)
    cfg = tiny.cfg
    ctx_kv = tiny.prepare_context(_context(1, cfg))
    x = _latents(2, 3)
    t = torch.full((3,), 937.5)
    cache = _cache(tiny, window=9)
    ref = tiny(x, t, ctx_kv, cache.kv, cache.slots(0)).clone()
    sd_before = {k: v.clone() for k, v in tiny.state_dict().items()}
    tiny.fuse_qk()
    attn = tiny.blocks[0].self_attn
    assert attn.q.weight.data_ptr() == attn.qk_weight.data_ptr()  # views, not copies
    sd_after = tiny.state_dict()
    assert sd_after.keys() == sd_before.keys()
    assert all(torch.equal(sd_after[k], sd_before[k]) for k in sd_before)
    cache2 = _cache(tiny, window=9)
    out = tiny(x, t, ctx_kv, cache2.kv, cache2.slots(0))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # one q/k GEMM vs two: summation order only
    torch.testing.assert_close(cache2.kv, cache.kv, rtol=1e-5, atol=1e-5)


def test_fused_qk_follows_a_cast_and_fuses_again():
    """After ``.to()`` the q/k modules are the truth (not the stale fused tensor); ``fuse_qk`` fuses again."""
    tiny = WanDiT(PRESETS["tiny"]).eval()
    tiny.load_state_dict(synthetic_dit_state_dict("tiny", seed=1), strict=True)
    tiny.fuse_qk()
    attn = tiny.blocks[0].self_attn
    assert attn._qk_fused()
    tiny.double()
    x = torch.randn(5, tiny.cfg.dim, dtype=torch.float64)
    assert not attn._qk_fused()
    q, k = attn.project_qk(x)
    assert torch.equal(q, attn.q(x)) and torch.equal(k, attn.k(x))
    tiny.fuse_qk()
    assert attn._qk_fused() and attn.qk_weight.dtype == torch.float64
    q2, k2 = attn.project_qk(x)
    torch.testing.assert_close(q2, q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k2, k, rtol=1e-12, atol=1e-12)
