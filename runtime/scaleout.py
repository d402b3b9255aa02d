"""Work lists over warm runtimes: in this process, or on a Ray cluster with one actor per GPU.

A *job* is built once per worker (it loads a ``Runtime``: models, then prompts encoded, text encoder
freed, caches allocated, CUDA graphs captured in the warm-up) and then processes *units* (a prompt, or
a prompt and seed of a sweep) one at a time. A unit writes its own outputs, atomically, into the shared
output folder and returns a small summary; processing a unit whose outputs exist already returns what
they say without writing again, so a unit may safely be handed out twice.

``execute(units, make_job, ...)`` runs the list:

- locally (``ray_address=None``): one job in this process, units in order;
- on Ray: one actor per bundle of a placement group. Each bundle asks for ``Placement.gpus_per_worker``
  GPUs and ``cpus_per_worker`` CPUs (default 1 GPU, 2 CPUs; on a cluster without GPUs, CPU actors:
  ``workers`` of them). A bundle always lies on one node, so a worker that needs two GPUs of one host
  (one actor per GPU pair) is ``Placement(gpus_per_worker=2)``; ``strategy`` is the placement group's
  (``PACK`` fills nodes in turn, ``SPREAD`` spreads the actors). Ray sets ``CUDA_VISIBLE_DEVICES`` for
  each actor to its bundle's GPUs, so the job sees them as ``cuda:0`` (and ``cuda:1``). A profile whose
  ``devices`` section puts the target on a GPU of its own asks for two GPUs per actor by default
  (``placement_from_args``), and its devices are renumbered onto the actor's (``placement.for_worker``).
  The driver hands one unit at a time to each idle actor (a pull work list: fast GPUs take more). An
  actor that dies (``max_restarts`` times at most; Ray restarts it inside its reserved bundle) has its
  unit re-queued at the front, for whichever actor is free first; a unit that killed its worker
  ``max_attempts`` times stops the run. An error raised by the job (a bad checkpoint, out of memory)
  stops the run with that error.
"""
from __future__ import annotations

import functools
import glob
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import DependencyError, SdvgError


class Job(Protocol):
    def process(self, unit: dict, on_output: Callable[[int], None] | None = None) -> dict:
        """Make (or find) the unit's outputs; ``on_output(n)`` after each n outputs written."""
        ...


@dataclass(frozen=True)
class Placement:
    """How each Ray worker is placed: one placement-group bundle per worker."""

    workers: int | None = None  # default: cluster GPUs // gpus_per_worker (1 on a cluster without GPUs)
    gpus_per_worker: int = 1
    cpus_per_worker: int = 2
    strategy: str = "PACK"
    max_restarts: int = 3  # per actor
    max_attempts: int = 3  # deaths of a worker while it held the same unit before the run stops
    ready_timeout_s: float = 600.0  # waiting for the cluster to grant the bundles

    def bundles(self, cluster: dict) -> list[dict[str, float]]:
        gpus = int(cluster.get("GPU", 0))
        per = {"CPU": float(self.cpus_per_worker)}
        if gpus:
            if self.gpus_per_worker < 1:
                raise SdvgError(f"gpus_per_worker must be >= 1 on a cluster with GPUs, got {self.gpus_per_worker}")
            per["GPU"] = float(self.gpus_per_worker)
            n = self.workers if self.workers is not None else gpus // self.gpus_per_worker
        else:
            n = self.workers if self.workers is not None else 1
        if n < 1:
            raise SdvgError(f"the Ray cluster has {gpus} GPU(s): not enough for one worker of {self.gpus_per_worker} "
                            "GPU(s)")
        return [dict(per) for _ in range(n)]


@dataclass
class Report:
    results: dict[str, dict] = field(default_factory=dict)  # unit key -> the job's summary
    retries: int = 0  # units re-queued after their worker died
    workers: int = 1


def clean_stale(paths: Iterable[Path]) -> None:
    """Remove temporary files (``<name>.tmp-<pid>``) a killed worker left beside these final paths."""
    for p in paths:
        for tmp in glob.glob(glob.escape(str(p)) + ".tmp-*"):
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


