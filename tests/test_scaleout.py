"""`--ray` on a local cluster of two CPU actors: `sdvg-rt run` gives the local run's videos and records bit
for bit; with an actor killed (SIGKILL of its process) while it holds a prompt, the prompt is re-queued
and finished elsewhere, nothing lost, nothing written twice; `sdvg-rt sweep --ray` gives the local sweep's
frames. One local Ray instance for the module."""
import functools
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

import sdvg_rt.profiles as profiles  # noqa: E402
from sdvg_rt.checkpoints.synthetic import make_synthetic_set  # noqa: E402
from sdvg_rt.cli import main  # noqa: E402
from sdvg_rt.scaleout import Placement, RunJob, execute  # noqa: E402

pytestmark = pytest.mark.slow

SMALL_VIDEO = "video: {width: 32, height: 32, latent_frames: 3, frames_per_block: 1}"
PROMPTS = ["a red fox in the snow", "a city at night", "a boat on a lake", "a dog on a beach", "rain on a window"]
TIMING = ("wall_time_s", "times_ms", "prepare_ms", "blocks", "totals", "peak_gpu_memory_bytes",
          "target_only_estimate_s", "speedup_estimate")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "sdvg-rt-tiny-set"
    if not (root / "ImageReward").exists():
        make_synthetic_set(root, "tiny", 0, log=None)
    text = (profiles.DEMO_PROFILE.read_text().replace("root: cache://synthetic/tiny", f"root: {root}")
            .replace("video: {width: 64, height: 64, latent_frames: 9, frames_per_block: 3}", SMALL_VIDEO)
            .replace("window_frames: 9", "window_frames: 3"))
    folder = tmp_path_factory.mktemp("scaleout")
    (folder / "small.yaml").write_text(text)
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return folder


@pytest.fixture
def one_thread():  # the actors run torch on one thread each (CPU numbers depend on the thread count)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def local_run(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", str(small / "prompts.txt"), "--profile", str(small / "small.yaml"), "--out", str(out),
                     "--quiet"]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def _same_outputs(a: Path, b: Path):
    from sdvg_rt.video import read_video

    vids = sorted(p.name for p in a.glob("*.mp4"))
    assert len(vids) == len(PROMPTS) and vids == sorted(p.name for p in b.glob("*.mp4"))
    for v in vids:
        assert np.array_equal(read_video(a / v), read_video(b / v)), v
        assert (a / v).read_bytes() == (b / v).read_bytes(), v
        ra, rb = (json.loads((d / v).with_suffix(".json").read_text()) for d in (a, b))
        assert [x["decision"] for x in ra["blocks"]] == [x["decision"] for x in rb["blocks"]]
        assert [x["min_score"] for x in ra["blocks"]] == [x["min_score"] for x in rb["blocks"]]
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}
    assert not [p for p in b.iterdir() if ".tmp-" in p.name]


def test_run_on_ray_matches_local(cluster, small, local_run, tmp_path):
    out = tmp_path / "ray"
    assert main(["run", str(small / "prompts.txt"), "--profile", str(small / "small.yaml"), "--out", str(out),
                 "--quiet", "--ray", "--ray-workers", "2", "--ray-cpus-per-worker", "1"]) == 0
    _same_outputs(local_run, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated"] == len(PROMPTS) and all(e["status"] == "generated" for e in summary["prompts"])


def test_actor_killed_mid_way(cluster, small, local_run, tmp_path):
    from sdvg_rt.cli import output_stem, read_prompts
    from sdvg_rt.profiles import load_profile

    out = tmp_path / "ray-kill"
    out.mkdir()
    from sdvg_rt.batch import plan

    prompts, _ = read_prompts(small / "prompts.txt")
    prof = load_profile(small / "small.yaml")
    _, todo = plan(prof, prompts, out)  # the entries sdvg-rt run hands to run_on_ray, with their provenance
    units = [dict(e, key=e["video"]) for e in todo]
    assert [u["video"] for u in units] == [f"{output_stem(i, t, len(prompts))}.mp4" for i, (_, t) in enumerate(prompts)]
    killed, pids, submitted = [], {}, []

    def on_event(kind, info):
        if kind == "started":
            pids.update(enumerate(ray.get([a.pid.remote() for a in info["actors"]])))
        elif kind == "submitted":
            submitted.append(info["unit"]["key"])
            if len(submitted) == 3 and not killed:  # the first actor back takes its second prompt: kill it now
                os.kill(pids[info["index"]], signal.SIGKILL)
                killed.append(info["unit"]["key"])
    make_job = functools.partial(RunJob, prof, str(out), [u["prompt"] for u in units], False)
    rep = execute(units, make_job, use_ray=True, placement=Placement(workers=2, cpus_per_worker=1),
                  on_event=on_event, tick_s=0.2)
    assert killed and rep.retries == 1
    assert submitted.count(killed[0]) == 2  # handed out again, once
    assert sorted(rep.results) == sorted(u["key"] for u in units)
    _same_outputs(local_run, out)  # every prompt once, bit for bit the local run's


def test_sweep_on_ray_matches_local(cluster, small, tmp_path, one_thread):
    args = ["sweep", str(small / "prompts.txt"), "--profile", str(small / "small.yaml"), "--taus", "-0.3,inf",
            "--quiet", "--no-plots", "--metrics", "psnr"]
    assert main(args + ["--out", str(tmp_path / "local")]) == 0
    assert main(args + ["--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2", "--ray-cpus-per-worker",
                        "1"]) == 0
    rows = {d: {(r["key"], r["setting"]): r for r in json.loads((tmp_path / d / "sweep.json").read_text())["rows"]}
            for d in ("local", "ray")}
    assert len(rows["local"]) == len(PROMPTS) * 4 and rows["local"].keys() == rows["ray"].keys()
    for k, r in rows["local"].items():
        assert r["frames_sha256"] == rows["ray"][k]["frames_sha256"] and r["decisions"] == rows["ray"][k]["decisions"]
        assert r["psnr_db"] == rows["ray"][k]["psnr_db"]


def test_worker_error_stops_the_run_with_that_error(cluster, small, tmp_path):
    from sdvg_rt.errors import CheckpointError
    from sdvg_rt.profiles import load_profile

    text = (small / "small.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("\n".join(f"root: {tmp_path / 'no-checkpoints-here'}" if line.startswith("root:") else line
                             for line in text.splitlines()))
    prof = load_profile(bad)
    units = [{"key": "000-x.mp4", "index": 0, "line": 1, "prompt": "x", "video": "000-x.mp4", "record": "000-x.json"}]
    with pytest.raises(CheckpointError, match="no-checkpoints-here"):
        execute(units, functools.partial(RunJob, prof, str(tmp_path), ["x"], False), use_ray=True,
                placement=Placement(workers=1, cpus_per_worker=1))
    assert not list(tmp_path.glob("000-x*"))
