"""The speculative loop's invariants (sdvg-runtime.md §3) on the tiny synthetic models, CPU.

Geometry kept minimal for speed: 32x32 pixels (4x4 latents), 3 blocks of 1 latent frame (1 + 4 + 4 video
frames). Decision patterns other than all-accept / all-reject are forced by wrapping ``decide`` (decide.py
has its own tests); everything else runs the real loop, models and caches. Exact equalities below are
bit-for-bit: the compared paths run the same ops on the same shapes on the same device.
"""
import math

import numpy as np
import pytest
import torch

import seams
from sdvg_rt.api import Runtime
from sdvg_rt.backends.torch_backend import TorchDiTStep, vae_decoder
from sdvg_rt.checkpoints.synthetic import make_synthetic_set
from sdvg_rt.components import Denoiser
from sdvg_rt.decide import ACCEPTED, REJECTED, Decision, decide
from sdvg_rt.errors import NumericalError
from sdvg_rt.models.imagereward import frames_to_uint8
from sdvg_rt.profiles import demo_profile

SMALL = dict(width=32, height=32, latent_frames=3, frames_per_block=1, window_frames=3)


def tiny_set(tmp_path_factory):
    """The synthetic tiny set, written once per session (make_synthetic_set skips finished parts)."""
    d = tmp_path_factory.getbasetemp() / "sdvg-rt-tiny-set"
    make_synthetic_set(d, "tiny", 0, log=None)
    return d


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    r = Runtime.from_profile(demo_profile(tiny_set(tmp_path_factory), **SMALL), "cpu")
    r.prompts = r.encode_prompts(["a red fox running through fresh snow", "a lighthouse at night"])
    r.release_text_encoder()
    r.allocate()
    return r


def run(rt, prompt=0, *, mode="sdvg", tau=0.0, lazy=True, pattern=None, seed=0):
    """One generation with noise, syncs and final caches recorded; ``pattern`` forces sdvg decisions."""
    lp = rt.loop
    noise, syncs = [], []
    saved = {}
    for name in ("drafter", "target"):
        den = getattr(lp, name)
        orig = den.denoise_block
        saved[name] = orig

        def wrapped(block, _orig=orig, _den=den, _name=name):
            out = _orig(block)
            noise.append((_name, block, _den.noise.out.clone()))
            return out
        den.denoise_block = wrapped
    real_decide = decide

    def fake_decide(mode_, block, score, tau_, finite=True):
        d = real_decide(mode_, block, score, tau_, finite)
        return Decision(pattern[block], "forced by the test") if pattern and mode_ == "sdvg" and block else d
    lp.lazy_commit = lazy
    try:
        with lp.sync_hook(lambda sync: (syncs.append(1), sync())):
            res = rt.generate(rt.prompts[prompt], seed=seed, tau=tau, mode=mode, decide=fake_decide)  # as the benchmark
    finally:
        lp.lazy_commit = True
        for name, orig in saved.items():
            del getattr(lp, name).denoise_block
    return dict(res=res, noise=noise, syncs=len(syncs), kv={n: getattr(lp, n).cache.kv.clone()
                                                             for n in ("drafter", "target")})


@pytest.fixture(scope="module")
def split(rt):
    """The same models with the target through the two-device path (both sides on the CPU)."""
    return seams.split_twin(rt)


@pytest.fixture(scope="module")
def runs(rt, split):
    A, R = ACCEPTED, REJECTED
    out = {
        "target": run(rt, mode="target"),
        "inf": run(rt, tau=math.inf),
        "-inf": run(rt, tau=-math.inf),
        "far_lazy": run(rt, pattern=[None, A, R]),
        "far_eager": run(rt, pattern=[None, A, R], lazy=False),
        "faa_eager": run(rt, pattern=[None, A, A], lazy=False),
        "far_split": run(split, pattern=[None, A, R]),
        "faa_split": run(split, pattern=[None, A, A]),
    }
    out["faa_lazy"] = out["-inf"]  # all accepted, lazy: the same run
    return out


def decisions(r):
    return [b["decision"] for b in r["res"].stats["blocks"]]


def same_video(a, b):
    return np.array_equal(a["res"].frames, b["res"].frames) and torch.equal(a["res"].latents, b["res"].latents)


def test_sdvg_with_tau_inf_is_bit_identical_to_target(runs):
    assert decisions(runs["target"]) == ["forced"] * 3
    assert decisions(runs["inf"]) == ["forced", "rejected", "rejected"]
    assert same_video(runs["inf"], runs["target"])
    assert runs["target"]["res"].frames.shape == (9, 32, 32, 3)


