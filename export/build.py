"""Engine builds: ``python -m sdvg_export build --profile P`` (what ``make engines PROFILE=P`` runs).

For each engine of the requested parts (``io_spec.engine_ios``), in ``engines/<profile-name>/``:
1. decide what is stale (``manifest.onnx_stale_reasons`` / ``plan_stale_reasons``): a changed part
   config or shape, a changed checkpoint (sha256, reused while size and mtime hold), another
   TensorRT version, GPU or builder setting, a missing or truncated file; ``--force`` rebuilds all;
2. export the stale ONNX graphs (``onnx/<engine>.onnx``), loading each part's checkpoint once with
   the runtime's own loaders, on the GPU when there is one (tracing runs one forward);
3. build the stale plans (``<engine>.plan``) with polygraphy's Python API and either TensorRT flavour
   (``--tensorrt`` or the profile's ``backends.tensorrt``): ``network_from_onnx_path`` with
   ``strongly_typed=True`` (the precision is in the graph, LayerNorms compute in fp32 from the ONNX
   ``stash_type``; TensorRT 11 has no precision flags), one optimization profile from io_spec's
   min/opt/max, builder optimization level, ``LAYER_NAMES_ONLY`` profiling verbosity, a timing cache
   per GPU and TensorRT version, and a workspace limit. TensorRT 10/11 builds for the GPU of this
   machine; TensorRT-RTX builds ahead of time, without a GPU, for the compute capabilities asked
   (``--compute-capability``, default its portable set);
4. record everything in ``manifest.json`` after every engine, so an interrupted build resumes.

``--onnx-only`` does steps 1, 2 and 4 without TensorRT. Without it a missing, stub-only or too old
TensorRT raises ``BackendUnavailableError`` before any work. A profile whose checkpoints live under
``synthetic/`` gets its synthetic checkpoints written first if they are missing (the tiny demo's rule).
"""
from __future__ import annotations

import datetime
import gc
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import sdvg_rt
from sdvg_rt import io_spec
from sdvg_rt.backends.tensorrt_backend import (
    RTX_COMPUTE_CAPABILITIES, RTX_PORTABLE, choose_flavour, engines_folder, tensorrt_module,
)
from sdvg_rt.checkpoints.synthetic import ensure_synthetic
from sdvg_rt.errors import BackendUnavailableError, CheckpointError, OutOfMemoryError
from sdvg_rt.manifest import (
    HASH_CACHE_NAME, EngineRecord, Expected, HashCache, Manifest, PlanRecord,
    load_manifest, onnx_files, onnx_stale_reasons, plan_stale_reasons, rebuild_command, sha256_file, write_manifest,
)
from sdvg_rt.io_spec import DTYPES
from sdvg_rt.profiles import ENGINES_DIR, Profile, load_profile
from sdvg_rt.video import atomic_write_bytes

from . import onnx_export

if TYPE_CHECKING:
    import tensorrt as trt

DEFAULT_ENGINES_DIR = ENGINES_DIR


@dataclass(frozen=True)
class BuildOptions:
    parts: tuple[str, ...] = io_spec.PARTS
    force: bool = False
    onnx_only: bool = False
    opt_level: int = 3                       # builder optimization level (0-5; TensorRT's default is 3)
    timing_cache: Path | None = None         # default: <folder>/timing-<gpu>-trt<version>.cache
    workspace_bytes: int | None = None       # None: TensorRT's default (all free device memory)
    engines_dir: Path = DEFAULT_ENGINES_DIR
    device: str | None = None                # export device; default cuda if available
    flavour: str | None = None               # tensorrt | tensorrt_rtx | auto; None: the profile's backends.tensorrt
    compute_capabilities: tuple[tuple[int, int], ...] | None = None  # TensorRT-RTX targets; None: RTX_PORTABLE
    random_weights: bool = False             # export from the model's synthetic-weight rule, no checkpoint read

    def build_settings(self) -> dict[str, Any]:
        """The settings recorded with a plan (and compared: another value rebuilds)."""
        return {"opt_level": self.opt_level, "workspace_bytes": self.workspace_bytes,
                "strongly_typed": True, "profiling_verbosity": "LAYER_NAMES_ONLY"}


@dataclass
class BuildReport:
    folder: Path
    exported: list[str] = field(default_factory=list)
    built: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# TensorRT discovery (tensorrt_module: see sdvg_rt.backends.tensorrt_backend)

