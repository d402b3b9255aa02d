"""The attention implementation choice: FlashAttention-4 (optional package) or SDPA, and where each runs."""
import importlib.util
import sys
import types

import pytest
import torch
from sdvg_rt.models import attention as attn_mod
from sdvg_rt.profiles import ATTENTION_BACKENDS

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton merge kernel: compiled, or interpreted on CPU


def _fake_fa4(monkeypatch, calls: list, tiled: list | None = None):
    """A stand-in ``flash_attn.cute.interface`` whose ``flash_attn_func`` records its calls; with ``tiled``,
    also the internal forward with tile arguments (as the pinned release has), recording (heads, tiles)."""

    def flash_attn_func(q, k, v):
        calls.append((q.shape, k.shape))
        return torch.zeros_like(q), None

    def _flash_attn_fwd(q, k, v, softmax_scale=None, tile_mn=None, mma_pv_is_rs=None, intra_wg_overlap=None):
        tiled.append((q.shape[2], dict(tile_mn=tile_mn, mma_pv_is_rs=mma_pv_is_rs, intra_wg_overlap=intra_wg_overlap)))
        return torch.ones_like(q), None, None, None, None

    mods = {"flash_attn": types.ModuleType("flash_attn"), "flash_attn.cute": types.ModuleType("flash_attn.cute"),
            "flash_attn.cute.interface": types.ModuleType("flash_attn.cute.interface")}
    mods["flash_attn.cute.interface"].flash_attn_func = flash_attn_func
    if tiled is not None:
        mods["flash_attn.cute.interface"]._flash_attn_fwd = _flash_attn_fwd
    for name, m in mods.items():
        monkeypatch.setitem(sys.modules, name, m)


def test_profile_names_match_the_call_site():
    assert tuple(ATTENTION_BACKENDS) == tuple(attn_mod.NAMES)


def test_fa4_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'sdvg-rt\[fa4\]'"):
        attn_mod.Attention("fa4")
    a = attn_mod.Attention("auto", "cpu")  # auto never needs it
    assert a.implementation == "sdpa:auto"


def test_auto_on_cpu_does_not_load_fa4(monkeypatch):
    calls = []
    _fake_fa4(monkeypatch, calls)
    a = attn_mod.Attention("auto", "cpu")
    assert a.implementation == "sdpa:auto"
    a = attn_mod.Attention("auto")  # no device: the SDPA order
    assert a.implementation == "sdpa:auto"
    q = torch.randn(3, 2, 8)
    a(q, q, q)
    assert calls == []


def test_fa4_selected_leaves_cpu_fp32_and_masked_calls_on_sdpa(monkeypatch):
    calls = []
    _fake_fa4(monkeypatch, calls)
    a = attn_mod.Attention("fa4")
    assert a.name == "fa4"
    assert a.implementation == "fa4"
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(L, 2, 16, generator=g) for L in (5, 7, 7))
    scores = torch.einsum("qhd,khd->hqk", q, k) / 4.0
    ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    torch.testing.assert_close(a(q, k, v), ref, rtol=1e-5, atol=1e-5)
    mask = torch.ones(5, 7, dtype=torch.bool)
    torch.testing.assert_close(a(q, k, v, mask), ref, rtol=1e-5, atol=1e-5)
    assert calls == []  # CPU tensors never reach the GPU kernel


_HAS_FA4 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 \
    and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(not _HAS_FA4, reason="needs a Hopper GPU and flash-attn-4 (pip install 'sdvg-rt[fa4]')")
