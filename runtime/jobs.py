"""Video jobs on a pool of Runtimes (one per device): a bounded queue, worker threads, cancellation between
blocks, and the same output files as ``sdvg-rt run`` (``<out>/<job id>/000-<slug>-<hash>.mp4`` and ``.json``).

    svc = JobService(profile, out_dir, devices=["cpu"], queue_size=16)
    svc.start()                                  # loads and warms every Runtime, then starts the workers
    job = svc.submit("a red fox in the snow", seed=0)
    ...                                          # job.events fill block by block; job.status ends terminal
    svc.shutdown("cancel")                       # or "finish": running jobs complete, queued ones are cancelled

The HTTP layer (``sdvg_rt.serve``) sits on top; nothing here imports a web framework. Listeners
(``add_listener``) are called from worker threads with the job whenever it changes.
"""
from __future__ import annotations

import math
import os
import queue
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import OutputError, SdvgError

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


class QueueFullError(SdvgError):
    """Every Runtime is busy and the wait queue is full; ``retry_after`` is the suggested wait in seconds."""

    exit_code = 7

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(SdvgError):
    """The service is draining and takes no new jobs."""

    exit_code = 7


@dataclass
class BlockEvent:
    """One committed block of a job: its record (JSON dict) and uint8 frames [f, H, W, 3] (``None`` once
    the job has finished and no stream still reads them)."""

    block: int
    record: dict
    frames: np.ndarray | None


@dataclass
class Job:
    id: str
    prompt: str
    seed: int | None
    tau: float | None
    mode: str | None
    created: float = field(default_factory=time.time)
    status: str = QUEUED
    device: str | None = None
    error: dict | None = None
    events: list[BlockEvent] = field(default_factory=list)
    stats: dict | None = None
    video: Path | None = None
    record: Path | None = None
    started: float | None = None
    finished: float | None = None
    first_block_s: float | None = None
    readers: int = 0  # streams reading the events' frames
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict:
        """The job as the HTTP API shows it: status, request, per-block records, errors, output names."""
        return {
            "id": self.id, "status": self.status, "prompt": self.prompt, "seed": self.seed, "tau": self.tau,
            "mode": self.mode, "device": self.device, "created": self.created, "started": self.started,
            "finished": self.finished, "time_to_first_block_s": self.first_block_s,
            "blocks": [e.record for e in self.events], "error": self.error,
            "acceptance_rate": None if self.stats is None else self.stats.get("acceptance_rate"),
            "wall_time_s": None if self.stats is None else self.stats.get("wall_time_s"),
            "video": self.video.name if self.video is not None else None,
        }


class _Cancelled(Exception):
    pass


