"""The ``sdvg-rt`` command: ``run`` (one video per prompt line), ``calibrate`` (fp8 activation scales) and
``info`` (versions, devices, backends, profile and checkpoint status). Errors print one paragraph and exit
with ``SdvgError.exit_code``.

    sdvg-rt run prompts.txt --profile profiles/paper-832x480.yaml --out outputs/ --tau -0.7
    sdvg-rt run prompts.txt                 # no --profile: the tiny synthetic demo (random weights)
    sdvg-rt info --profile profiles/paper-832x480.yaml
    sdvg-rt calibrate prompts.txt --profile profiles/paper-832x480.yaml --blocks 3   # then quantization.target: fp8

A ``bench`` subcommand plugs in from ``sdvg_rt.bench`` when that module exists: it must define
``add_parser(subparsers)`` returning an argparse parser whose ``func(args) -> int`` runs it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
from pathlib import Path

from .batch import output_stem  # noqa: F401 - re-exported: the name of a prompt's files
from .errors import PromptFileError, SdvgError

BANNER = """\
============================================================================================
  SYNTHETIC DEMO: no --profile given, so this runs the tiny demo profile (profiles/tiny.yaml)
  on synthetic checkpoints with RANDOM WEIGHTS. The videos are noise; the run exercises the
  runtime, not the models. Give --profile profiles/paper-832x480.yaml for real generation.
