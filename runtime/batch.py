"""A list of prompts into an output folder, resumable and honest about it.

Each prompt becomes ``<out>/<index>-<slug>-<hash>.mp4`` and a JSON record beside it (written last: its
existence marks the prompt done). The record's ``provenance`` holds what made the video: prompt text,
seed, mode, tau, the profile's settings and their hash, the checkpoints' sha256 and the code version. A
re-run skips a finished prompt only when its provenance equals the current one; any difference stops the
run before anything is loaded, naming the files and the differences (``overwrite=True`` regenerates them).
``summary.json`` covers every finished prompt in the folder, from this run and earlier ones.

    summary = run_prompts(profile, [(1, "a red fox"), (2, "a cat")], "outputs/")   # what `sdvg-rt run` does
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from .errors import OutputError, ResumeMismatchError
from .video import (BackgroundVideoWriter, atomic_write_bytes, atomic_write_json, output_error, remove_own_temps,
                    remove_stale_temps, slugify)

SUMMARY = "summary.json"
# not settings: checkpoints are recorded by content; the devices the parts ran on do not change the output
_PATH_FIELDS = ("name", "path", "root", "checkpoints", "devices")


def output_stem(index: int, prompt: str, count: int) -> str:
    """``<index>-<slug>-<6 hex of the exact prompt>``: prompts whose slugs collide ("a red fox", "A RED FOX!!")
    get distinct names."""
    h = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:6]
    return f"{index:0{max(3, len(str(count - 1)))}d}-{slugify(prompt)}-{h}"


def display(text: str, limit: int | None = None) -> str:
    """A prompt made safe for a terminal: control and other non-printable characters escaped (``\\x1b``)."""
    if limit is not None and len(text) > limit:
        text = text[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ---- provenance ------------------------------------------------------------------------------------------
def profile_settings(profile) -> dict:
    """Every profile field that shapes the output, flattened (``video.width``); sampling's seed, mode and tau
    are recorded on their own, checkpoint paths by their content."""
    from .video import _json_safe as _jsonable  # tuples as lists, inf as "inf": equal to what JSON reads back

    out = {}
    for f in dataclasses.fields(profile):
        if f.name in _PATH_FIELDS:
            continue
        v = getattr(profile, f.name)
        if dataclasses.is_dataclass(v):
            for g in dataclasses.fields(v):
                if f.name == "sampling" and g.name in ("seed", "mode", "tau"):
                    continue
                out[f"{f.name}.{g.name}"] = _jsonable(getattr(v, g.name))
        else:
            out[f.name] = _jsonable(v)
    return out


def checkpoint_hashes(profile, log: Callable[[str], None] | None = None) -> dict[str, str]:
    """sha256 of each checkpoint (a folder: of its files' hashes), cached by path, size and mtime in
    ``cache_home()/sha256-cache.json`` so a 28 GB target is read once, not on every run."""
    from .manifest import HashCache, sha256_json
    from .profiles import cache_home

    cache = HashCache(cache_home() / "sha256-cache.json")
    t0 = time.perf_counter()
    out = {}
    for f in dataclasses.fields(profile.checkpoints):
        p = Path(getattr(profile.checkpoints, f.name))
        if p.is_dir():
            files = sorted(x for x in p.rglob("*") if x.is_file())
            out[f.name] = sha256_json({str(x.relative_to(p)): cache.record(x).sha256 for x in files})
        elif p.is_file():
            out[f.name] = cache.record(p).sha256
        else:
            out[f.name] = "missing"
    took = time.perf_counter() - t0
    if cache.hashed and log is not None and took > 2.0:  # large checkpoints, first time: say what took so long
        log(f"hashed {len(cache.hashed)} checkpoint file(s) for the output records in {took:.0f}s "
            "(cached for later runs)")
    try:
        cache.save()
    except (OSError, OutputError):
        pass  # an unwritable cache only costs hashing again next time
    return out


def provenance(profile, prompt: str, hashes: dict[str, str]) -> dict:
    from . import __version__
    from .manifest import sha256_json

    settings = profile_settings(profile)
    s = profile.sampling
    return {"prompt": prompt, "seed": s.seed, "mode": s.mode, "tau": _num(s.tau), "profile": profile.name,
            "profile_hash": sha256_json(settings), "settings": settings, "checkpoints": hashes,
            "code_version": __version__}


def _num(x: float):
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def differences(old: dict | None, new: dict) -> list[str]:
    """What differs between a record's provenance and the current one, in words (empty: identical)."""
    if not isinstance(old, dict):
        return ["the record has no provenance (made by an older sdvg-rt or another tool)"]
    out = []
    for k in ("prompt", "seed", "mode", "tau", "code_version"):
        if old.get(k) != new[k]:
            out.append(f"{k} {old.get(k)!r} -> {new[k]!r}")
    if old.get("profile_hash") != new["profile_hash"]:
        was, now = old.get("settings") or {}, new["settings"]
        fields = [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now))
                  if was.get(k) != now.get(k)]
        out.append("profile settings " + (", ".join(fields) if fields else "changed"))
    was = old.get("checkpoints") or {}
    for k, h in new["checkpoints"].items():
        if was.get(k) != h:
            out.append(f"checkpoint {k} sha256 {str(was.get(k))[:12]} -> {h[:12]}")
    return out


