"""DiT checkpoint formats: synthetic writers, detection, loading, key maps and every error path."""
import json
import warnings

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file
from sdvg_rt.checkpoints.wan_dit import (
    FORMATS,
    INDEX_NAME,
    WEIGHTS_NAME,
    detect_dit_format,
    diffusers_key_to_wan,
    expected_shapes,
    load_dit,
    load_dit_state_dict,
    synthetic_dit_state_dict,
    wan_key_to_diffusers,
    write_synthetic_dit,
)
from sdvg_rt.errors import CheckpointError
from sdvg_rt.models.wan_dit import PRESETS, WanDiTConfig

NAMES = {"self_forcing_pt": "self_forcing_dmd.pt", "krea_safetensors": "krea-realtime-video-14b.safetensors",
         "wan_folder": "Wan2.1-T2V", "diffusers_folder": "transformer"}


def _write(tmp_path, fmt, preset="tiny", seed=0, **kw):
    return write_synthetic_dit(tmp_path / NAMES[fmt], preset, fmt, seed=seed, **kw)


def _assert_same(sd, ref):
    assert set(sd) == set(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("preset", ["tiny", "tiny-target"])
def test_every_format_round_trips(tmp_path, fmt, preset):
    p = _write(tmp_path, fmt, preset, seed=5, dtype=torch.float32)
    assert detect_dit_format(p) == fmt
    model = load_dit(p, "cpu", torch.float32)
    assert model.cfg is PRESETS[preset]  # architecture from shapes (+ config.json heads)
    _assert_same(model.state_dict(), synthetic_dit_state_dict(preset, seed=5))
    assert model.rope.cos.dtype == torch.float64 and model.rope.cos.device.type == "cpu"
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("fmt", ["wan_folder", "diffusers_folder"])
def test_sharded_folders(tmp_path, fmt):
    p = _write(tmp_path, fmt, seed=2, dtype=torch.bfloat16, max_shard_bytes=100_000)
    index = json.loads((p / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (p / WEIGHTS_NAME).exists()
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    cfg, sd = load_dit_state_dict(p)
    assert cfg.name == "tiny" and all(v.dtype == torch.bfloat16 for v in sd.values())
    _assert_same(sd, synthetic_dit_state_dict("tiny", seed=2, dtype=torch.bfloat16))
    write_synthetic_dit(p, "tiny", fmt, seed=3)  # rewritten unsharded: no stale index or shards left
    assert sorted(f.name for f in p.iterdir()) == ["config.json", WEIGHTS_NAME]
    _assert_same(load_dit_state_dict(p)[1], synthetic_dit_state_dict("tiny", seed=3, dtype=torch.bfloat16))


def test_self_forcing_ema_generator_and_fp32_cast(tmp_path):
    p = _write(tmp_path, "self_forcing_pt", seed=3, dtype=torch.float32, with_critic=True)
    raw = torch.load(p, weights_only=True)
    assert set(raw) == {"generator_ema", "generator", "critic"}
    assert all(k.startswith("model.") for k in raw["generator_ema"])
    _, ema = load_dit_state_dict(p, dtype=torch.bfloat16)  # default: generator_ema, cast to bf16
    _assert_same(ema, synthetic_dit_state_dict("tiny", seed=3, dtype=torch.bfloat16))
    _, gen = load_dit_state_dict(p, use_ema=False)
    _assert_same(gen, synthetic_dit_state_dict("tiny", seed=4))  # "generator" is written with seed+1


def test_self_forcing_variants(tmp_path):
    sd = {"model." + k: v for k, v in synthetic_dit_state_dict("tiny", seed=1).items()}
    torch.save({"generator": sd}, tmp_path / "ode_init.pt")  # no EMA: falls back with a warning
    with pytest.warns(UserWarning, match="no 'generator_ema'"):
        _, got = load_dit_state_dict(tmp_path / "ode_init.pt")
    _assert_same(got, synthetic_dit_state_dict("tiny", seed=1))
    torch.save({"generator_ema": sd}, tmp_path / "ema_only.pt")
    with pytest.raises(CheckpointError, match="use_ema=True") as e:
        load_dit_state_dict(tmp_path / "ema_only.pt", use_ema=False)
    assert "ema_only.pt" in str(e.value)
    torch.save(sd, tmp_path / "flat.pt")  # a plain state dict
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(load_dit_state_dict(tmp_path / "flat.pt")[1], synthetic_dit_state_dict("tiny", seed=1))
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "step": torch.tensor(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="top-level keys: \\['optimizer', 'step'\\]"):
        load_dit_state_dict(tmp_path / "other.pt")


def test_key_map_round_trip_and_diffusers_reads_our_folder(tmp_path):
    """The diffusers folder we write is read by diffusers' own WanTransformer3DModel (config + strict
    load of our shards, read with safetensors directly), and maps back to the same original weights."""
    shapes = expected_shapes(PRESETS["tiny"])
    assert all(diffusers_key_to_wan(wan_key_to_diffusers(k)) == k for k in shapes)
    assert wan_key_to_diffusers("blocks.3.norm3.weight") == "blocks.3.norm2.weight"  # the norm swap
    assert wan_key_to_diffusers("head.modulation") == "scale_shift_table"
    assert diffusers_key_to_wan("blocks.0.scale_shift_table") == "blocks.0.modulation"
    p = _write(tmp_path, "diffusers_folder", seed=9, dtype=torch.float32, max_shard_bytes=100_000)
    config = json.loads((p / "config.json").read_text())
    dm = WanTransformer3DModel.from_config(config)
    index = json.loads((p / INDEX_NAME).read_text())
    sd = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update(load_file(p / shard))
    dm.load_state_dict(sd, strict=True)
    ours = {diffusers_key_to_wan(k): v for k, v in dm.state_dict().items()}
    _assert_same(ours, synthetic_dit_state_dict("tiny", seed=9))


def test_pipeline_folder_uses_transformer_subfolder(tmp_path):
    write_synthetic_dit(tmp_path / "pipe" / "transformer", "tiny", "diffusers_folder", seed=0)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert detect_dit_format(tmp_path / "pipe") == "diffusers_folder"
    assert load_dit(tmp_path / "pipe").cfg.name == "tiny"


# --------------------------------------------------------------------------------------------------
# Errors

def test_wrong_size_for_the_role(tmp_path):
    p = _write(tmp_path, "krea_safetensors", "tiny")
    with pytest.raises(CheckpointError, match="this is a tiny checkpoint .* but a tiny-target checkpoint") as e:
        load_dit(p, expect="tiny-target")
    msg = str(e.value)
    assert "krea-realtime-video-14b.safetensors" in msg and "(96, 16, 1, 2, 2)" in msg and "(64, 16, 1, 2, 2)" in msg


def test_architecture_matching_no_preset(tmp_path):
    odd = WanDiTConfig("odd", dim=80, ffn_dim=160, num_heads=2, num_layers=2, text_dim=64)
    p = write_synthetic_dit(tmp_path / "odd.safetensors", odd, "krea_safetensors")
    with pytest.raises(CheckpointError, match="matches no WanDiT preset") as e:
        load_dit(p)
    assert "dim 80" in str(e.value) and "tiny-target: dim 96" in str(e.value) and "wan2.1-14b" in str(e.value)


def test_config_heads_must_match(tmp_path):
    p = _write(tmp_path, "wan_folder")
    conf = json.loads((p / "config.json").read_text())
    conf["num_heads"] = 4
    (p / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="heads 4 \\(config.json\\)"):
        load_dit(p)


def _edited_krea(tmp_path, edit):
    sd = {"model." + k: v for k, v in synthetic_dit_state_dict("tiny", seed=0).items()}
    edit(sd)
    p = tmp_path / "edited.safetensors"
    save_file(sd, str(p))
    return p


def test_missing_key(tmp_path):
    p = _edited_krea(tmp_path, lambda sd: sd.pop("model.blocks.1.cross_attn.norm_k.weight"))
    with pytest.raises(CheckpointError, match="missing 1 key") as e:
        load_dit(p)
    assert "key: blocks.1.cross_attn.norm_k.weight" in str(e.value) and "edited.safetensors" in str(e.value)


def test_unexpected_key(tmp_path):
    p = _edited_krea(tmp_path, lambda sd: sd.update({"model.blocks.0.self_attn.to_qkv.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match="1 unexpected key") as e:
        load_dit(p)
    assert "blocks.0.self_attn.to_qkv.weight" in str(e.value) and "(3, 3)" in str(e.value)


def test_wrong_shape(tmp_path):
    p = _edited_krea(tmp_path, lambda sd: sd.update({"model.blocks.1.ffn.2.bias": torch.zeros(65)}))
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        load_dit(p)
    assert "blocks.1.ffn.2.bias" in str(e.value) and "expected: (64,), found: (65,)" in str(e.value)


def test_not_a_dit(tmp_path):
    p = tmp_path / "vae.safetensors"
    save_file({"decoder.conv1.weight": torch.zeros(2, 2)}, str(p))
    with pytest.raises(CheckpointError, match="is this a Wan2.1 DiT") as e:
        load_dit(p)
    assert "key: patch_embedding.weight" in str(e.value)


@pytest.mark.parametrize("fmt", ["krea_safetensors", "self_forcing_pt"])
def test_corrupt_and_truncated_files(tmp_path, fmt):
    p = _write(tmp_path, fmt)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_dit(p)
    assert p.name in str(e.value)
    p.write_bytes(b"\x13\x37" * 4096)
    with pytest.raises(CheckpointError, match="truncated or corrupt|needs arbitrary code"):
        load_dit(p)
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_dit(p)


def test_folder_errors(tmp_path):
    p = _write(tmp_path, "wan_folder", max_shard_bytes=100_000)
    shard = sorted(p.glob("diffusion_pytorch_model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="listed in the index is missing") as e:
        load_dit(p)
    assert shard.name in str(e.value)
    (p / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        detect_dit_format(p)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"_class_name": "WanModel"}))
    with pytest.raises(CheckpointError, match=f"neither {WEIGHTS_NAME}"):
        load_dit(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot parse JSON"):
        load_dit(empty)
    with pytest.raises(CheckpointError, match="not found"):
        load_dit(tmp_path / "nope.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unrecognised DiT checkpoint file type"):
        load_dit(tmp_path / "model.onnx")


def test_shard_missing_an_indexed_key(tmp_path):
    p = _write(tmp_path, "diffusers_folder", max_shard_bytes=100_000)
    index = json.loads((p / INDEX_NAME).read_text())
    key, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in index["weight_map"].values() if s != shard)
    index["weight_map"][key] = other  # the index points at a shard that lacks this key
    (p / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lacks a tensor that the index assigns") as e:
        load_dit(p)
    assert key in str(e.value) and other in str(e.value)


def test_self_forcing_keys_with_training_wrapper_segments(tmp_path):
    """EMA dicts saved from an FSDP-wrapped generator carry '_fsdp_wrapped_module.' inside the key (SF's
    inference.py strips it); activation-checkpoint and torch.compile wrappers leave similar segments."""
    ref = synthetic_dit_state_dict("tiny", seed=5)

    def wrapped(k):
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            return f"model.blocks.{i}._fsdp_wrapped_module._checkpoint_wrapped_module.{rest}"
        return "model._orig_mod." + k

    torch.save({"generator_ema": {wrapped(k): v for k, v in ref.items()}}, tmp_path / "self_forcing_dmd.pt")
    cfg, got = load_dit_state_dict(tmp_path / "self_forcing_dmd.pt")
    assert cfg.name == "tiny"
    _assert_same(got, ref)


# The diffusers names of the original Wan keys, written out from DIFF scripts/convert_wan_to_diffusers.py
# (wan-models.md) rather than derived from our key map: per block, then top level.
_SPEC_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm2": "norm3", "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
_SPEC_TOP = {
    "patch_embedding": "patch_embedding", "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out", "head.modulation": "scale_shift_table",
}


def _spec_diffusers_name(key: str) -> str:
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        for wan, diff in _SPEC_BLOCK.items():
            if rest == wan or rest.startswith(wan + "."):
                return f"blocks.{i}.{diff}{rest[len(wan):]}"
        raise AssertionError(f"no spec name for {key}")
    for wan, diff in _SPEC_TOP.items():
        if key == wan or key.startswith(wan + "."):
            return diff + key[len(wan):]
    raise AssertionError(f"no spec name for {key}")


def test_diffusers_folder_with_distinct_tensors_loads_each_into_its_own_parameter(tmp_path):
    """A diffusers folder written by diffusers itself, every tensor filled with its own value: each of our
    keys gets exactly the tensor the spec's name table says (a swap of two same-shaped tensors, e.g. q/k or
    norm2/norm3, fails here although shapes and key sets still match)."""
    shapes = expected_shapes(PRESETS["tiny"])
    p = _write(tmp_path, "diffusers_folder", seed=0, dtype=torch.float32)
    dm = WanTransformer3DModel.from_config(json.loads((p / "config.json").read_text()))
    value = {}
    with torch.no_grad():
        for i, (name, t) in enumerate(sorted(dm.state_dict().items())):
            t.fill_(float(i + 1))
            value[name] = float(i + 1)
    out = tmp_path / "ours" / "transformer"
    dm.save_pretrained(out, safe_serialization=True)
    _, sd = load_dit_state_dict(out)
    assert set(sd) == set(shapes)
    for key, t in sd.items():
        want = value[_spec_diffusers_name(key)]
        assert torch.all(t == want), f"{key} holds {t.flatten()[0].item()}, expected {_spec_diffusers_name(key)}"
