"""Full-size TensorRT-RTX builds of the paper profile's engines, one part per call, with a short table.

Exports the part's graphs from the synthetic-weight rule's random weights at full size
(``--random-weights``: no checkpoint is read or written), then builds them with TensorRT-RTX ahead of
time for its portable compute capabilities, through the project's own ``python -m sdvg_export build``.
Each stage runs as a child process; the table gives ONNX and plan sizes, wall times and the peak host
memory (max RSS of the child) and whether the build log shows a fused attention kernel.

    python3 tools/trt_full_build.py --parts target --stage export   # 14B: ~28 GB ONNX (external data)
    python3 tools/trt_full_build.py --parts target --stage build    # then the plan
    python3 tools/trt_full_build.py --parts drafter,vae,scorer      # both stages

Disk: the 14B needs its ONNX (~28.6 GB) and its plan (~28-29 GB) at once; ``--drop-onnx`` deletes a part's
ONNX after its plan is built. Run ``--stage export`` and ``--stage build`` as separate commands where one
command may run 10 minutes at most; the engines folder (``--engines-dir``) must survive between them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_stage(args: list[str]) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS of the child in GiB, output tail)."""
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-m", "sdvg_export", "build", *args], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    sys.stdout.write(proc.stdout[-4000:])
    return proc.returncode, time.perf_counter() - t0, max(peak, before) / 2**20, proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="profiles/paper-832x480.yaml")
    ap.add_argument("--parts", default="drafter,vae,scorer,target")
    ap.add_argument("--stage", choices=("export", "build", "all"), default="all")
    ap.add_argument("--engines-dir", default=str(REPO / "engines"))
    ap.add_argument("--device", default=None, help="export device (default: cuda if available)")
    ap.add_argument("--compute-capability", default=None, help="TensorRT-RTX targets (default: its portable set)")
    ap.add_argument("--drop-onnx", action="store_true", help="delete a part's ONNX once its plan is built (disk)")
    a = ap.parse_args()
    common = ["--profile", a.profile, "--random-weights", "--engines-dir", a.engines_dir]
    if a.device:
        common += ["--device", a.device]
    rows = []
    for part in a.parts.split(","):
        base = [*common, "--parts", part]
        if a.stage in ("export", "all"):
            rc, sec, peak, _ = run_stage([*base, "--onnx-only"])
            rows.append((part, "export", rc, sec, peak))
            if rc:
                break
        if a.stage in ("build", "all"):
            extra = ["--tensorrt", "tensorrt_rtx"] + (["--compute-capability", a.compute_capability]
                                                     if a.compute_capability else [])
            rc, sec, peak, _ = run_stage([*base, *extra])
            rows.append((part, "build", rc, sec, peak))
            if rc:
                break
    from sdvg_rt.profiles import load_profile

    folder = Path(a.engines_dir) / load_profile(REPO / a.profile).name
    man = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {"engines": {}}
    print("\nstage            exit   seconds   peak host GiB")
    for part, stage, rc, sec, peak in rows:
        print(f"{part + ' ' + stage:16} {rc:4} {sec:9.1f} {peak:12.1f}")
    print("\nengine            ONNX GiB (+data)   plan GiB   build s   fused attention in log")
    for name, rec in man["engines"].items():
        onnx = folder / rec["onnx"]
        data = onnx.with_name(onnx.name + ".data")
        size = sum(p.stat().st_size for p in (onnx, data) if p.is_file()) / 2**30
        plan = rec.get("plan") or {}
        log = folder / f"{name}.plan.build.log"
        text = log.read_text(errors="replace").lower() if log.is_file() else ""
        fused = "yes" if any(k in text for k in ("mha", "fmha", "flash", "attention")) else ("?" if not text else "no")
        print(f"{name:17} {size:10.2f}        {plan.get('size', 0) / 2**30:8.2f}   "
              f"{plan.get('build', {}).get('seconds', float('nan')):7.1f}   {fused}")
        if a.drop_onnx and plan and a.stage in ("build", "all"):
            for p in (onnx, data):
                p.unlink(missing_ok=True)
    return 0 if all(r[2] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
