"""Profiles: one YAML file -> frozen dataclasses, validated field by field.

A profile names the checkpoints (relative paths resolve against ``root``, itself relative to the profile's
folder; without ``root``, against the profile's folder; ``cache://x`` is ``x`` under ``cache_home()``;
``hf://<owner>/<repo>[@<revision>]/<path>`` is a file or folder in the local Hugging Face hub cache, resolved
offline), the expected architectures, the video geometry,
the schedule, the cache window, the precision, one backend per component, the sampling defaults and the
output settings. Every problem raises ``ProfileError`` naming the file and the field (``video.width``).

    profile = load_profile("profiles/paper-832x480.yaml", tau=-0.5)   # overrides by field name
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from .decide import MODES
from .errors import ProfileError

PRECISIONS = ("bf16", "fp16", "fp32")
BACKENDS = ("torch", "tensorrt")
TRT_FLAVOURS = ("auto", "tensorrt", "tensorrt_rtx")  # auto: what is installed and runs on this GPU
QUANTIZATIONS = ("bf16", "fp8")
ATTENTION_BACKENDS = ("auto", "fa4", "cudnn", "flash", "efficient", "math")  # models.attention.NAMES
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")
COMPONENTS = ("drafter", "target", "vae", "scorer")
DEVICE_NAME = re.compile(r"cpu|cuda(:\d+)?")  # devices.<part>


def _shipped_profiles_dir() -> Path:
    """The shipped profiles: package data ``sdvg_rt/_profiles`` in a wheel; the ``profiles/`` folder beside
    the package in a source checkout (which the wheel's ``_profiles`` is built from)."""
    here = Path(__file__).resolve().parent
    for d in (here / "_profiles", here.parent / "profiles"):
        if (d / "tiny.yaml").is_file():
            return d
    return here / "_profiles"


def cache_home() -> Path:
    """Where generated data lives (the synthetic demo set, checkpoint hashes): ``$SDVG_RT_CACHE``, else
    ``$XDG_CACHE_HOME/sdvg-rt``, else ``~/.cache/sdvg-rt``. A profile writes it as ``cache://<path>``."""
    env = os.environ.get("SDVG_RT_CACHE")
    if env:
        return Path(os.path.expanduser(env))
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(os.path.expanduser(xdg) if xdg else os.path.expanduser("~/.cache")) / "sdvg-rt"


PROFILES_DIR = _shipped_profiles_dir()
DEMO_PROFILE = PROFILES_DIR / "tiny.yaml"
# TensorRT engines: ``$SDVG_RT_ENGINES``, else ``engines/`` in the working folder, one subfolder per profile.
ENGINES_DIR = Path(os.environ.get("SDVG_RT_ENGINES", "engines"))
CACHE_SCHEME, HF_SCHEME = "cache://", "hf://"


@dataclass(frozen=True)
class Checkpoints:
    drafter: Path  # Self-Forcing 1.3B (.pt with generator_ema/generator) or any Wan DiT format
    target: Path  # 14B block-causal (e.g. Krea safetensors)
    vae: Path  # Wan2.1_VAE.pth
    text_encoder: Path  # models_t5_umt5-xxl-enc-bf16.pth
    tokenizer: Path  # folder of the umT5 tokenizer (google/umt5-xxl)
    scorer: Path  # ImageReward folder (ImageReward.pt, med_config.json, vocab.txt) or the .pt beside them


@dataclass(frozen=True)
class Models:
    """Expected architecture presets: a checkpoint of another size is refused at load."""

    drafter: str = "wan2.1-1.3b"
    target: str = "wan2.1-14b"
    vae: str = "wan2.1"
    scorer: str = "v1.0"


@dataclass(frozen=True)
class Video:
    width: int = 832
    height: int = 480
    latent_frames: int = 21
    frames_per_block: int = 3

    @property
    def latent_height(self) -> int:
        return self.height // 8

    @property
    def latent_width(self) -> int:
        return self.width // 8

    @property
    def num_blocks(self) -> int:
        return self.latent_frames // self.frames_per_block

    @property
    def total_frames(self) -> int:
        return 4 * self.latent_frames - 3


@dataclass(frozen=True)
class ScheduleConfig:
    steps: tuple[int, ...] = (1000, 750, 500, 250)  # SF denoising_step_list, before the shift warp
    shift: float = 5.0


@dataclass(frozen=True)
class Cache:
    window_frames: int = 21  # latent frames the KV cache holds (local attention size); >= a whole video = global
    sink_frames: int = 0  # first frames never evicted once the window rolls


@dataclass(frozen=True)
class Backends:
    drafter: str = "torch"
    target: str = "torch"
    vae: str = "torch"
    scorer: str = "torch"
    tensorrt: str = "auto"  # TensorRT flavour for the tensorrt components: auto | tensorrt | tensorrt_rtx


@dataclass(frozen=True)
class Performance:
    """GPU fast path of the torch backend (ignored on CPU, where everything runs eagerly)."""

    attention: str = "auto"  # auto (FlashAttention-4 on Hopper if installed, else cuDNN) | fa4 | cudnn | flash | efficient | math
    cuda_graphs: bool = True  # one graph per (model, block index), VAE decode and scorer
    compile: bool = True  # the elementwise groups as single kernels (DiT: Triton kernels; the rest: torch.compile)
    tf32: bool = True  # fp32 matmuls and convolutions (the fp32 scorer) on TF32 tensor cores (~1e-3 relative)


@dataclass(frozen=True)
class Quantization:
    """Linear layers of each DiT: bf16, or fp8 (e4m3, static calibrated scales; ``models.fp8``)."""

    target: str = "bf16"  # bf16 | fp8 (fp8 needs compute capability >= 8.9 and `sdvg-rt calibrate` scales)
    drafter: str = "bf16"
    keep_first: int = 1  # transformer blocks kept in bf16 at the start and the end of the stack
    keep_last: int = 1
    weight_scaling: str = "channel"  # fp8 weight scales per output channel | per tensor
    cross_kv: bool = False  # also the cross-attention K/V weights in fp8 (once per prompt: saves memory only)
    fast_accum: bool = True  # fp8 GEMMs accumulate in the tensor cores' fast mode (faster) | false: fp32 promotion


@dataclass(frozen=True)
class Devices:
    """Where each part runs (``cpu``, ``cuda`` or ``cuda:N``); unset: the runtime's device (``--device``).
    The drafter, the VAE and the scorer share one device (a draft is decoded and scored where it is made);
    the target may have its own (``sdvg_rt.placement``)."""

    drafter: str | None = None
    vae: str | None = None
    scorer: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class Sampling:
    mode: str = "sdvg"
    tau: float = -0.7
    seed: int = 0
    lazy_commit: bool = True  # accepted drafts reach the target's cache only when the target is next needed
    fused_commits: bool = False  # commit several pending blocks in one masked forward (components.Denoiser)


@dataclass(frozen=True)
class Output:
    fps: int = 16
    crf: int = 18  # libx264 constant rate factor (0 lossless .. 51 worst)
    preset: str = "medium"  # libx264 speed/size preset


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path | None  # the YAML file it came from (None if built in code)
    checkpoints: Checkpoints
    root: Path | None = None  # the folder relative checkpoint paths resolved against
    models: Models = Models()
    video: Video = Video()
    schedule: ScheduleConfig = ScheduleConfig()
    cache: Cache = Cache()
    precision: str = "bf16"  # DiTs, VAE (and the text encoder on GPU)
    scorer_precision: str = "fp32"  # ImageReward: decisions compare its scores with tau
    backends: Backends = Backends()
    performance: Performance = Performance()
    quantization: Quantization = Quantization()
    sampling: Sampling = Sampling()
    output: Output = Output()
    devices: Devices = Devices()

    def cache_geometry(self) -> tuple[int, int]:
        """(window_frames, sink_frames) actually allocated: a window covering the whole video is cut to it."""
        if self.cache.window_frames >= self.video.latent_frames:
            return self.video.latent_frames, 0
        return self.cache.window_frames, self.cache.sink_frames

    def replace(self, **overrides) -> Profile:
        """A copy with fields replaced by name (``tau=0.1``, ``window_frames=9``) or ``section__field``
        where a name is ambiguous (``backends__target="torch"``). The result is validated again."""
        return _apply_overrides(self, overrides)


_SECTIONS = {
    "checkpoints": Checkpoints,
    "models": Models,
    "video": Video,
    "schedule": ScheduleConfig,
    "cache": Cache,
    "backends": Backends,
    "performance": Performance,
    "quantization": Quantization,
    "sampling": Sampling,
    "output": Output,
    "devices": Devices,
}
_TOP = ("name", "root", "precision", "scorer_precision")


def load_profile(path: str | os.PathLike, **overrides) -> Profile:
    """Read and validate a profile YAML (``overrides`` as in ``Profile.replace``)."""
    import yaml

    p = Path(path)
    if not p.is_file() and p.parent == Path(".") and (PROFILES_DIR / f"{p.stem}.yaml").is_file():
        p = PROFILES_DIR / f"{p.stem}.yaml"  # a shipped profile by name: "paper-832x480" or "tiny.yaml"
    if not p.is_file():
        shipped = sorted(x.stem for x in PROFILES_DIR.glob("*.yaml")) if PROFILES_DIR.is_dir() else []
        hint = f"; or name a shipped profile: {', '.join(shipped)}" if shipped else ""
        raise ProfileError(f"profile file not found (give the path of a profile YAML{hint})", path=p)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ProfileError(f"profile is not UTF-8 text ({e.reason} at byte {e.start})", path=p) from None
    except yaml.YAMLError as e:
        raise ProfileError(f"profile is not valid YAML: {e}", path=p) from None
    if not isinstance(raw, dict):
        raise ProfileError(f"profile must be a YAML mapping of sections, found {type(raw).__name__}", path=p)
    profile = _build(raw, p)
    return _apply_overrides(profile, overrides) if overrides else profile


def _build(raw: dict, path: Path | None) -> Profile:
    unknown = sorted(set(raw) - set(_SECTIONS) - set(_TOP))
    if unknown:
        raise ProfileError(
            f"unknown top-level field {unknown[0]!r}; allowed: {', '.join(list(_TOP) + list(_SECTIONS))}",
            path=path, field=unknown[0],
        )
    base = _abs(path.parent if path is not None else Path.cwd())
    root = raw.get("root")
    if root is not None:
        if not isinstance(root, str) or not root:
            raise ProfileError("root must be a folder path (string)", path=path, field="root")
        base = _local_path(root, base)
    sections = {}
    for name, cls in _SECTIONS.items():
        sec = raw.get(name)
        if sec is None and name == "checkpoints":
            raise ProfileError("the checkpoints section is required", path=path, field="checkpoints")
        sections[name] = _section(cls, name, sec or {}, path, base)
    name = raw.get("name", path.stem if path is not None else "profile")
    if not isinstance(name, str) or not name:
        raise ProfileError("name must be a non-empty string", path=path, field="name")
    prec = {k: raw[k] for k in ("precision", "scorer_precision") if k in raw}
    profile = Profile(name=name, path=path, root=base, **prec, **sections)
    validate(profile)
    return profile


def _local_path(text: str, base: Path) -> Path:
    """``cache://x`` -> ``cache_home()/x``; ``~`` expanded; relative paths against ``base`` (the profile's
    folder, or its ``root``)."""
    if text.startswith(CACHE_SCHEME):
        return _abs(cache_home() / text[len(CACHE_SCHEME):])
    p = Path(os.path.expanduser(text))
    return _abs(p if p.is_absolute() else (base / p))


def _abs(p: Path) -> Path:
    """Absolute and normalised (``..`` collapsed), without resolving symlinks."""
    return Path(os.path.normpath(os.path.abspath(p)))


def _section(cls, name: str, raw, path: Path | None, base: Path):
    if not isinstance(raw, dict):
        raise ProfileError(f"{name} must be a mapping, found {type(raw).__name__}", path=path, field=name)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ProfileError(
            f"unknown field {name}.{unknown[0]}; allowed: {', '.join(known)}", path=path, field=f"{name}.{unknown[0]}"
        )
    missing = [k for k, f in known.items() if f.default is dataclasses.MISSING and k not in raw]
    if missing:
        raise ProfileError(f"missing required field {name}.{missing[0]}", path=path, field=f"{name}.{missing[0]}")
    values = {}
    for k, v in raw.items():
        values[k] = _coerce(cls, known[k], v, f"{name}.{k}", path, base)
    return cls(**values)


def _coerce(cls, f, v, where: str, path, base: Path):
    """Type-check one field from YAML (ints stay ints, floats accept ints and inf, paths resolve)."""
    default = None if f.default is dataclasses.MISSING else f.default
    if cls is Checkpoints:
        if not isinstance(v, str) or not v:
            raise ProfileError("checkpoint path must be a non-empty string", path=path, field=where)
        if v.startswith(HF_SCHEME):
            from .checkpoints.hub import resolve_hf

            return resolve_hf(v, path=path, field=where)
        return _local_path(v, base)
    if cls is Devices:
        if not isinstance(v, str) or not DEVICE_NAME.fullmatch(v):
            raise ProfileError(f"must be a device name: cpu, cuda or cuda:N (e.g. cuda:1), got {v!r}; leave it "
                               "out to use the runtime's device (--device)", path=path, field=where)
        return v
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ProfileError(f"must be true or false, got {v!r}", path=path, field=where)
        return v
    if isinstance(default, int):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProfileError(f"must be an integer, got {v!r}", path=path, field=where)
        return v
    if isinstance(default, float):
        if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "-inf", ".inf", "-.inf"):
            v = float(v.replace(".", ""))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ProfileError(f"must be a number (inf and -inf allowed), got {v!r}", path=path, field=where)
        return float(v)
    if isinstance(default, tuple):
        if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ProfileError(f"must be a non-empty list of integers, got {v!r}", path=path, field=where)
        return tuple(v)
    if isinstance(default, str):
        if not isinstance(v, str):
            raise ProfileError(f"must be a string, got {v!r}", path=path, field=where)
        return v
    return v


