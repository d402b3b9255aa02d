#!/usr/bin/env python3
"""Mutation check: apply each one-line mutant of ``mutants.yaml`` to a scratch copy of the tree, run the
tests named for it there, and report which mutants survive (their tests still pass).

    python3 tools/mutants/run.py                 # every mutant
    python3 tools/mutants/run.py sampler-renoise-index decide-tau-strict   # some, by id
    python3 tools/mutants/run.py --list

Each entry: ``id``, ``file`` (relative to the repository root), ``edits`` (a list of [original, mutated]
pairs; each original must occur exactly once in the file) and ``tests`` (pytest arguments, relative to the
root). The scratch copy holds runtime/, export/, tests/, profiles/ and tools/ plus ``.pypath`` links, so the
mutated code is what the tests import (PYTHONPATH points at the copy). Tests run niced, one mutant at a
time; a mutant is killed when its tests fail (or time out). Exit status 1 if any mutant survived.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COPY = ("runtime", "export", "tests", "profiles", "tools", "pyproject.toml")


def load(path: Path) -> list[dict]:
    entries = yaml.safe_load(path.read_text())
    for e in entries:
        missing = {"id", "file", "edits", "tests"} - set(e)
        if missing:
            raise SystemExit(f"{path}: mutant {e.get('id', '?')} lacks {sorted(missing)}")
    return entries


def scratch_tree(dst: Path) -> None:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst / name)
    (dst / ".pypath").mkdir()
    os.symlink("../runtime", dst / ".pypath" / "sdvg_rt")
    os.symlink("../export", dst / ".pypath" / "sdvg_export")


def apply(tree: Path, m: dict) -> str:
    p = tree / m["file"]
    text = p.read_text()
    for orig, new in m["edits"]:
        n = text.count(orig)
        if n != 1:
            raise SystemExit(f"mutant {m['id']}: {orig!r} occurs {n} times in {m['file']} (must be once)")
        text = text.replace(orig, new)
    original = p.read_text()
    p.write_text(text)
    return original


def run_tests(tree: Path, tests: list[str], timeout: int) -> tuple[bool, float]:
    env = dict(os.environ, PYTHONPATH=str(tree / ".pypath"), PYTHONDONTWRITEBYTECODE="1")
    cmd = ["nice", "-n", "10", sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        ok = r.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    return ok, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ids", nargs="*", help="run only these mutants")
    ap.add_argument("--mutants", default=str(Path(__file__).with_name("mutants.yaml")))
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test set")
    a = ap.parse_args(argv)
    entries = load(Path(a.mutants))
    if a.ids:
        unknown = set(a.ids) - {e["id"] for e in entries}
        if unknown:
            raise SystemExit(f"unknown mutant ids: {sorted(unknown)}")
        entries = [e for e in entries if e["id"] in a.ids]
    if a.list:
        for e in entries:
            print(f"{e['id']:32s} {e['file']}  ->  {' '.join(e['tests'])}")
        return 0
    with tempfile.TemporaryDirectory(prefix="sdvg-mutants-") as d:
        tree = Path(d)
        scratch_tree(tree)
        if not a.no_baseline:  # the tests must pass unmutated, or a "kill" means nothing
            for tests in sorted({tuple(e["tests"]) for e in entries}):
                ok, _ = run_tests(tree, list(tests), a.timeout)
                if not ok:
                    raise SystemExit(f"baseline fails (fix the tree first): pytest {' '.join(tests)}")
        rows = []
        for e in entries:
            original = apply(tree, e)
            try:
                ok, secs = run_tests(tree, e["tests"], a.timeout)
            finally:
                (tree / e["file"]).write_text(original)
            rows.append((e["id"], "SURVIVED" if ok else "killed", secs))
            print(f"{e['id']:32s} {rows[-1][1]:8s} {secs:6.1f}s", flush=True)
    print("\n| mutant | result | s |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} |")
    survivors = [r[0] for r in rows if r[1] == "SURVIVED"]
    print(f"\n{len(rows) - len(survivors)}/{len(rows)} killed" + (f"; survivors: {', '.join(survivors)}"
                                                                if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
