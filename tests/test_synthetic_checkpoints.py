"""The synthetic model set: official layout, every file loads back through its family loader with the
right architecture, skip / resume / overwrite, and byte-for-byte determinism in the seed."""
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sdvg_rt.checkpoints.synthetic import LAYOUT, MANIFEST, PARTS, PRESETS, make_synthetic_set
from sdvg_rt.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "models"
    lines = []
    manifest = make_synthetic_set(root, "tiny", seed=0, log=lines.append)
    return root, manifest, lines


def test_layout_and_manifest(tiny_set):
    root, manifest, lines = tiny_set
    for comp, rel in LAYOUT.items():
        assert (root / rel).exists(), comp
    for name in ("ImageReward.pt", "med_config.json", "vocab.txt"):
        assert (root / "ImageReward" / name).is_file()
    assert (root / LAYOUT["tokenizer"] / "tokenizer.json").is_file()
    on_disk = json.loads((root / MANIFEST).read_text())
    assert on_disk == manifest and manifest["complete"] and manifest["size"] == "tiny" and manifest["seed"] == 0
    assert manifest["presets"] == PRESETS["tiny"]
    files = _files(root)
    assert set(manifest["files"]) == set(files)  # nothing unrecorded, no staging leftovers
    for rel, rec in manifest["files"].items():
        assert rec["bytes"] == files[rel].stat().st_size and rec["sha256"] == _sha(files[rel]), rel
    assert not any(p.name.startswith(".synthetic-staging") for p in root.iterdir())
    assert sum(1 for s in lines if ": writing" in s) == len(PARTS)  # progress per part and per file
    assert all(any(rel in s for s in lines) for rel in files)


def test_every_file_loads_back_with_the_right_architecture(tiny_set):
    from sdvg_rt.checkpoints.imagereward import load_imagereward
    from sdvg_rt.checkpoints.umt5 import load_text_encoder
    from sdvg_rt.checkpoints.wan_dit import detect_dit_format, load_dit
    from sdvg_rt.checkpoints.wan_vae import load_vae_decoder
    from sdvg_rt.models.imagereward import ImageRewardConfig
    from sdvg_rt.models.wan_dit import WanDiTConfig
    from sdvg_rt.models.wan_vae import WanVAEConfig

    root, _, _ = tiny_set
    drafter = load_dit(root / LAYOUT["drafter"], "cpu", torch.float32, expect="tiny")
    target = load_dit(root / LAYOUT["target"], "cpu", torch.float32, expect="tiny-target")
    assert drafter.cfg == WanDiTConfig.from_name("tiny") and target.cfg == WanDiTConfig.from_name("tiny-target")
    assert detect_dit_format(root / LAYOUT["drafter"]) == "self_forcing_pt"
    assert detect_dit_format(root / LAYOUT["target"]) == "krea_safetensors"
    with pytest.raises(CheckpointError, match="wrong model size"):  # drafter given as target
        load_dit(root / LAYOUT["drafter"], "cpu", torch.float32, expect="tiny-target")

    vae = load_vae_decoder(root / LAYOUT["vae"])
    assert vae.config == WanVAEConfig.from_name("tiny")

    te = load_text_encoder(root / LAYOUT["text_encoder"], root / LAYOUT["tokenizer"], "cpu", torch.float32)
    assert te.config.name == "tiny" and te.config.d_model == drafter.cfg.text_dim == target.cfg.text_dim
    ctx = te.encode(["a red boat on a calm lake"])[0]
    assert ctx.shape == (1, drafter.cfg.text_len, drafter.cfg.text_dim)

    ir, tok = load_imagereward(root / LAYOUT["imagereward"])
    assert ir.cfg == ImageRewardConfig.preset("tiny")


def test_rerun_skips_and_overwrite_rewrites(tiny_set, tmp_path):
    src, manifest, _ = tiny_set
    root = tmp_path / "models"
    shutil.copytree(src, root)
    files = _files(root)
    for p in files.values():
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))  # an old, recognisable mtime
    lines = []
    again = make_synthetic_set(root, "tiny", seed=0, log=lines.append)
    assert again == manifest and any("already complete" in s for s in lines)
    assert all(p.stat().st_mtime_ns == 1_000_000_000 for p in files.values())  # nothing rewritten

    make_synthetic_set(root, "tiny", seed=0, overwrite=True, log=None)
    assert all(p.stat().st_mtime_ns != 1_000_000_000 for p in files.values())  # every file rewritten
    assert json.loads((root / MANIFEST).read_text()) == manifest  # same seed -> same bytes


