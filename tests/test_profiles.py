"""Profiles: the shipped YAMLs validate; path resolution; every bad field gives a ProfileError naming the
file and the field; overrides by name."""
import math
from pathlib import Path

import pytest
import yaml

from sdvg_rt.errors import ProfileError
from sdvg_rt.profiles import DEMO_PROFILE, PROFILES_DIR, cache_home, demo_profile, load_profile

MINIMAL = {
    "name": "t",
    "checkpoints": {"drafter": "d.pt", "target": "t.safetensors", "vae": "v.pth", "text_encoder": "te.pth",
                    "tokenizer": "tok", "scorer": "ir"},
}


def _write(tmp_path, data, name="p.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return p


def _with(section, field, value):
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MINIMAL.items()}
    if section is None:
        d[field] = value
    else:
        d.setdefault(section, {})[field] = value
    return d


@pytest.mark.parametrize("name", sorted(p.name for p in PROFILES_DIR.glob("*.yaml")))
def test_shipped_profiles_validate(name):
    p = load_profile(PROFILES_DIR / name)
    assert p.video.num_blocks * p.video.frames_per_block == p.video.latent_frames
    assert all(c.is_absolute() for c in vars(p.checkpoints).values())


def test_paper_profile_is_the_paper_setup():
    p = load_profile(PROFILES_DIR / "paper-832x480.yaml")
    assert (p.video.width, p.video.height, p.video.latent_frames) == (832, 480, 21)
    assert p.video.num_blocks == 7 and p.video.total_frames == 81
    assert p.sampling.tau == -0.7 and p.sampling.mode == "sdvg"
    assert p.checkpoints.drafter.name == "self_forcing_dmd.pt"
    assert p.checkpoints.target.suffix == ".safetensors" and p.checkpoints.vae.name == "Wan2.1_VAE.pth"
    assert (p.models.drafter, p.models.target) == ("wan2.1-1.3b", "wan2.1-14b")
    assert p.output.fps == 16


def test_tiny_profile_is_small():
    p = load_profile(DEMO_PROFILE)
    assert (p.video.latent_height, p.video.latent_width, p.video.num_blocks) == (8, 8, 3)
    assert p.root == cache_home() / "synthetic" / "tiny"  # cache://, never inside the installed package