def gpu_info(device: torch.device) -> tuple[str, tuple[int, int]]:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise BackendUnavailableError("building TensorRT engines needs a CUDA GPU (the plans are built "
                                      "for it); use --onnx-only on a machine without one")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), (major, minor)


# --------------------------------------------------------------------------------------------------
# The build

def build(profile: str | Path | Profile, opts: BuildOptions, progress: Callable[[str], None] = print) -> BuildReport:
    t_start = time.perf_counter()
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    parts = io_spec.normalize_parts(opts.parts)
    ios = io_spec.engine_ios(prof, parts)
    folder = engines_folder(prof, opts.engines_dir)
    report = BuildReport(folder)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    trt_version = gpu_name = cc = flavour = None
    targets: tuple[tuple[int, int], ...] | None = None
    trt_mod = None
    if not opts.onnx_only:
        has_gpu = device.type == "cuda" and torch.cuda.is_available()
        gpu_cc = tuple(torch.cuda.get_device_capability(device)) if has_gpu else None
        requested = opts.flavour or prof.backends.tensorrt
        # TensorRT 10/11 builds for this machine's GPU (gpu_info says so if there is none)
        flavour = "tensorrt" if requested == "tensorrt" else choose_flavour(
            requested, gpu_cc if opts.compute_capabilities is None else None)
        trt_mod = tensorrt_module(flavour)
        polygraphy = import_polygraphy(flavour)
        trt_version = trt_mod.__version__
        if flavour == "tensorrt":
            gpu_name, cc = gpu_info(device)
            where = f"{gpu_name} (compute capability {cc[0]}.{cc[1]})"
        else:
            targets = check_targets(opts.compute_capabilities or RTX_PORTABLE)
            gpu_name, cc = (torch.cuda.get_device_name(device), gpu_cc) if has_gpu else (None, None)
            where = f"ahead of time for compute capabilities {', '.join(f'{a}.{b}' for a, b in targets)}"
        progress(f"{flavour} {trt_version}, polygraphy {polygraphy.__version__}, {where}")

    if not opts.random_weights:
        ensure_synthetic(prof, progress)  # the tiny profiles on a fresh clone
    ckpts = {name: io_spec.engine_checkpoints(prof, io.part) for name, io in ios.items()}
    if not opts.random_weights:
        for name, roles in ckpts.items():
            for role, p in roles.items():
                if not Path(p).is_file():
                    raise CheckpointError(f"checkpoint for {role} not found; check checkpoints.{ios[name].part} "
                                          "in the profile (or export from random weights with --random-weights)",
                                          path=p)
    else:
        ckpts = {name: {} for name in ios}
    exp = Expected(part_hashes=io_spec.engine_hashes(prof, ios), io_hashes={n: io.hash() for n, io in ios.items()},
                   checkpoints=ckpts, tensorrt_version=trt_version, gpu_name=gpu_name if flavour == "tensorrt" else None,
                   compute_capability=cc if flavour == "tensorrt" else None, build=opts.build_settings(),
                   flavour=flavour, targets=targets)
    hashes = HashCache(folder / HASH_CACHE_NAME)
    manifest = load_manifest(folder)
    records: dict[str, EngineRecord] = dict(manifest.engines) if manifest else {}

    def save() -> None:
        hashes.save()
        write_manifest(folder, Manifest(
            profile_name=prof.name, profile_path=str(prof.path or ""), profile_hash=io_spec.profile_hash(prof),
            engines=records, sdvg_rt_version=sdvg_rt.__version__, updated=_now()))

    # 1. what is stale
    need_onnx, need_plan = {}, {}
    for name in ios:
        rec = records.get(name)
        r_onnx = ["--force"] if opts.force else onnx_stale_reasons(folder, rec, name, exp, hashes)
        if r_onnx:
            need_onnx[name] = r_onnx
        if not opts.onnx_only:
            r_plan = r_onnx or plan_stale_reasons(folder, rec, name, exp, hashes)
            if r_plan:
                need_plan[name] = r_plan
        if name not in need_onnx and name not in need_plan:
            report.up_to_date.append(name)
    for name in ios:
        why = need_onnx.get(name) or need_plan.get(name)
        progress(f"{name}: " + ("up to date" if not why else "stale: " + "; ".join(why)))

    # 2. ONNX export, one model load per part
    for part in parts:
        names = [n for n in need_onnx if ios[n].part == part]
        if not names:
            continue
        progress(f"{part}: random weights at full size (the synthetic rule), {device} ..." if opts.random_weights
                 else f"loading {part} from {getattr(prof.checkpoints, part)} ({device}) ...")
        try:
            model = random_part(prof, part, device) if opts.random_weights else load_part(prof, part, device)
            paths = onnx_export.export_part(
                part, {n: ios[n] for n in names}, model, folder / "onnx",
                height=prof.video.height, width=prof.video.width, progress=progress)
        except torch.OutOfMemoryError as e:
            raise OutOfMemoryError(
                f"out of device memory while exporting {part} on {device} (the model and one traced "
                f"forward must fit). Free the GPU, or export on the CPU with --device cpu (slow for the "
                f"14B), then build the plans. Detail: {str(e).splitlines()[0]}") from e
        finally:
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for name, path in paths.items():
            io = ios[name]
            files = {f.name: hashes.record(f) for f in onnx_files(path)}
            records[name] = EngineRecord(
                name=name, part=io.part, part_hash=exp.part_hashes[name], io=io.to_json(), io_hash=io.hash(),
                onnx=str(path.relative_to(folder)), onnx_size=path.stat().st_size,
                onnx_sha256=files[path.name].sha256, opset=onnx_export.OPSET, exporter=onnx_export.EXPORTER,
                dtype=io.dtype, checkpoints={role: hashes.record(p) for role, p in ckpts[name].items()},
                exported=_now(), plan=None, onnx_files=files)
            report.exported.append(name)
            save()

    # 3. plans
    if not opts.onnx_only:
        assert trt_mod is not None and trt_version is not None and flavour is not None

        machine = gpu_name if flavour == "tensorrt" else "cc" + "-".join(f"{a}{b}" for a, b in targets or ())
        # TensorRT-RTX times no tactics ahead of time (it compiles for the GPU at load): no timing cache
        cache = opts.timing_cache or (folder / f"timing-{_slug(str(machine))}-{flavour}{trt_version}.cache"
                                      if flavour == "tensorrt" else None)
        for name in need_plan:
            rec = records[name]
            plan_path = folder / f"{name}.plan"
            progress(f"building {name} ({flavour} {trt_version}, opt level {opts.opt_level}) ...")
            t0 = time.perf_counter()
            warnings = build_plan(folder / rec.onnx, ios[name], plan_path, opt_level=opts.opt_level, timing_cache=cache,
                       workspace_bytes=opts.workspace_bytes, rebuild=rebuild_command(prof.path, [rec.part]),
                       flavour=flavour, compute_capabilities=targets)
            st = plan_path.stat()
            records[name] = rec.with_plan(PlanRecord(
                file=plan_path.name, size=st.st_size, sha256=sha256_file(plan_path),
                tensorrt_version=trt_version, polygraphy_version=polygraphy.__version__, gpu_name=gpu_name,
                compute_capability=cc, build={**opts.build_settings(), "timing_cache": str(cache) if cache else None,
                                               "profile": {k: list(map(list, v)) for k, v in ios[name].profile().items()},
                                               "warnings": warnings, "seconds": round(time.perf_counter() - t0, 2)}, built=_now(),
                flavour=flavour, targets=tuple(targets) if targets else ((cc,) if cc else ()), mtime_ns=st.st_mtime_ns))
            report.built.append(name)
            save()
            progress(f"  {name}: {st.st_size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s"
                     + (f"; warnings: {warnings}" if warnings else ""))
    if not need_onnx and not need_plan:
        progress(f"all engines of {', '.join(parts)} in {folder} are up to date")
    save()
    report.seconds = time.perf_counter() - t_start
    return report