def test_interrupted_set_resumes_only_missing_parts(tiny_set, tmp_path):
    src, manifest, _ = tiny_set
    root = tmp_path / "models"
    shutil.copytree(src, root)
    m = json.loads((root / MANIFEST).read_text())
    m["complete"] = False  # as after an interruption between parts
    (root / MANIFEST).write_text(json.dumps(m))
    (root / LAYOUT["vae"]).unlink()
    lines = []
    out = make_synthetic_set(root, "tiny", seed=0, log=lines.append)
    assert any(s.startswith("[3/5] vae") and "writing" in s for s in lines)
    assert sum("already written, skipping" in s for s in lines) == len(PARTS) - 1
    assert out == manifest and _sha(root / LAYOUT["vae"]) == manifest["files"][LAYOUT["vae"]]["sha256"]


def test_same_seed_same_bytes_other_seed_differs(tiny_set, tmp_path):
    _, manifest, _ = tiny_set
    same = make_synthetic_set(tmp_path / "a", "tiny", seed=0, log=None)
    assert {k: v["sha256"] for k, v in same["files"].items()} == {k: v["sha256"] for k, v in manifest["files"].items()}
    other = make_synthetic_set(tmp_path / "b", "tiny", seed=1, log=None)
    for comp in ("drafter", "target", "vae", "text_encoder"):
        rel = LAYOUT[comp]
        assert other["files"][rel]["sha256"] != manifest["files"][rel]["sha256"], comp
    ir = "ImageReward/ImageReward.pt"
    assert other["files"][ir]["sha256"] != manifest["files"][ir]["sha256"]


def test_other_seed_in_existing_folder_is_refused(tiny_set):
    root, _, _ = tiny_set
    with pytest.raises(CheckpointError, match="seed 0") as e:
        make_synthetic_set(root, "tiny", seed=7, log=None)
    assert MANIFEST in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(ValueError, match="size"):
        make_synthetic_set(root, "huge", seed=0, log=None)


def test_cli_wrapper(tiny_set, capsys):
    root, _, _ = tiny_set
    spec = importlib.util.spec_from_file_location("make_synth", ROOT / "tools" / "make_synthetic_checkpoints.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--size", "tiny", "--out", str(root)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert tool.main(["--size", "tiny", "--out", str(root), "--seed", "3"]) == CheckpointError.exit_code
    assert "--overwrite" in capsys.readouterr().err


def test_ensure_synthetic_writes_only_a_cache_profiles_missing_files(tiny_set, tmp_path, monkeypatch):
    """The one rule behind `sdvg-rt run`/`calibrate` and `make engines` on a fresh machine: a profile under
    cache://synthetic/ gets its missing checkpoints written (the same bytes), any other profile is left alone."""
    from sdvg_rt.checkpoints.synthetic import ensure_synthetic
    from sdvg_rt.profiles import PROFILES_DIR, demo_profile, load_profile

    monkeypatch.setenv("SDVG_RT_CACHE", str(tmp_path))
    shutil.copytree(tiny_set[0], tmp_path / "synthetic" / "tiny")
    prof = load_profile(PROFILES_DIR / "tiny-fp8.yaml")  # its fp8 scales are missing: not a checkpoint
    vae = Path(prof.checkpoints.vae)
    assert vae.is_relative_to(tmp_path / "synthetic" / "tiny")
    before = hashlib.sha256(vae.read_bytes()).hexdigest()
    lines = []
    assert ensure_synthetic(prof, log=lines.append) is False and lines == []
    vae.unlink()
    assert ensure_synthetic(prof, log=lines.append) is True
    assert "Wan2.1_VAE.pth" in lines[0] and "fp8" not in lines[0]
    assert hashlib.sha256(vae.read_bytes()).hexdigest() == before
    other = demo_profile(tmp_path / "elsewhere")  # a folder of the user's: never written
    assert ensure_synthetic(other, log=lines.append) is False and not (tmp_path / "elsewhere").exists()
