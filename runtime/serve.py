"""``sdvg-rt serve``: an HTTP API over ``JobService`` (FastAPI + uvicorn; ``pip install 'sdvg-rt[serve]'``).

    POST   /v1/videos                 {"prompt", "seed"?, "tau"?, "mode"?}   -> 202 {"id", "status", ...}
    GET    /v1/videos/{id}            status and per-block records
    GET    /v1/videos/{id}/content    the mp4 (409 until the job has succeeded)
    WS     /v1/videos/{id}/stream     each committed block as it is committed (JSON, then raw frames)
    POST   /v1/videos/{id}/cancel     (or DELETE /v1/videos/{id})
    GET    /healthz  /readyz  /metrics

Every Runtime is loaded and warmed before the port opens. A full queue answers 429 with ``Retry-After``;
a shutdown (SIGINT/SIGTERM) cancels the queued jobs and cancels (``--on-shutdown cancel``) or finishes
(``finish``) the running ones; a cancelled job's partial video is discarded, never left half-written.
"""

import argparse
import asyncio
import contextlib
import math
import secrets
import sys
import threading

from .jobs import CANCELLED, FAILED, SUCCEEDED, Job, JobService, QueueFullError, ShuttingDownError

STREAM_FRAMES = ("raw", "none")


class Metrics:
    """Prometheus metrics of one service (its own registry, so several apps can live in one process)."""

    def __init__(self, svc: JobService):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        Gauge("sdvg_queue_depth", "jobs waiting for a runtime", registry=r).set_function(svc.queue_depth)
        Gauge("sdvg_ready", "1 when every runtime is warm and the server takes jobs", registry=r) \
            .set_function(lambda: float(svc.ready))
        self.jobs = Counter("sdvg_jobs", "jobs by final status", ["status"], registry=r)
        self.submitted = Counter("sdvg_jobs_submitted", "jobs accepted into the queue", registry=r)
        self.rejected = Counter("sdvg_jobs_rejected", "submissions refused", ["reason"], registry=r)
        self.blocks = Counter("sdvg_blocks", "committed blocks by decision", ["decision"], registry=r)
        self.frames = Counter("sdvg_frames", "committed video frames", registry=r)
        self.acceptance = Gauge("sdvg_acceptance_rate", "accepted / (accepted + rejected) drafts since start",
                                registry=r)
        self.fps = Histogram("sdvg_job_fps", "video frames per second of generation, per job", registry=r,
                             buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.ttfb = Histogram("sdvg_time_to_first_block_seconds", "job start to its first committed block",
                              registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
        self._seen: dict[str, int] = {}  # job id -> blocks counted
        self._acc = self._judged = 0
        self._lock = threading.Lock()  # workers and request threads report changes

    def on_change(self, job: Job) -> None:
        """Count the job's new blocks; on its end, its status and fps (called once per change)."""
        with self._lock:
            self._count(job)

    def _count(self, job: Job) -> None:
        n = self._seen.get(job.id, 0)
        if n == 0 and job.events and job.first_block_s is not None:
            self.ttfb.observe(job.first_block_s)
        for e in job.events[n:]:
            d = e.record["decision"]
            self.blocks.labels(d).inc()
            self.frames.inc(e.record["frames"])
            self._acc += d == "accepted"
            self._judged += d in ("accepted", "rejected")
        if self._judged:
            self.acceptance.set(self._acc / self._judged)
        self._seen[job.id] = len(job.events)
        if job.done:
            del self._seen[job.id]
            self.jobs.labels(job.status).inc()
            if job.status == SUCCEEDED and job.stats and job.stats.get("wall_time_s"):
                self.fps.observe(job.stats["frames"] / job.stats["wall_time_s"])


def build_app(svc: JobService, *, token: str | None = None, on_shutdown: str = "cancel"):
    """The FastAPI app over a started (or, on startup, started here) ``JobService``."""
    from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
    from fastapi.responses import FileResponse, JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, field_validator
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from .decide import MODES

    metrics = Metrics(svc)
    waiters: dict[str, set[asyncio.Future]] = {}
    state: dict = {"loop": None}

    def on_change(job: Job) -> None:  # worker threads
        metrics.on_change(job)
        loop = state["loop"]
        if loop is not None and job.id in waiters:
            try:
                loop.call_soon_threadsafe(_wake, job.id)
            except RuntimeError:  # the event loop has closed: no stream is left to wake
                pass

    def _wake(job_id: str) -> None:
        for fut in waiters.pop(job_id, ()):
            if not fut.done():
                fut.set_result(None)

    svc.add_listener(on_change)

    class VideoRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str = Field(min_length=1, max_length=4096, description="the text prompt")
        seed: int | None = Field(None, ge=0, lt=2**64, description="noise seed (default: the profile's)")
        tau: float | str | None = Field(None, description="acceptance threshold; a number, 'inf' or '-inf'")
        mode: str | None = Field(None, description=f"one of {', '.join(MODES)} (default: the profile's)")

        @field_validator("prompt")
        @classmethod
        def _prompt(cls, v: str) -> str:
            if not v.strip():
                raise ValueError("prompt is blank; give the text to generate")
            return v.strip()

        @field_validator("tau")
        @classmethod
        def _tau(cls, v):
            if v is None:
                return v
            try:
                f = float(v)
            except ValueError:
                raise ValueError(f"tau must be a number, 'inf' or '-inf', got {v!r}") from None
            if math.isnan(f):
                raise ValueError("tau must not be nan")
            return f

        @field_validator("mode")
        @classmethod
        def _mode(cls, v):
            if v is not None and v not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}, got {v!r}")
            return v

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["loop"] = asyncio.get_running_loop()
        if not svc.ready and not svc.draining:
            await asyncio.to_thread(svc.start)
        yield
        await asyncio.to_thread(svc.shutdown, on_shutdown)
        print("stopped: every job is finished or cancelled, no partial files", file=sys.stderr)

    app = FastAPI(title="sdvg-rt", version=_version(), lifespan=lifespan)

    def auth(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].encode(), token.encode())):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    def job_or_404(job_id: str) -> Job:
        job = svc.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (unknown, or forgotten after {svc.history} newer jobs)")
        return job

    @app.post("/v1/videos", status_code=202, dependencies=[Depends(auth)])
    def create(req: VideoRequest):
        try:
            job = svc.submit(req.prompt, req.seed, req.tau, req.mode)
        except QueueFullError as e:
            metrics.rejected.labels("queue_full").inc()
            return JSONResponse({"detail": str(e)}, 429, headers={"Retry-After": str(e.retry_after)})
        except ShuttingDownError as e:
            metrics.rejected.labels("shutting_down").inc()
            return JSONResponse({"detail": str(e)}, 503, headers={"Retry-After": "5"})
        metrics.submitted.inc()
        return _safe(job.to_dict())

    @app.get("/v1/videos/{job_id}", dependencies=[Depends(auth)])
    def status(job_id: str):
        return _safe(job_or_404(job_id).to_dict())

    @app.get("/v1/videos/{job_id}/content", dependencies=[Depends(auth)])
    def content(job_id: str):
        job = job_or_404(job_id)
        if job.status != SUCCEEDED:
            why = f": {job.error['message']}" if job.status == FAILED and job.error else ""
            raise HTTPException(409, f"job {job_id} is {job.status}{why}; the video exists once it has succeeded")
        return FileResponse(job.video, media_type="video/mp4", filename=job.video.name)

    def cancel(job_id: str):
        job_or_404(job_id)
        return _safe(svc.cancel(job_id).to_dict())

    app.post("/v1/videos/{job_id}/cancel", dependencies=[Depends(auth)])(cancel)
    app.delete("/v1/videos/{job_id}", dependencies=[Depends(auth)])(cancel)

    @app.websocket("/v1/videos/{job_id}/stream")
    async def stream(ws: WebSocket, job_id: str, frames: str = "raw"):
        """Per block: a JSON text message {"type": "block", "block", "decision", "score", "record", "frames":
        {"shape", "dtype"}} and (frames=raw) one binary message with the uint8 frames [f, H, W, 3] in C
        order; at the end {"type": "end", "status", ...the job}. Blocks come in order from block 0 (a
        late client gets the earlier ones first); frames of a job that finished before the client came are
        gone ("frames": null): fetch the mp4 then."""
        if token is not None:
            got = ws.headers.get("authorization", "") or f"Bearer {ws.query_params.get('token', '')}"
            if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].encode(), token.encode())):
                await ws.close(code=1008, reason="missing or wrong bearer token")
                return
        job = svc.get(job_id)
        if job is None or frames not in STREAM_FRAMES:
            await ws.close(code=1008, reason=f"no job {job_id!r}" if job is None
                           else f"frames must be one of {', '.join(STREAM_FRAMES)}")
            return
        await ws.accept()
        job.readers += 1
        sent = 0
        loop = asyncio.get_running_loop()
        try:
            while True:
                fut = loop.create_future()
                waiters.setdefault(job_id, set()).add(fut)
                while sent < len(job.events):
                    e = job.events[sent]
                    arr = e.frames if frames == "raw" else None
                    await ws.send_json({"type": "block", "block": e.block, "decision": e.record["decision"],
                                        "score": _finite(e.record["min_score"]), "record": _safe(e.record),
                                        "frames": None if arr is None else {"shape": list(arr.shape),
                                                                             "dtype": "uint8"}})
                    if arr is not None:
                        await ws.send_bytes(memoryview(arr).cast("B"))
                    sent += 1
                if job.done and sent == len(job.events):
                    await ws.send_json(_safe(dict(job.to_dict(), type="end")))
                    break
                await fut
            await ws.close()
        except WebSocketDisconnect:
            pass
        finally:
            job.readers -= 1
            svc.release_frames(job)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        if not svc.ready:
            return JSONResponse({"status": "draining" if svc.draining else "starting"}, 503)
        return {"status": "ready", "runtimes": [str(rt.device) for rt in svc.runtimes],
                "queue_depth": svc.queue_depth(), "queue_size": svc.queue_size}

    @app.get("/metrics")
    def prom():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.service, app.state.metrics = svc, metrics
    return app