def test_tau_minus_inf_accepts_every_block_after_0_and_block_0_is_never_scored(runs):
    blocks = runs["-inf"]["res"].stats["blocks"]
    assert [b["decision"] for b in blocks] == ["forced", "accepted", "accepted"]
    assert blocks[0]["scores"] is None and blocks[0]["min_score"] is None
    for b in blocks[1:]:  # worst-frame aggregation over the 4 decoded frames
        assert len(b["scores"]) == 4 and b["min_score"] == min(b["scores"])
    assert runs["-inf"]["res"].stats["acceptance_rate"] == 1.0
    assert not same_video(runs["-inf"], runs["target"])  # the drafts really are different


def test_decisions_never_shift_the_noise(runs):
    """The noise of (block, step) is the same in every run and for both models, whatever was decided."""
    ref = {}
    for r in runs.values():
        for model, block, eps in r["noise"]:
            if block in ref:
                assert torch.equal(eps, ref[block]), (model, block)
            ref[block] = eps
    assert set(ref) == {0, 1, 2}
    assert not torch.equal(ref[1], ref[2])


def test_video_after_a_reject_equals_a_fresh_decode_of_the_committed_latents(rt, runs):
    for key in ("far_lazy", "inf", "-inf"):
        res = runs[key]["res"]
        stream = vae_decoder(rt.models["vae"], 4, 4, torch.float32, "cpu")
        frames = [frames_to_uint8(stream.decode_commit(res.latents[:, :, b:b + 1], b)[0].permute(1, 2, 3, 0))
                  for b in range(3)]
        assert np.array_equal(torch.cat(frames).numpy(), res.frames), key


def _fresh_cache(rt, kind, prompt, latents, blocks):
    den = Denoiser(TorchDiTStep(rt.models[kind]), kind, latent_shape=(1, 4, 4), window_frames=3,
                   sink_frames=0, schedule=rt.loop.drafter.schedule, device="cpu", dtype=torch.float32)
    den.prepare(prompt.context)
    for b in blocks:
        den.commit_block(b, latents[:, :, b:b + 1].contiguous())
    return den.cache.kv


def test_both_caches_hold_the_committed_history(rt, runs):
    """After the run, each model's cache equals a fresh model's that committed the same latents."""
    n = rt.loop.drafter.cache.tokens_per_block
    for key in ("far_lazy", "far_eager", "-inf", "inf"):
        r = runs[key]
        for kind in ("drafter", "target"):
            ref = _fresh_cache(rt, kind, rt.prompts[0], r["res"].latents, blocks=[0, 1])  # block 2 is last
            if key == "-inf" and kind == "target":  # lazy, all accepted: block 1 never reached the target
                assert torch.equal(r["kv"][kind][:, :, :n], ref[:, :, :n])
                assert not torch.equal(r["kv"][kind][:, :, n:2 * n], ref[:, :, n:2 * n])
                continue
            assert torch.equal(r["kv"][kind][:, :, :2 * n], ref[:, :, :2 * n]), (key, kind)


def test_lazy_commit_gives_the_eager_output(runs):
    for pat in ("far", "faa"):
        lazy, eager = runs[f"{pat}_lazy"], runs[f"{pat}_eager"]
        assert same_video(lazy, eager), pat
        assert decisions(lazy) == decisions(eager) == ["forced", "accepted", pat[2] == "r" and "rejected" or "accepted"]
    commits = lambda r: [b["target_commits"] for b in r["res"].stats["blocks"]]  # noqa: E731
    assert commits(runs["far_eager"]) == [[0], [1], []]
    assert commits(runs["far_lazy"]) == [[0], [], [1]]  # deferred until the target is needed at block 2
    assert commits(runs["faa_lazy"]) == [[0], [], []]
    assert runs["faa_lazy"]["res"].stats["totals"]["target_commits_skipped"] == [1]  # never needed