# ---- local ---------------------------------------------------------------------------------------
def _execute_local(units, make_job, on_output, on_result) -> Report:
    job = make_job()
    rep = Report()
    for unit in units:
        rep.results[unit["key"]] = res = job.process(unit, on_output)
        if on_result:
            on_result(unit, res)
    return rep


# ---- Ray -----------------------------------------------------------------------------------------
class _Worker:
    """The Ray actor: a job built once (models loaded, warm), units processed one by one."""

    def __init__(self, make_job, cpu_threads: int):
        import torch

        if cpu_threads > 0:  # CPU results depend on the thread count; one setting per worker kind
            torch.set_num_threads(cpu_threads)
        self.job = make_job()

    def pid(self) -> int:
        return os.getpid()

    def process(self, unit: dict) -> dict:
        return self.job.process(unit, None)


def ray_module():
    try:
        import ray
    except ImportError:
        raise DependencyError("--ray needs Ray: pip install 'sdvg-rt[ray]' (or run without --ray)") from None
    return ray


def _execute_ray(units, make_job, address, placement: Placement, on_tick, on_result, on_event, tick_s) -> Report:
    ray = ray_module()
    from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    started = not ray.is_initialized()
    if started:
        kw: dict[str, Any] = {"log_to_driver": False}
        if address in (None, "", "local"):
            kw.update(include_dashboard=False)
            address = None
        ray.init(address=address, **kw)
    pg, actors = None, []
    try:
        bundles = placement.bundles(ray.cluster_resources())
        pg = placement_group(bundles, strategy=placement.strategy)
        try:
            ray.get(pg.ready(), timeout=placement.ready_timeout_s)
        except GetTimeoutError:
            raise SdvgError(f"the Ray cluster did not grant {len(bundles)} worker bundle(s) of {bundles[0]} within "
                            f"{placement.ready_timeout_s:.0f}s (it has {ray.cluster_resources()}); ask for fewer "
                            "workers (--ray-workers) or CPUs per worker (--ray-cpus-per-worker)") from None
        cpu_threads = 0 if "GPU" in bundles[0] else placement.cpus_per_worker
        cls = ray.remote(_Worker)
        actors += [cls.options(num_cpus=b["CPU"], num_gpus=b.get("GPU", 0), max_restarts=placement.max_restarts,
                              max_task_retries=0,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
                  .remote(make_job, cpu_threads) for i, b in enumerate(bundles)]
        rep = Report(workers=len(actors))
        if on_event:
            on_event("started", {"actors": actors})
        pending = deque(units)
        attempts: dict[str, int] = {}
        deaths = [0] * len(actors)
        idle = deque(range(len(actors)))
        inflight: dict[Any, tuple[int, dict | None]] = {}  # ref -> (actor, unit); unit None: a health probe
        reprobe: dict[int, float] = {}  # restarting actor -> when to ask again whether it is back
        last_tick = 0.0
        while pending or any(u is not None for _, u in inflight.values()):
            now = time.monotonic()
            for i in [i for i, t in reprobe.items() if t <= now]:
                del reprobe[i]
                inflight[actors[i].pid.remote()] = (i, None)
            while pending and idle:
                i = idle.popleft()
                unit = pending.popleft()
                inflight[actors[i].process.remote(unit)] = (i, unit)
                if on_event:
                    on_event("submitted", {"actor": actors[i], "index": i, "unit": unit})
            if not inflight and not reprobe:
                raise SdvgError(f"every Ray worker died ({placement.max_restarts} restarts each); "
                                f"{len(pending)} unit(s) left undone; the outputs made so far are kept, re-run to "
                                "resume")
            if inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=tick_s)
            else:  # only restarting actors: wait for their next probe
                ready = []
                time.sleep(tick_s)
            for ref in ready:
                i, unit = inflight.pop(ref)
                try:
                    res = ray.get(ref)
                except RayActorError as e:
                    if unit is None:  # the probe of a restarting actor: try again, or give it up when dead
                        if deaths[i] <= placement.max_restarts and not isinstance(e, ActorDiedError):
                            reprobe[i] = time.monotonic() + tick_s
                        continue
                    deaths[i] += 1
                    rep.retries += 1
                    attempts[unit["key"]] = n = attempts.get(unit["key"], 0) + 1
                    if n >= placement.max_attempts:
                        raise SdvgError(f"unit {unit['key']} was being processed when its worker died {n} times "
                                        f"(last: {type(e).__name__}); out of host or device memory? The outputs "
                                        "made so far are kept, re-run to resume") from None
                    pending.appendleft(unit)  # first in line for the next free worker
                    restarts = deaths[i] <= placement.max_restarts
                    print(f"sdvg-rt: Ray worker {i} died while processing {unit['key']}; re-queued"
                          f"{'; the worker restarts' if restarts else ''}", file=sys.stderr)
                    if restarts:  # back to work once it answers (Ray restarts it in its bundle)
                        inflight[actors[i].pid.remote()] = (i, None)
                    continue
                except RayTaskError as e:
                    cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
                    if cause is not None:
                        raise cause from None
                    raise
                if unit is not None:
                    rep.results[unit["key"]] = res
                    if on_result:
                        on_result(unit, res)
                idle.append(i)
            if on_tick and time.monotonic() - last_tick >= tick_s:
                on_tick()
                last_tick = time.monotonic()
        return rep
    finally:
        if pg is not None and ray.is_initialized():
            for a in actors:
                ray.kill(a, no_restart=True)
            remove_placement_group(pg)
        if started:
            ray.shutdown()


