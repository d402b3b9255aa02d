"""Nothing lost, nothing silently wrong: every output write fault is a typed error that leaves no temporary
file, killed runs' temporary files are swept, resume compares what made each video, SIGTERM/SIGHUP end a
run like Ctrl-C, and the package runs from a wheel in an empty folder."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sdvg_rt.video as video
from sdvg_rt.batch import differences, display, output_stem
from sdvg_rt.cli import main
from sdvg_rt.errors import OutputError, ResumeMismatchError
from test_cli import check_video, prompts_file, small_profile


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from sdvg_rt.checkpoints.synthetic import make_synthetic_set

    d = tmp_path_factory.getbasetemp() / "sdvg-rt-tiny-set"  # shared with the other test modules
    make_synthetic_set(d, "tiny", 0, log=None)
    return d


def _error(capsys, argv, code, *needles):
    """The run fails with ``code`` and ends with a one-line error naming every needle, no traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("sdvg-rt: error (") and "Traceback" not in err, err
    for n in needles:
        assert n in last, (n, last)
    return last


def _temps(folder):
    return sorted(p.name for p in Path(folder).iterdir() if video.TMP_PATTERN.search(p.name))


# ---- write faults ------------------------------------------------------------------------------------------
FAULTS = ("read-only", "occupied", "disk-full-video", "disk-full-record", "quota")


@pytest.mark.parametrize("fault", FAULTS)
def test_write_faults_are_typed_errors_and_leave_no_temp_file(fault, tmp_path, tiny_dir, capsys, monkeypatch):
    prof = small_profile(tmp_path, tiny_dir)
    prompts = prompts_file(tmp_path, "a fox\n")
    out = tmp_path / "out"
    out.mkdir()
    stem = output_stem(0, "a fox", 1)
    pid = os.getpid()
    if fault == "read-only":
        if os.geteuid() != 0:
            out.chmod(0o555)
        else:  # root writes through permission bits: the writer meets the EACCES a read-only folder gives
            import av

            def denied(path, *a, **k):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            monkeypatch.setattr(av, "open", denied)
        needles = ("not writable", "writable folder")
    elif fault == "occupied":
        (out / f"{stem}.mp4").mkdir()
        needles = ("a folder", "move it away")
    elif fault.startswith("disk-full"):  # /dev/full: every write fails with ENOSPC, the real error path
        name = f"{stem}.mp4" if fault == "disk-full-video" else f"{stem}.json"
        (out / f"{name}.tmp-{pid}").symlink_to("/dev/full")
        needles = ("disk is full", "free space")
    else:  # quota: the record's writer fails with EDQUOT after creating its temporary file
        real_open = open

        class Failing:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                raise OSError(errno.EDQUOT, "Disk quota exceeded")

        def quota_open(path, mode="r", *a, **k):
            f = real_open(path, mode, *a, **k)
            return Failing(f) if "w" in mode and str(path).endswith(f".json.tmp-{pid}") else f
        monkeypatch.setattr(video, "open", quota_open, raising=False)
        needles = ("quota", "free space")
    try:
        err = _error(capsys, ["run", str(prompts), "--profile", str(prof), "--out", str(out), "--quiet"],
                     OutputError.exit_code, "OutputError", str(out), *needles)
    finally:
        out.chmod(0o755)
    assert _temps(out) == [], err
    assert not (out / f"{stem}.json").exists()  # the prompt is not marked done
    if fault == "occupied":
        assert (out / f"{stem}.mp4").is_dir()


def test_stale_temps_are_removed_by_pattern_pid_and_age(tmp_path):
    dead = tmp_path / "a.mp4.tmp-999999999"  # no such process
    live = tmp_path / f"b.mp4.tmp-{os.getppid()}"  # a live process (the parent), recently written
    old = tmp_path / f"c.json.tmp-{os.getppid()}"  # a live pid, but untouched for two hours: reused pid
    other = tmp_path / "d.mp4.tmp-notapid"  # not this tool's pattern
    for p in (dead, live, old, other):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert sorted(p.name for p in video.remove_stale_temps(tmp_path)) == sorted([old.name, dead.name])
    assert live.exists() and other.exists() and not dead.exists() and not old.exists()