def _finite(x):
    return x if x is None or math.isfinite(x) else str(x)


def _safe(obj):
    from .video import _json_safe

    return _json_safe(obj)


def _version() -> str:
    from . import __version__

    return __version__


# ---- the subcommand ------------------------------------------------------------------------------
def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="HTTP API: video jobs, block streaming, metrics",
                       description="Serve video jobs over HTTP (needs: pip install 'sdvg-rt[serve]').")
    p.add_argument("--profile", help="profile YAML (default: the tiny synthetic demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--out", default="outputs/serve", help="output folder: <out>/<job id>/000-<slug>-<hash>.mp4 and .json")
    p.add_argument("--devices", help="comma-separated devices, one Runtime each (default: every CUDA "
                                     "device, else cpu)")
    p.add_argument("--queue-size", type=int, default=16, help="jobs that may wait (429 beyond; default 16)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (default: $SDVG_RT_TOKEN if set)")
    p.add_argument("--on-shutdown", choices=("cancel", "finish"), default="cancel",
                   help="running jobs on SIGINT/SIGTERM: cancel after the current block, or finish them")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up run (faster start, slower first job)")
    p.set_defaults(func=cmd_serve)
    return p


def default_devices() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def _check_port(host: str, port: int) -> None:
    import socket

    from .errors import SdvgError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SdvgError(f"--host {host!r} is not an address of this machine ({e}); e.g. 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise SdvgError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or stop the "
                            "process that uses it") from None


