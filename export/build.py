"""Engine builds: ``python -m sdvg_export build --profile P`` (what ``make engines PROFILE=P`` runs).

For each engine of the requested parts (``io_spec.engine_ios``), in ``engines/<profile-name>/``:
1. decide what is stale (``manifest.onnx_stale_reasons`` / ``plan_stale_reasons``): a changed part
   config or shape, a changed checkpoint (sha256, reused while size and mtime hold), another
   TensorRT version, GPU or builder setting, a missing or truncated file; ``--force`` rebuilds all;
2. export the stale ONNX graphs (``onnx/<engine>.onnx``), loading each part's checkpoint once with
   the runtime's own loaders, on the GPU when there is one (tracing runs one forward);
3. build the stale plans (``<engine>.plan``) with polygraphy's Python API: ``network_from_onnx_path``
   with ``strongly_typed=True`` (the precision is in the graph; TensorRT 11 has no precision flags),
   LayerNorm layers computing in fp32, one optimization profile from io_spec's min/opt/max, builder
   optimization level, a timing cache per GPU and TensorRT version, and a workspace limit;
4. record everything in ``manifest.json`` after every engine, so an interrupted build resumes.

``--onnx-only`` does steps 1, 2 and 4 without TensorRT (what CI runs on the tiny profile). Without
``--onnx-only`` a missing or stub-only ``tensorrt`` raises ``BackendUnavailableError`` before any work.
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
from sdvg_rt.backends.tensorrt_backend import engines_folder, tensorrt_module
from sdvg_rt.errors import BackendUnavailableError, CheckpointError, OutOfMemoryError
from sdvg_rt.manifest import (
    HASH_CACHE_NAME, EngineRecord, Expected, HashCache, Manifest, PlanRecord,
    load_manifest, onnx_stale_reasons, plan_stale_reasons, rebuild_command, sha256_file, write_manifest,
)
from sdvg_rt.io_spec import DTYPES
from sdvg_rt.profiles import REPO_ROOT, Profile, load_profile
from sdvg_rt.video import atomic_write_bytes

from . import onnx_export

if TYPE_CHECKING:
    import tensorrt as trt

DEFAULT_ENGINES_DIR = REPO_ROOT / "engines"


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

    def build_settings(self) -> dict[str, Any]:
        """The settings recorded with a plan (and compared: another value rebuilds)."""
        return {"opt_level": self.opt_level, "workspace_bytes": self.workspace_bytes,
                "strongly_typed": True, "layernorm_fp32": True}


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

    trt_version = gpu_name = cc = None
    trt_mod = None
    if not opts.onnx_only:
        trt_mod = tensorrt_module()
        import polygraphy

        trt_version = trt_mod.__version__
        gpu_name, cc = gpu_info(device)
        progress(f"TensorRT {trt_version}, polygraphy {polygraphy.__version__}, {gpu_name} "
                 f"(compute capability {cc[0]}.{cc[1]})")

    ckpts = {name: io_spec.engine_checkpoints(prof, io.part) for name, io in ios.items()}
    for name, roles in ckpts.items():
        for role, p in roles.items():
            if not Path(p).is_file():
                raise CheckpointError(f"checkpoint for {role} not found; check checkpoints.{ios[name].part} "
                                      "in the profile", path=p)
    exp = Expected(part_hashes=io_spec.engine_hashes(prof, ios), io_hashes={n: io.hash() for n, io in ios.items()},
                   checkpoints=ckpts, tensorrt_version=trt_version, gpu_name=gpu_name, compute_capability=cc,
                   build=opts.build_settings())
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
        progress(f"loading {part} from {getattr(prof.checkpoints, part)} ({device}) ...")
        try:
            model = load_part(prof, part, device)
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
            records[name] = EngineRecord(
                name=name, part=io.part, part_hash=exp.part_hashes[name], io=io.to_json(), io_hash=io.hash(),
                onnx=str(path.relative_to(folder)), onnx_size=path.stat().st_size, onnx_sha256=sha256_file(path),
                opset=onnx_export.OPSET, exporter=onnx_export.EXPORTER, dtype=io.dtype,
                checkpoints={role: hashes.record(p) for role, p in ckpts[name].items()},
                exported=_now(), plan=None)
            report.exported.append(name)
            save()

    # 3. plans
    if not opts.onnx_only:
        assert trt_mod is not None and trt_version is not None and gpu_name is not None and cc is not None
        import polygraphy

        cache = opts.timing_cache or folder / f"timing-{_slug(gpu_name)}-trt{trt_version}.cache"
        for name in need_plan:
            rec = records[name]
            plan_path = folder / f"{name}.plan"
            progress(f"building {name} (TensorRT {trt_version}, opt level {opts.opt_level}) ...")
            t0 = time.perf_counter()
            build_plan(folder / rec.onnx, ios[name], plan_path, opt_level=opts.opt_level, timing_cache=cache,
                       workspace_bytes=opts.workspace_bytes, rebuild=rebuild_command(prof.path, [rec.part]))
            records[name] = rec.with_plan(PlanRecord(
                file=plan_path.name, size=plan_path.stat().st_size, sha256=sha256_file(plan_path),
                tensorrt_version=trt_version, polygraphy_version=polygraphy.__version__, gpu_name=gpu_name,
                compute_capability=cc, build={**opts.build_settings(), "timing_cache": str(cache)}, built=_now()))
            report.built.append(name)
            save()
            progress(f"  {name}: {plan_path.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t0:.0f} s")
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
               timing_cache: Path | None = None, workspace_bytes: int | None = None, rebuild: str = "") -> None:
    """Build one strongly typed plan from ``onnx_path`` with polygraphy's Python API.

    TensorRT reports failures (parser errors, out of memory) in its log and polygraphy then raises a
    generic error, so the log of this build is kept in ``<plan>.build.log`` and read on failure: an
    OOM becomes ``OutOfMemoryError`` with what to do, anything else a RuntimeError naming the log.
    """
    tensorrt_module()  # a clear BackendUnavailableError first
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.logger import G_LOGGER

    log = plan_path.with_name(plan_path.name + ".build.log")
    previous_log = G_LOGGER.log_file
    G_LOGGER.log_file = str(log)
    try:
        # 1. parse: strongly typed (the graph's dtypes are the engine's), LayerNorms computing in fp32
        builder, network, parser = network_from_onnx_path(str(onnx_path), strongly_typed=True)
        layernorm_in_fp32(network)
        # 2. one optimization profile from io_spec (min / opt / max of every dynamic input)
        profile = Profile()
        for name, (lo, opt, hi) in io.profile().items():
            profile.add(name, min=lo, opt=opt, max=hi)
        config = CreateConfig(
            profiles=[profile],
            builder_optimization_level=opt_level,
            load_timing_cache=str(timing_cache) if timing_cache is not None and timing_cache.exists() else None,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_bytes} if workspace_bytes else None,
            progress_monitor=_progress_monitor(io.name),
        )
        # 3. build (the timing cache is updated in place)
        plan = engine_bytes_from_network((builder, network, parser), config=config,
                                         save_timing_cache=str(timing_cache) if timing_cache else None)
    except Exception as e:  # noqa: BLE001 - PolygraphyException et al., after TensorRT logged the cause
        text = f"{type(e).__name__} {e}\n" + (log.read_text(errors="replace") if log.is_file() else "")
        if _is_oom(text):
            raise OutOfMemoryError(
                f"out of GPU memory while building {io.name} from {onnx_path} (TensorRT log: {log}). TensorRT "
                f"holds the weights and times tactics on the GPU during the build (more than at run time). Free "
                f"the GPU (no other process, nothing else loaded), lower --opt-level or set --workspace-gb, and "
                f"build this part alone: {rebuild}") from None
        raise RuntimeError(f"TensorRT could not build {io.name} from {onnx_path}; its log is in {log}: {e}") from e
    finally:
        G_LOGGER.log_file = previous_log
    if plan is None:
        raise RuntimeError(f"TensorRT returned no engine for {io.name} ({onnx_path}); its log is in {log}")
    atomic_write_bytes(plan_path, bytes(plan))


def layernorm_in_fp32(network: trt.INetworkDefinition) -> int:
    """Make every normalization layer compute in fp32 (the model's LayerNorms do: torch's bf16 kernels
    accumulate in fp32). Returns how many layers were set."""
    import tensorrt as trt

    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.__class__ = trt.INormalizationLayer  # the Python API's way to reach the subclass
            norm: trt.INormalizationLayer = layer  # type: ignore[assignment]
            norm.compute_precision = trt.DataType.FLOAT
            count += 1
    return count


def _progress_monitor(name: str) -> trt.IProgressMonitor:
    """A TensorRT progress monitor printing the top-level build phases of engine ``name``."""
    import tensorrt as trt

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
