"""ImageReward checkpoint format: synthetic writer, loader, and a specific error for each fault."""
import hashlib
import json
import shutil

import pytest
import torch
from sdvg_rt.checkpoints.imagereward import (
    MED_CONFIG_V1_TEXT,
    infer_config,
    load_imagereward,
    read_med_config,
    synthetic_vocab_lines,
    write_synthetic_imagereward,
)
from sdvg_rt.errors import CheckpointError
from sdvg_rt.models.imagereward import ImageReward, ImageRewardConfig

TINY = ImageRewardConfig.preset("tiny")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_synthetic_imagereward(tmp_path_factory.mktemp("ir") / "ImageReward", "tiny", seed=0)


@pytest.fixture
def copy(folder, tmp_path):
    """A private copy of the synthetic folder that a test may damage."""
    return shutil.copytree(folder, tmp_path / "ImageReward")


def _frames(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 10, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(96, 160), mode="bilinear", align_corners=False)


def _resave(folder, edit):
    sd = torch.load(folder / "ImageReward.pt", weights_only=True)
    edit(sd)
    torch.save(sd, folder / "ImageReward.pt")


def test_writer_produces_the_official_layout(folder):
    sd = torch.load(folder / "ImageReward.pt", weights_only=True)
    # flat, unprefixed, with the keys the real file carries but scoring never uses
    assert all(k.startswith(("blip.visual_encoder.", "blip.text_encoder.", "blip.vision_proj.",
                             "blip.text_proj.", "mlp.layers.")) for k in sd)
    assert sd["blip.vision_proj.weight"].shape == (256, TINY.vision_width)
    assert sd["blip.text_proj.weight"].shape == (256, TINY.text_hidden)
    assert torch.equal(sd["blip.text_encoder.embeddings.position_ids"], torch.arange(512)[None])
    assert sd["mlp.layers.7.weight"].shape == (1, 16) and "mlp.layers.1.weight" not in sd
    lines = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(lines) == 30522 and len(set(lines)) == 30522
    assert [lines[i] for i in (0, 100, 101, 102, 103, 1010, 1037)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                        "[MASK]", ",", "a"]
    assert synthetic_vocab_lines() == lines
    med = json.loads((folder / "med_config.json").read_text())
    assert (med["hidden_size"], med["num_hidden_layers"], med["vocab_size"]) == (32, 2, 30524)


def test_v1_med_config_is_the_original_file(tmp_path):
    # md5 of BLIP configs/med_config.json == ImageReward's copy (imagereward.md §1.2)
    assert hashlib.md5(MED_CONFIG_V1_TEXT.encode()).hexdigest() == "79f15a1d6d89eca832013de0b0c05835"
    p = tmp_path / "med_config.json"
    p.write_text(MED_CONFIG_V1_TEXT)
    v1 = ImageRewardConfig.preset("v1.0")
    assert read_med_config(p) == dict(text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072,
                                      vocab_size=30524, max_positions=512, text_eps=1e-12)
    # the architecture of a v1.0 file is recognised from shapes (meta tensors: nothing is allocated)
    with torch.device("meta"):
        shapes = {k: torch.empty(v.shape, device="meta") for k, v in ImageReward(v1).state_dict().items()}
    assert infer_config(shapes, read_med_config(p)) is v1
    assert shapes["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"].shape == (768, 1024)


def test_load_synthetic_and_score(folder):
    model, tok = load_imagereward(folder)
    assert model.cfg is TINY and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    sd = torch.load(folder / "ImageReward.pt", weights_only=True)
    assert torch.equal(model.mlp.layers["6"].weight, sd["mlp.layers.6.weight"])
    ids, mask = tok("a dog running on the beach")
    rewards = model.score_frames(_frames(), ids, mask)
    assert rewards.shape == (3,) and rewards.dtype == torch.float32
    assert torch.isfinite(rewards).all()
    assert float(rewards.max() - rewards.min()) > 1e-3  # the head init makes rewards vary


def test_load_pt_path_with_explicit_files(folder, tmp_path):
    shutil.copy(folder / "ImageReward.pt", tmp_path / "weights.pt")
    model, tok = load_imagereward(tmp_path / "weights.pt", med_config=folder / "med_config.json",
                                  vocab=folder / "vocab.txt")
    ref, _ = load_imagereward(folder)
    ids, mask = tok("a cat")
    px = _frames(2, seed=1)
    assert torch.equal(model.score_frames(px, ids, mask), ref.score_frames(px, ids, mask))


