"""`sdvg-rt sweep` on the tiny CPU profile: a run killed mid-way (SIGKILL) and resumed makes every record
exactly once and keeps the earlier ones byte for byte; CSV, JSON and plots; tau=+inf equals the
target-only reference bit for bit; a user's metric through the registry; the built-in PSNR and SSIM
against scikit-image's reference functions."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest

import sdvg_rt.metrics as qm
import sdvg_rt.profiles as profiles
from sdvg_rt.checkpoints.synthetic import make_synthetic_set
from sdvg_rt.cli import main
from sdvg_rt.errors import OutputError

SMALL_VIDEO = "video: {width: 32, height: 32, latent_frames: 3, frames_per_block: 1}"
PROMPTS = "a red fox in the snow\na city at night\n\na boat on a lake\n"
TAUS = "-0.3,-2,inf"
SETTINGS = ["target", "draft", "tau-0.3", "tau-2", "tau+inf"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "sdvg-rt-tiny-set"  # shared with the other test modules
    if not (root / "ImageReward").exists():
        make_synthetic_set(root, "tiny", 0, log=None)
    text = (profiles.DEMO_PROFILE.read_text().replace("root: cache://synthetic/tiny", f"root: {root}")
            .replace("video: {width: 64, height: 64, latent_frames: 9, frames_per_block: 3}", SMALL_VIDEO)
            .replace("window_frames: 9", "window_frames: 3"))
    assert SMALL_VIDEO in text
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "small.yaml").write_text(text)
    (folder / "prompts.txt").write_text(PROMPTS)
    return folder


def _sweep_cmd(small, out, *extra):
    return [sys.executable, "-m", "sdvg_rt.cli", "sweep", str(small / "prompts.txt"), "--profile",
            str(small / "small.yaml"), "--taus", TAUS, "--out", str(out), "--quiet", *extra]


def _records(out):
    return sorted(p.relative_to(out).as_posix() for p in (out / "records").rglob("*") if p.is_file())


def decode(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.slow
def test_sweep_killed_then_resumed(small, tmp_path):
    out = tmp_path / "sw"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # both runs: the same threads, so the same numbers
    # 1. killed (SIGKILL, no chance to clean up) once its first records exist
    proc = subprocess.Popen(_sweep_cmd(small, out, "--no-plots"), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "records").exists() and len(_records(out)) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r: (out / r).read_bytes() for r in _records(out)}
    assert 2 <= len(before) < 3 * len(SETTINGS), before.keys()
    # 2. the same command again: only the missing records are made, the earlier ones are kept as they are
    done = subprocess.run(_sweep_cmd(small, out), env=env, stderr=subprocess.PIPE, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{len(before)} of 15 record(s) already in" in done.stderr
    recs = _records(out)
    assert len(recs) == 15 == len(set(recs))
    assert all((out / r).read_bytes() == b for r, b in before.items())
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # the killed run's temporary files are gone
    # 3. tables: one row per prompt x setting, no duplicates; aggregate per setting
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15 and len({(r["key"], r["setting"]) for r in rows}) == 15
    assert sorted({r["setting"] for r in rows}) == sorted(SETTINGS)
    data = json.loads((out / "sweep.json").read_text())
    assert [a["setting"] for a in data["aggregate"]] == SETTINGS and len(data["rows"]) == 15
    with open(out / "sweep_aggregate.csv", newline="") as f:
        assert [r["setting"] for r in csv.DictReader(f)] == SETTINGS
    for name in ("pareto_imagereward_mean", "pareto_ssim", "acceptance_vs_tau", "block_acceptance"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert b"<svg" in (out / "plots" / f"{name}.svg").read_bytes()[:1000]
    # 4. tau=+inf rejects every draft: its video is the target-only one, bit for bit
    by = {(r["key"], r["setting"]): r for r in data["rows"]}
    keys = sorted({r["key"] for r in data["rows"]})
    assert len(keys) == 3
    for k in keys:
        t, inf, draft = by[k, "target"], by[k, "tau+inf"], by[k, "draft"]
        assert inf["frames_sha256"] == t["frames_sha256"] != draft["frames_sha256"]
        assert inf["decisions"] == "FRR" and draft["decisions"] == "AAA" and t["decisions"] == "FFF"
        assert np.array_equal(decode(out / inf["video"]), decode(out / t["video"]))
        assert t["psnr_db"] == "inf" and t["ssim"] == 1.0 and draft["ssim"] < 0.9
        assert by[k, "tau-2"]["decisions"][1:] == "AA" and by[k, "tau-2"]["acceptance_rate"] == 1.0
        assert t["speedup"] == 1.0 and inf["target_wall_time_s"] > 0
    agg = {a["setting"]: a for a in data["aggregate"]}
    assert agg["tau+inf"]["acceptance_rate"] == 0.0 and agg["draft"]["acceptance_rate"] == 1.0
    assert agg["tau+inf"]["imagereward_mean_retention"] == 0.0  # same frames, same reward
    assert agg["tau-2"]["tau"] == -2.0 and agg["tau+inf"]["tau"] == "inf"


class MeanPixel:
    name, columns, needs_reference, ratio = "meanpix", ("meanpix",), False, True

    def __call__(self, frames, *, prompt, reference=None):
        return {"meanpix": float(frames.mean()) + 1.0}


@pytest.mark.slow
def test_user_metric_and_record_checks(small, tmp_path, monkeypatch):
    qm.register("meanpix", lambda ctx: MeanPixel())
    out = tmp_path / "sw"
    args = ["sweep", str(small / "prompts.txt"), "--profile", str(small / "small.yaml"), "--taus", "-0.3",
            "--out", str(out), "--quiet", "--no-videos", "--no-plots", "--metrics", "psnr,meanpix"]
    assert main(args) == 0
    data = json.loads((out / "sweep.json").read_text())
    agg = {a["setting"]: a for a in data["aggregate"]}
    assert agg["target"]["meanpix_retention"] == 1.0
    draft = agg["draft"]
    assert draft["meanpix_retention"] == pytest.approx(draft["meanpix"] / agg["target"]["meanpix"])
    assert "imagereward_mean" not in draft and not (out / "videos").exists()
    # a record that belongs to another sweep is refused, naming the file
    rec = next((out / "records").glob("*/draft.json"))
    bad = json.loads(rec.read_text())
    bad["prompt"] = "something else"
    rec.write_text(json.dumps(bad))
    with pytest.raises(OutputError, match="draft.json"):
        from sdvg_rt.sweep import read_record, units
        u = next(u for u in units([(1, "a red fox in the snow"), (2, "a city at night"), (4, "a boat on a lake")],
                                  [0]) if rec.parent.name == u["key"])
        read_record(rec, u, "draft")
    assert main(args[:-2] + ["--metrics", "nosuch"]) == 1


def test_psnr_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (4, 24, 20, 3), dtype=np.uint8)
    noisy = np.clip(ref.astype(int) + rng.integers(-20, 21, ref.shape), 0, 255).astype(np.uint8)
    noisy[0] = ref[0]
    video, worst = qm.psnr(noisy, ref)
    per = [peak_signal_noise_ratio(r, n, data_range=255) for r, n in zip(ref[1:], noisy[1:])]
    assert worst == pytest.approx(min(per))
    mse = np.mean((noisy.astype(float) - ref) ** 2)
    assert video == pytest.approx(10 * np.log10(255 ** 2 / mse))
    assert qm.psnr(ref, ref) == (float("inf"), float("inf"))
    s = qm.SSIMMetric()(noisy, prompt="", reference=ref)
    want = [structural_similarity(r, n, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False) for r, n in zip(ref, noisy)]
    assert s["ssim"] == pytest.approx(np.mean(want)) and s["ssim_min"] == pytest.approx(min(want))
    assert want[0] == pytest.approx(1.0) and s["ssim_min"] < 0.99
