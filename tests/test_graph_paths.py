"""Every CUDA-graph-enabled path of the components, on CPU, through a stand-in graph (``seams.StandInGraph``:
capture records the call, replay re-runs it into the buffers the closure bound). Graph runs must give the
eager video bit for bit, replays must really happen, and outputs must come back in the static buffers."""
import math

import numpy as np
import pytest
import torch

import seams
from sdvg_rt.backends.graphs import CudaGraphs
from sdvg_rt.decide import ACCEPTED, REJECTED, Decision


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    r = seams.tiny_runtime(tmp_path_factory, prompts=("a red fox running through fresh snow", "a lighthouse"))
    yield r
    seams.use_eager(r)


def _pattern(pat):
    from sdvg_rt.decide import decide

    def fn(mode, block, score, tau, finite=True):
        d = decide(mode, block, score, tau, finite)
        return Decision(pat[block], "forced by the test") if mode == "sdvg" and block else d
    return fn


def _video(rt, prompt, mode, pattern=None):
    if pattern:
        seams.set_decide(rt.loop, _pattern(pattern))
    try:
        res = rt.generate(rt.prompts[prompt], seed=5, tau=0.0, mode=mode)
    finally:
        seams.clear_decide(rt.loop)
    return res.frames, res.latents


RUNS = [(0, "sdvg", [None, ACCEPTED, REJECTED]), (1, "sdvg", [None, REJECTED, ACCEPTED]), (0, "draft", None)]


def test_graph_runs_equal_eager_runs_and_replay(rt):
    seams.use_eager(rt)
    eager = [_video(rt, *r) for r in RUNS]
    runners = seams.use_standin_graphs(rt)
    before = seams.StandInGraph.replays
    for _ in range(2):  # the first pass captures most keys, the second replays all of them
        for r, (fe, le) in zip(RUNS, eager):
            fg, lg = _video(rt, *r)
            assert np.array_equal(fg, fe) and torch.equal(lg, le), r
    seams.use_eager(rt)
    keys = set().union(*(set(g.graphs) for g in runners))
    assert {("denoise", 1), ("commit", 1), ("denoise", 2)} <= keys
    assert any(isinstance(k, tuple) and k[0] == "decode" for k in keys)
    assert seams.StandInGraph.replays - before > 15


def test_graph_outputs_land_in_static_buffers(rt):
    comps = seams.components(rt)
    seams.use_standin_graphs(rt)
    try:
        rt.generate(rt.prompts[0], seed=1, tau=math.inf)  # captures
        den, dec, sc = comps["drafter"], comps["decoder"], comps["scorer"]
        x = den.denoise_block(1)
        assert x.data_ptr() == den.out.data_ptr()
        frames = dec.decode_scratch(x, 1)
        assert frames.data_ptr() == dec.frames[False].data_ptr()
        s = sc.score(frames)
        assert s.data_ptr() == sc.rewards.data_ptr()
        # a replayed decode/score writes fresh values there: poison the outputs, replay, compare with eager
        ref_frames = frames.clone()
        frames.fill_(7.0)
        s.fill_(7.0)
        again = dec.decode_scratch(x, 1)
        assert torch.equal(again, ref_frames)
        assert not torch.equal(sc.score(again), torch.full_like(s, 7.0))
    finally:
        seams.use_eager(rt)


def test_disabled_runner_and_cpu_without_factory_call_fn_eagerly():
    calls = []
    g = CudaGraphs(True, "cpu")  # no CUDA, no stand-in: eager
    assert not g.enabled
    g.run("k", lambda: calls.append(1))
    g.run("k", lambda: calls.append(2))
    assert calls == [1, 2] and not g.graphs
    s = CudaGraphs(True, "cpu", graph_factory=seams.StandInGraph)
    s.run("k", lambda: calls.append(3))  # eager first call, then captured (not executed by the capture)
    s.run("k", lambda: calls.append(4))  # replays the captured call
    assert calls == [1, 2, 3, 3]
