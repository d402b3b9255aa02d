"""A complete synthetic model set in the official formats and folder layout (sdvg-runtime.md §6).

`make_synthetic_set(out, size, seed)` writes, under `out`:

    Self-Forcing/checkpoints/self_forcing_dmd.pt               drafter  (Self-Forcing .pt, `model.` keys)
    krea-realtime-video/krea-realtime-video-14b.safetensors    target   (Krea flat safetensors)
    Wan2.1-T2V-1.3B/Wan2.1_VAE.pth                             VAE      (Wan torch pickle)
    Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth            umT5 encoder (Wan T5 keys, bf16)
    Wan2.1-T2V-1.3B/google/umt5-xxl/                           umT5 tokenizer folder
    ImageReward/{ImageReward.pt, med_config.json, vocab.txt}   ImageReward v1.0 files
    synthetic.json                                             what was written (sizes, sha256)

Each family's own writer produces its files (random weights under the official keys) into a
staging folder inside `out`; the files are then moved into place with `os.replace`, so a file at its
final path is always complete. `synthetic.json` is rewritten after every part, so an interrupted
run resumes where it stopped; a complete set is skipped unless `overwrite`.

Full size holds 2 x 1.3B (drafter `generator` + `generator_ema`), 14B, VAE, 5.7B umT5 and
ImageReward: about 50 GB on disk. Peak host memory is the largest in-memory part (umT5: ~11.4 GB;
the Self-Forcing .pt: ~5.7 GB; the 14B safetensors is streamed tensor by tensor).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointError
from ..manifest import sha256_file
from ..video import atomic_write_json

MANIFEST = "synthetic.json"
SCHEMA = 1
SIZES = ("tiny", "full")

# component -> path relative to the set's root (files, or a folder for the tokenizer / ImageReward)
LAYOUT = {
    "drafter": "Self-Forcing/checkpoints/self_forcing_dmd.pt",
    "target": "krea-realtime-video/krea-realtime-video-14b.safetensors",
    "vae": "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth",
    "text_encoder": "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
    "tokenizer": "Wan2.1-T2V-1.3B/google/umt5-xxl",
    "imagereward": "ImageReward",
}
PRESETS = {
    "tiny": {"drafter": "tiny", "target": "tiny-target", "vae": "tiny", "text_encoder": "tiny", "imagereward": "tiny"},
    "full": {"drafter": "wan2.1-1.3b", "target": "wan2.1-14b", "vae": "wan2.1", "text_encoder": "umt5-xxl",
             "imagereward": "v1.0"},
}
FORMATS = {"drafter": "self_forcing_pt", "target": "krea_safetensors", "vae": "wan_pth",
           "text_encoder": "wan_t5_pth", "imagereward": "imagereward_v1"}
PARTS = ("drafter", "target", "vae", "text_encoder", "imagereward")  # write order (one writer call each)


def _write_part(part: str, stage: Path, preset: str, seed: int) -> None:
    """Run the family writer for `part` into `stage` (a folder mirroring the final layout)."""
    if part in ("drafter", "target"):
        from .wan_dit import write_synthetic_dit

        write_synthetic_dit(stage / LAYOUT[part], preset, fmt=FORMATS[part], seed=seed)
    elif part == "vae":
        from .wan_vae import write_synthetic_vae

        write_synthetic_vae(stage / LAYOUT["vae"], preset, fmt="wan_pth", seed=seed)
    elif part == "text_encoder":
        from .umt5 import write_synthetic_umt5

        write_synthetic_umt5(stage / Path(LAYOUT["text_encoder"]).parent, preset, seed)
    elif part == "imagereward":
        from .imagereward import write_synthetic_imagereward

        write_synthetic_imagereward(stage / LAYOUT["imagereward"], preset, seed)
    else:  # pragma: no cover - PARTS is fixed
        raise AssertionError(part)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _read_manifest(p: Path) -> dict | None:
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the synthetic set's manifest ({e}); delete it or pass --overwrite",
                              path=p) from e
    return m if isinstance(m, dict) else None


def _part_done(root: Path, manifest: dict, part: str) -> bool:
    files = manifest.get("parts", {}).get(part)
    if not files:
        return False
    for rel in files:
        rec = manifest.get("files", {}).get(rel)
        p = root / rel
        if rec is None or not p.is_file() or p.stat().st_size != rec.get("bytes"):
            return False
    return True


def make_synthetic_set(out: str | os.PathLike, size: str = "tiny", seed: int = 0, overwrite: bool = False,
                       log: Callable[[str], None] | None = print) -> dict:
    """Write (or complete) a synthetic model set under `out`; returns the manifest (synthetic.json).

    `size` "tiny" (CPU test presets) or "full" (the real architectures, random weights). With
    `overwrite=False` parts already recorded in `out/synthetic.json` for the same size and seed are
    kept; a set of another size or seed raises `CheckpointError` (pass overwrite=True to replace).
    `log` receives one progress line per part/file (None: silent).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, found {size!r}")
    say = log or (lambda s: None)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    mpath = root / MANIFEST
    old = None if overwrite else _read_manifest(mpath)
    if old is not None and (old.get("size"), old.get("seed")) != (size, int(seed)):
        raise CheckpointError(
            f"{root} already holds a synthetic set of size {old.get('size')!r} seed {old.get('seed')}; "
            "choose another folder or pass --overwrite to replace it",
            path=mpath, expected=f"size {size!r} seed {seed}", found=f"size {old.get('size')!r} seed {old.get('seed')}")
    presets = PRESETS[size]
    manifest = {
        "schema": SCHEMA, "size": size, "seed": int(seed), "complete": False, "presets": dict(presets),
        "components": {
            **{c: {"path": LAYOUT[c], "preset": presets[c], "format": FORMATS[c]} for c in PARTS},
            "tokenizer": {"path": LAYOUT["tokenizer"], "preset": presets["text_encoder"], "format": "hf_tokenizer"},
        },
        "files": {}, "parts": {},
    }
    if old is not None:
        manifest["files"], manifest["parts"] = dict(old.get("files", {})), dict(old.get("parts", {}))
        if old.get("complete") and all(_part_done(root, old, p) for p in PARTS):
            say(f"synthetic {size} set (seed {seed}) already complete in {root}; skipping (use --overwrite to rewrite)")
            return old

    stage = root / ".synthetic-staging"  # same filesystem as the set, so os.replace is atomic
    try:
        for i, part in enumerate(PARTS, 1):
            tag = f"[{i}/{len(PARTS)}] {part} ({presets[part]}, {FORMATS[part]})"
            if old is not None and _part_done(root, old, part):
                say(f"{tag}: already written, skipping")
                continue
            if stage.exists():
                shutil.rmtree(stage)
            stage.mkdir(parents=True)
            t0 = time.perf_counter()
            say(f"{tag}: writing ...")
            _write_part(part, stage, presets[part], int(seed))
            rels = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
            for rel in rels:  # atomic per file: a final path only ever holds a complete file
                dst = root / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(stage / rel, dst)
            for p in [p for p in manifest["parts"].get(part, []) if p not in rels]:
                manifest["files"].pop(p, None)
            for rel in rels:
                n = (root / rel).stat().st_size
                manifest["files"][rel] = {"bytes": n, "sha256": sha256_file(root / rel), "component": part}
                say(f"    {rel}  {_human(n)}")
            manifest["parts"][part] = rels
            atomic_write_json(mpath, manifest)
            say(f"{tag}: done in {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    manifest["complete"] = True
    manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    atomic_write_json(mpath, manifest)
    say(f"synthetic {size} set (seed {seed}) complete in {root}: {len(manifest['files'])} files, "
        f"{_human(manifest['total_bytes'])}")
    return manifest




def ensure_synthetic(prof, log: Callable[[str], None] | None = print, demo: bool = False) -> bool:
    """Write ``prof``'s synthetic tiny set if its checkpoints live under ``cache://synthetic/`` (or
    anywhere, for ``demo``: the demo profile's root is a synthetic set by definition) and some are missing
    (the tiny profiles on a fresh machine: ``sdvg-rt run``, ``sdvg-rt calibrate``, ``make engines``).
    Profiles elsewhere are left alone. fp8 scales files are not checkpoints: they come from
    ``sdvg-rt calibrate``. Returns True if it wrote anything."""
    from dataclasses import fields

    from ..profiles import cache_home

    root = prof.root.resolve() if prof.root else None
    synth = (cache_home() / "synthetic").resolve()
    if root is None or not (demo or root == synth or synth in root.parents):
        return False
    paths = [Path(getattr(prof.checkpoints, f.name)) for f in fields(prof.checkpoints)]
    missing = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths if not p.exists()]
    if not missing:
        return False
    if log:
        log(f"writing the synthetic tiny checkpoints into {root} (first use; missing: {', '.join(missing)})")
    make_synthetic_set(root, "tiny", 0, log=None)
    return True