def load_part(prof: Profile, part: str, device: torch.device):
    """Load one part with the runtime's own loaders, in the dtype of its engine graph."""
    ck = prof.checkpoints
    if part in ("drafter", "target"):
        from sdvg_rt.checkpoints.wan_dit import load_dit

        model = load_dit(getattr(ck, part), device, DTYPES[prof.precision], expect=getattr(prof.models, part)).eval()
        from sdvg_rt.models.fp8 import apply_quantization  # quantization: fp8 -> Q/DQ nodes in the graph

        apply_quantization(prof, device, {part: model}, check_device=False)
        return model
    if part == "vae":
        from sdvg_rt.checkpoints.wan_vae import load_vae_decoder

        return load_vae_decoder(ck.vae, device, DTYPES[prof.precision]).eval()
    from sdvg_rt.checkpoints.imagereward import load_imagereward

    model, _tok = load_imagereward(ck.scorer, device=device, dtype=DTYPES[prof.scorer_precision])
    return model.eval()


def build_plan(onnx_path: Path, io: io_spec.EngineIO, plan_path: Path, *, opt_level: int = 3,
               timing_cache: Path | None = None, workspace_bytes: int | None = None, rebuild: str = "",
               flavour: str = "tensorrt", compute_capabilities: Sequence[tuple[int, int]] | None = None) -> list[str]:
    """Build one strongly typed plan from ``onnx_path`` with polygraphy's Python API.

    TensorRT reports failures (parser errors, out of memory) in its log and polygraphy then raises a
    generic error, so the log of this build is kept in ``<plan>.build.log`` and read on failure: an
    OOM becomes ``OutOfMemoryError`` with what to do, anything else a RuntimeError naming the log.
    The parsed network's I/O is checked against ``io`` (``trt_check.check_network``) before the build.
    The plan is written from TensorRT's host memory without a copy, after the parser and network (which
    hold the ONNX weights) are released. Returns the build's warnings that matter
    (``trt_check.build_warnings``; recorded in the manifest).
    """
    from .trt_check import build_warnings, check_network

    trt = tensorrt_module(flavour)  # a clear BackendUnavailableError first
    import_polygraphy(flavour)
    from polygraphy.backend.trt import Profile, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.logger import G_LOGGER

    if flavour == "tensorrt_rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX as CreateConfig
        extra: dict[str, Any] = {"compute_capabilities": list(compute_capabilities or RTX_PORTABLE)}
    else:
        from polygraphy.backend.trt import CreateConfig  # type: ignore[assignment]
        extra = {}
    log = plan_path.with_name(plan_path.name + ".build.log")
    log.unlink(missing_ok=True)  # this build's log only
    previous_log = G_LOGGER.log_file
    G_LOGGER.log_file = str(log)
    plan = None
    try:
        # 1. parse: strongly typed (the graph's dtypes are the engine's)
        builder, network, parser = network_from_onnx_path(str(onnx_path), strongly_typed=True)
        check_network(network, io, onnx_path)
        # 2. one optimization profile from io_spec (min / opt / max of every dynamic input)
        profile = Profile()
        for name, (lo, opt, hi) in io.profile().items():
            profile.add(name, min=lo, opt=opt, max=hi)
        config = CreateConfig(
            profiles=[profile],
            builder_optimization_level=opt_level,
            profiling_verbosity=trt.ProfilingVerbosity.LAYER_NAMES_ONLY,  # polygraphy's default is DETAILED
            load_timing_cache=str(timing_cache) if timing_cache is not None and timing_cache.exists() else None,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_bytes} if workspace_bytes else None,
            progress_monitor=_progress_monitor(io.name, trt),
            **extra,
        )
        # 3. build (the timing cache is updated in place)
        plan = engine_bytes_from_network((builder, network, parser), config=config,
                                         save_timing_cache=str(timing_cache) if timing_cache else None)
        del builder, network, parser, config
    except Exception as e:  # noqa: BLE001 - PolygraphyException et al., after TensorRT logged the cause
        text = f"{type(e).__name__} {e}\n" + (log.read_text(errors="replace") if log.is_file() else "")
        if _is_oom(text):
            raise OutOfMemoryError(
                f"out of memory while building {io.name} from {onnx_path} (log: {log}). The builder holds the "
                f"weights (and, for TensorRT 10/11, times tactics on the GPU). Free the machine (nothing else "
                f"loaded), lower --opt-level or set --workspace-gb, and build this part alone: {rebuild}") from None
        raise RuntimeError(f"{flavour} could not build {io.name} from {onnx_path}; its log is in {log}: {e}") from e
    finally:
        G_LOGGER.log_file = previous_log
    if plan is None:
        raise RuntimeError(f"{flavour} returned no engine for {io.name} ({onnx_path}); its log is in {log}")
    gc.collect()
    atomic_write_bytes(plan_path, memoryview(plan))
    del plan
    return build_warnings(log.read_text(errors="replace")) if log.is_file() else []


