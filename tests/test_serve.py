"""`sdvg-rt serve` over real HTTP and WebSocket clients on 127.0.0.1 (one uvicorn server for the module,
in a thread, on a free port) against a small tiny-model profile: byte-identical mp4s with `sdvg-rt run`,
ordered streams, 4xx validation, 429 on a full queue, bearer tokens, and a bounded load test."""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

requests = pytest.importorskip("requests")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
ws_client = pytest.importorskip("websockets.sync.client")

from sdvg_rt.checkpoints.synthetic import make_synthetic_set  # noqa: E402
from sdvg_rt.cli import main as cli_main  # noqa: E402
from sdvg_rt.jobs import JobService  # noqa: E402
from sdvg_rt.profiles import DEMO_PROFILE  # noqa: E402
from sdvg_rt.serve import build_app  # noqa: E402

pytestmark = pytest.mark.slow  # a real server with HTTP and WebSocket clients, and a load test

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUEUE = 8


def small_profile(dirpath: Path, tiny: Path, latent_frames: int = 3) -> Path:
    """The tiny models at 32x32, ``latent_frames`` blocks of one latent frame."""
    prof = dirpath / f"small-{latent_frames}.yaml"
    prof.write_text(DEMO_PROFILE.read_text()
                    .replace("root: cache://synthetic/tiny", f"root: {tiny}")
                    .replace("video: {width: 64, height: 64, latent_frames: 9, frames_per_block: 3}",
                             f"video: {{width: 32, height: 32, latent_frames: {latent_frames}, frames_per_block: 1}}")
                    .replace("window_frames: 9", f"window_frames: {latent_frames}"))
    return prof


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    tiny = tmp_path_factory.getbasetemp() / "sdvg-rt-tiny-set"  # shared with the other test modules
    make_synthetic_set(tiny, "tiny", 0, log=None)
    return small_profile(tmp_path_factory.mktemp("serve-profile"), tiny)


@pytest.fixture(scope="module")
def server(profile, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-out")
    svc = JobService(profile, out, devices=["cpu"], queue_size=QUEUE)
    app = build_app(svc, token=TOKEN)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not srv.started:  # the lifespan loads and warms the runtime before the socket serves
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield {"url": f"http://127.0.0.1:{port}", "ws": f"ws://127.0.0.1:{port}", "out": out, "svc": svc}
    srv.should_exit = True
    thread.join(60)
    assert not thread.is_alive()
    assert not list(out.rglob("*.tmp-*"))


def submit(server, **body):
    r = requests.post(f"{server['url']}/v1/videos", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def stream(server, job_id, frames="raw"):
    """Every message of the job's stream: [(block message, frames array or None)], end message."""
    blocks = []
    with ws_client.connect(f"{server['ws']}/v1/videos/{job_id}/stream?frames={frames}",
                           additional_headers=AUTH, open_timeout=30, close_timeout=30) as ws:
        while True:
            msg = json.loads(ws.recv(timeout=120))
            if msg["type"] == "end":
                return blocks, msg
            arr = None
            if msg["frames"] is not None:
                data = ws.recv(timeout=120)
                arr = np.frombuffer(data, np.uint8).reshape(msg["frames"]["shape"])
            blocks.append((msg, arr))


def test_ready_and_health(server):
    assert requests.get(f"{server['url']}/healthz", timeout=10).json() == {"status": "ok"}
    r = requests.get(f"{server['url']}/readyz", timeout=10)
    assert r.status_code == 200 and r.json()["runtimes"] == ["cpu"]


def test_job_matches_sdvg_rt_run_byte_for_byte(server, profile, tmp_path):
    job = submit(server, prompt="a red fox running through fresh snow", seed=5, tau=-2.0)
    blocks, end = stream(server, job)
    assert end["status"] == "succeeded", end
    assert [m["block"] for m, _ in blocks] == [0, 1, 2]  # every block, in order
    assert [m["decision"] for m, _ in blocks] == [b["decision"] for b in end["blocks"]]
    assert blocks[0][0]["decision"] == "forced"
    assert [a.shape for _, a in blocks] == [(1, 32, 32, 3), (4, 32, 32, 3), (4, 32, 32, 3)]
    mp4 = requests.get(f"{server['url']}/v1/videos/{job}/content", headers=AUTH, timeout=30)
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox running through fresh snow\n")
    assert cli_main(["run", str(prompts), "--profile", str(profile), "--out", str(tmp_path / "run"),
                     "--seed", "5", "--tau", "-2", "--device", "cpu", "--quiet"]) == 0
    from sdvg_rt.batch import output_stem

    stem = output_stem(0, "a red fox running through fresh snow", 1)  # the name sdvg-rt run gives it
    ran = tmp_path / "run" / f"{stem}.mp4"
    assert mp4.content == ran.read_bytes()
    # the streamed raw frames are the runtime's frames, exactly
    from sdvg_rt import Runtime

    with Runtime.from_profile(profile, "cpu") as rt:
        want = rt.generate("a red fox running through fresh snow", seed=5, tau=-2.0).frames
    np.testing.assert_array_equal(np.concatenate([a for _, a in blocks]), want)
    served_json = server["out"] / job / f"{stem}.json"
    a, b = json.loads(served_json.read_text()), json.loads(ran.with_suffix(".json").read_text())
    assert a["job"] == job and a["video"] == b["video"]
    assert [x["decision"] for x in a["blocks"]] == [x["decision"] for x in b["blocks"]]
    assert [x["min_score"] for x in a["blocks"]] == [x["min_score"] for x in b["blocks"]]

    # a client that comes after the end still gets every record in order (the frames are gone: use the mp4)
    late, end2 = stream(server, job)
    assert [m["block"] for m, _ in late] == [0, 1, 2] and all(a is None for _, a in late)
    assert end2["status"] == "succeeded"
    st = requests.get(f"{server['url']}/v1/videos/{job}", headers=AUTH, timeout=10).json()
    assert st["status"] == "succeeded" and len(st["blocks"]) == 3 and st["video"].endswith(".mp4")


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "   "}, 422, "blank"),
    ({"seed": 1}, 422, "prompt"),
    ({"prompt": "x", "mode": "fast"}, 422, "mode must be one of"),
    ({"prompt": "x", "tau": "high"}, 422, "tau must be a number"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "steps": 3}, 422, "steps"),
])
def test_bad_requests_get_4xx_with_a_message(server, body, status, words):
    r = requests.post(f"{server['url']}/v1/videos", json=body, headers=AUTH, timeout=10)
    assert r.status_code == status and words in r.text, r.text


