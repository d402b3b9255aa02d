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
import time
from pathlib import Path

from .errors import OutputError, ProfileError, PromptFileError, SdvgError

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


def output_stem(index: int, prompt: str, count: int) -> str:
    from .video import slugify

    return f"{index:0{max(3, len(str(count - 1)))}d}-{slugify(prompt)}"


# ---- run ---------------------------------------------------------------------------------------------
def _demo_profile(overrides: dict):
    """The tiny demo profile; creates its synthetic checkpoints on first use."""
    from .profiles import DEMO_PROFILE, load_profile

    print(BANNER, file=sys.stderr)
    prof = load_profile(DEMO_PROFILE, **overrides)
    root = prof.root
    missing = [f.name for f in _checkpoint_status(prof) if not f.exists]
    if missing:
        from .checkpoints.synthetic import make_synthetic_set

        print(f"creating the synthetic tiny checkpoints in {root} (first use; missing: {', '.join(missing)})",
              file=sys.stderr)
        make_synthetic_set(root, "tiny", 0, log=None)
    return prof


def cmd_run(args) -> int:
    from tqdm import tqdm

    from .api import Runtime
    from .profiles import load_profile
    from .video import BackgroundVideoWriter, atomic_write_bytes, atomic_write_json

    prompts, blank = read_prompts(args.prompts)
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (" ..." if len(blank) > 10 else "")
        print(f"skipping {len(blank)} blank line(s) in {args.prompts}: line {shown}", file=sys.stderr)
    out = Path(args.out)  # checked first: the demo profile may write its synthetic checkpoints
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot use {out} as the output folder ({e.strerror}); give --out a writable folder") \
            from None
    overrides = {"tau": args.tau, "mode": args.mode, "seed": args.seed}
    prof = load_profile(args.profile, **overrides) if args.profile else _demo_profile(overrides)

    # 1. which prompts still need a video (resume: an mp4 + json pair means done)
    n = len(prompts)
    todo, entries = [], []
    for idx, (line, text) in enumerate(prompts):
        stem = output_stem(idx, text, n)
        done = (out / f"{stem}.mp4").exists() and (out / f"{stem}.json").exists()
        entry = {"index": idx, "line": line, "prompt": text, "video": f"{stem}.mp4", "record": f"{stem}.json"}
        entries.append(entry)
        if done and not args.overwrite:
            entry["status"] = "skipped (finished earlier; --overwrite to redo)"
        else:
            todo.append(entry)
    skipped = n - len(todo)
    if skipped:
        print(f"{skipped} of {n} prompt(s) already finished in {out}; skipping them (--overwrite to redo)",
              file=sys.stderr)
    t_run = time.perf_counter()
    if todo:
        # 2. load, encode every prompt first, free the text encoder, then allocate and warm up
        rt = Runtime.from_profile(prof, args.device)
        print(f"profile {prof.name} on {rt.device}: loaded in {rt.timings['load_s']:.1f}s", file=sys.stderr)
        encoded = rt.encode_prompts([e["prompt"] for e in todo])
        rt.release_text_encoder()
        rt.allocate()
        if rt.device.type == "cuda":
            print(f"warm-up {rt.warmup():.1f}s", file=sys.stderr)
        # 3. generate
        for entry, prompt in zip(todo, encoded):
            stem = entry["video"][:-4]
            desc = f"[{entry['index'] + 1}/{n}] {entry['prompt'][:40]}"
            v = prof.video
            marks, acc, judged = [], 0, 0
            with tqdm(total=v.num_blocks, desc=desc, unit="block", file=sys.stderr, leave=True,
                      disable=args.quiet) as bar, \
                    BackgroundVideoWriter(out / f"{stem}.mp4", v.width, v.height, prof.output.fps,
                                          prof.output.crf, prof.output.preset) as writer:  # encodes off-loop
                for blk in rt.stream(prompt):
                    writer.write(blk.frames)
                    d = blk.record.decision
                    marks.append(d[0].upper())
                    acc += d == "accepted"
                    judged += d in ("accepted", "rejected")
                    bar.set_postfix_str(f"{''.join(marks)} accepted {acc}/{judged}")
                    bar.update(1)
            stats = dict(rt.last_stats, video=entry["video"], index=entry["index"], line=entry["line"])
            if args.save_latents:
                from safetensors.torch import save

                lat = rt.loop.committed_latents().cpu().contiguous()
                name = f"{stem}.latents.safetensors"
                atomic_write_bytes(out / name, save({"latents": lat}, metadata={
                    "prompt": entry["prompt"], "seed": str(stats["seed"]), "mode": stats["mode"],
                    "tau": str(stats["tau"]), "layout": "[1, 16, latent_frames, h, w], normalised Wan latents"}))
                stats["latents"] = name
            atomic_write_json(out / f"{stem}.json", stats)  # last: its existence marks the prompt done
            entry.update(status="generated", acceptance_rate=stats["acceptance_rate"],
                         wall_time_s=stats["wall_time_s"], target_only_estimate_s=stats["target_only_estimate_s"])
    # 4. run summary
    gen = [e for e in entries if e.get("status") == "generated"]
    rates = [e["acceptance_rate"] for e in gen if e["acceptance_rate"] is not None]
    wall = sum(e["wall_time_s"] for e in gen)
    est = [e["target_only_estimate_s"] for e in gen if e["target_only_estimate_s"] is not None]
    summary = {
        "profile": prof.name,
        "profile_path": str(prof.path) if prof.path else None,
        "prompts_file": str(args.prompts),
        "mode": prof.sampling.mode,
        "tau": prof.sampling.tau,
        "seed": prof.sampling.seed,
        "prompts": entries,
        "generated": len(gen),
        "skipped": skipped,
        "blank_lines": blank,
        "mean_acceptance_rate": sum(rates) / len(rates) if rates else None,
        "generation_time_s": wall,
        "run_time_s": time.perf_counter() - t_run,
        "target_only_estimate_s": sum(est) if len(est) == len(gen) and gen else None,
        "speedup_estimate": (sum(est) / wall) if len(est) == len(gen) and gen and wall > 0 else None,
    }
    atomic_write_json(out / "summary.json", summary)
    rate = summary["mean_acceptance_rate"]
    print(f"done: {len(gen)} generated, {skipped} skipped -> {out}"
          + (f"; mean acceptance {rate:.1%}" if rate is not None and not math.isnan(rate) else ""), file=sys.stderr)
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

    from .api import tensorrt_status
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
    try:
        prof = load_profile(path)
        info["profile"] = {"name": prof.name, "path": str(path), "ok": True,
                           "video": f"{prof.video.width}x{prof.video.height}, {prof.video.latent_frames} latent frames "
                                    f"({prof.video.num_blocks} blocks, {prof.video.total_frames} frames)",
                           "backends": {c: getattr(prof.backends, c) for c in COMPONENTS},
                           "checkpoints": {f.name: {"path": str(f.path), "exists": f.exists, "bytes": f.size}
                                           for f in _checkpoint_status(prof)}}
    except ProfileError as e:
        info["profile"] = {"path": str(path), "ok": False, "error": str(e)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
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
        return 0
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
    prof = load_profile(args.profile) if args.profile else _demo_profile({})
    calibrate(prof, prompts, args.part, args.blocks, args.device,
              log=lambda m: print(m, file=sys.stderr))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .decide import MODES

    ap = argparse.ArgumentParser(prog="sdvg-rt", description="SDVG video generation runtime")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate one video per prompt line",
                       description="Generate <out>/<index>-<slug>.mp4 and .json per prompt line.")
    r.add_argument("prompts", help="UTF-8 text file, one prompt per line (blank lines are skipped)")
    r.add_argument("--profile", help="profile YAML (default: the tiny synthetic demo)")
    r.add_argument("--out", default="outputs", help="output folder (default: outputs/)")
    r.add_argument("--mode", choices=MODES, help="override sampling.mode")
    r.add_argument("--tau", type=_tau, help="override sampling.tau (inf: always the target, -inf: accept all)")
    r.add_argument("--seed", type=_seed, help="override sampling.seed")
    r.add_argument("--overwrite", action="store_true", help="regenerate prompts whose mp4 and json exist")
    r.add_argument("--save-latents", action="store_true", help="also save the committed latents (safetensors)")
    r.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
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
    if importlib.util.find_spec(f"{__package__}.bench") is not None:  # the bench subcommand slot
        importlib.import_module(f"{__package__}.bench").add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SdvgError as e:  # one paragraph, no traceback
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"sdvg-rt: error ({type(e).__name__}): {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("sdvg-rt: interrupted; finished prompts are kept (re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