def test_target_on_its_own_device_gives_the_one_device_video(runs):
    """The two-device path (the target's own copy of the latents, blocks crossing by copies, its commits
    enqueued when decided; here both sides on the CPU) gives the one-device video bit for bit, and both
    caches hold what eager commits write."""
    for pat in ("far", "faa"):
        two, one, eager = runs[f"{pat}_split"], runs[f"{pat}_lazy"], runs[f"{pat}_eager"]
        assert decisions(two) == decisions(one) == decisions(eager), pat
        assert same_video(two, one), pat
        for kind in ("drafter", "target"):
            assert torch.equal(two["kv"][kind], eager["kv"][kind]), (pat, kind)
    stats = runs["far_split"]["res"].stats
    assert [b["target_commits"] for b in stats["blocks"]] == [[0], [1], []]  # block 1's when it was accepted
    assert stats["lazy_commit"] is False and stats["devices"] == {p: "cpu" for p in ("drafter", "vae", "scorer",
                                                                                       "target")}
    assert runs["faa_split"]["res"].stats["totals"]["target_commits_skipped"] == []
    # the target's times reach their blocks' records (collected once the target's queue is known done)
    assert stats["blocks"][1]["times_ms"]["target_commit"] > 0 and stats["blocks"][2]["times_ms"]["target_denoise"] > 0


def test_two_device_target_commits_are_issued_when_decided(rt, split):
    """Target apart: an accepted block's target commit is issued right after its decision, before the next
    block's draft (on its own GPU it runs beside that draft); on one device it waits, lazily, until the
    target is next needed."""
    A, R = ACCEPTED, REJECTED
    pat = [None, A, R]

    def calls(runtime):
        log, lp, spied = [], runtime.loop, []
        for name, meth in (("drafter", "denoise_block"), ("target", "denoise_block"), ("target", "commit_blocks")):
            comp = getattr(lp, name)

            def spy(*a, _real=getattr(comp, meth), _tag=f"{name}.{meth}", **k):
                log.append((_tag, a[0]))
                return _real(*a, **k)
            setattr(comp, meth, spy)
            spied.append((comp, meth))

        def logged(mode_, block, score, tau_, finite=True):
            log.append(("decide", block))
            return Decision(pat[block], "forced by the test") if block else decide(mode_, block, score, tau_, finite)
        try:
            runtime.generate(runtime.prompts[0], tau=0.0, decide=logged)
        finally:
            for comp, meth in spied:
                delattr(comp, meth)
        return log
    head = [("decide", 0), ("target.denoise_block", 0), ("drafter.denoise_block", 1), ("decide", 1)]
    assert calls(split) == head + [("target.commit_blocks", [1]), ("drafter.denoise_block", 2), ("decide", 2),
                                   ("target.denoise_block", 2)]
    assert calls(rt) == head + [("drafter.denoise_block", 2), ("decide", 2), ("target.commit_blocks", [1]),
                                ("target.denoise_block", 2)]


def test_one_host_sync_per_block(runs):
    # prepare (1) + one per block (3) + the final one that emits the last block (1)
    assert {r["syncs"] for r in runs.values()} == {5}


def test_state_memory_is_unchanged_across_prompts(rt):
    def snapshot():
        return {k: (v.data_ptr(), tuple(v.shape), v.dtype) for k, v in rt.state_tensors().items()}
    before = snapshot()
    vae_ptrs = sorted(p for k, (p, _, _) in before.items() if k.startswith("vae."))
    rt.generate(rt.prompts[1], tau=0.0)
    after = snapshot()
    assert len(before) > 20 and set(before) == set(after)
    # the VAE's committed/scratch states swap roles (keep_scratch is a swap): compare as a set
    assert sorted(p for k, (p, _, _) in after.items() if k.startswith("vae.")) == vae_ptrs
    assert {k: v for k, v in before.items() if not k.startswith("vae.")} == \
        {k: v for k, v in after.items() if not k.startswith("vae.")}


def test_nonfinite_scores_reject_and_are_reported(rt):
    """One bad frame is enough: NaN in block 1, +inf in block 2 (a +inf minimum must not pass tau)."""
    sc = rt.loop.scorer
    calls = []

    def fake(frames):
        calls.append(1)
        s = torch.full((frames.shape[2],), 0.5)
        s[1] = math.nan if len(calls) == 1 else math.inf
        return s
    sc.score = fake
    try:
        res = rt.generate(rt.prompts[0], tau=-math.inf)
    finally:
        del sc.score
    blocks = res.stats["blocks"]
    assert [b["decision"] for b in blocks] == ["forced", "rejected", "rejected"]
    assert math.isnan(blocks[1]["min_score"]) and "NaN" in blocks[1]["reason"]
    assert blocks[2]["min_score"] == math.inf and "non-finite" in blocks[2]["reason"]
    assert blocks[1]["scores"][0] == 0.5 and math.isnan(blocks[1]["scores"][1])  # every frame reported