def execute(units: list[dict], make_job: Callable[[], Job], *, ray_address: str | None = None,
            placement: Placement | None = None, on_output: Callable[[int], None] | None = None,
            on_tick: Callable[[], None] | None = None, on_result: Callable[[dict, dict], None] | None = None,
            on_event: Callable[[str, dict], None] | None = None, tick_s: float = 0.5, use_ray: bool = False) -> Report:
    """Run ``units`` (dicts with a unique ``key``) through jobs from ``make_job`` (picklable for Ray).

    Local: ``on_output`` is called by the job as outputs are written. Ray (``use_ray``; ``ray_address``
    as ``ray.init`` takes it, None to start a local cluster, or an already initialised Ray is used):
    ``on_tick`` about every ``tick_s`` seconds (the driver counts outputs on disk there), ``on_event``
    with ``started`` and ``submitted`` events (hooks for tests and logs)."""
    if not use_ray:
        return _execute_local(units, make_job, on_output, on_result)
    return _execute_ray(units, make_job, ray_address, placement or Placement(), on_tick, on_result, on_event, tick_s)


# ---- `sdvg-rt run --ray` ------------------------------------------------------------------------------
class RunJob:
    """``sdvg-rt run``'s per-prompt work on a warm Runtime: ``<stem>.mp4`` then ``<stem>.json`` (the
    record, written last, marks the prompt done), optionally ``<stem>.latents.safetensors``: the same
    files, names and records as the local run. Units are the run's entries (index, line, prompt, video)."""

    def __init__(self, profile, out: str, prompts: list[str], save_latents: bool, device: str | None = None):
        self.profile, self.out, self.prompts = profile, Path(out), prompts
        self.save_latents, self.device = save_latents, device
        self.rt = None

    def _load(self):
        from .api import Runtime

        rt = Runtime.from_profile(self.profile, self.device)
        self.encoded = dict(zip(self.prompts, rt.encode_prompts(self.prompts)))
        rt.release_text_encoder()
        rt.allocate()
        if rt.device.type == "cuda":
            rt.warmup()
        self.rt = rt

    def process(self, unit: dict, on_output=None) -> dict:
        import json

        stem = unit["video"][:-4]
        mp4, rec = self.out / unit["video"], self.out / unit["record"]
        if mp4.exists() and rec.exists():  # handed out again after its worker died: already written
            stats = json.loads(rec.read_text())
            return _run_summary(stats)
        clean_stale([mp4, rec, self.out / f"{stem}.latents.safetensors"])
        if self.rt is None:
            self._load()
        from .batch import _generate_one  # the same per-prompt work as the local run: mp4, then the record

        _generate_one(self.rt, self.profile, unit, self.encoded[unit["prompt"]], self.out, len(self.prompts),
                      self.save_latents, False, lambda msg: None)
        if on_output:
            on_output(1)
        return _run_summary(json.loads(rec.read_text()))


