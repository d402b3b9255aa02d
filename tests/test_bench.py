"""The benchmark's host logic: fixed acceptance patterns and the loop's benchmark-only override."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdvg_rt.bench import accept_pattern

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("rate,blocks,accepts", [(1.0, 7, 6), (0.8, 7, 5), (0.5, 7, 3), (0.0, 7, 0), (0.8, 3, 2)])
def test_accept_pattern_counts(rate, blocks, accepts):
    pat = accept_pattern(rate, blocks)
    assert len(pat) == blocks
    assert sum(pat[1:]) == accepts  # block 0 is forced whatever the pattern says


def test_accept_pattern_spreads_rejects():
    rejects = [i for i, ok in enumerate(accept_pattern(0.5, 7)) if not ok]
    assert len(rejects) == 3 and all(1 <= i <= 6 for i in rejects)
    assert len({b - a for a, b in zip(rejects, rejects[1:])}) == 1  # evenly spaced


def test_kernel_check_reports_kernels_as_accurate_as_eager():
    """The benchmark's self-check of the Triton kernels (run here under the CPU interpreter, tiny shapes):
    every group is within bf16 noise of the fp32 evaluation, like the eager bf16 groups."""
    import torch
    from sdvg_rt.bench import kernel_check
    from sdvg_rt.models import dit_kernels
    from sdvg_rt.models.wan_dit import PRESETS

    if not dit_kernels.AVAILABLE:
        pytest.skip("needs triton (test extra)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = kernel_check(PRESETS["tiny-target"], dev, grid=(2, 3, 4), vae_grid=(2, 3, 5))["kernels_rel_err"]
    assert set(out) == {"residual_ln", "qk_to_cache q", "qk_to_cache k", "vae norm_silu"}
    for kern, eager in out.values():
        assert 0 < eager < 1e-2
        # Triton's CPU interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest), which
        # doubles to triples the rounding error of the kernels that round intermediates (the VAE's norm rounds
        # four times); on the GPU the benchmark reports kernel and eager errors alike
        assert 0 < kern < (1.5 if dev.type == "cuda" else 4) * eager


def test_full_size_on_a_cpu_machine_is_refused_with_the_fit_table(monkeypatch, capsys):
    import sdvg_rt.bench as bench
    from sdvg_rt.cli import main
    from sdvg_rt.errors import OutOfMemoryError

    monkeypatch.setattr(bench, "host_available_bytes", lambda: 24 * 2**30)  # this machine's size, not the host's
    built = []
    monkeypatch.setattr(bench, "build_runtime", lambda *a, **k: built.append(1))
    assert main(["bench", "--device", "cpu"]) == OutOfMemoryError.exit_code
    err = capsys.readouterr().err
    assert "does not fit" in err and "target weights" in err and "--size tiny" in err and not built
    bench.check_bench_fits("tiny", bench.torch.device("cpu"))  # the tiny size fits


def test_commit_overlap_counts_target_commit_time_beside_the_drafter_side():
    from sdvg_rt.bench import commit_overlap

    home = [(1, "draft_denoise", 0.0, 10.0), (1, "vae_decode_scratch", 10.0, 15.0), (2, "draft_denoise", 20.0, 30.0)]
    target = [(0, "target_denoise", 0.0, 4.0), (1, "target_commit", 12.0, 22.0), (2, "target_commit", 40.0, 45.0)]
    ov = commit_overlap(home, target)
    # block 1's commit runs beside the VAE (12-15) and block 2's draft (20-22): 5 of its 10 ms; block 2's alone
    assert ov["target_commit_ms"] == 15 and ov["overlapped_ms"] == 5 and ov["overlap"] == pytest.approx(1 / 3)
    assert ov["home_busy_ms"] == 25 and ov["target_busy_ms"] == 19
    assert commit_overlap(home, target[:1])["overlap"] is None  # no commits: nothing to hide


def test_devices_option_parses_placements():
    import argparse

    from sdvg_rt import bench

    p = argparse.ArgumentParser()
    bench._args(p)
    assert p.parse_args([]).devices == ["one"]
    assert p.parse_args(["--devices", "one,split"]).devices == ["one", "split"]
    assert p.parse_args(["--devices", "split"]).devices == ["split"]
    for bad in ("two", "one,one", ""):
        with pytest.raises(SystemExit):
            p.parse_args(["--devices", bad])
    prof = bench.bench_profile("tiny", bench.torch.device("cuda"), "split")  # no GPU needed to build it
    assert (prof.devices.drafter, prof.devices.vae, prof.devices.scorer, prof.devices.target) == \
        ("cuda:0", "cuda:0", "cuda:0", "cuda:1")
    cpu = bench.torch.device("cpu")
    assert bench.bench_placement(bench.bench_profile("tiny", cpu, "split"), cpu, "split").target_apart


@pytest.mark.slow
def test_bench_runs_end_to_end_on_the_tiny_cpu_profile(tmp_path):
    """``tools/bench.py --size tiny --device cpu --devices one,split`` (its own process, as a user runs it):
    exit 0, the graph self-check reported as not run (CPU), every mode's video reported with its decisions
    for both placements (the split through the two-device path on the CPU), the split's outputs equal to
    the one device's, and its target commits measured against the drafter side's timeline."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--size", "tiny", "--device", "cpu",
                        "--repeats", "1", "--devices", "one,split", "--json", str(out)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    sc = res["self_check"]  # no CUDA: no graphs, so no comparison that could not fail
    assert sc["graph_check"].startswith("not run") and sc["latents_equal"] is None
    assert sc["sync_check"].startswith("not run")
    assert "CUDA-graph replay vs eager: not run" in r.stdout
    modes = [(r["devices"], r["mode"], r["accept_rate_set"]) for r in res["e2e"]]
    assert modes == [(d, m, a) for d in ("one", "split")
                     for m, a in (("target", None), ("draft", None), ("sdvg", 1.0), ("sdvg", 0.8))]
    same = res["split"]["same_as_one_device"]
    assert same["latents_equal"] and same["frames_equal"] and same["decisions"] == ["forced", "rejected", "accepted"]
    split = {(r["mode"], r["accept_rate_set"]): r for r in res["e2e"] if r["devices"] == "split"}
    assert split[("sdvg", 1.0)]["commit_overlap"]["target_commit_ms"] > 0  # the CPU runs them in turn: 0% overlap
    assert {t["name"] for t in split[("sdvg", 1.0)]["timeline"]} >= {"draft_denoise", "score", "target_commit"}
    dec = {(r["mode"], r["accept_rate_set"]): r["decisions"] for r in res["e2e"]}
    assert set(dec[("target", None)]) == {"F"} and set(dec[("draft", None)]) == {"A"}
    assert dec[("sdvg", 1.0)][0] == "F" and set(dec[("sdvg", 1.0)][1:]) == {"A"}
    assert "| one | target |" in r.stdout and "| split | sdvg |" in r.stdout  # the markdown table
    assert "latents bit-identical: True, frames identical: True" in r.stdout