def cmd_serve(args) -> int:
    import os

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(f"sdvg-rt serve needs the 'serve' extra ({e.name} is missing): "
                                      "pip install 'sdvg-rt[serve]'") from None
    from .cli import _demo_profile
    from .profiles import load_profile

    _check_port(args.host, args.port)  # before minutes of loading
    prof = load_profile(args.profile) if args.profile else _demo_profile({})
    devices = args.devices.split(",") if args.devices else default_devices()
    svc = JobService(prof, args.out, devices=devices, queue_size=args.queue_size, warmup=not args.no_warmup)
    print(f"loading {prof.name} on {', '.join(devices)} ...", file=sys.stderr)
    svc.start()  # loaded and warm before the port opens
    print(f"ready: {len(svc.runtimes)} runtime(s); listening on http://{args.host}:{args.port}", file=sys.stderr)
    token = args.token or os.environ.get("SDVG_RT_TOKEN") or None
    app = build_app(svc, token=token, on_shutdown=args.on_shutdown)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGINT/SIGTERM: cancel jobs now, not after the connections close
            if not svc.draining:
                print(f"shutting down: {args.on_shutdown} running jobs, cancel queued ones", file=sys.stderr)
                threading.Thread(target=svc.drain, args=(args.on_shutdown,), daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=60)
    Server(config).run()  # after a signal, uvicorn re-raises it once the shutdown is complete
    return 0


__all__ = ["build_app", "add_parser", "cmd_serve", "Metrics", "CANCELLED"]
