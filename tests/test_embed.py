"""The C++ embedding example (tools/embed): build it with g++ against libpython, run it on the tiny
synthetic models, and check what it prints and its exit status on a typed error."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sdvg_rt.checkpoints.synthetic import make_synthetic_set
from sdvg_rt.profiles import DEMO_PROFILE

EMBED = Path(__file__).resolve().parent.parent / "tools" / "embed"


def _skip_reason():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++) on this machine"
    if shutil.which("make") is None:
        return "no make on this machine"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python development headers (Python.h) for this interpreter"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


pytestmark = pytest.mark.slow  # compiles and links a C++ program against libpython


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    out = tmp_path_factory.mktemp("embed") / "embed_demo"
    r = subprocess.run(["make", "-s", "-C", str(EMBED), f"PYTHON={sys.executable}", f"OUT={out}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_embedded_runtime_generates_a_video(binary, tmp_path, tmp_path_factory):
    tiny = tmp_path_factory.getbasetemp() / "sdvg-rt-tiny-set"  # shared with the other test modules
    make_synthetic_set(tiny, "tiny", 0, log=None)
    prof = tmp_path / "small.yaml"
    prof.write_text(DEMO_PROFILE.read_text()
                    .replace("root: cache://synthetic/tiny", f"root: {tiny}")
                    .replace("video: {width: 64, height: 64, latent_frames: 9, frames_per_block: 3}",
                             "video: {width: 32, height: 32, latent_frames: 3, frames_per_block: 1}")
                    .replace("window_frames: 9", "window_frames: 3"))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([str(binary), str(prof), "a red fox running through fresh snow", "cpu"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert re.fullmatch(r"block 0: forced, 1 frames", lines[0])
    assert all(re.fullmatch(r"block [12]: (accepted|rejected), 4 frames", x) for x in lines[1:3])
    assert "frames: 9 (32x32)" in lines
    acc = float(re.search(r"acceptance: ([0-9.]+)", r.stdout).group(1))
    assert 0.0 <= acc <= 1.0


def test_embedded_runtime_reports_typed_errors(binary, tmp_path):
    r = subprocess.run([str(binary), str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 2  # ProfileError.exit_code, passed through by the C++ program
    assert "ProfileError" in r.stderr and "missing.yaml" in r.stderr
