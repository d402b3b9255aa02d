"""The C++ embedding library (embed/): build and install it with CMake and the system compiler, build its
test program against the installed copy (find_package) and run it on the tiny models (generation, cancel
from another thread, BusyError, typed errors); build the example (tools/embed) from the library's sources
(add_subdirectory) and check what it prints and its exit status on a typed error."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sdvg_rt.checkpoints.synthetic import make_synthetic_set

from test_serve import small_profile

ROOT = Path(__file__).resolve().parent.parent


def _skip_reason():
    if shutil.which("cmake") is None:
        return "no cmake on this machine"
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        return "no C++ compiler on this machine"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python development headers (Python.h) for this interpreter"
    return None


pytestmark = [pytest.mark.slow,  # compiles and links C++ programs against libpython
              pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def cmake(*args, cwd=None):
    r = subprocess.run(["cmake", *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    """The library built and installed (cmake --install) into a fresh prefix."""
    base = tmp_path_factory.mktemp("embed")
    cmake("-S", ROOT / "embed", "-B", base / "build", f"-DPython3_EXECUTABLE={sys.executable}",
          "-DSDVG_EMBED_TESTS=OFF")
    cmake("--build", base / "build", "-j2")
    cmake("--install", base / "build", "--prefix", base / "prefix")
    assert (base / "prefix" / "include" / "sdvg" / "runtime.hpp").is_file()
    assert list((base / "prefix").glob("lib*/cmake/sdvg/sdvgConfig.cmake"))
    return base / "prefix"


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    tiny = tmp_path_factory.getbasetemp() / "sdvg-rt-tiny-set"  # shared with the other test modules
    make_synthetic_set(tiny, "tiny", 0, log=None)
    return small_profile(tmp_path_factory.mktemp("embed-profile"), tiny)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="2")


def test_library_from_cpp_against_the_installed_package(prefix, profile, tmp_path):
    cmake("-S", ROOT / "embed" / "tests", "-B", tmp_path / "build", f"-DCMAKE_PREFIX_PATH={prefix}")
    cmake("--build", tmp_path / "build", "-j2")
    r = subprocess.run([str(tmp_path / "build" / "sdvg_embed_test"), str(profile), "cpu"], capture_output=True,
                       text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert r.returncode == 0 and "ALL PASSED" in r.stdout, r.stdout + r.stderr
    for check in ("cancel() from another thread -> CancelledError, code 130", "missing profile -> ProfileError",
                  "a concurrent generate() -> BusyError, code 7", "another thread ran Python during the generation",
                  "blocks 0..2 delivered in order"):
        assert f"ok: {check}" in r.stdout, r.stdout
    assert "FAIL" not in r.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """tools/embed built from the library's sources (no installed copy on the prefix path)."""
    build = tmp_path_factory.mktemp("embed-demo")
    cmake("-S", ROOT / "tools" / "embed", "-B", build, f"-DPython3_EXECUTABLE={sys.executable}")
    cmake("--build", build, "-j2")
    return build / "embed_demo"


def test_example_generates_a_video(demo, profile, tmp_path):
    r = subprocess.run([str(demo), str(profile), "a red fox running through fresh snow", "cpu"],
                       capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert re.fullmatch(r"block 0: forced, 1 frames", lines[0])
    assert all(re.fullmatch(r"block [12]: (accepted|rejected), 4 frames", x) for x in lines[1:3])
    assert "frames: 9 on cpu" in lines
    acc = float(re.search(r"acceptance: ([0-9.]+)", r.stdout).group(1))
    assert 0.0 <= acc <= 1.0


def test_example_exits_with_the_runtime_exit_code(demo, tmp_path):
    r = subprocess.run([str(demo), str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 2  # ProfileError.exit_code, passed through by the C++ program
    assert "ProfileError" in r.stderr and "missing.yaml" in r.stderr