def _run_summary(stats: dict) -> dict:
    return {k: stats.get(k) for k in ("acceptance_rate", "wall_time_s", "target_only_estimate_s")}


def run_on_ray(prof, todo: list[dict], out: Path, args) -> None:
    """The ``sdvg-rt run --ray`` branch: every entry of ``todo`` generated on the cluster; entries get
    the status and numbers the local run gives them (the run summary is written by the caller)."""
    from tqdm import tqdm

    units = [dict(e, key=e["video"]) for e in todo]
    from .placement import for_worker

    make_job = functools.partial(RunJob, for_worker(prof), str(out.resolve()), [e["prompt"] for e in todo],
                                 args.save_latents)
    with tqdm(total=len(units), desc="prompts", unit="video", file=sys.stderr, disable=args.quiet) as bar:
        rep = execute(units, make_job, ray_address=args.ray,
                      placement=placement_from_args(args, prof), use_ray=True,
                      on_result=lambda unit, res: bar.update(1))
    by_key = {e["video"]: e for e in todo}
    for key, res in rep.results.items():
        by_key[key].update(status="generated", **res)
    if rep.retries:
        print(f"sdvg-rt: {rep.retries} prompt(s) re-queued after a Ray worker died", file=sys.stderr)


def worker_placement(profile, workers: int | None = None, gpus_per_worker: int | None = None,
                     cpus_per_worker: int = 2) -> Placement:
    """One actor per GPU group of ``profile``: as many GPUs per actor as its ``devices`` section uses
    (``placement.worker_gpus``: two with the target on its own GPU, one otherwise) unless
    ``gpus_per_worker`` says more; fewer than it uses is refused."""
    from .placement import worker_gpus

    need = max(1, worker_gpus(profile)[0])
    if gpus_per_worker is not None and gpus_per_worker < need:
        raise SdvgError(f"--ray-gpus-per-worker {gpus_per_worker}: profile {profile.name!r} places its parts on "
                        f"{need} GPUs (devices: {_named_devices(profile)}), so each actor needs {need}; give "
                        f"--ray-gpus-per-worker {need} (or leave it out), or remove the devices section")
    return Placement(workers=workers, gpus_per_worker=need if gpus_per_worker is None else gpus_per_worker,
                     cpus_per_worker=cpus_per_worker)


def _named_devices(profile) -> dict:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(profile.devices).items() if v is not None}


def placement_from_args(args, profile) -> Placement:
    return worker_placement(profile, args.ray_workers, args.ray_gpus_per_worker, args.ray_cpus_per_worker)


def add_ray_arguments(p) -> None:
    """``--ray [ADDRESS]`` and the placement flags, shared by ``run`` and ``sweep``."""
    g = p.add_argument_group("scale-out on Ray (optional extra: pip install 'sdvg-rt[ray]')")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: no ADDRESS starts a local cluster (or joins RAY_ADDRESS); 'auto' joins the "
                        "running one; ray://host:10001 a remote one")
    g.add_argument("--ray-workers", type=_positive, default=None, metavar="N",
                   help="actors (default: one per GPU group of --ray-gpus-per-worker GPUs; 1 without GPUs)")
    g.add_argument("--ray-gpus-per-worker", type=_positive, default=None, metavar="G",
                   help="GPUs per actor (default: the GPUs the profile's devices section uses: 2 with the target "
                        "on its own GPU, else 1)")
    g.add_argument("--ray-cpus-per-worker", type=_positive, default=2, metavar="C",
                   help="CPUs per actor (default 2; on CPU-only clusters also its torch threads)")


def _positive(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v