def test_nan_latents_raise_numerical_error_naming_the_block(rt):
    den = rt.loop.target
    real = den.denoise_block

    def broken(block):
        x = real(block)
        return x.fill_(float("nan")) if block == 1 else x
    den.denoise_block = broken
    try:
        with pytest.raises(NumericalError, match="block 1"):
            rt.generate(rt.prompts[0], tau=math.inf)
    finally:
        del den.denoise_block
    assert rt.generate(rt.prompts[0], mode="target").frames.shape[0] == 9  # the runtime is still usable


def test_draft_mode_never_runs_the_target(rt):
    r = run(rt, mode="draft")
    assert decisions(r) == ["accepted"] * 3
    assert {m for m, _, _ in r["noise"]} == {"drafter"}
    assert all(b["scores"] is None for b in r["res"].stats["blocks"])


def test_fused_multi_block_commit_matches_per_block_commits(rt, runs):
    latents = runs["target"]["res"].latents
    xs = torch.stack([latents[:, :, b:b + 1].contiguous() for b in range(3)])
    kvs = []
    for fused in (False, True):
        den = Denoiser(TorchDiTStep(rt.models["target"]), "target", latent_shape=(1, 4, 4), window_frames=3,
                       sink_frames=0, schedule=rt.loop.target.schedule, device="cpu", dtype=torch.float32)
        den.prepare(rt.prompts[0].context)
        den.commit_blocks([0, 1, 2], xs, fused=fused)
        kvs.append(den.cache.kv)
    # one masked forward over 3 blocks vs three forwards: same maths, other matmul shapes (summation
    # order) and attention kernel; fp32 agreement to 1e-5 relative to the values' scale
    scale = kvs[0].abs().max()
    assert (kvs[0] - kvs[1]).abs().max() <= 1e-5 * scale


def test_lazy_equals_eager_through_the_ring_with_several_pending_blocks(tmp_path_factory):
    """7 blocks through a 3-frame window with a 1-frame sink (the ring wraps), several accepted blocks
    pending when a reject needs the target: lazy and eager commits give the same video and caches."""
    r = Runtime.from_profile(demo_profile(tiny_set(tmp_path_factory), width=32, height=32, latent_frames=7,
                                          frames_per_block=1, window_frames=3, sink_frames=1), "cpu")
    r.prompts = r.encode_prompts(["a red fox running through fresh snow"])
    r.release_text_encoder()
    r.allocate()
    A, R = ACCEPTED, REJECTED
    pat = [None, A, A, A, R, A, R]
    lazy, eager = run(r, pattern=pat), run(r, pattern=pat, lazy=False)
    two = run(seams.split_twin(r), pattern=pat)  # the target through the two-device path
    assert decisions(lazy) == decisions(eager) == decisions(two) == ["forced"] + [p for p in pat[1:]]
    assert same_video(lazy, eager) and same_video(two, lazy)
    for kind in ("drafter", "target"):
        assert torch.equal(lazy["kv"][kind], eager["kv"][kind]), kind
        assert torch.equal(two["kv"][kind], eager["kv"][kind]), kind
    commits = [b["target_commits"] for b in lazy["res"].stats["blocks"]]
    assert commits[4] == [1, 2, 3, 4]  # three pending accepts, then the rejected block's own commit
    assert [b["target_commits"] for b in two["res"].stats["blocks"]] == \
        [b["target_commits"] for b in eager["res"].stats["blocks"]]  # each when decided


def test_nonfinite_draft_latents_reject_through_the_loop(rt):
    """NaN in the drafter's output at block 1: rejected for non-finite latents, the target's block kept."""
    den = rt.loop.drafter
    real = den.denoise_block

    def broken(block):
        x = real(block)
        return x.index_fill_(3, torch.tensor([0]), float("nan")) if block == 1 else x
    den.denoise_block = broken
    sc = rt.loop.scorer
    sc.score = lambda frames: torch.zeros(frames.shape[2])  # a finite score that would pass tau = 0
    try:
        res = rt.generate(rt.prompts[0], tau=0.0)
    finally:
        del den.denoise_block, sc.score
    b1 = res.stats["blocks"][1]
    assert b1["decision"] == "rejected" and "not finite" in b1["reason"]
    assert torch.isfinite(res.latents).all()


def test_nan_frames_raise_numerical_error_naming_the_block(rt):
    dec = rt.loop.decoder
    real = dec.decode_commit

    def broken(z, block):
        f = real(z, block)
        return f.index_fill_(2, torch.tensor([0]), float("nan")) if block == 2 else f
    dec.decode_commit = broken
    try:
        with pytest.raises(NumericalError, match="block 2: the decoded frames"):
            rt.generate(rt.prompts[0], mode="target")
    finally:
        del dec.decode_commit
