"""`sdvg-rt serve` as a user starts it (a subprocess on 127.0.0.1): a running job cancelled through the API
stops between blocks, and SIGTERM mid-job stops the server cleanly, leaving no partial files."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
ws_client = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed  # noqa: E402

from sdvg_rt.checkpoints.synthetic import make_synthetic_set  # noqa: E402

from test_serve import small_profile  # noqa: E402

pytestmark = pytest.mark.slow  # real server subprocesses

BLOCKS = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = tmp_path_factory.getbasetemp() / "sdvg-rt-tiny-set"
    make_synthetic_set(tiny, "tiny", 0, log=None)
    prof = small_profile(tmp_path_factory.mktemp("shutdown-profile"), tiny, latent_frames=BLOCKS)
    out = tmp_path_factory.mktemp("shutdown-out")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(out.parent / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "sdvg_rt.cli", "serve", "--profile", str(prof), "--host", "127.0.0.1",
                             "--port", str(port), "--out", str(out), "--devices", "cpu", "--no-warmup"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="2"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.seek(0) or log.read()
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    yield {"url": url, "ws": f"ws://127.0.0.1:{port}", "out": out, "proc": proc, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def submit(server, prompt):
    r = requests.post(f"{server['url']}/v1/videos", json={"prompt": prompt}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def first_block(ws):
    msg = json.loads(ws.recv(timeout=120))
    assert msg["type"] == "block" and msg["block"] == 0
    return msg


def test_cancel_a_running_job(server):
    job = submit(server, "cancel me")
    with ws_client.connect(f"{server['ws']}/v1/videos/{job}/stream?frames=none", open_timeout=30) as ws:
        first_block(ws)
        r = requests.post(f"{server['url']}/v1/videos/{job}/cancel", timeout=30)
        assert r.status_code == 200
        while (msg := json.loads(ws.recv(timeout=120)))["type"] != "end":
            pass
    assert msg["status"] == "cancelled" and len(msg["blocks"]) < BLOCKS
    assert not (server["out"] / job).exists()  # the partial video was discarded
    r = requests.get(f"{server['url']}/v1/videos/{job}/content", timeout=30)
    assert r.status_code == 409


def test_sigterm_mid_job_leaves_no_partial_files(server):
    running, queued = submit(server, "running at shutdown"), submit(server, "queued at shutdown")
    with ws_client.connect(f"{server['ws']}/v1/videos/{running}/stream?frames=none", open_timeout=30) as ws:
        first_block(ws)
        server["proc"].send_signal(signal.SIGTERM)
        try:
            while json.loads(ws.recv(timeout=120))["type"] != "end":
                pass
        except ConnectionClosed:
            pass
    # uvicorn re-raises the signal after shutting down; sdvg-rt then exits 128 + SIGTERM like every command
    assert server["proc"].wait(120) in (0, 128 + signal.SIGTERM, -signal.SIGTERM)
    server["log"].seek(0)
    log = server["log"].read()
    assert "shutting down" in log and "stopped" in log, log
    out = server["out"]
    assert not (out / running).exists() and not (out / queued).exists()
    assert not [p for p in out.rglob("*") if p.is_file()], "partial or stray files after shutdown"
