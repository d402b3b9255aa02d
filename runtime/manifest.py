"""Engine manifests: what a folder of TensorRT engines was built from, and whether it still fits.

``engines/<profile-name>/manifest.json`` holds one record per engine (``drafter.step``, ``vae.first``,
...): the ONNX file (size, sha256, opset, exporter, graph dtype), the engine's I/O spec and its hash,
the part hash (the profile fields that change this engine: its model config, dtypes and I/O; tau,
seed, outputs and the other parts do not count), the checkpoints it was exported from (path, size,
mtime, sha256) and, once built, the plan (size, sha256, TensorRT and polygraphy versions, GPU name and
compute capability, builder settings). Records are per engine so that rebuilding one part (hours for
the 14B) leaves the others valid.

Used by both packages: ``sdvg_export.build`` writes records and rebuilds what ``stale_reasons``
reports; the TensorRT backend calls ``check_engines`` before anything runs and raises
``EngineMismatchError`` with the exact rebuild command. A checkpoint's sha256 is reused while its
size and mtime are unchanged (``HashCache``), so checking a 28 GB checkpoint is a ``stat``.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import EngineMismatchError
from .video import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 2  # 2: TensorRT flavour, target compute capabilities, file records (mtime) of ONNX/plan
HASH_CACHE_NAME = ".sha256-cache.json"


# --- hashing --------------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no whitespace)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """A file as it was when recorded: absolute path, size, mtime (ns) and sha256."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


class HashCache:
    """sha256 of files keyed by (absolute path, size, mtime_ns), persisted as a small JSON file.

    A file whose size or mtime changed is hashed again; an unchanged one is not read at all.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict] = {}
        self.hashed: list[str] = []  # files actually read (for progress and tests)
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if isinstance(data, dict):
                    self._entries = data
            except (OSError, ValueError):
                self._entries = {}  # a corrupt cache only costs a re-hash

    def record(self, path: str | os.PathLike) -> FileRecord:
        p = Path(path).resolve()
        st = p.stat()
        e = self._entries.get(str(p))
        if e and e.get("size") == st.st_size and e.get("mtime_ns") == st.st_mtime_ns:
            return FileRecord(str(p), st.st_size, st.st_mtime_ns, e["sha256"])
        rec = FileRecord(str(p), st.st_size, st.st_mtime_ns, sha256_file(p))
        self.hashed.append(str(p))
        self._entries[str(p)] = {"size": rec.size, "mtime_ns": rec.mtime_ns, "sha256": rec.sha256}
        return rec

    def seed(self, rec: FileRecord) -> None:
        """Trust an earlier record (e.g. from a manifest) for as long as size and mtime match."""
        self._entries.setdefault(rec.path, {"size": rec.size, "mtime_ns": rec.mtime_ns,
                                            "sha256": rec.sha256})

    def save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self._entries, indent=1, sort_keys=True))


# --- schema ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanRecord:
    """A built TensorRT plan and everything it is specific to."""

    file: str                          # file name inside the engines folder
    size: int
    sha256: str
    tensorrt_version: str
    polygraphy_version: str
    gpu_name: str | None               # the GPU it was built on (None: TensorRT-RTX ahead of time, no GPU)
    compute_capability: tuple[int, int] | None  # that GPU's
    build: dict                        # builder settings: opt level, workspace, timing cache, typing
    built: str                         # ISO time
    flavour: str = "tensorrt"          # tensorrt | tensorrt_rtx
    targets: tuple[tuple[int, int], ...] = ()  # compute capabilities the plan runs on (TensorRT-RTX)
    mtime_ns: int = 0

    @staticmethod
    def from_json(d: Mapping) -> PlanRecord:
        d = dict(d)
        d["compute_capability"] = tuple(d["compute_capability"]) if d.get("compute_capability") else None
        d["targets"] = tuple(tuple(c) for c in d.get("targets", ()))
        return PlanRecord(**d)


@dataclass(frozen=True)
class EngineRecord:
    """One engine of the folder: its ONNX graph, what it was exported from, and its plan if built."""

    name: str
    part: str                          # drafter | target | vae | scorer
    part_hash: str                     # io_spec.engine_hash: config + dtypes + I/O of this engine
    io: dict                           # io_spec.EngineIO.to_json()
    io_hash: str
    onnx: str                          # path relative to the engines folder
    onnx_size: int
    onnx_sha256: str
    opset: int
    exporter: str
    dtype: str
    checkpoints: dict[str, FileRecord] = field(default_factory=dict)
    exported: str = ""
    plan: PlanRecord | None = None
    onnx_files: dict[str, FileRecord] = field(default_factory=dict)  # the graph and its external data

    @staticmethod
    def from_json(d: Mapping) -> EngineRecord:
        d = dict(d)
        d["checkpoints"] = {k: FileRecord(**v) for k, v in d.get("checkpoints", {}).items()}
        d["onnx_files"] = {k: FileRecord(**v) for k, v in d.get("onnx_files", {}).items()}
        d["plan"] = PlanRecord.from_json(d["plan"]) if d.get("plan") else None
        return EngineRecord(**d)

    def with_plan(self, plan: PlanRecord | None) -> EngineRecord:
        return replace(self, plan=plan)


@dataclass(frozen=True)
class Manifest:
    profile_name: str
    profile_path: str
    profile_hash: str
    engines: dict[str, EngineRecord]
    sdvg_rt_version: str
    updated: str
    schema: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @staticmethod
    def from_json(d: Mapping) -> Manifest:
        d = dict(d)
        d["engines"] = {k: EngineRecord.from_json(v) for k, v in d["engines"].items()}
        return Manifest(**d)


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest.to_json(), indent=2, sort_keys=True))
    return path


def load_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The folder's manifest, or None if there is none or it is unreadable / of another schema."""
    try:
        return read_manifest(folder, rebuild="")
    except EngineMismatchError:
        return None