def test_load_bf16_keeps_head_fp32(folder):
    ref, tok = load_imagereward(folder)
    model, _ = load_imagereward(folder, dtype=torch.bfloat16)
    assert model.blip.visual_encoder.pos_embed.dtype == torch.bfloat16
    assert model.mlp.layers["0"].weight.dtype == torch.float32
    ids, mask = tok("a red car")
    px = _frames(2, seed=2)
    out = model.score_frames(px, ids, mask)
    assert out.dtype == torch.float32
    # bf16 towers (8-bit mantissa) vs fp32: rewards of size ~1 agree to a few 1e-2
    torch.testing.assert_close(out, ref.score_frames(px, ids, mask), atol=5e-2, rtol=0)


def test_unused_keys_are_optional_and_ddp_prefix_is_stripped(copy):
    def edit(sd):
        for k in [k for k in sd if k.startswith(("blip.vision_proj.", "blip.text_proj."))]:
            del sd[k]
        for k in list(sd):
            sd["module." + k] = sd.pop(k)
    _resave(copy, edit)
    model, _ = load_imagereward(copy)
    assert model.cfg is TINY


def test_corrupt_checkpoint(copy):
    data = (copy / "ImageReward.pt").read_bytes()
    (copy / "ImageReward.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_imagereward(copy)
    assert e.value.path == copy / "ImageReward.pt"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as e:
        load_imagereward(tmp_path)
    assert e.value.path == tmp_path / "ImageReward.pt"


def test_missing_key(copy):
    key = "blip.text_encoder.encoder.layer.1.crossattention.self.value.bias"
    _resave(copy, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match="missing") as e:
        load_imagereward(copy)
    assert e.value.key == key and e.value.path == copy / "ImageReward.pt"


def test_unexpected_key(copy):
    _resave(copy, lambda sd: sd.__setitem__("blip.itm_head.weight", torch.zeros(2, 32)))
    with pytest.raises(CheckpointError, match="unexpected") as e:
        load_imagereward(copy)
    assert e.value.key == "blip.itm_head.weight" and e.value.found == (2, 32)


def test_wrong_shape(copy):
    _resave(copy, lambda sd: sd.__setitem__("mlp.layers.7.weight", torch.zeros(2, 16)))
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        load_imagereward(copy)
    assert (e.value.key, e.value.expected, e.value.found) == ("mlp.layers.7.weight", (1, 16), (2, 16))


def test_not_an_imagereward_file(copy):
    torch.save({"patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2)}, copy / "ImageReward.pt")
    with pytest.raises(CheckpointError, match="not an ImageReward checkpoint") as e:
        load_imagereward(copy)
    assert e.value.key == "blip.visual_encoder.cls_token"


def test_missing_med_config(copy):
    (copy / "med_config.json").unlink()
    with pytest.raises(CheckpointError, match="med_config.json not found") as e:
        load_imagereward(copy)
    assert e.value.path == copy / "med_config.json"


def test_missing_vocab(copy):
    (copy / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match="vocab.txt not found") as e:
        load_imagereward(copy)
    assert e.value.path == copy / "vocab.txt"


@pytest.mark.parametrize("field,value,match", [
    ("num_hidden_layers", 3, "num_hidden_layers = 3 does not match the checkpoint"),
    ("hidden_size", 64, "hidden_size = 64 does not match the checkpoint"),
    ("hidden_act", "relu", "does not describe"),
    ("num_attention_heads", 5, "does not describe"),
    ("intermediate_size", None, "lacks a required field"),
    ("layer_norm_eps", "1e-12", "positive float"),
])
def test_bad_med_config(copy, field, value, match):
    p = copy / "med_config.json"
    med = json.loads(p.read_text())
    if value is None:
        del med[field]
    else:
        med[field] = value
    p.write_text(json.dumps(med))
    with pytest.raises(CheckpointError, match=match) as e:
        load_imagereward(copy)
    assert field in str(e.value.key) and e.value.path == p


def test_med_config_not_json(copy):
    (copy / "med_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_imagereward(copy)


def test_wrong_vocab_size(copy):
    (copy / "vocab.txt").write_text("\n".join(synthetic_vocab_lines()[:30000]) + "\n")
    with pytest.raises(CheckpointError, match="30522 lines") as e:
        load_imagereward(copy)
    assert e.value.path == copy / "vocab.txt"
