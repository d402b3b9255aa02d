"""TensorRT-RTX builds of the tiny engines, read back and compared with io_spec (CPU, no GPU needed).

TensorRT-RTX's builder parses and builds ahead of time without a GPU (the ``trt-rtx`` extra, which CI
installs). The engines are the ones ``make engines`` built for ``profiles/tiny.yaml`` and
``profiles/tiny-bf16.yaml``, and the fp8 target of ``profiles/tiny-fp8.yaml`` (CI runs them before the tests and sets ``SDVG_REQUIRE_ENGINES=1``, which makes
missing engines a failure; elsewhere they are skipped with the command that builds them). Each engine's ONNX graph is parsed again by
TensorRT-RTX and the network's I/O (names, dtypes, dynamic axes, static sizes) is compared with io_spec;
the manifest must record the flavour, version, target compute capabilities and io_spec's profile
ranges, and no build warning that matters. The fp8 target's graph carries the calibrated scales as Q/DQ
nodes (ModelOpt's form); its engine is built for compute capability 8.9 (the first with FP8 GEMMs).
"""
from __future__ import annotations

import json
import os
import types

import pytest

from sdvg_rt import io_spec
from sdvg_rt.profiles import ENGINES_DIR, PROFILES_DIR, load_profile

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (pip install 'sdvg-rt[trt-rtx]') builds on CPU")
if not hasattr(trt, "Builder"):
    pytest.skip("tensorrt_rtx without its libraries", allow_module_level=True)

from sdvg_export import trt_check  # noqa: E402


def _folder(profile_file: str):
    prof = load_profile(PROFILES_DIR / profile_file)
    folder = ENGINES_DIR / prof.name
    manifest = folder / "manifest.json"
    built = manifest.is_file() and all(
        (r.get("plan") or {}).get("flavour") == "tensorrt_rtx" for r in json.loads(manifest.read_text())["engines"].values())
    return prof, folder if built else None


@pytest.fixture(scope="module", params=["tiny.yaml", "tiny-bf16.yaml"])
def built(request):
    prof, folder = _folder(request.param)
    if folder is None:
        why = f"build them first: make engines PROFILE=profiles/{request.param} (CI does, and sets SDVG_REQUIRE_ENGINES=1)"
        if os.environ.get("SDVG_REQUIRE_ENGINES") == "1":
            pytest.fail(f"no TensorRT-RTX engines for {request.param}; {why}")
        pytest.skip(why)
    return prof, folder, json.loads((folder / "manifest.json").read_text())


def test_every_engine_is_built_by_tensorrt_rtx_and_recorded(built):
    prof, folder, manifest = built
    ios = io_spec.engine_ios(prof)
    assert set(manifest["engines"]) == set(ios)
    for name, rec in manifest["engines"].items():
        plan = rec["plan"]
        assert plan["flavour"] == "tensorrt_rtx" and plan["tensorrt_version"] == trt.__version__
        assert [tuple(c) for c in plan["targets"]] == [(8, 0), (8, 6), (8, 9), (12, 0)]  # the portable default
        assert (folder / plan["file"]).stat().st_size == plan["size"] > 0
        assert plan["build"]["profile"] == {k: [list(x) for x in v] for k, v in ios[name].profile().items()}
        assert plan["build"]["warnings"] == [], f"{name}: build warnings {plan['build']['warnings']}"
        assert plan["build"]["profiling_verbosity"] == "LAYER_NAMES_ONLY"


