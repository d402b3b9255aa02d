"""Engine manifests (staleness, hashes, errors) and the I/O spec (profile -> shapes, ranges, buffers)."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from sdvg_rt import io_spec
from sdvg_rt.errors import EngineMismatchError
from sdvg_rt.kv_cache import KVCache
from sdvg_rt.manifest import (
    HASH_CACHE_NAME, EngineRecord, Expected, HashCache, Manifest, PlanRecord, check_engines, load_manifest,
    onnx_stale_reasons, plan_stale_reasons, read_manifest, rebuild_command, sha256_file, write_manifest,
)
from sdvg_rt.profiles import PROFILES_DIR, load_profile

TINY = PROFILES_DIR / "tiny.yaml"
PAPER = PROFILES_DIR / "paper-832x480.yaml"


# --------------------------------------------------------------------------------------------------
# io_spec

def test_paper_profile_shapes_and_ranges():
    ios = io_spec.engine_ios(load_profile(PAPER))
    assert sorted(ios) == ["drafter.context", "drafter.step", "scorer", "target.context", "target.step",
                           "vae.first", "vae.step"]
    t = ios["target.step"]
    # 14B: 40 layers x (x, t, rope x2, ctx_kv) + 4 past segments per layer; outputs flow + 2 per layer
    assert len(t.inputs) == 5 + 4 * 40 and len(t.outputs) == 1 + 2 * 40 and t.dtype == "bfloat16"
    opt = t.shapes(t.dims("opt"))
    assert opt["x"] == opt["flow"] == (1, 16, 3, 60, 104)
    assert opt["k_new.39"] == (4680, 40, 128) and opt["ctx_kv"] == (40, 2, 512, 40, 128)
    # 21-frame window = the whole video: the past grows to 6 blocks, never a tail; opt = the median block
    assert (t.axis("P_head").min, t.axis("P_head").opt, t.axis("P_head").max) == (0, 3 * 4680, 6 * 4680)
    prof = t.profile()
    assert prof["k_head.0"] == ((0, 40, 128), (14040, 40, 128), (28080, 40, 128))
    assert "x" not in prof  # static inputs need no profile entry
    assert t.dynamic_axes()["v_tail.7"] == {0: "P_tail"}
    s = ios["scorer"]
    assert s.dtype == "float32" and s.inputs[0].dtype == "bfloat16"  # fp32 scorer reads the bf16 VAE frames
    assert s.profile()["frames"] == ((1, 3, 9, 480, 832), (1, 3, 12, 480, 832), (1, 3, 12, 480, 832))
    first, step = ios["vae.first"], ios["vae.step"]
    assert first.shapes()["frames"] == (1, 3, 9, 480, 832) and step.shapes()["frames"] == (1, 3, 12, 480, 832)
    assert not any(n.startswith("state_in") for n in first.input_names) and len(step.inputs) == 1 + 32
    assert step.shapes()["state_in.31"] == (1, 96, 2, 480, 832)
    # the 1.76 GiB VAE state of wan-models.md §5, from the spec's buffer planning
    state = sum(b for n, b in step.nbytes().items() if n.startswith("state_in"))
    assert abs(state / 2**30 - 1.76) < 0.01


def test_ring_segments_follow_the_kv_cache_slots():
    prof = load_profile(TINY, latent_frames=15, window_frames=9, sink_frames=3)
    geo = io_spec.profile_geometry(prof)
    cfg = io_spec.model_configs(prof)["drafter"]
    cache = KVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, geo.tokens_per_frame, 3, 9, 3,
                    dtype=torch.float32)
    io = io_spec.dit_step_io("drafter", cfg, geo, "fp32")
    n = geo.tokens_per_block
    seen = []
    for b in range(geo.num_blocks):
        s = cache.slots(b)
        seg = geo.dit_segments(geo.kv_cache(cfg), b)
        assert seg == {"P_head": s.write_start, "P_tail": s.read_end - s.write_start - n}
        shapes = io.shapes(seg)  # inside the engine's range for every block
        assert shapes["k_head.0"][0] + n + shapes["k_tail.0"][0] == s.read_end
        seen.append(seg)
    assert seen[0] == {"P_head": 0, "P_tail": 0}
    assert any(s["P_head"] and s["P_tail"] for s in seen)  # a ring block with both segments
    with pytest.raises(ValueError, match="outside the engine's range"):
        io.shapes({"P_head": io.axis("P_head").max + 1, "P_tail": 0})


def test_engine_hashes_change_only_with_what_changes_the_engine():
    base = load_profile(TINY)
    h0 = io_spec.engine_hashes(base)
    assert h0 == io_spec.engine_hashes(base.replace(tau=-0.3, seed=5))  # sampling never rebuilds
    h_target = io_spec.engine_hashes(base.replace(models__target="tiny"))
    assert h_target["drafter.step"] == h0["drafter.step"] and h_target["vae.step"] == h0["vae.step"]
    assert h_target["target.step"] != h0["target.step"]
    h_res = io_spec.engine_hashes(base.replace(width=32, height=32))
    assert all(h_res[k] != h0[k] for k in ("drafter.step", "vae.first", "scorer"))
    assert h_res["drafter.context"] == h0["drafter.context"]  # the text path has no video shape
    assert io_spec.normalize_parts("imagereward, vae") == ["vae", "scorer"]
    with pytest.raises(ValueError, match="unknown part 'unet'"):
        io_spec.normalize_parts(["unet"])


def test_allocate_plans_buffers_at_the_max_of_every_axis():
    io = io_spec.engine_ios(load_profile(TINY))["scorer"]
    bufs = io.allocate(["frames", "rewards"])
    assert bufs["frames"].shape == (1, 3, 12, 64, 64) and bufs["frames"].dtype == torch.float32
    assert bufs["rewards"].shape == (12,)
    assert io.nbytes({"N": 9})["frames"] == 3 * 9 * 64 * 64 * 4


# --------------------------------------------------------------------------------------------------
# manifest

def _record(folder, name="drafter.step", ckpt=None, hashes=None, plan=True, **over):
    onnx = folder / "onnx" / f"{name}.onnx"
    onnx.parent.mkdir(parents=True, exist_ok=True)
    onnx.write_bytes(b"onnx-" + name.encode())
    p = None
    if plan:
        (folder / f"{name}.plan").write_bytes(b"plan-bytes")
        p = PlanRecord(file=f"{name}.plan", size=10, sha256=sha256_file(folder / f"{name}.plan"),
                       tensorrt_version="10.13.0", polygraphy_version="0.49.22", gpu_name="NVIDIA H100 80GB HBM3",
                       compute_capability=(9, 0), build={"opt_level": 3}, built="now",
                       mtime_ns=(folder / f"{name}.plan").stat().st_mtime_ns)
    rec = EngineRecord(name=name, part=name.split(".")[0], part_hash="ph", io={}, io_hash="ih",
                       onnx=str(onnx.relative_to(folder)), onnx_size=onnx.stat().st_size,
                       onnx_sha256=sha256_file(onnx), opset=22, exporter="torchscript", dtype="bfloat16",
                       checkpoints={"drafter": hashes.record(ckpt)} if ckpt else {}, plan=p,
                       onnx_files={onnx.name: hashes.record(onnx)})
    return dataclasses.replace(rec, **over)


def _expected(ckpt, **over):
    kw = dict(part_hashes={"drafter.step": "ph"}, io_hashes={"drafter.step": "ih"},
              checkpoints={"drafter.step": {"drafter": ckpt}}, tensorrt_version="10.13.0",
              gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), build={"opt_level": 3})
    kw.update(over)
    return Expected(**kw)


def test_staleness_reasons(tmp_path):
    ckpt = tmp_path / "dit.pt"
    ckpt.write_bytes(b"weights-v1")
    hashes = HashCache(tmp_path / "h.json")
    rec = _record(tmp_path, ckpt=ckpt, hashes=hashes)
    exp = _expected(ckpt)
    assert plan_stale_reasons(tmp_path, rec, "drafter.step", exp, hashes) == []

    def why(**over):
        return " | ".join(plan_stale_reasons(tmp_path, rec, "drafter.step", _expected(ckpt, **over), hashes))

    assert "TensorRT version changed (built with 10.13.0, installed 11.0.1)" in why(tensorrt_version="11.0.1")
    assert "compute capability 9.0; this GPU is NVIDIA A100, 8.0" in why(gpu_name="NVIDIA A100",
                                                                        compute_capability=(8, 0))
    assert "GPU changed (built on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H100 PCIe)" in why(
        gpu_name="NVIDIA H100 PCIe")
    assert "build setting opt_level changed (3 -> 5)" in why(build={"opt_level": 5})
    assert "profile changed" in why(part_hashes={"drafter.step": "other"})
    assert "I/O shapes changed" in why(io_hashes={"drafter.step": "other"})
    assert why(tensorrt_version=None, gpu_name=None, compute_capability=None, build=None) == ""  # --onnx-only view
    assert "has no TensorRT plan yet" in " ".join(
        plan_stale_reasons(tmp_path, dataclasses.replace(rec, plan=None), "drafter.step", exp, hashes))
    assert onnx_stale_reasons(tmp_path, dataclasses.replace(rec, plan=None), "drafter.step", exp, hashes) == []
    assert "never built" in onnx_stale_reasons(tmp_path, None, "drafter.step", exp, hashes)[0]
    (tmp_path / "drafter.step.plan").write_bytes(b"plan")  # truncated
    assert "interrupted build" in why()
    (tmp_path / "drafter.step.plan").unlink()
    assert "plan file" in why() and "is missing" in why()


def test_checkpoint_hash_is_cached_by_size_and_mtime(tmp_path):
    ckpt = tmp_path / "dit.pt"
    ckpt.write_bytes(b"weights-v1")
    hashes = HashCache(tmp_path / "h.json")
    rec = _record(tmp_path, ckpt=ckpt, hashes=hashes)
    hashes.save()
    fresh = HashCache(tmp_path / "h.json")
    assert plan_stale_reasons(tmp_path, rec, "drafter.step", _expected(ckpt), fresh) == []
    assert fresh.hashed == []  # size and mtime unchanged: not read again
    st = os.stat(ckpt)
    ckpt.write_bytes(b"weights-v2")  # same size, new content
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reasons = plan_stale_reasons(tmp_path, rec, "drafter.step", _expected(ckpt), fresh)
    assert fresh.hashed == [str(ckpt.resolve())] and "drafter checkpoint changed" in reasons[0]
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))  # touched, same content as recorded?
    ckpt.write_bytes(b"weights-v1")
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 3 * 10**9))
    assert plan_stale_reasons(tmp_path, rec, "drafter.step", _expected(ckpt), fresh) == []  # re-hashed, same


def test_check_engines_error_has_the_rebuild_command(tmp_path):
    ckpt = tmp_path / "dit.pt"
    ckpt.write_bytes(b"w")
    hashes = HashCache()
    rec = _record(tmp_path, ckpt=ckpt, hashes=hashes)
    cmd = rebuild_command("profiles/paper-832x480.yaml", ["drafter"])
    assert cmd == "python -m sdvg_export build --profile profiles/paper-832x480.yaml --parts drafter"
    with pytest.raises(EngineMismatchError, match=r"no engines built for this profile.*\n.*build them with: python -m"):
        check_engines(tmp_path, ["drafter.step"], _expected(ckpt), cmd)
    m = Manifest(profile_name="p", profile_path="p.yaml", profile_hash="h", engines={"drafter.step": rec},
                 sdvg_rt_version="0.1.0", updated="now")
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path, cmd) == m  # round trip, records and tuples included
    assert check_engines(tmp_path, ["drafter.step"], _expected(ckpt), cmd, hashes) == m
    with pytest.raises(EngineMismatchError) as e:
        check_engines(tmp_path, ["drafter.step"], _expected(ckpt, tensorrt_version="11.1.0"), cmd, hashes)
    msg = str(e.value)
    assert "drafter.step: TensorRT version changed" in msg and msg.endswith(f"rebuild with: {cmd}")
    (tmp_path / "manifest.json").write_text("{not json")
    assert load_manifest(tmp_path) is None
    with pytest.raises(EngineMismatchError, match=r"(?s)unreadable.*--force"):
        read_manifest(tmp_path, cmd)


def test_check_engines_keeps_its_hash_cache(tmp_path):
    """Without a cache passed in, check_engines saves the hashes it had to compute (a touched 28 GB checkpoint
    is hashed once, not at every start)."""
    ckpt = tmp_path / "dit.pt"
    ckpt.write_bytes(b"w")
    hashes = HashCache()
    rec = _record(tmp_path, ckpt=ckpt, hashes=hashes)
    cmd = rebuild_command("p.yaml")
    write_manifest(tmp_path, Manifest(profile_name="p", profile_path="p.yaml", profile_hash="h",
                                      engines={"drafter.step": rec}, sdvg_rt_version="0.1.0", updated="now"))
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    check_engines(tmp_path, ["drafter.step"], _expected(ckpt), cmd)
    fresh = HashCache(tmp_path / HASH_CACHE_NAME)
    assert plan_stale_reasons(tmp_path, rec, "drafter.step", _expected(ckpt), fresh) == []
    assert fresh.hashed == []  # the new mtime's hash came from the saved cache


def test_onnx_staleness_compares_content_and_external_data(tmp_path):
    """Same size, new content (the mtime moved) is stale; so is a ``.onnx.data`` the manifest does not know,
    or a recorded one that changed."""
    ckpt = tmp_path / "dit.pt"
    ckpt.write_bytes(b"w")
    hashes = HashCache()
    rec = _record(tmp_path, ckpt=ckpt, hashes=hashes)
    exp = _expected(ckpt)
    onnx = tmp_path / rec.onnx
    st = os.stat(onnx)
    onnx.write_bytes(b"ONNX-" + b"drafter.step")  # same size
    os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "changed (sha256" in " ".join(onnx_stale_reasons(tmp_path, rec, "drafter.step", exp, hashes))
    onnx.write_bytes(b"onnx-drafter.step")
    os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert onnx_stale_reasons(tmp_path, rec, "drafter.step", exp, hashes) == []
    data = onnx.with_name(onnx.name + ".data")
    data.write_bytes(b"weights")
    assert "not in the manifest" in " ".join(onnx_stale_reasons(tmp_path, rec, "drafter.step", exp, hashes))
    rec = dataclasses.replace(rec, onnx_files={**rec.onnx_files, data.name: hashes.record(data)})
    assert onnx_stale_reasons(tmp_path, rec, "drafter.step", exp, hashes) == []
    data.write_bytes(b"weightz")
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 3 * 10**9))
    assert "drafter.step.onnx.data changed" in " ".join(onnx_stale_reasons(tmp_path, rec, "drafter.step", exp, hashes))
    data.unlink()
    assert "is missing" in " ".join(onnx_stale_reasons(tmp_path, rec, "drafter.step", exp, hashes))


def test_runtime_check_needs_only_the_plans(tmp_path):
    """A plans-only deployment (no ONNX, no checkpoints) passes the runtime's check; a replaced plan of the
    same size does not; the builder's view still wants the ONNX."""
    ckpt = tmp_path / "dit.pt"
    ckpt.write_bytes(b"w")
    hashes = HashCache()
    rec = _record(tmp_path, ckpt=ckpt, hashes=hashes)
    cmd = rebuild_command("p.yaml")
    write_manifest(tmp_path, Manifest(profile_name="p", profile_path="p.yaml", profile_hash="h",
                                      engines={"drafter.step": rec}, sdvg_rt_version="0.1.0", updated="now"))
    (tmp_path / rec.onnx).unlink()
    ckpt.unlink()
    assert check_engines(tmp_path, ["drafter.step"], _expected(ckpt), cmd, HashCache())
    assert "is missing" in " ".join(plan_stale_reasons(tmp_path, rec, "drafter.step", _expected(ckpt), HashCache()))
    plan = tmp_path / "drafter.step.plan"
    st = os.stat(plan)
    plan.write_bytes(b"PLAN-bytes")  # same size, other content
    os.utime(plan, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(EngineMismatchError, match="plan file .* changed"):
        check_engines(tmp_path, ["drafter.step"], _expected(ckpt), cmd, HashCache())


def test_tensorrt_rtx_plans_are_checked_by_flavour_and_target_list(tmp_path):
    ckpt = tmp_path / "dit.pt"
    ckpt.write_bytes(b"w")
    hashes = HashCache()
    rec = _record(tmp_path, ckpt=ckpt, hashes=hashes)
    rtx = dataclasses.replace(rec, plan=dataclasses.replace(
        rec.plan, flavour="tensorrt_rtx", tensorrt_version="1.7.1.116", gpu_name=None, compute_capability=None,
        targets=((8, 0), (8, 6), (8, 9), (12, 0))))

    def why(r, **over):
        return " | ".join(plan_stale_reasons(tmp_path, r, "drafter.step", _expected(ckpt, **over), hashes))

    # the builder's view (no GPU): flavour, version and target list
    build = dict(tensorrt_version="1.7.1.116", gpu_name=None, compute_capability=None, flavour="tensorrt_rtx")
    assert why(rtx, targets=((8, 0), (8, 6), (8, 9), (12, 0)), **build) == ""
    assert "target compute capabilities changed (8.0, 8.6, 8.9, 12.0 -> 8.9)" in why(rtx, targets=((8, 9),), **build)
    assert "TensorRT flavour changed (built with tensorrt, this run uses tensorrt_rtx)" in why(rec, **build)
    # the runtime's view: this GPU's compute capability must be a target
    run = dict(tensorrt_version="1.7.1.116", flavour="tensorrt_rtx")
    assert why(rtx, gpu_name="NVIDIA GeForce RTX 4090", compute_capability=(8, 9), **run) == ""
    assert "this GPU (NVIDIA H200) is 9.0" in why(rtx, gpu_name="NVIDIA H200", compute_capability=(9, 0), **run)
    m = Manifest(profile_name="p", profile_path="p.yaml", profile_hash="h", engines={"drafter.step": rtx},
                 sdvg_rt_version="0.1.0", updated="now")
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path, "") == m  # targets survive the JSON round trip as tuples