# ---- honest resume -----------------------------------------------------------------------------------------
def test_resume_refuses_other_settings_and_collisions_get_distinct_names(tmp_path, tiny_dir, capsys):
    prof = small_profile(tmp_path, tiny_dir)
    out = tmp_path / "out"
    fox = prompts_file(tmp_path, "a red fox\n")
    run = ["run", str(fox), "--profile", str(prof), "--out", str(out), "--quiet"]
    assert main(run) == 0
    stem = output_stem(0, "a red fox", 1)
    made = (out / f"{stem}.mp4").stat().st_mtime_ns
    rec = json.loads((out / f"{stem}.json").read_text())["provenance"]
    assert rec["prompt"] == "a red fox" and rec["tau"] == -2.0 and rec["seed"] == 0 and rec["mode"] == "sdvg"
    assert set(rec["checkpoints"]) == {"drafter", "target", "vae", "text_encoder", "tokenizer", "scorer"}
    assert all(len(h) == 64 for h in rec["checkpoints"].values()) and rec["code_version"] and rec["profile_hash"]
    capsys.readouterr()
    for extra, diff in ((["--tau", "0.5"], "tau -2.0 -> 0.5"), (["--seed", "3"], "seed 0 -> 3"),
                        (["--mode", "target"], "mode 'sdvg' -> 'target'")):
        _error(capsys, run + extra, ResumeMismatchError.exit_code, stem, diff, "--overwrite", "another --out")
    crf = tmp_path / "crf.yaml"
    crf.write_text(prof.read_text().replace("crf: 18", "crf: 20"))
    _error(capsys, ["run", str(fox), "--profile", str(crf), "--out", str(out)], ResumeMismatchError.exit_code,
           "output.crf 18 -> 20")
    assert (out / f"{stem}.mp4").stat().st_mtime_ns == made  # nothing was touched
    # the same settings: skipped
    assert main(run) == 0 and (out / f"{stem}.mp4").stat().st_mtime_ns == made
    # an edited prompt whose slug is the same gets its own name; the summary lists both finished videos
    shout = tmp_path / "shout.txt"
    shout.write_text("A RED FOX!!\n")
    other = output_stem(0, "A RED FOX!!", 1)
    assert other != stem and other.startswith("000-a-red-fox-")
    assert main(["run", str(shout), "--profile", str(prof), "--out", str(out), "--quiet"]) == 0
    check_video(out / f"{other}.mp4")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated"] == 1 and summary["finished"] == 2
    assert sorted(v["prompt"] for v in summary["videos"]) == ["A RED FOX!!", "a red fox"]
    # --overwrite regenerates with the new settings
    assert main(run + ["--tau", "0.5", "--overwrite"]) == 0
    assert json.loads((out / f"{stem}.json").read_text())["provenance"]["tau"] == 0.5


def test_differences_name_checkpoints_settings_and_missing_provenance():
    new = {"prompt": "p", "seed": 0, "mode": "sdvg", "tau": -0.7, "code_version": "0.1.0", "profile_hash": "b",
           "settings": {"video.width": 64}, "checkpoints": {"target": "f" * 64}}
    old = dict(new, profile_hash="a", settings={"video.width": 32}, checkpoints={"target": "e" * 64})
    assert differences(old, new) == ["profile settings video.width 32 -> 64",
                                     f"checkpoint target sha256 {'e' * 12} -> {'f' * 12}"]
    assert differences(new, new) == []
    assert "no provenance" in differences(None, new)[0]


def test_prompts_reach_the_terminal_escaped():
    assert display("\x1b[2Jwipe\x07") == "\\x1b[2Jwipe\\x07"
    assert display("caf\u00e9") == "caf\u00e9"


