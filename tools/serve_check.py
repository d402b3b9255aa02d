"""Serve a profile with `sdvg-rt serve` on 127.0.0.1 and measure it as a client would; print a table.

    python3 tools/serve_check.py --profile profiles/paper-832x480.yaml --jobs 4
    python3 tools/serve_check.py                       # the tiny synthetic demo, on CPU

Steps: start the server (time until /readyz: load + allocate + warm-up); one job streamed over the
WebSocket with raw frames (time to first block from the POST, wall time, fps, blocks in order); ``--jobs``
jobs submitted at once (throughput, every one succeeded); /metrics; SIGTERM during a job (clean exit, no
partial files); finally ``sdvg-rt run`` of the first prompt and seed, its mp4 compared byte for byte with
the served one (after the server has exited, so both never hold the GPU at once).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from websockets.sync.client import connect


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", help="profile YAML (default: the tiny synthetic demo)")
    ap.add_argument("--jobs", type=int, default=4, help="jobs submitted at once")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    ap.add_argument("--prompt", default="a red fox running through fresh snow")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sdvg-serve-check-"))
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, rows = f"http://127.0.0.1:{port}", []
    cmd = [sys.executable, "-m", "sdvg_rt.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--out",
           str(out / "serve"), "--queue-size", str(max(16, args.jobs))]
    if args.profile:
        cmd += ["--profile", args.profile]
    log = open(out / "serve.log", "w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                print(log.read(), file=sys.stderr)
                return 1
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        rows.append(("start (load + allocate + warm-up) until /readyz", f"{time.perf_counter() - t0:.1f} s"))
        ready = requests.get(f"{url}/readyz", timeout=10).json()
        rows.append(("runtimes", ", ".join(ready["runtimes"])))

        # 1. one streamed job
        t = time.perf_counter()
        job = requests.post(f"{url}/v1/videos", json={"prompt": args.prompt, "seed": args.seed}, timeout=30).json()
        ttfb, order, frames = None, [], 0
        with connect(f"ws://127.0.0.1:{port}/v1/videos/{job['id']}/stream", max_size=None) as ws:
            while (msg := json.loads(ws.recv()))["type"] == "block":
                arr = np.frombuffer(ws.recv(), np.uint8).reshape(msg["frames"]["shape"])
                ttfb = ttfb if ttfb is not None else time.perf_counter() - t
                order.append(msg["block"])
                frames += arr.shape[0]
        wall = time.perf_counter() - t
        rows += [("job 1 status", msg["status"]), ("job 1 time to first block (client)", f"{ttfb:.2f} s"),
                 ("job 1 wall (client) / fps", f"{wall:.2f} s / {frames / wall:.1f}"),
                 ("job 1 blocks in order", str(order == list(range(len(order))))),
                 ("job 1 acceptance", str(msg["acceptance_rate"]))]
        first = msg

        # 2. jobs at once
        t = time.perf_counter()
        ids = [requests.post(f"{url}/v1/videos", json={"prompt": f"{args.prompt} {i}", "seed": i}, timeout=30)
               .json()["id"] for i in range(args.jobs)]
        ends = []
        for i in ids:
            with connect(f"ws://127.0.0.1:{port}/v1/videos/{i}/stream?frames=none") as ws:
                while (msg := json.loads(ws.recv()))["type"] == "block":
                    pass
                ends.append(msg["status"])
        wall = time.perf_counter() - t
        rows += [(f"{args.jobs} jobs at once: succeeded", f"{ends.count('succeeded')}/{args.jobs}"),
                 (f"{args.jobs} jobs at once: wall / jobs per minute", f"{wall:.1f} s / {60 * args.jobs / wall:.2f}")]
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        for name in ("sdvg_acceptance_rate", "sdvg_time_to_first_block_seconds_sum", "sdvg_job_fps_sum"):
            val = next((ln.split()[-1] for ln in metrics.splitlines() if ln.startswith(name)), "missing")
            rows.append((f"metric {name}", val))

        # 3. SIGTERM during a job
        late = requests.post(f"{url}/v1/videos", json={"prompt": "stopped by the shutdown"}, timeout=30).json()["id"]
        with connect(f"ws://127.0.0.1:{port}/v1/videos/{late}/stream?frames=none") as ws:
            json.loads(ws.recv())
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(300)
        partial = [str(p) for p in (out / "serve").rglob("*tmp-*")]
        rows += [("SIGTERM mid-job: exit status", str(rc)),
                 ("SIGTERM mid-job: partial files / cancelled job folder",
                  f"{len(partial)} / {'present' if (out / 'serve' / late).exists() else 'absent'}")]
    finally:
        if proc.poll() is None:
            proc.kill()

    # 4. sdvg-rt run of the first prompt, compared with the served mp4
    (out / "prompt.txt").write_text(args.prompt + "\n")
    run = [sys.executable, "-m", "sdvg_rt.cli", "run", str(out / "prompt.txt"), "--out", str(out / "run"),
           "--seed", str(args.seed), "--quiet"] + (["--profile", args.profile] if args.profile else [])
    r = subprocess.run(run, capture_output=True, text=True, env=dict(os.environ))
    served = out / "serve" / first["id"] / first["video"]
    ran = out / "run" / first["video"]
    same = r.returncode == 0 and ran.is_file() and served.read_bytes() == ran.read_bytes()
    rows.append(("mp4 byte-identical to sdvg-rt run", str(same) if r.returncode == 0 else f"run failed: {r.stderr[-300:]}"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(f"(files in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