def _parse(path):
    """TensorRT-RTX's own parser, called directly (not through the build's polygraphy path)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    assert ok and not errors, f"{path}: {errors}"
    return builder, network, parser


def test_parsed_networks_have_io_specs_io(built):
    prof, folder, manifest = built
    ios = io_spec.engine_ios(prof)
    for name, rec in manifest["engines"].items():
        _b, network, _p = _parse(folder / rec["onnx"])
        assert trt_check.network_io(network) == trt_check.expected_io(ios[name])
        trt_check.check_network(network, ios[name])
        if name == "drafter.step":
            assert trt_check.network_io(network)["k_head.0"][1][0] == -1  # P_head is dynamic
        if prof.precision == "bf16" and name == "vae.step":
            assert trt_check.network_io(network)["frames"][0] == "bfloat16"


def _fp8_folder():
    prof, folder = _folder("tiny-fp8.yaml")
    if folder is None:
        why = ("build it first: sdvg-rt calibrate tools/demo_prompts.txt --profile profiles/tiny-fp8.yaml --blocks 1 "
               "--device cpu && make engines PROFILE=profiles/tiny-fp8.yaml TRT=tensorrt_rtx SM=8.9 PARTS=target")
        if os.environ.get("SDVG_REQUIRE_ENGINES") == "1":
            pytest.fail(f"no TensorRT-RTX fp8 engine for tiny-fp8.yaml; {why}")
        pytest.skip(why)
    return prof, folder, json.loads((folder / "manifest.json").read_text())


def test_fp8_target_engine_is_built_from_qdq_with_the_calibrated_scales():
    import onnx

    from sdvg_rt.manifest import sha256_file
    from sdvg_rt.models import fp8
    from sdvg_rt.models.wan_dit import WanDiTConfig

    prof, folder, manifest = _fp8_folder()
    assert set(manifest["engines"]) == {"target.step", "target.context"}
    rec = manifest["engines"]["target.step"]
    # the scales file next to the checkpoint is one of the engine's recorded sources (a new calibration
    # makes the engine stale); paths from the manifest: the tests' cache folder is not the build's
    sources = rec["checkpoints"]
    scales = fp8.scales_path(sources["target"]["path"])
    assert sources["target.fp8_scales"]["path"] == str(scales)
    assert sources["target.fp8_scales"]["sha256"] == sha256_file(scales)
    plan = rec["plan"]
    assert plan["flavour"] == "tensorrt_rtx" and [tuple(c) for c in plan["targets"]] == [(8, 9)]
    assert (folder / plan["file"]).stat().st_size == plan["size"] > 0 and plan["build"]["warnings"] == []
    graph = onnx.load(str(folder / rec["onnx"]), load_external_data=False).graph
    n_q = sum(n.op_type == "QuantizeLinear" for n in graph.node)
    layers = WanDiTConfig.from_name(prof.models.target).num_layers
    blocks = fp8.Fp8Config(prof.quantization.keep_first, prof.quantization.keep_last).quantized_blocks(layers)
    assert blocks and n_q >= len(blocks) * len(fp8.layer_names(0))  # every quantized GEMM input
    _b, network, _p = _parse(folder / rec["onnx"])
    q = [network.get_layer(i) for i in range(network.num_layers)
         if network.get_layer(i).type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)]
    quant = [(L.get_input(0).dtype, L.get_output(0).dtype) for L in q if L.type == trt.LayerType.QUANTIZE]
    dequant = [(L.get_input(0).dtype, L.get_output(0).dtype) for L in q if L.type == trt.LayerType.DEQUANTIZE]
    # bf16 activation -> e4m3 for each GEMM input; e4m3 -> bf16 for each of those and for each fp8 weight
    assert quant == [(trt.DataType.BF16, trt.DataType.FP8)] * n_q
    assert dequant == [(trt.DataType.FP8, trt.DataType.BF16)] * (2 * n_q)


def test_check_network_names_what_differs():
    prof = load_profile(PROFILES_DIR / "tiny.yaml")
    io = io_spec.engine_ios(prof, ["scorer"])["scorer"]

    def tensor(name, dtype, shape):
        return types.SimpleNamespace(name=name, dtype=types.SimpleNamespace(name=dtype), shape=shape)

    spec = trt_check.expected_io(io)
    ins = [tensor(n, {"float32": "FLOAT", "int64": "INT64"}[d], s) for n, (d, s, i) in spec.items() if i]
    outs = [tensor(n, "FLOAT", s) for n, (d, s, i) in spec.items() if not i]
    net = types.SimpleNamespace(num_inputs=len(ins), num_outputs=len(outs), get_input=ins.__getitem__,
                                get_output=outs.__getitem__)
    trt_check.check_network(net, io)
    ins[1] = tensor(ins[1].name, "INT32", ins[1].shape)  # the parser cast ids to int32
    with pytest.raises(RuntimeError, match=r"not the I/O the runtime binds.*int64.*int32"):
        trt_check.check_network(net, io)


def test_build_warnings_keep_what_matters():
    log = ("[I] building\n[W] ModelImporter.cpp:1071: Make sure input ids has Int64 binding.\n"
           "[W] 'colored' module is not installed, will not use colors\n"
           "[W] [TRT] Weights [name=conv] had the following issues when converted to BF16: subnormal values\n")
    assert trt_check.build_warnings(log) == [
        "[W] [TRT] Weights [name=conv] had the following issues when converted to BF16: subnormal values"]