@pytest.mark.slow
def test_bench_fp8_with_the_drafter_on_the_tiny_cpu_profile(tmp_path):
    """``tools/bench.py --quantization fp8 --fp8-drafter`` on the tiny CPU profile (the fp8 layers' dequantized
    reference path): exit 0; the fp8-target rows, then the drafter quantized with the same settings, its
    accuracy in draft mode, its block and commit times and every video again; the markdown's three columns."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--size", "tiny", "--device", "cpu",
                        "--repeats", "1", "--modes", "target,sdvg", "--accept-rates", "0.8", "--quantization", "fp8",
                        "--fp8-drafter", "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    f = json.loads(out.read_text())["fp8"]
    d = f["drafter"]
    # tiny-target: 3 blocks, 1 quantized; the tiny drafter's 2 are its first and last, kept in bf16 by default, so
    # its part checks the plumbing (the same quantize_part as the target's), not fp8 maths
    assert f["quantized_blocks"] == 1 and d["blocks"] == 2 and d["quantized_blocks"] == 0
    assert [(x["mode"], x["accept_rate_set"]) for x in d["e2e"]] == [("target", None), ("sdvg", 0.8)]
    assert [(x["mode"], x["accept_rate_set"]) for x in f["e2e"]] == [("target", None), ("sdvg", 0.8)]
    assert len(d["accuracy"]["blocks"]) == 3 and d["components"]["drafter_block_ms"] > 0
    assert "| mode | accept | bf16 fps | fp8 target fps | fp8 both fps |" in r.stdout
    assert "Accuracy of the fp8 drafter (draft mode) against bf16" in r.stdout