def _read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


# ---- the run ---------------------------------------------------------------------------------------------
def plan(profile, prompts: Sequence[tuple[int, str]], out: Path, *, overwrite: bool = False,
         log: Callable[[str], None] | None = None) -> tuple[list[dict], list[dict]]:
    """(every entry, the entries still to generate). Raises ``ResumeMismatchError`` if a finished output
    was made differently (unless ``overwrite``) and ``OutputError`` if a folder occupies an output path."""
    hashes = checkpoint_hashes(profile, log)
    n = len(prompts)
    entries, todo, mismatched = [], [], []
    for idx, (line, text) in enumerate(prompts):
        stem = output_stem(idx, text, n)
        entry = {"index": idx, "line": line, "prompt": text, "video": f"{stem}.mp4", "record": f"{stem}.json",
                 "provenance": provenance(profile, text, hashes)}
        entries.append(entry)
        for name in (entry["video"], entry["record"]):
            if (out / name).is_dir():
                raise output_error(IsADirectoryError(21, "Is a directory"), out / name)
        rec = _read_record(out / entry["record"]) if (out / entry["video"]).is_file() else None
        if rec is None or overwrite:
            todo.append(entry)
            continue
        diff = differences(rec.get("provenance"), entry["provenance"])
        if diff:
            mismatched.append((entry["video"], diff))
        else:
            entry["status"] = "skipped (finished earlier with the same settings)"
    if mismatched:
        shown = "; ".join(f"{v}: {', '.join(d)}" for v, d in mismatched[:5])
        more = f" (and {len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        raise ResumeMismatchError(
            f"{len(mismatched)} finished output(s) in {out} were made differently: {shown}{more}. Nothing was "
            f"generated. Re-run with --overwrite to regenerate them, or give another --out")
    return entries, todo