def import_polygraphy(flavour: str):
    """polygraphy, bound to ``flavour``'s module: polygraphy picks tensorrt or tensorrt_rtx when its
    TensorRT backend is first imported (``polygraphy.config.USE_TENSORRT_RTX``), so the choice is made
    before that import, and one process builds with one flavour."""
    import sys

    import polygraphy
    from polygraphy import config as pg_config

    want = flavour == "tensorrt_rtx"
    if "polygraphy.backend.trt" in sys.modules and pg_config.USE_TENSORRT_RTX != want:
        raise BackendUnavailableError(
            f"polygraphy's TensorRT backend is already bound to "
            f"{'tensorrt_rtx' if pg_config.USE_TENSORRT_RTX else 'tensorrt'} in this process; build with "
            f"{flavour} in a new process")
    pg_config.USE_TENSORRT_RTX = want
    return polygraphy


def check_targets(ccs: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """TensorRT-RTX target compute capabilities, validated (sorted, unique)."""
    out = tuple(sorted({(int(a), int(b)) for a, b in ccs}))
    bad = [c for c in out if c not in RTX_COMPUTE_CAPABILITIES]
    if bad or not out:
        raise BackendUnavailableError(
            f"TensorRT-RTX cannot target compute capability {', '.join(f'{a}.{b}' for a, b in bad) or '(none)'}; "
            f"it targets {', '.join(f'{a}.{b}' for a, b in RTX_COMPUTE_CAPABILITIES)} (Hopper, 9.0, takes "
            "TensorRT 10/11)")
    return out


def parse_compute_capabilities(text: str | None) -> tuple[tuple[int, int], ...] | None:
    """``"8.6,8.9,12.0"`` -> ((8, 6), (8, 9), (12, 0)); None stays None (the portable default)."""
    if not text:
        return None
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\.(\d)\s*", item)
        if not m:
            raise ValueError(f"--compute-capability: {item!r} is not MAJOR.MINOR (e.g. 8.9)")
        out.append((int(m.group(1)), int(m.group(2))))
    return tuple(out)


def random_part(prof: Profile, part: str, device: torch.device):
    """One part at the profile's size with the synthetic-checkpoint rule's weights (seed 0), built in
    memory: what a synthetic set would hold, without writing it (the full-size set is about 50 GB)."""
    dtype = DTYPES[prof.scorer_precision if part == "scorer" else prof.precision]
    name = getattr(prof.models, part)
    if part in ("drafter", "target"):
        from sdvg_rt.checkpoints.wan_dit import synthetic_dit_state_dict
        from sdvg_rt.models.wan_dit import WanDiT, WanDiTConfig

        cfg = WanDiTConfig.from_name(name)
        with torch.device("meta"):
            model = WanDiT(cfg)
        sd = {k: v.to(device) for k, v in synthetic_dit_state_dict(cfg, 0, dtype).items()}
        model.load_state_dict(sd, strict=True, assign=True)
        model.rope.build(device)
        return model.eval().requires_grad_(False)
    if part == "vae":
        from sdvg_rt.checkpoints.wan_vae import synthetic_vae_state_dict
        from sdvg_rt.models.wan_vae import WanVAEConfig, WanVAEDecoder

        cfg = WanVAEConfig.from_name(name)
        with torch.device("meta"):
            model = WanVAEDecoder(cfg)
        model.load_state_dict(synthetic_vae_state_dict(cfg, 0, decoder_only=True), strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    from sdvg_rt.checkpoints.imagereward import UNUSED_KEYS, UNUSED_PREFIXES, synthetic_state_dict
    from sdvg_rt.models.imagereward import ImageReward, ImageRewardConfig

    cfg = ImageRewardConfig.preset(name)
    sd = {k: v for k, v in synthetic_state_dict(cfg, 0).items()
          if not (k.startswith(UNUSED_PREFIXES) or k in UNUSED_KEYS)}
    with torch.device("meta"):
        model = ImageReward(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.blip.to(device=device, dtype=dtype)
    model.mlp.to(device=device, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def _progress_monitor(name: str, trt) -> trt.IProgressMonitor:
    """A TensorRT progress monitor printing the top-level build phases of engine ``name``."""
    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                print(f"    {name}: {phase_name} ({num_steps} steps)", flush=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


def _is_oom(text: str) -> bool:
    """TensorRT's and CUDA's ways of saying it (e.g. "Requested amount of GPU memory (...) could not be
    allocated", "cudaErrorMemoryAllocation", "out of memory")."""
    text = text.lower()
    return any(s in text for s in ("out of memory", "outofmemory", "cudaerrormemoryallocation",
                                   "insufficient memory", "requested amount of gpu memory",
                                   "could not be allocated"))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_parts(text: str | Sequence[str] | None) -> tuple[str, ...]:
    return tuple(io_spec.normalize_parts(text)) if text else io_spec.PARTS