def test_version(capsys):
    from sdvg_rt import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sdvg-rt {__version__}"


# ---- real processes: kill -9, SIGTERM, SIGHUP ---------------------------------------------------------------
def _start(prompts, prof, out, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sdvg_rt.cli", "run", str(prompts), "--profile", str(prof),
                             "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_temp(proc, out, limit_s=120.0):
    """Poll until the run is writing a video (its temporary mp4 exists)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if out.is_dir() and any(n.endswith(f".mp4.tmp-{proc.pid}") for n in os.listdir(out)):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the run never started writing a video")


@pytest.mark.slow
def test_kill9_then_rerun_sweeps_the_temp_file_and_finishes(tmp_path, tiny_dir):
    prof = small_profile(tmp_path, tiny_dir)
    prompts = prompts_file(tmp_path, "a cat\n\x1b[2Jwipe\n")
    out = tmp_path / "out"
    proc = _start(prompts, prof, out)
    _wait_for_temp(proc, out)
    proc.kill()  # SIGKILL: no handler runs, the temporary file stays
    proc.wait()
    assert _temps(out)
    # the re-run (a real process, stderr a pipe) removes it, finishes, and writes plain lines
    again = _start(prompts, prof, out)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "removed 1 temporary file(s) of interrupted runs" in err or "removed 2 temporary" in err
    assert _temps(out) == [] and "\r" not in err and "\x1b" not in err
    assert "[2/2] \\x1b[2Jwipe ->" in err  # one line per video, the escape shown escaped
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] == 2 and all((out / v["video"]).is_file() for v in summary["videos"])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_end_the_run_like_ctrl_c(sig, tmp_path, tiny_dir):
    prof = small_profile(tmp_path, tiny_dir)
    prompts = prompts_file(tmp_path, "".join(f"a cat number {i}\n" for i in range(6)))  # outlasts the signal
    out = tmp_path / "out"
    proc = _start(prompts, prof, out)
    _wait_for_temp(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted ({signal.Signals(sig).name})" in err and "Traceback" not in err
    done = [p for p in out.glob("*.json") if p.name != "summary.json"]
    assert _temps(out) == [] and len(done) < 6  # abandoned cleanly: the interrupted video is not marked done
    assert all(p.with_suffix(".mp4").is_file() for p in done)  # a record only beside its finished video


# ---- a wheel, installed, run in an empty folder ---------------------------------------------------------------
@pytest.mark.slow
def test_wheel_install_runs_the_demo_from_an_empty_folder(tmp_path, tiny_dir):
    repo = Path(__file__).resolve().parent.parent
    build = tmp_path / "build-src"  # a copy: the build's own build/ and egg-info stay out of the checkout
    shutil.copytree(repo, build, ignore=shutil.ignore_patterns(".git", ".pypath", "build", "*.egg-info",
                                                               "__pycache__", "synthetic", "outputs", "engines"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(build)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("sdvg_rt-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path)
    cache = tmp_path / "cache"
    shutil.copytree(tiny_dir, cache / "synthetic" / "tiny")  # the demo set the first run would create
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    (empty / "prompts.txt").write_text("a fox\n")
    env = dict(os.environ, PYTHONPATH=str(target), SDVG_RT_CACHE=str(cache), OMP_NUM_THREADS="2")
    where = subprocess.run([sys.executable, "-c", "import sdvg_rt, sdvg_rt.profiles as p; "
                            "print(sdvg_rt.__file__); print(p.DEMO_PROFILE)"],
                           env=env, cwd=empty, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(w).is_relative_to(target) for w in where), where  # the wheel's files, its package data
    r = subprocess.run([str(target / "bin" / "sdvg-rt"), "run", "prompts.txt"], env=env, cwd=empty,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    check_video(next((empty / "outputs").glob("000-a-fox-*.mp4")), frames=33, size=(64, 64))
    assert not list(target.rglob("*.mp4")) and not (target / "sdvg_rt" / "synthetic").exists()