def read_manifest(folder: str | os.PathLike, rebuild: str) -> Manifest:
    """Read ``folder/manifest.json``; a missing or unreadable one raises ``EngineMismatchError``."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise EngineMismatchError(
            f"no engines built for this profile: {path} does not exist.\n  build them with: {rebuild}"
        )
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"schema {data.get('schema')!r}, this sdvg-rt reads {SCHEMA_VERSION}")
        return Manifest.from_json(data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EngineMismatchError(
            f"engine manifest {path} is unreadable or of another version ({e}).\n"
            f"  rebuild with: {rebuild} --force"
        ) from e


# --- staleness ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    """What the current profile and machine need, per engine; compared by ``stale_reasons``.

    ``part_hashes`` / ``io_hashes``: engine name -> hash; ``checkpoints``: engine name -> {role: path}.
    ``tensorrt_version`` / ``compute_capability`` None: plans are not checked (``--onnx-only``).
    ``build``: only compared when set (the builder asks for settings; the runtime accepts any).
    ``flavour``: tensorrt | tensorrt_rtx; ``targets``: the compute capabilities a TensorRT-RTX build is
    asked for (None at run time, where ``compute_capability`` is the GPU's and must be among the plan's).
    """

    part_hashes: Mapping[str, str]
    io_hashes: Mapping[str, str]
    checkpoints: Mapping[str, Mapping[str, str | os.PathLike]]
    tensorrt_version: str | None = None
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    build: Mapping[str, Any] | None = None
    flavour: str | None = None
    targets: tuple[tuple[int, int], ...] | None = None


def onnx_files(onnx: Path) -> list[Path]:
    """The files of an exported graph: ``<engine>.onnx`` and, for a graph over 2 GB, its external data."""
    data = onnx.with_name(onnx.name + ".data")
    return [onnx] + ([data] if data.is_file() else [])


def file_changed(path: Path, old: FileRecord, hashes: HashCache) -> str | None:
    """Why ``path`` is not the file ``old`` recorded (missing, other size, other sha256 after an mtime
    change), or None. The sha256 is only recomputed when size or mtime moved."""
    if not path.is_file():
        return f"{path} is missing"
    st = path.stat()
    if st.st_size != old.size:
        return f"{path} has {st.st_size} bytes, the manifest says {old.size} (interrupted build or replaced file)"
    hashes.seed(old)
    now = hashes.record(path)
    if now.sha256 != old.sha256:
        return f"{path} changed (sha256 {old.sha256[:12]} -> {now.sha256[:12]})"
    return None


def onnx_stale_reasons(folder: str | os.PathLike, rec: EngineRecord | None, name: str, exp: Expected,
                       hashes: HashCache) -> list[str]:
    """Why the ONNX graph of engine ``name`` must be exported again (empty: it is up to date)."""
    if rec is None:
        return [f"{name} was never built for this profile"]
    reasons = []
    want = exp.part_hashes.get(name)
    if want is not None and rec.part_hash != want:
        reasons.append(f"the profile changed for this engine (model config, precision or shapes; "
                       f"hash {rec.part_hash[:12]} -> {want[:12]})")
    want_io = exp.io_hashes.get(name)
    if want_io is not None and rec.io_hash != want_io:
        reasons.append(f"I/O shapes changed (io hash {rec.io_hash[:12]} -> {want_io[:12]})")
    onnx = Path(folder) / rec.onnx
    recorded = rec.onnx_files or {onnx.name: FileRecord(str(onnx.resolve()), rec.onnx_size, -1, rec.onnx_sha256)}
    for fname, old in recorded.items():
        why = file_changed(onnx.with_name(fname), old, hashes)
        if why:
            reasons.append(f"ONNX file {why}")
    for f in onnx_files(onnx):
        if f.name not in recorded:
            reasons.append(f"ONNX file {f} is not in the manifest (exported by something else)")
    reasons += checkpoint_reasons(rec, name, exp, hashes)
    return reasons


def checkpoint_reasons(rec: EngineRecord, name: str, exp: Expected, hashes: HashCache,
                       missing_ok: bool = False) -> list[str]:
    """Checkpoints that changed since ``rec`` was exported (``missing_ok``: a plans-only deployment
    without them is fine)."""
    reasons = []
    want_ck = {k: str(Path(v).resolve()) for k, v in exp.checkpoints.get(name, {}).items()}
    if set(want_ck) != set(rec.checkpoints):
        reasons.append(f"checkpoint files changed ({sorted(rec.checkpoints)} -> {sorted(want_ck)})")
    for role, path in want_ck.items():
        old = rec.checkpoints.get(role)
        if old is None:
            continue
        if not Path(path).is_file():
            if not missing_ok:
                reasons.append(f"{role} checkpoint {path} does not exist")
            continue
        hashes.seed(old)
        now = hashes.record(path)
        if now.sha256 != old.sha256:
            reasons.append(f"{role} checkpoint changed ({old.path}, sha256 {old.sha256[:12]} -> "
                           f"{path}, {now.sha256[:12]})")
    return reasons


def plan_stale_reasons(folder: str | os.PathLike, rec: EngineRecord | None, name: str, exp: Expected,
                       hashes: HashCache, plans_only: bool = False) -> list[str]:
    """Why the plan of engine ``name`` must be built again: its ONNX is stale, it was never built,
    or it was built by another TensorRT flavour or version, for another GPU (TensorRT: the same GPU
    model; TensorRT-RTX: a target list holding this GPU's compute capability) or (when asked) with
    other builder settings.

    ``plans_only`` (the runtime): the ONNX graphs need not be there and checkpoints only count where they
    exist; the profile's hashes, the plan file (size, sha256) and the TensorRT/GPU checks still hold.
    """
    if rec is None:
        return [f"{name} was never built for this profile"]
    if plans_only:
        reasons = []
        if (want := exp.part_hashes.get(name)) is not None and rec.part_hash != want:
            reasons.append(f"the profile changed for this engine (hash {rec.part_hash[:12]} -> {want[:12]})")
        if (want := exp.io_hashes.get(name)) is not None and rec.io_hash != want:
            reasons.append(f"I/O shapes changed (io hash {rec.io_hash[:12]} -> {want[:12]})")
        reasons += checkpoint_reasons(rec, name, exp, hashes, missing_ok=True)
    else:
        reasons = onnx_stale_reasons(folder, rec, name, exp, hashes)
    p = rec.plan
    if p is None:
        return reasons + [f"{name} has no TensorRT plan yet (exported with --onnx-only?)"]
    if exp.flavour is not None and p.flavour != exp.flavour:
        reasons.append(f"TensorRT flavour changed (built with {p.flavour}, this run uses {exp.flavour})")
    elif exp.tensorrt_version is not None and p.tensorrt_version != exp.tensorrt_version:
        label = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}.get(p.flavour, p.flavour)
        reasons.append(f"{label} version changed (built with {p.tensorrt_version}, installed "
                       f"{exp.tensorrt_version})")
    if p.flavour == "tensorrt_rtx":
        if exp.targets is not None and tuple(p.targets) != tuple(exp.targets):
            reasons.append(f"target compute capabilities changed ({_ccs(p.targets)} -> {_ccs(exp.targets)})")
        if exp.compute_capability is not None and tuple(exp.compute_capability) not in tuple(p.targets):
            reasons.append(f"built for compute capabilities {_ccs(p.targets)}; this GPU ({exp.gpu_name}) is "
                           f"{_cc(exp.compute_capability)}")
    elif exp.compute_capability is not None and (p.compute_capability is None
                                                 or tuple(p.compute_capability) != tuple(exp.compute_capability)):
        reasons.append(f"GPU changed (built on {p.gpu_name}, compute capability {_cc(p.compute_capability)}; "
                       f"this GPU is {exp.gpu_name}, {_cc(exp.compute_capability)})")
    elif exp.gpu_name is not None and p.gpu_name != exp.gpu_name:
        reasons.append(f"GPU changed (built on {p.gpu_name}, this GPU is {exp.gpu_name})")
    if exp.build is not None:
        for k, v in exp.build.items():
            if p.build.get(k) != v:
                reasons.append(f"build setting {k} changed ({p.build.get(k)!r} -> {v!r})")
    plan = Path(folder) / p.file
    why = file_changed(plan, FileRecord(str(plan.resolve()), p.size, p.mtime_ns, p.sha256), hashes)
    if why:
        reasons.append(f"plan file {why}")
    return reasons


def check_engines(folder: str | os.PathLike, names: Iterable[str], exp: Expected, rebuild: str,
                  hashes: HashCache | None = None, plans_only: bool = True) -> Manifest:
    """Raise ``EngineMismatchError`` listing every stale plan of ``names`` and the rebuild command
    (``plans_only``, the runtime's check: see ``plan_stale_reasons``)."""
    manifest = read_manifest(folder, rebuild)
    own = hashes is None
    hashes = HashCache(Path(folder) / HASH_CACHE_NAME) if own else hashes
    problems = {n: r for n in names
                if (r := plan_stale_reasons(folder, manifest.engines.get(n), n, exp, hashes, plans_only))}
    if own and hashes.hashed:  # a checkpoint re-hashed after an mtime change: once, not at every start
        try:
            hashes.save()
        except OSError:  # a read-only engines folder: the cache is an optimisation
            pass
    if problems:
        lines = [f"TensorRT engines in {folder} do not match this profile/machine:"]
        for n, rs in problems.items():
            lines += [f"  {n}: {r}" for r in rs]
        lines.append(f"  rebuild with: {rebuild}")
        raise EngineMismatchError("\n".join(lines))
    return manifest


def rebuild_command(profile_path: str | os.PathLike | None, parts: Iterable[str] | None = None) -> str:
    """The exact command that rebuilds (only) what is stale for ``profile_path``."""
    cmd = f"python -m sdvg_export build --profile {profile_path or '<profile.yaml>'}"
    parts = list(parts or [])
    if parts:
        cmd += " --parts " + ",".join(parts)
    return cmd


def _ccs(ccs) -> str:
    return ", ".join(_cc(c) for c in ccs) or "none"


def _cc(cc) -> str:
    return f"{cc[0]}.{cc[1]}" if cc else "?"


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


