"""TensorRT backend logic on CPU with a fake ``tensorrt`` module (TensorRT itself cannot run here).

The fake engine is honest about memory: at ``execute_async_v3`` it reads its inputs from the raw
addresses given to ``set_tensor_address`` and writes its outputs to theirs (``view_at``), computing with
the same graph modules that are exported to ONNX (``sdvg_export.onnx_export``; their ONNX parity is in
test_export_onnx.py). So a wrong binding (wrong cache slot, wrong state parity) gives wrong numbers, and
the components are compared with the torch backend end to end: same model, same noise, same results.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import sys
import types

import pytest
import torch

from sdvg_export.onnx_export import DiTContextGraph, DiTStepGraph, ScorerGraph, VAEFirstGraph, VAEStepGraph
from sdvg_rt import io_spec
from sdvg_rt.backends import tensorrt_backend as tb
from sdvg_rt.backends.graphs import CudaGraphs
from sdvg_rt.backends.torch_backend import TorchDiTStep, TorchScoreStep, vae_decoder
from sdvg_rt.components import Decoder, Denoiser, Scorer
from sdvg_rt.errors import BackendUnavailableError, EngineMismatchError
from sdvg_rt.models.imagereward import ImageReward, ImageRewardConfig
from sdvg_rt.models.wan_dit import WanDiT, WanDiTConfig
from sdvg_rt.models.wan_vae import WanVAEConfig, WanVAEDecoder
from sdvg_rt.schedule import Schedule

# fp32 everywhere: both paths run the same torch ops on the same values in the same key order, so
# differences are only kernel choices (SDPA on a contiguous concat vs a cache slice): 1e-5 is tight.
TOL = dict(atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------------
# The fake tensorrt module

def view_at(ptr: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over the CPU memory at ``ptr`` (no copy): what a TensorRT engine sees of a binding."""
    n = 1
    for d in shape:
        n *= d
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    buf = (ctypes.c_char * (n * itemsize)).from_address(ptr)
    return torch.frombuffer(buf, dtype=dtype, count=n).view(shape)


class FakeDataType:
    def __init__(self, name):
        self.name = name


_DT = {torch.float32: "FLOAT", torch.bfloat16: "BF16", torch.int64: "INT64"}