def test_fa4_on_cache_slices_matches_fp32():
    """FlashAttention-4 through the call site, on a [2, S, H, D] cache layer's slices (no copies), matches
    an fp32 evaluation as closely as cuDNN does, and ``auto`` picks it on Hopper."""
    a = attn_mod.Attention("auto", "cuda")
    assert a.implementation == "fa4"
    g = torch.Generator(device="cuda").manual_seed(0)
    H, D, lq, lk = 12, 128, 1560, 4680
    kv = torch.randn(2, lk + 1560, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(lq, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = kv[0, :lk], kv[1, :lk]
    out = a(q, k, v)
    assert out.shape == (lq, H, D) and out.dtype == torch.bfloat16
    f = [t.float().transpose(0, 1)[None] for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*f)[0].transpose(0, 1)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    err_cudnn = ((attn_mod.Attention("cudnn")(q, k, v).float() - ref).norm() / ref.norm()).item()
    assert err < 1.2 * err_cudnn + 1e-4, (err, err_cudnn)


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: takes the GPU branch of the dispatch without a GPU."""

    @property
    def is_cuda(self):
        return True


def test_fa4_dispatch_conditions_on_tensors_that_take_the_gpu_branch(monkeypatch):
    """Unmasked bf16/fp16 CUDA calls go to FlashAttention-4; masked calls (whose mask FA4 would ignore) and
    fp32 calls stay on SDPA and honour the mask."""
    calls = []
    _fake_fa4(monkeypatch, calls)
    attn = attn_mod.Attention("fa4")
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = (torch.randn(L, 2, 16, generator=g).to(dtype).as_subclass(_OnCuda) for L in (5, 7, 7))
        assert q.is_cuda
        attn(q, k, v)
        assert len(calls) == 1, dtype
        calls.clear()
        mask = torch.rand(5, 7, generator=g) > 0.5
        mask[:, 0] = True
        out = attn(q, k, v, mask)
        assert calls == [], f"a masked {dtype} call reached FlashAttention-4 (it takes no mask)"
        f = [t.float().as_subclass(torch.Tensor) for t in (q, k, v)]
        s = torch.einsum("qhd,khd->hqk", f[0], f[1]) / 4.0
        ref = torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, -torch.inf).softmax(-1), f[2])
        torch.testing.assert_close(out.float().as_subclass(torch.Tensor), ref, rtol=2e-2, atol=2e-2)
    q32 = torch.randn(5, 2, 16, generator=g).as_subclass(_OnCuda)
    attn(q32, q32, q32)
    assert calls == [], "an fp32 call reached FlashAttention-4 (bf16/fp16 only)"


def test_fa4_tiles_by_head_count(monkeypatch):
    """Head counts in ``FA4_TILES`` (the 14B's 40) run FlashAttention-4's forward with those tiles; others, a
    release without that forward, or ``fa4_tiles={}`` run ``flash_attn_func`` with its own choice."""
    calls, tiled = [], []
    _fake_fa4(monkeypatch, calls, tiled)
    assert attn_mod.Attention("fa4")._fa4_tiles == {} or attn_mod._sm90(None)  # measured on Hopper only
    monkeypatch.setattr(attn_mod, "_sm90", lambda device: True)
    assert 40 in attn_mod.FA4_TILES and 12 not in attn_mod.FA4_TILES
    g = torch.Generator().manual_seed(1)

    def qkv(heads):
        return (torch.randn(L, heads, 128, generator=g).bfloat16().as_subclass(_OnCuda) for L in (4, 6, 6))
    attn = attn_mod.Attention("fa4")
    out = attn(*qkv(40))
    assert tiled == [(40, attn_mod.FA4_TILES[40])] and calls == [] and (out == 1).all() and out.shape == (4, 40, 128)
    tiled.clear()
    attn(*qkv(12))
    assert tiled == [] and len(calls) == 1
    calls.clear()
    q, k, v = (t[..., :64] for t in qkv(40))  # measured at head dim 128 only
    attn(q, k, v)
    assert tiled == [] and len(calls) == 1
    calls.clear()
    attn_mod.Attention("fa4", fa4_tiles={})(*qkv(40))
    assert tiled == [] and len(calls) == 1
    calls.clear()
    _fake_fa4(monkeypatch, calls)  # a release without the tiled forward
    attn_mod.Attention("fa4")(*qkv(40))
    assert tiled == [] and len(calls) == 1


@pytest.mark.skipif(not _HAS_FA4, reason="needs a Hopper GPU and flash-attn-4 (pip install 'sdvg-rt[fa4]')")
def test_fa4_tiles_of_the_14b_give_flash_attn_funcs_output_bit_for_bit():
    """The 14B's tiles (192x128) reduce the keys in the same 128-wide tiles as FlashAttention-4's own choice:
    the same output, bit for bit, on the self-attention over cache slices and on the text keys."""
    a = attn_mod.Attention("fa4")
    assert 40 in a._fa4_tiles, "the pinned flash-attn-4 release lacks the tiled forward"
    func = attn_mod.load_fa4()
    g = torch.Generator(device="cuda").manual_seed(0)
    H, D, lq = 40, 128, 4680
    kv = torch.randn(2, 2 * lq, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(lq, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    for lk in (2 * lq, 512):
        k, v = kv[0, :lk], kv[1, :lk]
        assert torch.equal(a(q, k, v), func(q[None], k[None], v[None])[0][0]), lk


def _range_attention(q, k, v):
    """Reference attention of q [B, Lq, H, D] over k/v [B, Lk, H, D] in fp32: (out in q's dtype, lse [B, H, Lq])."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    out = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float())
    return out.to(q.dtype).contiguous(), torch.logsumexp(s, -1).contiguous()


@pytest.mark.parametrize("splits", [2, 3])
def test_combine_splits_merges_key_ranges_into_attention_over_all_keys(splits):
    """Each range's normalised output and log-sum-exp, merged, give the attention over all keys (fp32), with
    a row count that leaves the last program part-full."""
    from sdvg_rt.models.dit_kernels import combine_splits

    g = torch.Generator().manual_seed(splits)
    lq, h, d, n = 37, 3, 32, 24
    q = torch.randn(lq, h, d, generator=g).to(DEV)
    k, v = (torch.randn(splits * n, h, d, generator=g).to(DEV) * 2 for _ in range(2))
    o, lse = _range_attention(q[None].expand(splits, lq, h, d), k.view(splits, n, h, d), v.view(splits, n, h, d))
    out = combine_splits(o, lse, rows_per_program=16)
    ref = _range_attention(q[None], k[None], v[None])[0][0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="contiguous fp32"):
        combine_splits(o, lse.double())


def test_split_keys_runs_one_call_over_views_of_the_cache():
    """``split_keys`` passes the queries as a stride-0 batch and each key range as a view of the cache layer
    (no copy), one forward call with the tiles given, and matches attention over all keys."""
    g = torch.Generator().manual_seed(4)
    lq, h, d, lk = 20, 2, 16, 48
    kv = torch.randn(2, lk + 16, h, d, generator=g).to(DEV)
    q = torch.randn(lq, h, d, generator=g).to(DEV)
    k, v = kv[0, :lk], kv[1, :lk]
    seen = []

    def fwd(q2, k2, v2, return_lse=False, **kw):
        seen.append((q2.stride(0), k2.data_ptr() == k.data_ptr(), v2.data_ptr() == v.data_ptr(),
                     k2[1].data_ptr() == k[lk // 2:].data_ptr(), return_lse, kw))
        return _range_attention(q2, k2, v2)

    out = attn_mod.split_keys(fwd, q, k, v, 2, tile_mn=(192, 128))
    assert seen == [(0, True, True, True, True, {"tile_mn": (192, 128)})]
    torch.testing.assert_close(out, _range_attention(q[None], k[None], v[None])[0][0], rtol=1e-5, atol=1e-5)


def test_fa4_key_splits_by_head_count_and_key_count(monkeypatch):
    """A head count in ``fa4_key_splits`` splits the keys when they divide into ranges of at least
    ``MIN_SPLIT_KEYS``; other head counts, short or indivisible key sets (the text keys) take one call."""
    calls, tiled = [], []
    _fake_fa4(monkeypatch, calls, tiled)
    monkeypatch.setattr(attn_mod, "_sm90", lambda device: True)
    split = []
    monkeypatch.setattr(attn_mod, "split_keys", lambda fwd, q, k, v, s, **kw: split.append((q.shape[1], k.shape[0], s, kw))
                        or torch.zeros_like(q))
    g = torch.Generator().manual_seed(2)
    lmin = attn_mod.MIN_SPLIT_KEYS

    def qkv(heads, lk):
        return (torch.randn(L, heads, 128, generator=g).bfloat16().as_subclass(_OnCuda) for L in (4, lk, lk))
    attn = attn_mod.Attention("fa4", fa4_key_splits={12: 2, 40: 2})
    attn(*qkv(12, 2 * lmin))
    attn(*qkv(40, 2 * lmin))
    assert split == [(12, 2 * lmin, 2, {}), (40, 2 * lmin, 2, attn_mod.FA4_TILES[40])]
    split.clear()
    attn(*qkv(12, 2 * lmin - 2))  # ranges under the minimum
    attn(*qkv(12, 2 * lmin + 1))  # not divisible
    attn(*qkv(20, 2 * lmin))  # no entry
    assert split == [] and len(calls) == 3
    assert attn_mod.Attention("fa4", fa4_key_splits={})._fa4_splits == {}


@pytest.mark.skipif(not _HAS_FA4, reason="needs a Hopper GPU and flash-attn-4 (pip install 'sdvg-rt[fa4]')")
def test_fa4_split_keys_match_fp32_as_closely_as_one_call():
    """On the GPU, FlashAttention-4 over two key ranges merged is within 1.3x of one call's error to fp32, at
    the 1.3B's heads over cache slices."""
    g = torch.Generator(device="cuda").manual_seed(0)
    H, D, lq, lk = 12, 128, 4680, 9360
    kv = torch.randn(2, lk + lq, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(lq, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = kv[0, :lk], kv[1, :lk]
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(0, 1)[None] for t in (q, k, v)))
    ref = ref[0].transpose(0, 1)
    one = attn_mod.Attention("fa4", fa4_key_splits={})(q, k, v)
    two = attn_mod.Attention("fa4", fa4_key_splits={12: 2})(q, k, v)
    e1, e2 = (((o.float() - ref).norm() / ref.norm()).item() for o in (one, two))
    assert e2 < 1.3 * e1, (e1, e2)
