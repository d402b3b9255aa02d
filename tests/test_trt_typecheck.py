"""Static check of every TensorRT call in the backend and the builder against ``tensorrt-stubs``.

TensorRT cannot be installed here, so its Python API is checked with mypy against the type stubs
(``pip install --no-deps tensorrt-stubs``; its declared dependency is the unreachable real wheel).
The stubs (10.13) are generated from pybind11 and have three kinds of syntax errors (a parameter
named ``in``, non-default parameters after defaults); a sanitised copy goes to ``tmp_path``, put on
``MYPYPATH`` (the package ships no ``py.typed``, so mypy would not read it in site-packages).
A control file with wrong calls proves the stubs are active: mypy must flag exactly those lines.
(Return types are not checked: the stubs shadow ``bool`` with a module attribute, so ``-> bool`` reads
as Any; argument counts, argument types and attribute names are.)
"""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECKED = [REPO / "runtime" / "backends" / "tensorrt_backend.py", REPO / "export" / "build.py"]

CONTROL = '''\
import tensorrt as trt

def wrong(ctx: trt.IExecutionContext, engine: trt.ICudaEngine) -> None:
    ctx.execute_async_v3()                                   # line 4: missing stream handle
    ctx.set_tensor_address("x", "not an address")            # line 5: str for int
    engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGE)  # line 6: no such member
    trt.Runtime()                                            # line 7: missing logger
'''

MYPY_INI = """\
[mypy]
python_version = {py}
check_untyped_defs = True
ignore_missing_imports = True
follow_imports = skip
[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]
follow_imports = normal
ignore_errors = True
"""


def _stub_root() -> Path:
    spec = importlib.util.find_spec("tensorrt")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        root = Path(loc).parent
        if (root / "tensorrt" / "__init__.pyi").is_file() and (root / "tensorrt_bindings" / "tensorrt.pyi").is_file():
            return root
    pytest.skip("tensorrt-stubs is not installed (CI: pip install --no-deps tensorrt-stubs)")


def _sanitise(text: str) -> str:
    """Fix the generated stubs' syntax: rename parameters called ``in``; give a default to a parameter
    that follows one with a default."""
    out = []
    for line in text.split("\n"):
        if line.lstrip().startswith("def "):
            line = re.sub(r"([(,]\s*)in:", r"\1in_:", line)
            m = re.match(r"^(\s*def \w+\()(.*)(\)\s*->.*)$", line)
            if m:
                params, seen_default = m.group(2).split(", "), False
                for i, p in enumerate(params):
                    if "=" in p:
                        seen_default = True
                    elif seen_default and ":" in p and not p.startswith("*"):
                        params[i] = p + " = ..."
                line = m.group(1) + ", ".join(params) + m.group(3)
        out.append(line)
    return "\n".join(out)


def test_tensorrt_calls_match_the_stubs(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (CI: pip install mypy)")
    root = _stub_root()
    stubs = tmp_path / "stubs"
    for pkg in ("tensorrt", "tensorrt_bindings"):
        for f in (root / pkg).glob("*.pyi"):
            dst = stubs / pkg / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = _sanitise(f.read_text())
            ast.parse(text)  # the copy is valid Python
            dst.write_text(text)
    (tmp_path / "mypy.ini").write_text(MYPY_INI.format(py=f"{sys.version_info.major}.{sys.version_info.minor}"))
    control = tmp_path / "control.py"
    control.write_text(CONTROL)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "mypy.ini"), "--cache-dir", str(tmp_path / "c"),
         "--no-error-summary", "--show-error-codes", *map(str, CHECKED), str(control)],
        capture_output=True, text=True, cwd=REPO, env={"MYPYPATH": str(stubs), "PATH": "/usr/bin:/bin"}, timeout=120)
    errors = [ln for ln in proc.stdout.splitlines() if ": error:" in ln]
    ours = [ln for ln in errors if not ln.startswith(str(control))]
    assert ours == [], "wrong TensorRT calls:\n" + "\n".join(ours)
    flagged = sorted({int(ln.split(":")[1]) for ln in errors if ln.startswith(str(control))})
    assert flagged == [4, 5, 6, 7], proc.stdout + proc.stderr  # the stubs are active and strict