============================================================================================"""


# ---- prompts ---------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike) -> tuple[list[tuple[int, str]], list[int]]:
    """(prompts as (line number, text), blank line numbers). Raises PromptFileError naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"prompt file not found: {p} (one prompt per line, UTF-8)")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptFileError(
            f"prompt file {p} is not UTF-8 text: byte 0x{data[e.start]:02x} at line {line} cannot be decoded "
            f"({e.reason}); re-save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the first prompt
    prompts, blank = [], []
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            prompts.append((i, line.strip()))
        else:
            blank.append(i)
    if not prompts:
        raise PromptFileError(f"prompt file {p} has no prompts ({'only blank lines' if blank else 'it is empty'}); "
                              "write one prompt per line")
    return prompts, blank


# ---- run ---------------------------------------------------------------------------------------------
def _demo_profile(overrides: dict):
    """The tiny demo profile; creates its synthetic checkpoints on first use."""
    from .checkpoints.synthetic import ensure_synthetic
    from .profiles import DEMO_PROFILE, load_profile

    print(BANNER, file=sys.stderr)
    prof = load_profile(DEMO_PROFILE, **overrides)
    ensure_synthetic(prof, log=lambda m: print(m, file=sys.stderr), demo=True)
    return prof


def cmd_run(args) -> int:
    from .batch import run_prompts
    from .profiles import load_profile
    from .video import output_error

    prompts, blank = read_prompts(args.prompts)
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (" ..." if len(blank) > 10 else "")
        print(f"skipping {len(blank)} blank line(s) in {args.prompts}: line {shown}", file=sys.stderr)
    out = Path(args.out)  # checked first: the demo profile may write its synthetic checkpoints
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(e, out) from None
    overrides = {"tau": args.tau, "mode": args.mode, "seed": args.seed}
    prof = load_profile(args.profile, **overrides) if args.profile else _demo_profile(overrides)
    run_prompts(prof, prompts, out, device=args.device, overwrite=args.overwrite, save_latents=args.save_latents,
                bars=False if args.quiet else None,
                ray_args=args if args.ray is not None else None, check=args.check_signals,
                extra_summary={"prompts_file": str(args.prompts), "blank_lines": blank})
    return 0


# ---- info --------------------------------------------------------------------------------------------
class _File:
    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.exists = path.exists()
        if path.is_dir():
            self.size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        else:
            self.size = path.stat().st_size if self.exists else 0


def _checkpoint_status(prof) -> list[_File]:
    from dataclasses import fields

    return [_File(f.name, getattr(prof.checkpoints, f.name)) for f in fields(prof.checkpoints)]


def _versions() -> dict:
    import torch

    out = {"sdvg_rt": _pkg_version(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": None}
    if torch.cuda.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
    for mod in ("transformers", "safetensors", "av", "numpy", "diffusers", "onnx", "onnxruntime"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional packages
            out[mod] = None
    try:  # the optional attention kernel: its version only (importing it takes seconds)
        from importlib.metadata import PackageNotFoundError, version

        out["flash_attn_4"] = version("flash-attn-4")
    except PackageNotFoundError:
        out["flash_attn_4"] = None
    return out


def _pkg_version() -> str:
    from . import __version__

    return __version__


def cmd_info(args) -> int:
    import torch

    from .backends import tensorrt_status
    from .profiles import COMPONENTS, DEMO_PROFILE, load_profile

    info = {"versions": _versions(), "devices": [{"device": "cpu", "threads": torch.get_num_threads(),
                                                   "cores": os.cpu_count()}]}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"device": f"cuda:{i}", "name": p.name,
                                    "memory_gib": round(p.total_memory / 2**30, 1),
                                    "capability": f"sm_{p.major}{p.minor}"})
    trt_ok, trt_detail = tensorrt_status()
    info["backends"] = {"torch": {"usable": True, "detail": f"torch {torch.__version__}"},
                        "tensorrt": {"usable": trt_ok, "detail": trt_detail}}
    path = Path(args.profile) if args.profile else DEMO_PROFILE
    code = 0
    try:
        prof = load_profile(path)
        info["profile"] = {"name": prof.name, "path": str(path), "ok": True,
                           "video": f"{prof.video.width}x{prof.video.height}, {prof.video.latent_frames} latent frames "
                                    f"({prof.video.num_blocks} blocks, {prof.video.total_frames} frames)",
                           "backends": {c: getattr(prof.backends, c) for c in COMPONENTS},
                           "checkpoints": {f.name: {"path": str(f.path), "exists": f.exists, "bytes": f.size}
                                           for f in _checkpoint_status(prof)}}
    except SdvgError as e:  # the profile's error (or an hf:// checkpoint not in the cache): its exit code
        info["profile"] = {"path": str(path), "ok": False, "error": str(e)}
        code = e.exit_code
    if args.json:
        print(json.dumps(info, indent=2))
        return code
    v = info["versions"]
    print(f"sdvg-rt {v['sdvg_rt']}  python {v['python']}  torch {v['torch']} (CUDA {v['cuda'] or 'n/a'}, "
          f"cuDNN {v['cudnn'] or 'n/a'})")
    print("  " + "  ".join(f"{k} {v[k] or 'missing'}" for k in ("transformers", "safetensors", "av", "numpy",
                                                                "diffusers", "onnx", "onnxruntime")))
    fa4 = v["flash_attn_4"] or "not installed (optional, faster attention on Hopper: pip install 'sdvg-rt[fa4]')"
    print(f"  flash-attn-4 {fa4}")
    print("devices:")
    for d in info["devices"]:
        print("  " + ", ".join(f"{k} {val}" if k != "device" else str(val) for k, val in d.items()))
    print("backends:")
    for name, b in info["backends"].items():
        print(f"  {name:9s} {'usable' if b['usable'] else 'NOT usable'}: {b['detail']}")
    p = info["profile"]
    if not p["ok"]:
        print(f"profile {p['path']}: INVALID\n  {p['error']}")
        return code
    print(f"profile {p['name']} ({p['path']}): {p['video']}")
    print("  backends: " + ", ".join(f"{k} {b}" for k, b in p["backends"].items()))
    print("  checkpoints:")
    for name, f in p["checkpoints"].items():
        state = f"ok, {f['bytes'] / 2**20:.1f} MiB" if f["exists"] else "MISSING"
        print(f"    {name:13s} {state:18s} {f['path']}")
    if not args.profile and not all(f["exists"] for f in p["checkpoints"].values()):
        print("  (the synthetic demo checkpoints are created by the first `sdvg-rt run` without --profile)")
    return 0


# ---- entry point -------------------------------------------------------------------------------------
def _tau(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tau must be a number, inf or -inf, got {text!r}") from None
    if math.isnan(v):
        raise argparse.ArgumentTypeError("tau must not be nan")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2^64), got {v}")
    return v


def cmd_calibrate(args) -> int:
    from .models.fp8 import calibrate
    from .profiles import load_profile

    prompts = [text for _, text in read_prompts(args.prompts)[0]]
    if args.profile:
        from .checkpoints.synthetic import ensure_synthetic

        prof = load_profile(args.profile)
        ensure_synthetic(prof, log=lambda m: print(m, file=sys.stderr))  # a tiny profile on a fresh machine
    else:
        prof = _demo_profile({})
    calibrate(prof, prompts, args.part, args.blocks, args.device,
              log=lambda m: print(m, file=sys.stderr))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .decide import MODES

    ap = argparse.ArgumentParser(prog="sdvg-rt", description="SDVG video generation runtime")
    ap.add_argument("--version", action="version", version=f"sdvg-rt {_pkg_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate one video per prompt line",
                       description="Generate <out>/<index>-<slug>.mp4 and .json per prompt line.")
    r.add_argument("prompts", help="UTF-8 text file, one prompt per line (blank lines are skipped)")
    r.add_argument("--profile", help="profile YAML (default: the tiny synthetic demo)")
    r.add_argument("--out", default="outputs", help="output folder (default: outputs/)")
    r.add_argument("--mode", choices=MODES, help="override sampling.mode")
    r.add_argument("--tau", type=_tau, help="override sampling.tau (inf: always the target, -inf: accept all)")
    r.add_argument("--seed", type=_seed, help="override sampling.seed")
    r.add_argument("--overwrite", action="store_true", help="regenerate prompts whose outputs exist, even when made with other "
                   "settings")
    r.add_argument("--save-latents", action="store_true", help="also save the committed latents (safetensors)")
    r.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    r.add_argument("--quiet", action="store_true", help="no progress bars (the one line per finished video stays); "
                   "bars are shown only when stderr is a terminal")
    from .scaleout import add_ray_arguments

    add_ray_arguments(r)  # --ray [ADDRESS]: the prompts on a Ray cluster (sdvg_rt.scaleout)
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("calibrate", help="fp8 activation scales of a DiT (profile field quantization)",
                       description="Run the bf16 DiT over the prompts (all steps; --blocks blocks) and write "
                                   "each quantized GEMM input's amax next to its checkpoint.")
    c.add_argument("prompts", help="UTF-8 text file, one prompt per line (a few varied prompts suffice)")
    c.add_argument("--profile", help="profile YAML (default: the tiny synthetic demo)")
    c.add_argument("--part", choices=("target", "drafter"), default="target")
    c.add_argument("--blocks", type=int, default=None, help="blocks per prompt (default: the whole video)")
    c.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    c.set_defaults(func=cmd_calibrate)
    i = sub.add_parser("info", help="versions, devices, usable backends, profile and checkpoint status")
    i.add_argument("--profile", help="profile YAML (default: the tiny demo profile)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)
    from .sweep import add_parser as add_sweep_parser

    add_sweep_parser(sub)
    if importlib.util.find_spec(f"{__package__}.bench") is not None:  # the bench subcommand slot
        importlib.import_module(f"{__package__}.bench").add_parser(sub)
    from .serve import add_parser as add_serve_parser  # web dependencies are imported only when it runs

    add_serve_parser(sub)
    return ap


# The paper profile fills an 80 GB GPU to within a few GiB; without expandable segments the caching
# allocator fragments (6.4 GiB reserved but unusable -> OOM in the VAE decode). Set by the command-line
# entry points only (a library import changes nothing process-wide), before CUDA is initialised; a
# user's own setting wins.
ALLOC_CONF = "expandable_segments:True"


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the run is, so the current write is abandoned like on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _SignalLatch:
    """The handler of SIGTERM and SIGHUP: raises ``Interrupted`` where the main thread is, and keeps the signal,
    so that ``check`` (the run's, between blocks) raises it again where the first raise was dropped: a signal
    that lands in a finalizer or a weakref callback (an import lock's, for one) only prints
    "Exception ignored" there, and the run would go on."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame):
        self.signum = signum
        raise Interrupted(signum)

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
    args = build_parser().parse_args(argv)
    handled = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous, latch = {}, _SignalLatch()
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, latch) for s in handled}
    args.check_signals = latch.check
    try:
        return args.func(args)
    except SdvgError as e:  # one paragraph, no traceback
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"sdvg-rt: error ({type(e).__name__}): {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"sdvg-rt: interrupted ({signal.Signals(signum).name}); the unfinished video was discarded, "
              "finished prompts are kept (re-run to resume)", file=sys.stderr)
        return 128 + signum
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