def test_cache_home_and_shipped_profiles_by_name(monkeypatch, tmp_path):
    monkeypatch.setenv("SDVG_RT_CACHE", str(tmp_path / "c"))
    assert cache_home() == tmp_path / "c"
    assert load_profile(DEMO_PROFILE).checkpoints.vae == tmp_path / "c/synthetic/tiny/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth"
    monkeypatch.delenv("SDVG_RT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_home() == tmp_path / "x" / "sdvg-rt"
    monkeypatch.chdir(tmp_path)  # a shipped profile by name, from any folder
    assert load_profile("paper-832x480").path == PROFILES_DIR / "paper-832x480.yaml"
    with pytest.raises(ProfileError, match="paper-832x480"):  # the error lists the shipped names
        load_profile("nope")


def _fake_hub(cache, repo, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """The hub cache layout huggingface_hub writes: blobs, a snapshot of symlinks, refs/main."""
    d = cache / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        blob = d / "blobs" / f"blob{abs(hash(rel))}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = d / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return d / "snapshots" / commit


def test_hf_checkpoints_resolve_offline_from_the_hub_cache(tmp_path, monkeypatch):
    from sdvg_rt.errors import CheckpointError

    cache = tmp_path / "hub"
    snap = _fake_hub(cache, "gdhe17/Self-Forcing", {"checkpoints/self_forcing_dmd.pt": b"x"})
    tok = _fake_hub(cache, "Wan-AI/Wan2.1-T2V-1.3B", {"google/umt5-xxl/spiece.model": b"s",
                                                       "google/umt5-xxl/tokenizer_config.json": b"{}"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    text = DEMO_PROFILE.read_text()
    text = text.replace("drafter: Self-Forcing/checkpoints/self_forcing_dmd.pt",
                        "drafter: hf://gdhe17/Self-Forcing/checkpoints/self_forcing_dmd.pt")
    text = text.replace("tokenizer: Wan2.1-T2V-1.3B/google/umt5-xxl", "tokenizer: hf://Wan-AI/Wan2.1-T2V-1.3B/google/umt5-xxl")
    assert text.count("hf://") == 2
    prof = tmp_path / "hf.yaml"
    prof.write_text(text)
    p = load_profile(prof)
    assert p.checkpoints.drafter == snap / "checkpoints/self_forcing_dmd.pt" and p.checkpoints.drafter.read_bytes() == b"x"
    assert p.checkpoints.tokenizer == tok / "google/umt5-xxl" and p.checkpoints.tokenizer.is_dir()
    # not in the cache: a clear error with the download command, nothing fetched
    prof.write_text(text.replace("self_forcing_dmd.pt", "other.pt"))
    with pytest.raises(CheckpointError, match="huggingface-cli download gdhe17/Self-Forcing checkpoints/other.pt"):
        load_profile(prof)
    prof.write_text(text.replace("hf://gdhe17/Self-Forcing/checkpoints/self_forcing_dmd.pt", "hf://gdhe17/Self-Forcing"))
    with pytest.raises(ProfileError, match="checkpoints.drafter"):
        load_profile(prof)


def test_relative_paths_resolve_against_the_profile_folder_or_root(tmp_path):
    sub = tmp_path / "cfg"
    sub.mkdir()
    p = load_profile(_write(sub, MINIMAL))
    assert p.checkpoints.drafter == sub / "d.pt"
    p = load_profile(_write(sub, dict(MINIMAL, root="../weights")))
    assert p.checkpoints.tokenizer == tmp_path / "weights" / "tok" and p.root == tmp_path / "weights"
    d = dict(MINIMAL, checkpoints=dict(MINIMAL["checkpoints"], vae="/abs/v.pth"))
    assert load_profile(_write(sub, d)).checkpoints.vae == Path("/abs/v.pth")
    assert demo_profile(tmp_path / "x").checkpoints.scorer == tmp_path / "x" / "ImageReward"


@pytest.mark.parametrize("section,field,value,where", [
    ("video", "width", 100, "video.width"),
    ("video", "height", 0, "video.height"),
    ("video", "latent_frames", 10, "video.latent_frames"),
    ("video", "frames_per_block", "3", "video.frames_per_block"),
    ("cache", "window_frames", 4, "cache.window_frames"),
    ("cache", "sink_frames", 2, "cache.sink_frames"),
    ("schedule", "steps", [250, 500], "schedule.steps"),
    ("schedule", "shift", -1, "schedule.shift"),
    (None, "precision", "int8", "precision"),
    (None, "scorer_precision", "fp8", "scorer_precision"),
    ("backends", "target", "onnx", "backends.target"),
    ("sampling", "mode", "fast", "sampling.mode"),
    ("sampling", "tau", "high", "sampling.tau"),
    ("sampling", "seed", -1, "sampling.seed"),
    ("sampling", "lazy_commit", "yes", "sampling.lazy_commit"),
    ("output", "crf", 99, "output.crf"),
    ("video", "colour", 1, "video.colour"),
    (None, "extra", 1, "extra"),
    ("checkpoints", "vae", 3, "checkpoints.vae"),
])
def test_bad_fields_name_file_and_field(tmp_path, section, field, value, where):
    path = _write(tmp_path, _with(section, field, value))
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert e.value.field == where and e.value.path == path
    assert str(path) in str(e.value) and where in str(e.value)
    assert e.value.exit_code == 2


def test_structural_errors(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "nope.yaml")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(_write(tmp_path, "video: [1, 2"))
    with pytest.raises(ProfileError, match="mapping"):
        load_profile(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ProfileError, match="checkpoints section is required") as e:
        load_profile(_write(tmp_path, {"name": "x"}))
    assert e.value.field == "checkpoints"
    with pytest.raises(ProfileError, match="missing required field checkpoints.target"):
        load_profile(_write(tmp_path, {"checkpoints": {"drafter": "a"}}))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ProfileError, match="not UTF-8"):
        load_profile(bad)


def test_tensorrt_backend_and_infinite_tau_validate(tmp_path):
    d = _with("backends", "target", "tensorrt")
    d["sampling"] = {"tau": ".inf"}
    p = load_profile(_write(tmp_path, d))
    assert p.backends.target == "tensorrt" and p.sampling.tau == math.inf
    d["sampling"] = {"tau": float("-inf")}
    assert load_profile(_write(tmp_path, d)).sampling.tau == -math.inf


def test_overrides(tmp_path):
    path = _write(tmp_path, MINIMAL)
    p = load_profile(path, tau=-0.5, mode="target", window_frames=9, precision="fp32")
    assert (p.sampling.tau, p.sampling.mode, p.cache.window_frames, p.precision) == (-0.5, "target", 9, "fp32")
    assert p.replace(backends__target="tensorrt").backends.target == "tensorrt"
    assert p.replace(seed=None).sampling.seed == p.sampling.seed  # None means "keep"
    with pytest.raises(ProfileError, match="ambiguous"):
        p.replace(drafter="x")  # checkpoints.drafter, models.drafter, backends.drafter
    with pytest.raises(ProfileError, match="no such field"):
        p.replace(colour=1)
    with pytest.raises(ProfileError) as e:
        p.replace(latent_frames=10)  # re-validated
    assert e.value.field == "video.latent_frames"


def test_cache_geometry():
    p = demo_profile()
    assert p.cache_geometry() == (9, 0)
    assert p.replace(window_frames=30, sink_frames=3).cache_geometry() == (9, 0)  # the video fits: global
    assert p.replace(window_frames=6, sink_frames=3).cache_geometry() == (6, 3)
