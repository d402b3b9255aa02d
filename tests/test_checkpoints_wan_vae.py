"""Wan2.1 VAE checkpoint formats: key map vs diffusers, synthetic writers, loaders and their errors."""
import json
import math

import pytest
import torch
from sdvg_rt.checkpoints.wan_vae import (
    decoder_shapes,
    detect_vae_format,
    diffusers_key_map,
    encoder_shapes,
    load_vae_decoder,
    load_vae_state_dict,
    official_shapes,
    synthetic_vae_state_dict,
    to_diffusers,
    write_synthetic_vae,
)
from sdvg_rt.backends.torch_backend import vae_decoder
from sdvg_rt.errors import CheckpointError
from sdvg_rt.models.wan_vae import VAE_PRESETS, WanVAEConfig, WanVAEDecoder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP's 2-thread barriers cost more than the work. One thread, restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    return {
        "pth": write_synthetic_vae(d / "Wan2.1_VAE.pth", "tiny", "wan_pth", seed=5),
        "folder": write_synthetic_vae(d / "vae_diffusers", "tiny", "diffusers_folder", seed=5),
    }


# --------------------------------------------------------------------------------------------------
# key map and shapes against diffusers


@pytest.mark.parametrize("preset", ["tiny", "wan2.1"])
def test_key_map_and_shapes_match_diffusers(preset):
    """Our official names (encoder derived by arithmetic, decoder from the model) mapped through our key
    map give exactly diffusers' AutoencoderKLWan state dict, names and shapes; and diffusers' own
    converter (convert_wan_vae_to_diffusers) maps every official key the same way."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    cfg = WanVAEConfig.from_name(preset)
    with torch.device("meta"):
        ref = AutoencoderKLWan(
            base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
            num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(reversed(cfg.temporal_upsample)),
        )
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = official_shapes(cfg)
    kmap = diffusers_key_map(cfg)
    assert {kmap[k]: s for k, s in ours.items()} == ref_shapes
    assert convert_wan_vae_to_diffusers({k: k for k in ours}) == {v: k for k, v in kmap.items()}
    if preset == "wan2.1":  # wan-models.md §5: encoder + quant conv1 53.60 M, whole VAE ~126.9 M
        enc = sum(math.prod(s) for s in encoder_shapes(cfg).values())
        assert round(enc / 1e6, 2) == 53.60
        assert round(sum(math.prod(s) for s in ours.values()) / 1e6, 1) == 126.9


# --------------------------------------------------------------------------------------------------
# writers and loaders


def test_detect_format(files, tmp_path):
    assert detect_vae_format(files["pth"]) == "wan_pth"
    assert detect_vae_format(files["folder"]) == "diffusers_folder"
    with pytest.raises(CheckpointError, match="not found"):
        detect_vae_format(tmp_path / "nope.pth")
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(files["pth"].read_bytes())
    with pytest.raises(CheckpointError, match="give the file itself"):
        detect_vae_format(tmp_path)


def test_wan_pth_holds_the_whole_vae_and_loads_the_decoder(files):
    cfg = VAE_PRESETS["tiny"]
    raw = torch.load(files["pth"], weights_only=True)
    assert set(raw) == set(official_shapes(cfg))  # encoder.*, conv1.* included, as in the official file
    got_cfg, sd = load_vae_state_dict(files["pth"])
    assert got_cfg == cfg  # architecture read back from the shapes
    assert set(sd) == set(decoder_shapes(cfg))
    assert all(torch.equal(sd[k], raw[k]) for k in sd)


def test_diffusers_folder_loads_in_diffusers_and_in_ours(files):
    """The folder is a valid AutoencoderKLWan for diffusers itself; our loader maps it back to the same
    tensors as the wan_pth written with the same seed; the decoders agree with diffusers' decode."""
    from diffusers import AutoencoderKLWan

    ref, info = AutoencoderKLWan.from_pretrained(files["folder"], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    cfg = VAE_PRESETS["tiny"]
    whole = synthetic_vae_state_dict(cfg, seed=5)
    ref_sd = ref.state_dict()
    assert all(torch.equal(ref_sd[d], whole[o]) for o, d in diffusers_key_map(cfg).items())

    cfg_f, sd_f = load_vae_state_dict(files["folder"])
    cfg_p, sd_p = load_vae_state_dict(files["pth"])
    assert cfg_f == cfg_p == cfg
    assert set(sd_f) == set(sd_p) and all(torch.equal(sd_f[k], sd_p[k]) for k in sd_p)

    model = load_vae_decoder(files["folder"], dtype=torch.float64)
    z = torch.randn(1, 16, 2, 2, 3, dtype=torch.float64)
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float64).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        want = ref.to(torch.float64).decode(z * std + mean).sample
    got = vae_decoder(model, 2, 3).decode_commit(z, 0)
    assert got.shape == want.shape == (1, 3, 5, 16, 24)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # fp64; diffusers' fp32 upsample cast


def test_load_vae_decoder_dtype_device_and_fp32_constants(files):
    model = load_vae_decoder(files["pth"], device="cpu", dtype=torch.bfloat16, channels_last=True)
    assert model.conv2.weight.dtype == torch.bfloat16 and not model.training
    assert model.decoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert model.latents_mean.dtype == torch.float32 and model.latents_mean.device.type == "cpu"
    frames = vae_decoder(model, 2, 3).decode_commit(torch.randn(1, 16, 1, 2, 3), 0)
    assert frames.shape == (1, 3, 1, 16, 24) and torch.isfinite(frames).all()


