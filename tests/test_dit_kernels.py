"""The DiT's Triton kernels (``models.dit_kernels``) against the eager groups of ``wan_dit`` that define
them: each kernel alone (fp32 to rounding, bf16 to a few bf16 ulps), the cache slots they write and leave
alone, bad inputs, and a whole cached block step of the tiny model with every kernel in place.

On CPU machines the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py);
on a GPU they run compiled.
"""
import pytest
import torch
from sdvg_rt.checkpoints.wan_dit import synthetic_dit_state_dict
from sdvg_rt.kv_cache import KVCache
from sdvg_rt.models import dit_kernels as K
from sdvg_rt.models import wan_dit as W

pytestmark = pytest.mark.skipif(not K.AVAILABLE, reason="needs triton (test extra)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rope(dim, heads, frames=2, h=3, w=4, offset=5):
    rope = W.WanRoPE(W.WanDiTConfig("k", dim=dim, ffn_dim=8, num_heads=heads, num_layers=1)).to(DEV)
    return rope.factors(frames, h, w, frame_offset=offset)


def _close(got, ref, dtype):
    """fp32: rounding only; 16-bit: within 4 ulps at the reference's scale (the kernels round where the
    eager code rounds, but Triton's CPU interpreter rounds fp32 -> 16-bit by truncation, not to nearest,
    so an element can land 2-3 ulps away after two roundings)."""
    tol = {torch.float32: 2e-6, torch.bfloat16: 4 * 2.0**-7, torch.float16: 4 * 2.0**-10}[dtype]
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= tol * max(1.0, ref.float().abs().max().item()), err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # (fp32 takes the eager composition itself)
# a row's 32-bit words in two power-of-two chunks: 48 = 32 + 16, 24 = 16 + 8 (pairs per head not a power of
# two), 44 = 32 + 12 of 16 (a masked second chunk), 64 = 64 + an empty one
@pytest.mark.parametrize("heads,head_dim", [(3, 32), (2, 24), (2, 44), (4, 32)])
def test_qk_to_cache_matches_eager(dtype, heads, head_dim):
    dim, n, ws = heads * head_dim, 24, 7
    q, k = torch.randn(n, 2 * dim, device=DEV).to(dtype).chunk(2, -1)  # strided rows, as after fuse_qk
    wq, wk = torch.randn(dim, device=DEV).to(dtype), torch.randn(dim, device=DEV).to(dtype)
    cos, sin = _rope(dim, heads)
    kv = torch.full((2, 40, heads, head_dim), 7.0, device=DEV, dtype=dtype)
    kv_ref = kv.clone()
    got = K.qk_to_cache(q, k, wq, wk, 1e-6, cos, sin, heads, kv, ws)
    ref = W._qk_to_cache(q, k, wq, wk, 1e-6, cos, sin, heads, kv_ref, ws)
    if DEV == "cpu" and dtype == torch.float16:
        # the interpreter rounds fp32 -> fp16 to nearest like torch, so the rounding points must match: all but
        # a rare element (the sum of squares is reduced in another order) equal, none more than 1 ulp away
        for g, r in ((got, ref), (kv[0, ws:ws + n], kv_ref[0, ws:ws + n])):
            assert (g != r).float().mean().item() <= 0.01
            assert ((g.float() - r.float()).abs() <= r.float().abs() * 2.0**-10 + 2.0**-24).all()
    _close(got, ref, dtype)
    _close(kv[0, ws:ws + n], kv_ref[0, ws:ws + n], dtype)
    # the value slots and the key slots outside [ws, ws + n) are untouched
    assert (kv[1] == 7).all() and (kv[0, :ws] == 7).all() and (kv[0, ws + n:] == 7).all()


def _mods(frames, dim, dtype):
    return (torch.randn(frames, 6, dim, device=DEV).to(dtype)).unsqueeze(2).unbind(1)  # strided rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# a row in two power-of-two chunks: 96 = 64 + 32, 88 = 64 + 24 of 32 (a masked second chunk), 64 = 64 + none
@pytest.mark.parametrize("dim", [96, 88, 64])
def test_residual_ln_matches_each_eager_group(dtype, dim):
    fr, tpf = 2, 12
    x, y = (torch.randn(fr, tpf, dim, device=DEV).to(dtype) for _ in range(2))
    shift, scale, gate, _, _, gate2 = _mods(fr, dim, dtype)
    w, b = torch.randn(dim, device=DEV).to(dtype), torch.randn(dim, device=DEV).to(dtype)
    eps = 1e-6
    cases = [
        (K.residual_ln(x, None, None, None, None, shift, scale, eps), (x, W._modulated_ln(x, shift, scale, eps))),
        (K.residual_ln(x, y, gate, w, b, None, None, eps), W._gated_add_ln(x, y, gate, w, b, eps)),
        (K.residual_ln(x, y, None, None, None, shift, scale, eps), W._add_modulated_ln(x, y, shift, scale, eps)),
        (K.residual_ln(x, y, gate2, None, None, shift, scale, eps),
         W._gated_add_modulated_ln(x, y, gate2, shift, scale, eps)),
    ]
    assert cases[0][0][0] is x  # no residual: x is handed back, not copied
    for i, ((gx, gh), (rx, rh)) in enumerate(cases):
        if i:
            _close(gx, rx, dtype)
        _close(gh, rh, dtype)


def test_bad_inputs_name_the_tensor():
    dim, heads, n = 64, 2, 12
    q, k = torch.randn(n, 2 * dim, device=DEV, dtype=torch.bfloat16).chunk(2, -1)
    w = torch.ones(dim, device=DEV, dtype=torch.bfloat16)
    cos, sin = _rope(dim, heads, 1, 3, 4)
    kv = torch.zeros(2, 20, heads, dim // heads, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="kv_layer"):
        K.qk_to_cache(q, k, w, w, 1e-6, cos, sin, heads, kv, 10)  # 10 + 12 > 20 slots
    with pytest.raises(ValueError, match="cos"):
        K.qk_to_cache(q, k, w, w, 1e-6, cos[:6], sin, heads, kv, 0)
    with pytest.raises(ValueError, match="k: expected shape"):
        K.qk_to_cache(q, k[:6], w, w, 1e-6, cos, sin, heads, kv, 0)
    with pytest.raises(ValueError, match="one dtype"):
        K.qk_to_cache(q, k, w.float(), w, 1e-6, cos, sin, heads, kv, 0)
    odd = torch.randn(n, 2 * dim + 2, device=DEV, dtype=torch.bfloat16)[:, 1:]  # rows start at odd elements
    with pytest.raises(ValueError, match="heads of an even size"):
        K.qk_to_cache(q, k, w, w, 1e-6, cos, sin, 3, kv, 0)  # 64 is not 3 heads
    with pytest.raises(ValueError, match="wq: expected shape"):
        K.qk_to_cache(q, k, w[:32], w, 1e-6, cos, sin, heads, kv, 0)
    with pytest.raises(ValueError, match="H=4"):
        K.qk_to_cache(q, k, w, w, 1e-6, *_rope(dim, 4, 1, 3, 4), 4, kv, 0)  # the cache has 2 heads of 32
    with pytest.raises(ValueError, match="4-byte aligned"):
        K.qk_to_cache(odd[:, :dim], odd[:, dim:2 * dim], w, w, 1e-6, cos, sin, heads, kv, 0)
    x = torch.randn(2, 6, dim, device=DEV)
    s = torch.randn(2, 1, dim, device=DEV)
    with pytest.raises(ValueError, match="modulation"):
        K.residual_ln(x, None, None, None, None, s[:1], s[:1], 1e-6)
    with pytest.raises(ValueError, match="y must be contiguous"):
        K.residual_ln(x, x.transpose(0, 1), None, None, None, s, s, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_block_steps_with_kernels_match_eager(dtype):
    """Three cached block steps of the tiny model with every Triton group in place equal the eager model:
    outputs and the whole KV cache (fp32: to rounding; bf16, where the q/k kernel runs: to bf16 noise)."""
    model = W.WanDiT(W.PRESETS["tiny"]).eval().to(DEV)
    model.load_state_dict(synthetic_dit_state_dict("tiny", seed=1), strict=True)
    model.to(dtype).fuse_qk()
    c = model.cfg
    ctx_kv = model.prepare_context(torch.randn(1, c.text_len, c.text_dim, device=DEV))
    caches = [KVCache(c.num_layers, c.num_heads, c.head_dim, 12, 3, 21, 0, dtype, DEV) for _ in range(2)]
    x = torch.randn(1, 16, 9, 6, 8, device=DEV)
    outs = []
    for use_kernels, cache in zip((False, True), caches):
        model.set_kernels(W.DiTKernels(triton=use_kernels))
        assert model.blocks[-1].self_attn.kernels.triton == use_kernels
        with torch.no_grad():
            outs.append([model(x[:, :, 3 * b:3 * b + 3], torch.full((3,), 500.0 + b, device=DEV), ctx_kv,
                               cache.kv, cache.slots(b)) for b in range(3)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, ref in zip(outs[1] + [caches[1].kv], outs[0] + [caches[0].kv]):
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < tol


def test_a_model_with_chosen_kernels_can_be_copied():
    """``copy.deepcopy`` of a model whose kernels were chosen (fp8 variants quantize copies): the copy
    shares the kernel choice and computes the same output."""
    import copy

    model = W.WanDiT(W.PRESETS["tiny"]).eval()
    model.load_state_dict(synthetic_dit_state_dict("tiny", seed=1), strict=True)
    kernels = W.DiTKernels(triton=False)
    model.set_kernels(kernels)
    twin = copy.deepcopy(model)
    assert twin.kernels is kernels and twin.blocks[0].self_attn.kernels is kernels
    assert twin.blocks[0].ffn[0].weight is not model.blocks[0].ffn[0].weight
    c = model.cfg
    ctx = torch.randn(1, c.text_len, c.text_dim)
    x, t = torch.randn(1, 16, 3, 4, 4), torch.full((3,), 500.0)
    with torch.no_grad():
        assert torch.equal(twin.forward_full(x, t, twin.prepare_context(ctx)),
                           model.forward_full(x, t, model.prepare_context(ctx)))