def test_infinite_tau_is_accepted_and_shown_as_text(server):
    job = submit(server, prompt="always the target", tau="inf", seed=1)
    blocks, end = stream(server, job, frames="none")
    assert end["status"] == "succeeded" and end["tau"] == "inf"
    assert [m["decision"] for m, _ in blocks] == ["forced", "rejected", "rejected"]  # tau = +inf rejects every draft
    assert requests.get(f"{server['url']}/v1/videos/{job}", headers=AUTH, timeout=10).json()["tau"] == "inf"


def test_unknown_jobs_bad_bodies_and_tokens(server):
    u = server["url"]
    r = requests.get(f"{u}/v1/videos/nope", headers=AUTH, timeout=10)
    assert r.status_code == 404 and "no job 'nope'" in r.json()["detail"]
    assert requests.get(f"{u}/v1/videos/nope/content", headers=AUTH, timeout=10).status_code == 404
    assert requests.post(f"{u}/v1/videos/nope/cancel", headers=AUTH, timeout=10).status_code == 404
    r = requests.post(f"{u}/v1/videos", data=b"{not json", headers=dict(AUTH, **{"content-type": "application/json"}),
                      timeout=10)
    assert r.status_code == 422 and "JSON" in r.text
    r = requests.post(f"{u}/v1/videos", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401 and "bearer token" in r.json()["detail"]
    r = requests.post(f"{u}/v1/videos", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401


def test_full_queue_gets_429_and_queued_jobs_cancel(server):
    accepted, refused = [], []
    for i in range(3 * QUEUE):  # faster than the worker: the queue fills
        r = requests.post(f"{server['url']}/v1/videos", json={"prompt": f"burst {i}", "mode": "draft"},
                          headers=AUTH, timeout=10)
        (accepted if r.status_code == 202 else refused).append(r)
    assert refused and all(r.status_code == 429 for r in refused)
    assert int(refused[0].headers["Retry-After"]) >= 1 and "queue is full" in refused[0].json()["detail"]
    assert len(accepted) <= QUEUE + 2
    last = accepted[-1].json()["id"]
    c = requests.delete(f"{server['url']}/v1/videos/{last}", headers=AUTH, timeout=10).json()
    assert c["status"] in ("cancelled", "succeeded")  # succeeded only if the worker got there first
    ends = [stream(server, r.json()["id"], frames="none")[1]["status"] for r in accepted]
    assert ends[:-1] == ["succeeded"] * (len(accepted) - 1) and ends[-1] == c["status"]
    if c["status"] == "cancelled":
        assert not (server["out"] / last).exists()
        r = requests.get(f"{server['url']}/v1/videos/{last}/content", headers=AUTH, timeout=10)
        assert r.status_code == 409 and "cancelled" in r.json()["detail"]


def test_load_50_requests_from_8_clients_lose_nothing(server):
    def client(k):
        ids = []
        for i in range(k, 50, 8):
            job = submit(server, prompt=f"load {i}", seed=i, mode="draft")
            blocks, end = stream(server, job, frames="raw" if i % 2 else "none")
            assert end["status"] == "succeeded" and [m["block"] for m, _ in blocks] == [0, 1, 2], end
            ids.append(job)
        return ids

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        ids = [j for f in [pool.submit(client, k) for k in range(8)] for j in f.result(timeout=300)]
    assert len(set(ids)) == 50 and time.monotonic() - t0 < 300
    for j in ids:
        assert len(list((server["out"] / j).glob("*.mp4"))) == 1 and len(list((server["out"] / j).glob("*.json"))) == 1
    assert requests.get(f"{server['url']}/readyz", timeout=10).status_code == 200
    m = requests.get(f"{server['url']}/metrics", timeout=10).text
    ok = [float(line.split()[-1]) for line in m.splitlines() if line.startswith('sdvg_jobs_total{status="succeeded"}')]
    assert ok and ok[0] >= 50
    for name in ("sdvg_queue_depth", "sdvg_acceptance_rate", "sdvg_job_fps_count", "sdvg_time_to_first_block_seconds_count"):
        assert any(line.startswith(name) for line in m.splitlines()), name


def test_serve_refuses_a_port_in_use_before_loading(profile, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli_main(["serve", "--profile", str(profile), "--port", str(port), "--devices", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "loading" not in err