def validate(p: Profile) -> None:
    """Check cross-field rules; raises ProfileError naming the field."""
    path = p.path
    v, c = p.video, p.cache

    def bad(field_name, msg):
        raise ProfileError(msg, path=path, field=field_name)

    for k in ("width", "height"):
        x = getattr(v, k)
        if x <= 0 or x % 16:
            bad(f"video.{k}", f"must be a positive multiple of 16 (VAE stride 8 x patch 2), got {x}")
    if v.frames_per_block <= 0:
        bad("video.frames_per_block", f"must be positive, got {v.frames_per_block}")
    if v.latent_frames <= 0 or v.latent_frames % v.frames_per_block:
        bad("video.latent_frames", f"must be a positive multiple of frames_per_block ({v.frames_per_block}), "
            f"got {v.latent_frames}")
    if c.window_frames <= 0 or c.window_frames % v.frames_per_block:
        bad("cache.window_frames", f"must be a positive multiple of frames_per_block ({v.frames_per_block}), "
            f"got {c.window_frames}")
    if c.sink_frames < 0 or c.sink_frames % v.frames_per_block:
        bad("cache.sink_frames", f"must be a multiple of frames_per_block ({v.frames_per_block}), got {c.sink_frames}")
    if c.sink_frames and c.window_frames - c.sink_frames < v.frames_per_block:
        bad("cache.sink_frames", f"leaves no room for a block in the window ({c.window_frames} frames)")
    s = p.schedule
    if any(not 0 < t <= 1000 for t in s.steps) or list(s.steps) != sorted(s.steps, reverse=True):
        bad("schedule.steps", f"must be decreasing integers in (0, 1000], got {list(s.steps)}")
    if not s.shift > 0 or math.isinf(s.shift):
        bad("schedule.shift", f"must be a positive number, got {s.shift}")
    for k in ("precision", "scorer_precision"):
        if getattr(p, k) not in PRECISIONS:
            bad(k, f"must be one of {', '.join(PRECISIONS)}, got {getattr(p, k)!r}")
    for comp in COMPONENTS:
        b = getattr(p.backends, comp)
        if b not in BACKENDS:
            bad(f"backends.{comp}", f"must be one of {', '.join(BACKENDS)}, got {b!r}")
    if p.backends.tensorrt not in TRT_FLAVOURS:
        bad("backends.tensorrt", f"must be one of {', '.join(TRT_FLAVOURS)}, got {p.backends.tensorrt!r}")
    if p.performance.attention not in ATTENTION_BACKENDS:
        bad("performance.attention", f"must be one of {', '.join(ATTENTION_BACKENDS)}, got {p.performance.attention!r}")
    q = p.quantization
    for k in ("target", "drafter"):
        if getattr(q, k) not in QUANTIZATIONS:
            bad(f"quantization.{k}", f"must be one of {', '.join(QUANTIZATIONS)}, got {getattr(q, k)!r}")
    for k in ("keep_first", "keep_last"):
        if getattr(q, k) < 0:
            bad(f"quantization.{k}", f"must be >= 0 (blocks kept in bf16), got {getattr(q, k)}")
    if q.weight_scaling not in ("channel", "tensor"):
        bad("quantization.weight_scaling", f"must be channel or tensor, got {q.weight_scaling!r}")
    if "fp8" in (q.target, q.drafter) and p.precision == "fp16":
        bad("quantization", "fp8 layers produce the bf16 (or fp32) model dtype; set precision: bf16")
    sm = p.sampling
    if sm.mode not in MODES:
        bad("sampling.mode", f"must be one of {', '.join(MODES)}, got {sm.mode!r}")
    if not 0 <= sm.seed < 2**64:
        bad("sampling.seed", f"must be in [0, 2^64), got {sm.seed}")
    o = p.output
    if o.fps <= 0:
        bad("output.fps", f"must be positive, got {o.fps}")
    if not 0 <= o.crf <= 51:
        bad("output.crf", f"must be in 0..51 (libx264), got {o.crf}")
    if o.preset not in X264_PRESETS:
        bad("output.preset", f"must be a libx264 preset ({', '.join(X264_PRESETS)}), got {o.preset!r}")
    side = [(k, getattr(p.devices, k)) for k in ("drafter", "vae", "scorer") if getattr(p.devices, k) is not None]
    for k, dev in side[1:]:
        if dev.replace("cuda:0", "cuda") != side[0][1].replace("cuda:0", "cuda"):
            bad(f"devices.{k}", f"is {dev} but devices.{side[0][0]} is {side[0][1]}: the drafter, the VAE and the "
                "scorer share one device (a draft is decoded and scored where it is made); only the target may "
                "have its own. Give them the same device")
    from .models.imagereward import PRESETS as IR_PRESETS
    from .models.wan_dit import PRESETS as DIT_PRESETS
    from .models.wan_vae import VAE_PRESETS

    for k, known in (("drafter", DIT_PRESETS), ("target", DIT_PRESETS), ("vae", VAE_PRESETS),
                     ("scorer", IR_PRESETS)):
        if getattr(p.models, k) not in known:
            bad(f"models.{k}", f"must be one of the presets {', '.join(sorted(known))}, got {getattr(p.models, k)!r}")