class JobService:
    """Jobs over one Runtime per device. ``runtimes`` may be passed in (already loaded) instead of
    ``devices``; ``warmup`` runs ``Runtime.warmup()`` on each before the service reports ready."""

    def __init__(self, profile, out_dir: str | os.PathLike, *, devices: list[str] | None = None,
                 runtimes: list | None = None, queue_size: int = 16, history: int = 1024, warmup: bool = True):
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.profile = profile
        self.out = Path(out_dir)
        self.devices = devices
        self.runtimes = list(runtimes or [])
        self.queue_size, self.history, self.do_warmup = queue_size, history, warmup
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()  # jobs, counters, state
        self._threads: list[threading.Thread] = []
        self._listeners: list[Callable[[Job], None]] = []
        self._job_seconds: deque[float] = deque(maxlen=20)  # recent wall times (Retry-After estimate)
        self.ready = False
        self.draining = False

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Load (unless given), allocate and warm every Runtime, then start one worker thread each."""
        from .api import Runtime

        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot use {self.out} as the output folder ({e.strerror}); give --out a "
                              "writable folder") from None
        if not self.runtimes:
            for dev in self.devices or [None]:
                self.runtimes.append(Runtime.from_profile(self.profile, dev))
        for rt in self.runtimes:
            rt.allocate()
            if self.do_warmup:
                rt.warmup()
        for i, rt in enumerate(self.runtimes):
            t = threading.Thread(target=self._work, args=(rt,), name=f"sdvg-serve-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self.ready = True

    def drain(self, running: str = "cancel") -> None:
        """Stop taking jobs and cancel the queued ones; ``running``: "cancel" (stop after the current block,
        discard its partial video) or "finish". Returns at once (idempotent)."""
        if running not in ("cancel", "finish"):
            raise ValueError(f"running must be 'cancel' or 'finish', got {running!r}")
        with self._lock:
            self.draining, self.ready = True, False
            jobs = list(self.jobs.values())
        for job in jobs:
            if job.status == QUEUED or (running == "cancel" and job.status == RUNNING):
                self.cancel(job.id)

    def shutdown(self, running: str = "cancel", timeout: float | None = None) -> None:
        """``drain(running)``, then wait until every worker has stopped."""
        self.drain(running)
        for _ in self._threads:
            self._queue.put(None)  # after the queued (cancelled) jobs: each worker takes one and stops
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    def add_listener(self, fn: Callable[[Job], None]) -> None:
        self._listeners.append(fn)

    # ---- requests --------------------------------------------------------------------------------
    def submit(self, prompt: str, seed: int | None = None, tau: float | None = None,
               mode: str | None = None) -> Job:
        job = Job(uuid.uuid4().hex, prompt, seed, tau, mode)
        with self._lock:
            if self.draining:
                raise ShuttingDownError("the server is shutting down and takes no new jobs")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFullError(f"the queue is full ({self.queue_size} jobs wait for "
                                     f"{len(self.runtimes)} runtime(s)); retry later",
                                     self.retry_after()) from None
            self.jobs[job.id] = job
            self._forget_old()
        self._notify(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once, a running one after its current block. Finished jobs stay as they are."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None or job.done:
                return job
            job.cancel_requested.set()
            if job.status == QUEUED:
                job.status, job.finished = CANCELLED, time.time()
        self._notify(job)
        return job

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: mean recent job time x waiting jobs / runtimes."""
        recent = list(self._job_seconds)
        mean = sum(recent) / len(recent) if recent else 1.0
        return max(1, math.ceil(mean * max(1, self._queue.qsize()) / max(1, len(self.runtimes))))

    def release_frames(self, job: Job) -> None:
        """Drop a finished job's frames once no stream reads them (the mp4 holds the video)."""
        with self._lock:
            if job.done and job.readers == 0:
                for e in job.events:
                    e.frames = None

    # ---- workers ---------------------------------------------------------------------------------
    def _work(self, rt) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.status != QUEUED:  # cancelled while waiting
                    continue
                job.status, job.started, job.device = RUNNING, time.time(), str(rt.device)
            self._notify(job)
            self._run(rt, job)
            self.release_frames(job)
            self._notify(job)

    def _run(self, rt, job: Job) -> None:
        from .cli import output_stem
        from .video import BackgroundVideoWriter, atomic_write_json

        prof = rt.profile
        v, o = prof.video, prof.output
        folder = self.out / job.id
        stem = output_stem(0, job.prompt, 1)
        t0 = time.perf_counter()
        status, error = FAILED, None
        try:
            prompt = rt.encode_prompts([job.prompt])[0]
            folder.mkdir(parents=True, exist_ok=True)
            with BackgroundVideoWriter(folder / f"{stem}.mp4", v.width, v.height, o.fps, o.crf, o.preset) as w:
                gen = rt.stream(prompt, seed=job.seed, tau=job.tau, mode=job.mode)
                try:
                    for blk in gen:
                        w.write(blk.frames)
                        with self._lock:
                            if job.first_block_s is None:
                                job.first_block_s = time.perf_counter() - t0
                            job.events.append(BlockEvent(blk.block, blk.record.to_dict(), blk.frames))
                        self._notify(job)
                        if job.cancel_requested.is_set():
                            raise _Cancelled
                finally:
                    gen.close()  # releases the Runtime now (a cancelled generation stops between blocks)
            stats = dict(rt.last_stats, video=f"{stem}.mp4", index=0, job=job.id)
            atomic_write_json(folder / f"{stem}.json", stats)  # last: its existence marks the job done
            job.stats, job.video, job.record = stats, folder / f"{stem}.mp4", folder / f"{stem}.json"
            status = SUCCEEDED
            self._job_seconds.append(time.perf_counter() - t0)
        except _Cancelled:
            status = CANCELLED
        except SdvgError as e:
            error = {"type": type(e).__name__, "exit_code": e.exit_code, "message": str(e)}
        except Exception as e:  # noqa: BLE001 - a job's failure must not stop the worker
            error = {"type": type(e).__name__, "exit_code": 1, "message": str(e)}
        if status != SUCCEEDED and folder.is_dir() and not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)  # the writer discarded its temporary file
        with self._lock:
            job.status, job.error, job.finished = status, error, time.time()

    def _notify(self, job: Job) -> None:
        for fn in self._listeners:
            fn(job)

    def _forget_old(self) -> None:
        """Keep at most ``history`` jobs in memory (oldest finished first; their files stay on disk)."""
        while len(self.jobs) > self.history:
            old = next((k for k, j in self.jobs.items() if j.done), None)
            if old is None:
                return
            del self.jobs[old]