class FakeEngine:
    def __init__(self, io: io_spec.EngineIO, fn, device_memory: int = 4096):
        self.io, self.fn, self.fail = io, fn, False
        self.spec = {t.name: t for t in io.tensors}
        self.num_io_tensors = len(io.tensors)
        self.device_memory_size_v2 = device_memory
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, i):
        return self.io.tensors[i].name

    def get_tensor_mode(self, name):
        return FAKE.TensorIOMode.INPUT if name in self.io.input_names else FAKE.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return FakeDataType(_DT[self.spec[name].torch_dtype])

    def get_tensor_shape(self, name):  # as TensorRT reports a built engine: -1 on dynamic axes
        return tuple(d if isinstance(d, int) else -1 for d in self.spec[name].shape)

    def create_execution_context(self, strategy):
        assert strategy == FAKE.ExecutionContextAllocationStrategy.USER_MANAGED
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses, self.memory, self.runs = engine, {}, {}, None, 0

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_input_shape(self, name, shape):
        spec = self.engine.spec[name]
        if len(shape) != len(spec.shape):
            return False
        for d, v in zip(spec.shape, shape):
            if isinstance(d, int) and d != v:
                return False
            if isinstance(d, str) and not self.engine.io.axis(d).min <= v <= self.engine.io.axis(d).max:
                return False
        self.shapes[name] = tuple(shape)
        return True

    def _dims(self):
        return {d: v for t in self.engine.io.inputs for d, v in zip(t.shape, self.shapes[t.name])
                if isinstance(d, str)}

    def infer_shapes(self):
        return [n for n in self.engine.io.input_names if n not in self.shapes]

    def get_tensor_shape(self, name):
        return self.engine.io.shapes(self._dims())[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        if self.engine.fail:
            return False
        io, shapes = self.engine.io, self.engine.io.shapes(self._dims())
        ins = [view_at(self.addresses[t.name], shapes[t.name], t.torch_dtype) for t in io.inputs]
        with torch.no_grad():
            outs = self.engine.fn(*ins)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for t, o in zip(io.outputs, outs):
            view_at(self.addresses[t.name], shapes[t.name], t.torch_dtype).copy_(o)
        self.runs += 1
        return True


def _fake_module(registry: dict) -> types.ModuleType:
    m = types.ModuleType("tensorrt")
    m.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo probes find_spec
    m.__version__ = "10.99.0-fake"
    m.Builder = object
    m.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    m.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED", STATIC="STATIC")

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return registry.get(bytes(data).decode(errors="replace"))  # None: "corrupt" plan

    m.Logger, m.Runtime = Logger, Runtime
    return m


FAKE = _fake_module({})


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    """Register fake engines: ``add(io, fn) -> Engine`` (activated, I/O checked)."""
    registry: dict = {}
    mod = _fake_module(registry)
    global FAKE
    FAKE = mod
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    runtime = mod.Runtime(mod.Logger())

    def add(io, fn, name=None):
        name = name or io.name
        registry[name] = FakeEngine(io, fn)
        plan = tmp_path / f"{name}.plan"
        plan.write_bytes(name.encode())
        e = tb.Engine(plan, name, rebuild="python -m sdvg_export build --profile p.yaml").load().activate(runtime)
        e.check_io(io)
        return e

    add.registry, add.runtime, add.tmp = registry, runtime, tmp_path
    return add


def _geo(h=4, w=4, latent_frames=15, window=9, sink=3):
    # 5 blocks of 3 frames with a window of 3 blocks and a 1-block sink: blocks 3 and 4 are in the ring
    # phase (block 3 has a non-empty head and tail), block 0 has an empty past
    return io_spec.Geometry(3, h, w, latent_frames, window, sink)


SCHED = Schedule.from_steps((1000, 750, 500, 250), 5.0)


# --------------------------------------------------------------------------------------------------
# Denoiser

@pytest.fixture
def denoisers(fake_trt):
    geo = _geo()
    cfg = WanDiTConfig.from_name("tiny")
    model = WanDiT(cfg).eval()
    step = fake_trt(io_spec.dit_step_io("drafter", cfg, geo, "fp32"), DiTStepGraph(model))
    ctx = fake_trt(io_spec.dit_context_io("drafter", cfg, "fp32"), DiTContextGraph(model))
    memory = tb.ActivationMemory([step, ctx], "cpu")
    kw = dict(latent_shape=(3, geo.latent_height, geo.latent_width), window_frames=geo.window_frames,
              sink_frames=geo.sink_frames, schedule=SCHED, device="cpu", dtype=torch.float32)
    trt_d = Denoiser(tb.TrtDiTStep(step, ctx, memory, cfg, "cpu"), "drafter", num_blocks=geo.num_blocks, **kw)
    torch_d = Denoiser(TorchDiTStep(model), "drafter", **kw)
    return trt_d, torch_d, geo


def test_denoiser_matches_torch_backend_through_the_ring_phase(denoisers):
    trt_d, torch_d, geo = denoisers
    context = torch.randn(1, trt_d.cfg.text_len, trt_d.cfg.text_dim)
    for d in (trt_d, torch_d):
        d.prepare(context)
        d.set_seed(1234)
    torch.testing.assert_close(trt_d.ctx_kv, torch_d.ctx_kv, **TOL)
    for b in range(geo.num_blocks):
        x_trt = trt_d.denoise_block(b).clone()
        x_ref = torch_d.denoise_block(b).clone()
        torch.testing.assert_close(x_trt, x_ref, **TOL)
        assert x_ref.abs().max() > 0.1  # a real latent, not zeros
        trt_d.commit_block(b, x_ref)
        torch_d.commit_block(b, x_ref)
        # the engine wrote this block's K/V straight into the cache slots (and nothing else)
        torch.testing.assert_close(trt_d.cache.kv, torch_d.cache.kv, **TOL)
    # each block used its own context, bound once: 4 denoise steps + 1 commit
    assert [trt_d.step.engine.contexts[b].runs for b in range(geo.num_blocks)] == [5] * geo.num_blocks


def test_denoiser_binds_the_cache_slots_by_address(denoisers):
    trt_d, _, geo = denoisers
    kv, n = trt_d.cache.kv, geo.tokens_per_block
    saw_ring = False
    for b in range(geo.num_blocks):
        s = trt_d.cache.slots(b)
        ws, re = s.write_start, s.read_end
        eng = trt_d.step.engine
        addr = eng.addresses[b]
        ctx = eng.contexts[b]
        # an empty segment gets a valid address of its own (distinct, non-null, aligned), outside
        # TensorRT's activation memory
        order = {name: k for k, name in enumerate([*eng.inputs, *eng.outputs])}
        empties = []
        for i in range(trt_d.cfg.num_layers):
            for j, a in enumerate("kv"):
                head, tail = f"{a}_head.{i}", f"{a}_tail.{i}"
                assert addr[head] == (kv[i, j].data_ptr() if ws else trt_d.step.memory.empty_address(order[head]))
                assert addr[f"{a}_new.{i}"] == kv[i, j, ws].data_ptr()
                assert addr[tail] == (kv[i, j, ws + n].data_ptr() if re > ws + n
                                      else trt_d.step.memory.empty_address(order[tail]))
                empties += [addr[k] for k, on in ((head, not ws), (tail, re == ws + n)) if on]
                assert ctx.shapes[f"{a}_head.{i}"][0] == ws
                assert ctx.shapes[f"{a}_tail.{i}"][0] == re - ws - n
        assert len(set(empties)) == len(empties) and all(p and p % tb.ALIGNMENT == 0 for p in empties)
        mem = trt_d.step.memory
        assert not any(mem.ptr <= p < mem.ptr + mem.size for p in empties)
        saw_ring |= 0 < ws and re - ws - n > 0
        cos, _ = trt_d.step.rope[b]
        assert addr["rope_cos"] == cos.data_ptr() and addr["x"] == trt_d.x.data_ptr()
        assert ctx.memory == (trt_d.step.memory.ptr, trt_d.step.memory.size)
    assert saw_ring, "the geometry must exercise a block with both a head and a tail segment"


def test_false_from_execute_async_v3_raises_naming_the_engine(denoisers):
    trt_d, _, _ = denoisers
    trt_d.step.engine.contexts[0].engine.fail = True
    with pytest.raises(tb.EngineRunError, match=r"execute_async_v3 failed for engine .*drafter\.step\.plan"):
        trt_d.denoise_block(0)


def test_shape_outside_the_profile_asks_for_a_rebuild(fake_trt):
    cfg = WanDiTConfig.from_name("tiny")
    model = WanDiT(cfg).eval()
    small = _geo(window=6, sink=3, latent_frames=15)  # engines built for a 2-block window
    step = fake_trt(io_spec.dit_step_io("drafter", cfg, small, "fp32"), DiTStepGraph(model))
    ctx = fake_trt(io_spec.dit_context_io("drafter", cfg, "fp32"), DiTContextGraph(model))
    memory = tb.ActivationMemory([step, ctx], "cpu")
    with pytest.raises(EngineMismatchError, match=r"outside the engine's optimization profile.*sdvg_export build"):
        Denoiser(tb.TrtDiTStep(step, ctx, memory, cfg, "cpu"), "drafter", latent_shape=(3, 4, 4), window_frames=9,
                 sink_frames=3, schedule=SCHED, device="cpu", dtype=torch.float32, num_blocks=5)


def test_engine_checks_dtype_alignment_and_io(fake_trt):
    cfg = WanDiTConfig.from_name("tiny")
    model = WanDiT(cfg).eval()
    io = io_spec.dit_context_io("drafter", cfg, "fp32")
    e = fake_trt(io, DiTContextGraph(model))
    e.alignment = 256  # TensorRT's rule for device tensors, enforced here on host memory
    mem = tb.ActivationMemory([e], "cpu")
    ctx_kv = torch.zeros(io.shapes()["ctx_kv"])
    with pytest.raises(tb.EngineRunError, match="float32 in the engine but the buffer is torch.float64"):
        e.bind("a", {"context": torch.zeros(io.shapes()["context"], dtype=torch.float64), "ctx_kv": ctx_kv}, mem)
    flat = torch.zeros(ctx_kv.numel() + 64)
    start = (-flat.data_ptr() % 256) // 4 + 1  # one float past a 256-byte boundary
    misaligned = flat[start:start + ctx_kv.numel()].view(ctx_kv.shape)
    with pytest.raises(tb.EngineRunError, match="not 256-byte aligned"):
        e.bind("b", {"context": torch.zeros(io.shapes()["context"]), "ctx_kv": misaligned}, mem)
    with pytest.raises(tb.EngineRunError, match="miss"):
        e.bind("c", {"context": torch.zeros(io.shapes()["context"])}, mem)
    other = io_spec.dit_context_io("target", WanDiTConfig.from_name("tiny-target"), "fp32")
    with pytest.raises(EngineMismatchError, match="does not have the I/O"):
        e.check_io(other)
    (fake_trt.tmp / "corrupt.plan").write_bytes(b"\xff\xfe not a plan")
    with pytest.raises(EngineMismatchError, match="could not deserialize"):
        tb.Engine(fake_trt.tmp / "corrupt.plan").activate(fake_trt.runtime)
    with pytest.raises(EngineMismatchError, match="missing; rebuild with"):
        tb.Engine(fake_trt.tmp / "absent.plan").load()


# --------------------------------------------------------------------------------------------------
# Decoder and scorer

@pytest.fixture
def decoders(fake_trt):
    geo = _geo(h=2, w=2, latent_frames=9, window=9, sink=0)
    vae = WanVAEDecoder(WanVAEConfig.from_name("tiny")).eval()
    io_first = io_spec.vae_io(vae.config, geo, "fp32", True)
    io_step = io_spec.vae_io(vae.config, geo, "fp32", False)
    first = fake_trt(io_first, VAEFirstGraph(vae))
    step = fake_trt(io_step, VAEStepGraph(vae))
    memory = tb.ActivationMemory([first, step], "cpu")
    trt_v = Decoder(tb.TrtVAEStep(first, step, memory, "cpu"), io_first, io_step, "cpu", graphs=False)
    torch_v = vae_decoder(vae, geo.latent_height, geo.latent_width, torch.float32, "cpu")
    return trt_v, torch_v, geo


def test_decoder_double_buffering_matches_torch_and_binds_by_parity(decoders):
    trt_v, torch_v, geo = decoders
    z = [torch.randn(1, 16, 3, geo.latent_height, geo.latent_width) for _ in range(4)]
    for v in (trt_v, torch_v):
        v.reset()

    def same(a, b):
        torch.testing.assert_close(a, b, **TOL)

    same(trt_v.decode_commit(z[0], 0), torch_v.decode_commit(z[0], 0))       # block 0: 9 frames
    same(trt_v.decode_scratch(z[1], 1), torch_v.decode_scratch(z[1], 1))     # a draft ...
    trt_v.keep_scratch()
    torch_v.keep_scratch()                                                   # ... accepted
    committed = [s.clone() for s in trt_v.committed.slots]
    same(trt_v.decode_scratch(z[2], 2), torch_v.decode_scratch(z[2], 2))     # a draft, rejected:
    for a, b in zip(trt_v.committed.slots, committed):                             # the committed state is
        assert torch.equal(a, b)                                             # untouched (bit for bit)
    frames = trt_v.decode_commit(z[3], 2)                                    # the target's block
    same(frames, torch_v.decode_commit(z[3], 2))
    assert frames.shape == (1, 3, 12, 8 * geo.latent_height, 8 * geo.latent_width)
    for a, b in zip(trt_v.committed.slots, torch_v.committed.slots):
        same(a, b)
    # the step context of parity p reads state p and writes state 1 - p, by address
    for p in (0, 1):
        addr = trt_v.step.step.addresses[("step", p, 1 - p)]
        states = trt_v.state.states
        for j in range(len(states[0].slots)):
            assert addr[f"state_in.{j}"] == states[p].slots[j].data_ptr()
            assert addr[f"state_out.{j}"] == states[1 - p].slots[j].data_ptr()


def test_scorer_matches_torch_and_reads_the_decoder_buffer_in_place(decoders, fake_trt):
    trt_v, _, geo = decoders
    ir = ImageReward(ImageRewardConfig.preset("tiny")).eval()
    with torch.no_grad():
        for p in ir.mlp.parameters():
            p.normal_(0, 0.2)  # a head that spreads the rewards (the default init is near-constant)
    io = io_spec.scorer_io(ir.cfg, geo, "fp32", "fp32")
    e = fake_trt(io, ScorerGraph(ir, 8 * geo.latent_height, 8 * geo.latent_width))
    ids = torch.randint(1000, 2000, (1, 35))
    ids[0, 0] = 101
    mask = torch.zeros(1, 35, dtype=torch.int64)
    mask[0, :12] = 1
    tok = lambda prompt: (ids, mask)  # noqa: E731 - both scorers get the same tokens
    trt_s = Scorer(tb.TrtScoreStep(e, tb.ActivationMemory([e], "cpu"), io, "cpu"), tok, io, "cpu", graphs=False)
    torch_s = Scorer(TorchScoreStep(ir), tok, io, "cpu")
    trt_s.prepare("p")
    torch_s.prepare("p")
    trt_v.reset()
    for block in (0, 1):
        frames = trt_v.decode_commit(torch.randn(1, 16, 3, geo.latent_height, geo.latent_width), block)
        r = trt_s.score(frames)
        ref = torch_s.score(frames)
        assert r.shape == (geo.pixel_frames(block),)
        # the engine's preprocessing rounds to uint8 levels after a matmul instead of torch's
        # interpolate kernel: a level may flip on <0.1% of pixels (test_export_onnx), so not bitwise
        torch.testing.assert_close(r, ref, atol=2e-3, rtol=2e-3)
        assert e.addresses[(frames.shape[2], frames.data_ptr())]["frames"] == frames.data_ptr()  # zero copy
    strided = torch.randn(1, 12, 3, 16, 16).transpose(1, 2)  # not contiguous: copied into the scorer's buffer
    trt_s.score(strided)
    assert e.addresses[(12, trt_s.step._frames.data_ptr())]["frames"] == trt_s.step._frames.data_ptr()


# --------------------------------------------------------------------------------------------------
# CUDA graph runner and TensorRT discovery

def test_graph_runner_warms_up_captures_replays_and_ends_a_failed_capture(monkeypatch):
    events = []

    class FakeGraph:
        def capture_begin(self, pool=None):
            events.append("begin")

        def capture_end(self):
            events.append("end")

        def replay(self):
            events.append("replay")

    class FakeStream:
        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    runner = CudaGraphs(True, torch.device("cuda"))
    runner.run("a", lambda: events.append("body"))
    assert events == ["body", "begin", "body", "end"]  # eager warm-up, then the capture
    runner.run("a", lambda: events.append("body"))
    assert events[-1] == "replay"
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:  # fails during the capture
            raise tb.EngineRunError("enqueue failed")

    events.clear()
    with pytest.raises(tb.EngineRunError):
        runner.run("b", failing)
    assert events == ["begin", "end"] and "b" not in runner.graphs  # capture ended, nothing kept
    assert not CudaGraphs(True, torch.device("cpu")).enabled


def test_missing_or_stub_tensorrt_is_backend_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(BackendUnavailableError, match="not installed"):
        tb.tensorrt_module()
    stub = types.ModuleType("tensorrt")  # what the type stubs give: a namespace without Builder
    stub.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    with pytest.raises(BackendUnavailableError, match="finds no library"):
        tb.tensorrt_module()
    old = types.ModuleType("tensorrt")
    old.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    old.Builder, old.__version__ = object, "10.8.0"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(BackendUnavailableError, match=r"tensorrt 10\.8\.0 is installed; sdvg-rt needs TensorRT >= 10\.11"):
        tb.tensorrt_module()
    old.__version__ = "11.1.0"
    assert tb.tensorrt_module() is old


def test_flavour_choice_follows_what_is_installed_and_the_gpu(monkeypatch):
    def fake(name, version):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.Builder, m.__version__ = object, version
        return m

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", fake("tensorrt_rtx", "1.7.1.116"))
    assert tb.choose_flavour("auto", None) == "tensorrt_rtx"  # no GPU: only TensorRT-RTX builds ahead of time
    assert tb.choose_flavour("auto", (8, 9)) == "tensorrt_rtx"
    with pytest.raises(BackendUnavailableError, match=r"(?s)tensorrt_rtx does not run on compute capability 9\.0.*"
                                                      r"Hopper .* take TensorRT 10/11"):
        tb.choose_flavour("auto", (9, 0))
    monkeypatch.setitem(sys.modules, "tensorrt", fake("tensorrt", "10.13.0"))
    assert tb.choose_flavour("auto", (9, 0)) == "tensorrt"
    assert tb.choose_flavour("auto", (8, 9)) == "tensorrt"  # both run there: TensorRT first
    assert tb.choose_flavour("tensorrt_rtx", (8, 9)) == "tensorrt_rtx"
    with pytest.raises(BackendUnavailableError, match="there is none"):
        tb.choose_flavour("tensorrt", None)


def test_capture_that_tensorrt_cannot_do_falls_back_to_eager_with_one_warning(monkeypatch):
    events = []

    class FakeGraph:
        def capture_begin(self, pool=None):
            events.append("begin")

        def capture_end(self):
            events.append("end")

        def replay(self):
            events.append("replay")

    class FakeStream:
        def wait_stream(self, other):
            pass

        def synchronize(self):
            events.append("sync")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("device-sync"))
    runner = CudaGraphs(True, torch.device("cuda"))
    capturing = []

    def body():
        events.append("body")
        if capturing:
            raise tb.CaptureUnsupported("not capturable")

    def begin(pool=None):
        events.append("begin")
        capturing.append(1)

    monkeypatch.setattr(FakeGraph, "capture_begin", lambda self, pool=None: begin(pool))
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        runner.run("k", body)
    assert events == ["body", "sync", "begin", "body", "end", "device-sync"]
    capturing.clear()
    events.clear()
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")  # one warning only
        runner.run("k", body)
        runner.run("k", body)
    assert events == ["body", "body"] and "k" not in runner.graphs and "k" in runner.eager
    other = []
    with pytest.raises(tb.EngineRunError):  # any other failure still stops the run
        capturing.append(1)
        runner.run("j", lambda: (other.append(1), (_ for _ in ()).throw(tb.EngineRunError("boom")))
                   if len(other) else other.append(0))