def _apply_overrides(profile: Profile, overrides: dict) -> Profile:
    updates: dict[str, dict] = {}
    top = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if "__" in key:
            sec, name = key.split("__", 1)
            owners = [sec] if sec in _SECTIONS and name in {f.name for f in fields(_SECTIONS[sec])} else []
        elif key in ("precision", "scorer_precision", "name"):
            top[key] = value
            continue
        else:
            owners = [s for s, cls in _SECTIONS.items() if key in {f.name for f in fields(cls)}]
            name = key
        if len(owners) != 1:
            where = f"ambiguous: in {', '.join(owners)}; write section__{key}" if owners else "no such field"
            raise ProfileError(f"cannot override {key!r} ({where})", path=profile.path, field=key)
        sec = owners[0]
        f = next(x for x in fields(_SECTIONS[sec]) if x.name == name)
        if sec == "checkpoints":
            value = str(value)
        updates.setdefault(sec, {})[name] = _coerce(
            _SECTIONS[sec], f, list(value) if isinstance(value, tuple) else value, f"{sec}.{name}",
            profile.path, Path.cwd(),
        )
    new = dataclasses.replace(
        profile, **top, **{s: dataclasses.replace(getattr(profile, s), **kv) for s, kv in updates.items()}
    )
    validate(new)
    return new


def demo_profile(synthetic_dir: str | os.PathLike | None = None, **overrides) -> Profile:
    """The tiny CPU demo profile (profiles/tiny.yaml), optionally with its checkpoints read from another
    folder holding a synthetic tiny set (``make_synthetic_set(dir, "tiny")``)."""
    import yaml

    raw = yaml.safe_load(DEMO_PROFILE.read_text(encoding="utf-8"))
    if synthetic_dir is not None:
        raw["root"] = str(_abs(Path(synthetic_dir)))
    p = _build(raw, DEMO_PROFILE)
    return p.replace(**overrides) if overrides else p