def test_full_size_synthetic_weights_decode_to_finite_frames():
    """Full Wan2.1 size (73 M decoder parameters), 2 latents at a 2x2 latent: finite, not saturated."""
    cfg = WanVAEConfig.from_name("wan2.1")
    sd = synthetic_vae_state_dict(cfg, seed=0, decoder_only=True)
    with torch.device("meta"):
        model = WanVAEDecoder(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to("cpu").eval()
    frames = vae_decoder(model, 2, 2).decode_commit(torch.randn(1, 16, 2, 2, 2), 0)
    assert frames.shape == (1, 3, 5, 16, 16)
    assert torch.isfinite(frames).all() and (frames.abs() < 1).float().mean() > 0.2


def test_synthetic_is_deterministic_and_per_key():
    cfg = VAE_PRESETS["tiny"]
    a, b = synthetic_vae_state_dict(cfg, 7), synthetic_vae_state_dict(cfg, 7, decoder_only=True)
    assert set(b) == set(decoder_shapes(cfg)) and all(torch.equal(a[k], b[k]) for k in b)
    c = synthetic_vae_state_dict(cfg, 8, decoder_only=True)
    assert not torch.equal(b["decoder.conv1.weight"], c["decoder.conv1.weight"])


# --------------------------------------------------------------------------------------------------
# errors


def test_corrupt_and_truncated_files(files, tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="cannot read") as e:
        load_vae_state_dict(bad)
    assert str(bad) in str(e.value)
    data = files["pth"].read_bytes()
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_vae_state_dict(cut)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_vae_state_dict(empty)


def _edited(files, tmp_path, edit):
    sd = torch.load(files["pth"], weights_only=True)
    edit(sd)
    p = tmp_path / "edited.pth"
    torch.save(sd, p)
    return p


def test_missing_key_is_named(files, tmp_path):
    key = "decoder.upsamples.5.residual.2.weight"
    p = _edited(files, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match="missing") as e:
        load_vae_state_dict(p)
    assert e.value.key == key and str(p) in str(e.value)


def test_missing_encoder_keys_are_fine(files, tmp_path):
    """Only decoder.* and conv2.* are needed (like SF's wrapper); encoder keys are ignored."""
    p = _edited(files, tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(("encoder.", "conv1."))])
    cfg, sd = load_vae_state_dict(p)
    assert cfg == VAE_PRESETS["tiny"] and set(sd) == set(decoder_shapes(cfg))


def test_wrong_shape_is_named(files, tmp_path):
    key = "decoder.middle.1.to_qkv.weight"
    p = _edited(files, tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(96, 32, 1, 2)))
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        load_vae_state_dict(p)
    assert e.value.key == key and e.value.expected == (96, 32, 1, 1) and e.value.found == (96, 32, 1, 2)


def test_unexpected_key_and_layout_errors(files, tmp_path):
    p = _edited(files, tmp_path, lambda sd: sd.__setitem__("decoder.extra.weight", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected") as e:
        load_vae_state_dict(p)
    assert e.value.key == "decoder.extra.weight"
    p = _edited(files, tmp_path, lambda sd: sd.pop("decoder.head.2.weight"))
    with pytest.raises(CheckpointError, match="architecture") as e:
        load_vae_state_dict(p)
    assert e.value.key == "decoder.head.2.weight"
    p = _edited(files, tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("decoder.upsamples.7.")])
    with pytest.raises(CheckpointError, match="layout"):
        load_vae_state_dict(p)


def test_nested_and_diffusers_named_files(files, tmp_path):
    raw = torch.load(files["pth"], weights_only=True)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": raw}, nested)
    with pytest.raises(CheckpointError, match="flat dict") as e:
        load_vae_state_dict(nested)
    assert e.value.key == "state_dict"
    lone = files["folder"] / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match="diffusers folder"):
        load_vae_state_dict(lone)


def _folder_copy(files, tmp_path):
    d = tmp_path / "vae_copy"
    d.mkdir()
    for f in files["folder"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def test_diffusers_folder_errors(files, tmp_path):
    d = _folder_copy(files, tmp_path)
    cfg_path = d / "config.json"
    c = json.loads(cfg_path.read_text())

    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_vae_state_dict(d)
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot parse"):
        load_vae_state_dict(d)
    cfg_path.write_text(json.dumps({**c, "_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="not an AutoencoderKLWan") as e:
        load_vae_state_dict(d)
    assert e.value.key == "_class_name"
    cfg_path.write_text(json.dumps({**c, "is_residual": True}))  # the Wan2.2 VAE
    with pytest.raises(CheckpointError, match="unsupported") as e:
        load_vae_state_dict(d)
    assert e.value.key == "is_residual"
    cfg_path.write_text(json.dumps({**c, "base_dim": 16}))  # config and weights disagree
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_vae_state_dict(d)
    cfg_path.write_text(json.dumps(c))

    from safetensors.torch import load_file, save_file

    w = d / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(w))
    key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    sd.pop(key)
    save_file(sd, str(w))
    with pytest.raises(CheckpointError, match="missing") as e:
        load_vae_state_dict(d)
    assert e.value.key == key  # named as in the file (diffusers names)
    w.unlink()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is missing"):
        load_vae_state_dict(d)


def test_to_diffusers_roundtrip_names():
    cfg = VAE_PRESETS["tiny"]
    sd = {k: torch.zeros(1) for k in official_shapes(cfg)}
    d = to_diffusers(sd, cfg)
    assert "decoder.up_blocks.0.upsamplers.0.time_conv.weight" in d
    assert "decoder.up_blocks.2.upsamplers.0.resample.1.weight" in d
    assert "encoder.down_blocks.5.time_conv.weight" in d and "post_quant_conv.weight" in d
