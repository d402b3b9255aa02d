"""ONNX export of the engine graphs: numerical parity with the torch modules through polygraphy's ONNX
Runtime runner, graph validity (onnx.checker full + strict shape inference inside ``export_graph``), the
bf16 engine graphs, external data, and the ``--onnx-only`` build with its staleness logic.

Parity runs on fp32 exports: ONNX Runtime's CPU provider has no bf16 kernels for most of these ops
(Conv, LayerNormalization, ...), so bf16 graphs are checked structurally only (they are what the
engines are built from). Tolerances are stated where they are used.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

from sdvg_export import onnx_export as ox
from sdvg_export.__main__ import main as export_main
from sdvg_rt import io_spec
from sdvg_rt.kv_cache import KVCache
from sdvg_rt.models.imagereward import ImageReward, ImageRewardConfig, preprocess
from sdvg_rt.models.wan_dit import WanDiT, WanDiTConfig
from sdvg_rt.models.wan_vae import WanVAEConfig, WanVAEDecoder
from sdvg_rt.profiles import load_profile

# 5 blocks, window of 3 blocks with a 1-block sink: block 0 has an empty past, block 3 a head and a tail
GEO = io_spec.Geometry(frames_per_block=3, latent_height=4, latent_width=4, latent_frames=15, window_frames=9,
                       sink_frames=3)


def _run(path, feed):
    with OnnxrtRunner(SessionFromOnnx(str(path))) as r:
        return r.infer({k: np.ascontiguousarray(v.numpy() if torch.is_tensor(v) else v) for k, v in feed.items()})


def _graph(io, module, seed=0):
    return ox.Graph(io, module.eval(), ox.example_inputs(io, "cpu", seed=seed, vocab=getattr(
        getattr(module, "model", None), "cfg", None) and getattr(module.model.cfg, "vocab_size", None)))


@torch.no_grad()
def test_dit_step_with_a_real_cache_prefix_matches_the_cached_torch_forward(tmp_path):
    cfg = WanDiTConfig.from_name("tiny")
    model = WanDiT(cfg).eval()
    step_io = io_spec.dit_step_io("drafter", cfg, GEO, "fp32")
    ctx_io = io_spec.dit_context_io("drafter", cfg, "fp32")
    step = ox.export_graph(_graph(step_io, ox.DiTStepGraph(model)), tmp_path / "step.onnx")
    ctxp = ox.export_graph(_graph(ctx_io, ox.DiTContextGraph(model)), tmp_path / "ctx.onnx")
    m = onnx.load(str(step), load_external_data=False)
    assert m.opset_import[0].version == ox.OPSET == 22
    assert not any(a.name == "to" and a.i == onnx.TensorProto.DOUBLE for n in m.graph.node for a in n.attribute)

    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    ctx_kv = model.prepare_context(context)
    # fp32, same maths, different kernels/summation order: ~1e-6 observed; 1e-5 leaves margin
    tol = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(_run(ctxp, {"context": context})["ctx_kv"], ctx_kv.numpy(), **tol)

    L, n, hw = cfg.num_layers, GEO.tokens_per_block, (GEO.latent_height, GEO.latent_width)
    cache = KVCache(L, cfg.num_heads, cfg.head_dim, GEO.tokens_per_frame, 3, GEO.window_frames, GEO.sink_frames,
                    dtype=torch.float32)
    saw = set()
    for b in range(GEO.num_blocks):
        s = cache.slots(b)
        ws, re = s.write_start, s.read_end
        x = torch.randn(1, 16, 3, *hw)
        t = torch.full((3,), 833.33)
        cos, sin = model.rope.factors(3, hw[0] // 2, hw[1] // 2, frame_offset=s.frame_offset)
        feed = {"x": x, "t": t, "rope_cos": cos, "rope_sin": sin, "ctx_kv": ctx_kv}
        for i in range(L):  # the past exactly as the runtime binds it: slices of the cache
            for j, a in enumerate("kv"):
                feed[f"{a}_head.{i}"] = cache.kv[i, j, :ws].clone()
                feed[f"{a}_tail.{i}"] = cache.kv[i, j, ws + n:re].clone()
        out = _run(step, feed)
        flow = model(x, t, ctx_kv, cache.kv, s)  # the cached torch path writes the block's K/V in place
        np.testing.assert_allclose(out["flow"], flow.numpy(), **tol)
        for i in range(L):
            for j, a in enumerate("kv"):
                np.testing.assert_allclose(out[f"{a}_new.{i}"], cache.kv[i, j, ws:ws + n].numpy(), **tol)
        saw.add((ws > 0, re - ws - n > 0))
        model(x, torch.zeros(3), ctx_kv, cache.kv, s)  # commit (t = 0): the history later blocks read
    assert saw == {(False, False), (True, False), (True, True)}  # empty past, head only, head + tail


@pytest.mark.parametrize("subpixel", ["off", "2x2"])  # 2x2: what an export on a GPU contains ("auto")
@torch.no_grad()
def test_vae_threads_its_state_across_three_blocks(tmp_path, subpixel):
    from sdvg_rt.models.wan_vae import VAEKernels

    _check_vae_export(tmp_path, VAEKernels(subpixel=subpixel))


def _check_vae_export(tmp_path, kernels):
    geo = io_spec.Geometry(3, 2, 2, 9, 9, 0)
    vae = WanVAEDecoder(WanVAEConfig.from_name("tiny")).eval().set_kernels(kernels)
    first_io, step_io = (io_spec.vae_io(vae.config, geo, "fp32", f) for f in (True, False))
    first = ox.export_graph(_graph(first_io, ox.VAEFirstGraph(vae)), tmp_path / "first.onnx")
    step = ox.export_graph(_graph(step_io, ox.VAEStepGraph(vae)), tmp_path / "step.onnx")
    zs = [torch.randn(1, 16, 3, 2, 2) for _ in range(3)]
    a, b = vae.new_state(2, 2), vae.new_state(2, 2)
    ref = [vae.decode(zs[0], None, a, True), vae.decode(zs[1], a, b, False).clone(), vae.decode(zs[2], b, a, False)]
    slots = len(a.slots)
    outs = [_run(first, {"z": zs[0]})]
    for z in zs[1:]:  # the ONNX states themselves are threaded, not torch's
        outs.append(_run(step, {"z": z, **{f"state_in.{j}": outs[-1][f"state_out.{j}"] for j in range(slots)}}))
    # fp32 convolutions over up to 11 frames: ~3e-6 on frames in [-1, 1], ~1e-5 on states up to ~5
    for o, r in zip(outs, ref):
        np.testing.assert_allclose(o["frames"], r.numpy(), atol=2e-5, rtol=1e-5)
    assert outs[0]["frames"].shape[2] == 9 and outs[2]["frames"].shape[2] == 12
    for j in range(slots):
        np.testing.assert_allclose(outs[-1][f"state_out.{j}"], a.slots[j].numpy(), atol=1e-4, rtol=1e-5)


def test_export_refuses_a_model_with_fast_kernels():
    """The export traces the eager groups a loaded model runs; a model given Triton or compiled kernels (as
    a GPU Runtime configures its own) is refused by name, not traced into a wrong graph."""
    from sdvg_rt.models import dit_kernels
    from sdvg_rt.models.wan_dit import DiTKernels
    from sdvg_rt.models.wan_vae import VAEKernels

    vae = WanVAEDecoder(WanVAEConfig.from_name("tiny")).eval()
    assert vae.kernels.eager and ox.part_graphs("vae", {}, vae) == []  # as loaded: accepted
    assert VAEKernels(subpixel="3x3").eager  # a mode alone keeps the eager groups
    with pytest.raises(ValueError, match=r"vae model runs VAEKernels\(compile=True.*export a model as loaded"):
        ox.part_graphs("vae", {}, vae.set_kernels(VAEKernels(compile=True)))
    dit = WanDiT(WanDiTConfig.from_name("tiny")).eval()
    kernels = DiTKernels(compile=True, triton=dit_kernels.AVAILABLE)
    with pytest.raises(ValueError, match=r"drafter model runs DiTKernels\(.*compile"):
        ox.part_graphs("drafter", {}, dit.set_kernels(kernels))


@torch.no_grad()
def test_scorer_with_in_graph_preprocessing(tmp_path):
    ir = ImageReward(ImageRewardConfig.preset("tiny")).eval()
    for p in ir.mlp.parameters():
        p.normal_(0, 0.05)  # spread the rewards (the default head is nearly constant)
    geo = io_spec.Geometry(3, 6, 8, 9, 9, 0)  # 48x64 frames: a real downscale-free upscale + crop path
    io = io_spec.scorer_io(ir.cfg, geo, "fp32", "fp32")
    g = ox.ScorerGraph(ir, 48, 64)
    path = ox.export_graph(ox.Graph(io, g.eval(), ox.example_inputs(io, "cpu", vocab=ir.cfg.vocab_size)),
                           tmp_path / "scorer.onnx")
    frames = torch.rand(1, 3, 12, 48, 64) * 2 - 1
    ids = torch.randint(1000, 2000, (1, 35))
    ids[0, 0] = 101
    mask = torch.zeros(1, 35, dtype=torch.int64)
    mask[0, :9] = 1
    for n in (9, 12):  # both block sizes through the one dynamic axis
        f = frames[:, :, :n].contiguous()
        out = _run(path, {"frames": f, "ids": ids, "mask": mask})["rewards"]
        # the graph == its torch module: same ops, fp32 (the levels are integers, so rounding agrees
        # except on exact ties of the two summation orders: none expected at this size)
        np.testing.assert_allclose(out, g(f, ids, mask).numpy(), atol=1e-4, rtol=1e-4)
        # and the scorer as the torch backend runs it (``preprocess``): a level may flip where the two
        # resize implementations land within float error of x.5 (<0.5% of pixels, see below)
        # the tolerance is set from the rewards' own spread: a tenth of it, so mixing up frames fails
        ref = ir.score_frames(f[0].transpose(0, 1), ids, mask).numpy()
        spread = float(ref.max() - ref.min())
        assert spread > 0
        np.testing.assert_allclose(out, ref, atol=0.1 * spread, rtol=0)
        assert np.abs(out - ref[::-1]).max() > 0.1 * spread  # the check can see reversed frames
    for h, w in ((48, 64), (480, 832), (224, 300)):  # upscale, downscale, crop only
        x = torch.rand(2, 3, h, w) * 2 - 1
        mine = ox.ScorerGraph(ir, h, w).pixels(x)
        ref = preprocess(x)
        levels = (mine - ref).abs() * 255 * torch.tensor(ir.cfg.pixel_std).view(1, 3, 1, 1)  # uint8 levels
        assert levels.max() < 1.01 and (levels > 0.5).float().mean() < 5e-3


def test_external_data_above_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 1 << 16)  # stands in for 2 GB
    cfg = WanDiTConfig.from_name("tiny")
    model = WanDiT(cfg).eval()
    io = io_spec.dit_context_io("drafter", cfg, "fp32")
    path = ox.export_graph(_graph(io, ox.DiTContextGraph(model)), tmp_path / "ctx.onnx")
    data = tmp_path / "ctx.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    m = onnx.load(str(path), load_external_data=False)
    big = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(not t.raw_data for t in big)
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {"ctx.onnx.data"}
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, {"context": context})["ctx_kv"], model.prepare_context(context).numpy(),
                                   atol=1e-5, rtol=1e-5)


def test_typed_initializers_go_to_raw_data_and_float64_becomes_float32(tmp_path, monkeypatch):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    w = helper.make_tensor("w", TensorProto.DOUBLE, [4], [1.0, 2.0, 3.0, 4.0])  # double_data, not raw
    nodes = [helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE),
             helper.make_node("Mul", ["xd", "w"], ["yd"]),
             helper.make_node("Cast", ["yd"], ["y"], to=TensorProto.FLOAT)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 22)],
                              ir_version=10)
    with pytest.raises(RuntimeError, match="float64 left"):
        onnx.save(model, str(tmp_path / "d.onnx"))
        ox.check_onnx(tmp_path / "d.onnx")
    ox.float64_to_float32(model)
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 0)
    ox.save_onnx(model, tmp_path / "f.onnx")
    ox.check_onnx(tmp_path / "f.onnx")
    out = _run(tmp_path / "f.onnx", {"x": np.ones(4, np.float32)})["y"]
    np.testing.assert_array_equal(out, [1, 2, 3, 4])
    m = onnx.load(str(tmp_path / "f.onnx"), load_external_data=False)
    w = m.graph.initializer[0]
    assert w.data_type == TensorProto.FLOAT and len(w.raw_data) == 16 and not w.double_data and not w.float_data


# --------------------------------------------------------------------------------------------------
# the build command, ONNX only

def _profile(tmp_path, drafter_seed=0):
    from sdvg_rt.checkpoints.imagereward import write_synthetic_imagereward
    from sdvg_rt.checkpoints.wan_dit import write_synthetic_dit

    write_synthetic_dit(tmp_path / "sf.pt", "tiny", fmt="self_forcing_pt", seed=drafter_seed)
    if not (tmp_path / "ImageReward").exists():
        write_synthetic_imagereward(tmp_path / "ImageReward", "tiny", 0)
    p = tmp_path / "p.yaml"
    p.write_text(
        "name: t\ncheckpoints: {drafter: sf.pt, target: none.safetensors, vae: none.pth, text_encoder: none.pth,\n"
        "  tokenizer: none, scorer: ImageReward}\n"
        "models: {drafter: tiny, target: tiny-target, vae: tiny, scorer: tiny}\n"
        "video: {width: 32, height: 32, latent_frames: 9, frames_per_block: 3}\nprecision: bf16\n")
    return p


def test_onnx_only_build_is_incremental_and_bf16(tmp_path, capsys):
    prof = _profile(tmp_path)
    eng = tmp_path / "engines"
    args = ["build", "--profile", str(prof), "--parts", "drafter,imagereward", "--onnx-only", "--engines-dir", str(eng)]
    assert export_main(args) == 0
    folder = eng / "t"
    man = json.loads((folder / "manifest.json").read_text())
    assert sorted(man["engines"]) == ["drafter.context", "drafter.step", "scorer"]
    rec = man["engines"]["drafter.step"]
    assert rec["plan"] is None and rec["opset"] == 22 and rec["dtype"] == "bfloat16"
    assert rec["checkpoints"]["drafter"]["path"] == str((tmp_path / "sf.pt").resolve())
    m = onnx.load(str(folder / rec["onnx"]), load_external_data=False)
    types = {t.data_type for t in m.graph.initializer if len(t.dims) == 2}  # the Linear weights
    assert types == {onnx.TensorProto.BFLOAT16}  # strongly typed: bf16 weights in the graph
    casts = {a.i for n in m.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert onnx.TensorProto.FLOAT in casts  # the fp32 islands (RMSNorm statistic, RoPE) are explicit
    scorer = onnx.load(str(folder / man["engines"]["scorer"]["onnx"]), load_external_data=False)
    assert scorer.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16  # the VAE's frames
    assert scorer.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    capsys.readouterr()

    assert export_main(args) == 0  # nothing changed: nothing exported
    assert "exported 0, built 0, up to date 3" in capsys.readouterr().out

    _profile(tmp_path, drafter_seed=1)  # new drafter weights: only the drafter's graphs are redone
    assert export_main(args) == 0
    out = capsys.readouterr().out
    assert "drafter.step: stale: drafter checkpoint changed" in out and "scorer: up to date" in out
    man2 = json.loads((folder / "manifest.json").read_text())
    assert man2["engines"]["scorer"] == man["engines"]["scorer"]
    assert man2["engines"]["drafter.step"]["onnx_sha256"] != rec["onnx_sha256"]

    # without --onnx-only a machine without TensorRT 10/11 gets one clear message, exit code 4, no traceback
    assert export_main(args[:-3] + ["--engines-dir", str(eng), "--tensorrt", "tensorrt"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--onnx-only" in err and "Traceback" not in err


def test_plan_builds_use_polygraphy_strongly_typed_and_rebuild_only_stale_plans(tmp_path, monkeypatch):
    """The non-ONNX half of the build with TensorRT and polygraphy's builder replaced by recorders (no
    TensorRT here): what is passed to polygraphy, what the manifest records, what gets rebuilt."""
    import sys
    import types

    import polygraphy.backend.trt as ptrt
    from polygraphy.logger import G_LOGGER

    from sdvg_export import build as B
    from sdvg_rt.errors import OutOfMemoryError

    class Layer:
        def __init__(self, kind):
            self.type, self.compute_precision = kind, None

    class Network:
        def __init__(self):
            self.layers = [Layer("NORMALIZATION"), Layer("MATRIX_MULTIPLY"), Layer("NORMALIZATION")]
            self.num_layers = len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class Monitor:
        def __init__(self):
            pass

    import importlib.machinery

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo probes find_spec
    trt.__version__, trt.Builder, trt.IProgressMonitor = "10.13.0", object, Monitor
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.ProfilingVerbosity = types.SimpleNamespace(LAYER_NAMES_ONLY="LAYER_NAMES_ONLY", DETAILED="DETAILED")
    trt.LayerType = types.SimpleNamespace(NORMALIZATION="NORMALIZATION")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT")
    trt.INormalizationLayer = Layer
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(B, "gpu_info", lambda device: ("Fake GPU", (9, 0)))
    calls = []
    from sdvg_export import trt_check

    monkeypatch.setattr(trt_check, "check_network", lambda net, io, path="": calls.append(("check", io.name)))

    def parse(path, strongly_typed=False):
        net = Network()
        calls.append(("parse", path, strongly_typed, net))
        return None, net, None

    def create_config(**kw):
        calls.append(("config", kw))
        return kw

    def build_bytes(triple, config=None, save_timing_cache=None):
        calls.append(("build", save_timing_cache))
        return b"plan"

    monkeypatch.setattr(ptrt, "network_from_onnx_path", parse)
    monkeypatch.setattr(ptrt, "CreateConfig", create_config)
    monkeypatch.setattr(ptrt, "engine_bytes_from_network", build_bytes)
    prof = _profile(tmp_path)
    opts = B.BuildOptions(parts=("drafter",), engines_dir=tmp_path / "engines", device="cpu", opt_level=2,
                          flavour="tensorrt")
    report = B.build(prof, opts, progress=lambda s: None)
    assert sorted(report.exported) == sorted(report.built) == ["drafter.context", "drafter.step"]
    parses = [c for c in calls if c[0] == "parse"]
    assert all(c[2] is True for c in parses)  # strongly typed, no precision flags anywhere
    # no layer precision is set (TensorRT 11 has no compute_precision; 10.x rejects it when strongly typed)
    assert all([ly.compute_precision for ly in c[3].layers] == [None, None, None] for c in parses)
    assert sorted(c[1] for c in calls if c[0] == "check") == ["drafter.context", "drafter.step"]
    cfg = [c[1] for c in calls if c[0] == "config"]
    step_cfg = next(c for c in cfg if "k_head.0" in repr(c["profiles"][0]))
    io = io_spec.engine_ios(load_profile(prof), ["drafter"])["drafter.step"]
    lo, opt, hi = io.profile()["k_head.0"]
    got = step_cfg["profiles"][0]["k_head.0"]
    assert (tuple(got.min), tuple(got.opt), tuple(got.max)) == (lo, opt, hi) and lo[0] == 0 < hi[0]
    assert set(step_cfg["profiles"][0]) == set(io.profile())  # every dynamic input, nothing else
    assert step_cfg["builder_optimization_level"] == 2 and step_cfg["memory_pool_limits"] is None
    assert step_cfg["profiling_verbosity"] == "LAYER_NAMES_ONLY"  # not polygraphy's DETAILED
    folder = tmp_path / "engines" / "t"
    assert (folder / "drafter.step.plan").read_bytes() == b"plan"
    rec = json.loads((folder / "manifest.json").read_text())["engines"]["drafter.step"]["plan"]
    assert (rec["tensorrt_version"], rec["gpu_name"], rec["compute_capability"]) == ("10.13.0", "Fake GPU", [9, 0])
    assert rec["build"]["opt_level"] == 2 and rec["build"]["strongly_typed"] is True
    assert rec["flavour"] == "tensorrt" and rec["targets"] == [[9, 0]]

    calls.clear()
    assert B.build(prof, opts, progress=lambda s: None).built == [] and calls == []  # all up to date
    trt.__version__ = "10.14.1"  # a TensorRT upgrade: plans are rebuilt, the ONNX graphs are kept
    report = B.build(prof, opts, progress=lambda s: None)
    assert report.exported == [] and sorted(report.built) == ["drafter.context", "drafter.step"]

    def oom(triple, config=None, save_timing_cache=None):
        G_LOGGER.error("Requested amount of GPU memory (4294967296 bytes) could not be allocated.")
        raise RuntimeError("Invalid Engine. Please ensure the engine was built correctly")

    monkeypatch.setattr(ptrt, "engine_bytes_from_network", oom)
    with pytest.raises(OutOfMemoryError, match=r"(?s)out of memory while building drafter\.\w+.*--parts drafter"):
        B.build(prof, B.BuildOptions(parts=("drafter",), engines_dir=tmp_path / "engines", device="cpu",
                                     opt_level=2, force=True, flavour="tensorrt"), progress=lambda s: None)