def run_prompts(profile, prompts: Sequence[tuple[int, str]], out: str | Path, *, runtime=None,
                device=None, overwrite: bool = False, save_latents: bool = False, bars: bool | None = None,
                log: Callable[[str], None] | None = None, extra_summary: dict | None = None,
                ray_args=None, check: Callable[[], None] = lambda: None) -> dict:
    """Generate one video per ``(line, prompt)`` into ``out`` with resume (see the module docstring).

    ``runtime``: a loaded ``Runtime`` of ``profile`` to use (kept open); without it one is built on
    ``device`` and closed at the end. ``ray_args`` (``--ray`` and its placement flags): the videos are made
    by the actors of a Ray cluster instead (``scaleout.run_on_ray``), same files and records. ``bars``: progress bars (None: only when stderr is a terminal); one
    plain line per finished video is always logged. ``check``: called before each video and after each block
    (the command line's: raises a SIGTERM/SIGHUP whose first raise was dropped); what it raises stops the run
    as Ctrl-C does, the unfinished video discarded. Returns the summary written to ``summary.json``.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(e, out) from None
    probe = atomic_write_bytes(out / ".sdvg-rt-write-check", b"")  # a read-only folder fails here, not later
    probe.unlink()
    removed = remove_stale_temps(out)
    if removed:
        log(f"removed {len(removed)} temporary file(s) of interrupted runs in {out}")
    entries, todo = plan(profile, prompts, out, overwrite=overwrite, log=log)
    n, skipped = len(entries), len(entries) - len(todo)
    if skipped:
        log(f"{skipped} of {n} prompt(s) already finished in {out} with the same settings; skipping them")
    t_run = time.perf_counter()
    if todo and ray_args is not None:
        from .scaleout import run_on_ray

        try:
            run_on_ray(profile, todo, out, ray_args)
        except BaseException:
            remove_own_temps(out)
            raise
    elif todo:
        own = runtime is None
        rt = _load(profile, device, log) if own else runtime
        try:  # the writers discard their temporary files on any exception; remove_own_temps is the backstop
            encoded = rt.encode_prompts([e["prompt"] for e in todo])
            if own:
                rt.release_text_encoder()
            rt.allocate()
            if own and rt.device.type == "cuda":
                log(f"warm-up {rt.warmup():.1f}s")
            for entry, prompt in zip(todo, encoded):
                check()
                _generate_one(rt, profile, entry, prompt, out, n, save_latents, bars, log, check)
        except BaseException:
            remove_own_temps(out)
            raise
        finally:
            if own:
                rt.close()
    summary = write_summary(out, profile, entries, skipped, time.perf_counter() - t_run, extra_summary)
    rate = summary["mean_acceptance_rate"]
    log(f"done: {summary['generated']} generated, {skipped} skipped, {summary['finished']} finished in {out}"
        + (f"; mean acceptance {rate:.1%}" if isinstance(rate, float) and not math.isnan(rate) else ""))
    return summary


def _load(profile, device, log):
    from .api import Runtime

    rt = Runtime.from_profile(profile, device)
    log(f"profile {profile.name} on {rt.device}: loaded in {rt.timings['load_s']:.1f}s")
    return rt


def _generate_one(rt, profile, entry, prompt, out: Path, n: int, save_latents: bool, bars, log,
                  check: Callable[[], None] = lambda: None) -> None:
    from tqdm import tqdm

    stem = entry["video"][:-4]
    v = profile.video
    desc = f"[{entry['index'] + 1}/{n}] {display(entry['prompt'], 40)}"
    marks, acc, judged = [], 0, 0
    with tqdm(total=v.num_blocks, desc=desc, unit="block", file=sys.stderr, leave=False,
              disable=None if bars is None else not bars) as bar, \
            BackgroundVideoWriter(out / entry["video"], v.width, v.height, profile.output.fps,
                                  profile.output.crf, profile.output.preset) as writer:  # encodes off-loop
        for blk in rt.stream(prompt):
            writer.write(blk.frames)
            d = blk.record.decision
            marks.append(d[0].upper())
            acc += d == "accepted"
            judged += d in ("accepted", "rejected")
            bar.set_postfix_str(f"{''.join(marks)} accepted {acc}/{judged}")
            bar.update(1)
            check()
    stats = dict(rt.last_stats, video=entry["video"], index=entry["index"], line=entry["line"],
                 provenance=entry["provenance"])
    if save_latents:
        from safetensors.torch import save

        lat = rt.loop.committed_latents().cpu().contiguous()
        name = f"{stem}.latents.safetensors"
        atomic_write_bytes(out / name, save({"latents": lat}, metadata={
            "prompt": entry["prompt"], "seed": str(stats["seed"]), "mode": stats["mode"],
            "tau": str(stats["tau"]), "layout": "[1, 16, latent_frames, h, w], normalised Wan latents"}))
        stats["latents"] = name
    atomic_write_json(out / entry["record"], stats)  # last: its existence marks the prompt done
    entry.update(status="generated", acceptance_rate=stats["acceptance_rate"],
                 wall_time_s=stats["wall_time_s"], target_only_estimate_s=stats["target_only_estimate_s"])
    rate = "" if judged == 0 else f", accepted {acc}/{judged} drafts"
    log(f"{desc} -> {entry['video']} ({''.join(marks)}{rate}, {stats['wall_time_s']:.1f}s)")


def finished_records(out: Path) -> list[dict]:
    """Every finished prompt in ``out`` (a JSON record with provenance and its video beside it), by name."""
    recs = []
    for p in sorted(out.glob("*.json")):
        if p.name == SUMMARY:
            continue
        rec = _read_record(p)
        if rec is None or "provenance" not in rec or not (out / str(rec.get("video", ""))).is_file():
            continue
        recs.append(dict(rec, record=p.name))
    return recs


def write_summary(out: Path, profile, entries: list[dict], skipped: int, run_time_s: float,
                  extra: dict | None = None) -> dict:
    """``summary.json``: this run's prompts and every finished prompt in the folder, with totals over all."""
    gen = [e for e in entries if e.get("status") == "generated"]
    done = finished_records(out)
    rates = [r["acceptance_rate"] for r in done if isinstance(r.get("acceptance_rate"), float)]
    wall = sum(r.get("wall_time_s") or 0.0 for r in done)
    est = [r["target_only_estimate_s"] for r in done if isinstance(r.get("target_only_estimate_s"), float)]
    full_est = len(est) == len(done) and bool(done)
    summary = {
        "profile": profile.name,
        "profile_path": str(profile.path) if profile.path else None,
        **(extra or {}),
        "mode": profile.sampling.mode,
        "tau": profile.sampling.tau,
        "seed": profile.sampling.seed,
        "prompts": [{k: v for k, v in e.items() if k != "provenance"} for e in entries],  # this run's
        "generated": len(gen),
        "skipped": skipped,
        "run_time_s": run_time_s,
        "finished": len(done),  # every finished prompt in the folder, this run's and earlier ones
        "videos": [{"video": r["video"], "record": r["record"], "prompt": r.get("prompt"), "seed": r.get("seed"),
                    "mode": r.get("mode"), "tau": r.get("tau"), "profile_hash": r["provenance"].get("profile_hash"),
                    "acceptance_rate": r.get("acceptance_rate"), "wall_time_s": r.get("wall_time_s")}
                   for r in done],
        "mean_acceptance_rate": sum(rates) / len(rates) if rates else None,
        "generation_time_s": wall,
        "target_only_estimate_s": sum(est) if full_est else None,
        "speedup_estimate": (sum(est) / wall) if full_est and wall > 0 else None,
    }
    atomic_write_json(out / SUMMARY, summary)
    return summary
