"""ImageReward scorer: parity with transformers' BLIP, preprocessing vs PIL, batching, tokenizer guards."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sdvg_rt.checkpoints.imagereward import (
    UNUSED_KEYS,
    UNUSED_PREFIXES,
    synthetic_state_dict,
    synthetic_vocab_lines,
)
from sdvg_rt.errors import CheckpointError
from sdvg_rt.models.imagereward import (
    CLIP_MEAN,
    CLIP_STD,
    ImageReward,
    ImageRewardConfig,
    ImageRewardTokenizer,
    frames_to_uint8,
    preprocess,
    resize_geometry,
)

TINY = ImageRewardConfig.preset("tiny")


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ir_vocab") / "vocab.txt"
    p.write_text("\n".join(synthetic_vocab_lines()) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tok(vocab_file):
    return ImageRewardTokenizer(vocab_file)


@pytest.fixture(scope="module")
def tiny_sd():
    return synthetic_state_dict(TINY, seed=1)


@pytest.fixture(scope="module")
def tiny_model(tiny_sd):
    m = ImageReward(TINY)
    sd = {k: v for k, v in tiny_sd.items() if not (k.startswith(UNUSED_PREFIXES) or k in UNUSED_KEYS)}
    m.load_state_dict(sd, strict=True)
    return m.eval().requires_grad_(False)


def _smooth_frames(n, h, w, seed=0):
    """Video-like frames in [-1, 1]: smooth structure plus fine noise (exercises the antialias filter)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(2, h // 16), max(2, w // 16), generator=g) * 2 - 1
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (x + 0.15 * torch.randn(n, 3, h, w, generator=g)).clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def test_v1_preset_sizes_and_parameter_count():
    cfg = ImageRewardConfig.preset("v1.0")
    assert (cfg.vision_width, cfg.vision_depth, cfg.vision_heads, cfg.vision_mlp) == (1024, 24, 16, 4096)
    assert (cfg.text_hidden, cfg.text_layers, cfg.text_heads, cfg.text_intermediate) == (768, 12, 12, 3072)
    assert (cfg.vocab_size, cfg.max_positions, cfg.encoder_width, cfg.text_length) == (30524, 512, 1024, 35)
    with torch.device("meta"):
        m = ImageReward(cfg)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    # parameter counts measured on the original module (imagereward.md §5)
    assert count(m.blip.visual_encoder) == 303_301_632
    assert count(m.blip.text_encoder) == 141_977_088
    assert count(m.mlp) == 927_969
    assert count(m) == 446_206_689
    with pytest.raises(ValueError, match="known presets"):
        ImageRewardConfig.preset("v2")


# --------------------------------------------------------------------------------------------
# parity with an independent implementation: transformers' BLIP towers + the affine head
# --------------------------------------------------------------------------------------------


def _hf_vision_key(k):
    k = k[len("blip.visual_encoder."):]
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}
    if k in fixed:
        return fixed[k]
    if k.startswith("norm."):
        return "post_layernorm." + k[len("norm."):]
    for a, b in [("patch_embed.proj.", "embeddings.patch_embedding."), ("blocks.", "encoder.layers."),
                 (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."),
                 (".attn.qkv.", ".self_attn.qkv."), (".attn.proj.", ".self_attn.projection.")]:
        k = k.replace(a, b)
    return k


def _hf_blip(cfg, sd):
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vis = BlipVisionModel(BlipVisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp, num_hidden_layers=cfg.vision_depth,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        layer_norm_eps=cfg.vision_eps, hidden_act="gelu", attention_dropout=0.0,
        attn_implementation="eager"))
    txt = BlipTextModel(BlipTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, encoder_hidden_size=cfg.vision_width,
        intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_positions,
        layer_norm_eps=cfg.text_eps, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager",
        # is_decoder builds the cross-attention; forward(is_decoder=False) keeps the mask bidirectional
        is_decoder=True),
        add_pooling_layer=False)
    # key map official ImageReward.pt -> transformers BLIP (written here, independent of the runtime);
    # med.py's BERT names equal transformers' BlipText names, so the text tower only loses its prefix
    vsd = {_hf_vision_key(k): v for k, v in sd.items() if k.startswith("blip.visual_encoder.")}
    tsd = {k[len("blip.text_encoder."):]: v for k, v in sd.items()
           if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}
    vis.load_state_dict(vsd, strict=True)
    txt.load_state_dict(tsd, strict=True)
    return vis.eval(), txt.eval()


def test_parity_with_transformers_blip(tiny_sd, tiny_model, tok):
    vis, txt = _hf_blip(TINY, tiny_sd)
    pixels = preprocess(_smooth_frames(3, 240, 416))
    ids, mask = tok("a cat and a dog walking on the beach at sunset, cinematic")
    assert int(mask.sum()) < 35  # padding present, so the self-attention mask matters

    # reference: score_gard with ids broadcast to N, all-ones image mask, token 0, affine head
    n = pixels.shape[0]
    with torch.no_grad():
        image_ref = vis(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_ref.shape[:2], dtype=torch.long)
        h = txt(input_ids=ids.expand(n, -1), attention_mask=mask.expand(n, -1),
                encoder_hidden_states=image_ref, encoder_attention_mask=image_mask).last_hidden_state[:, 0]
    for i in (0, 2, 4, 6, 7):
        h = F.linear(h, tiny_sd[f"mlp.layers.{i}.weight"], tiny_sd[f"mlp.layers.{i}.bias"])
    ref = (h[:, 0] - 0.16717362830052426) / 1.0333394966054072

    image = tiny_model.blip.visual_encoder(pixels)
    out = tiny_model(pixels, ids, mask)
    # fp32 on both sides, same maths in a different op order (SDPA vs matmul-softmax, -1e4 vs
    # finfo.min mask: both exp to exactly 0): agreement to ~1e-6; 1e-4 leaves margin for BLAS order.
    torch.testing.assert_close(image, image_ref, atol=1e-4, rtol=1e-4)
    assert out.dtype == torch.float32 and out.shape == (n,)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert float(ref.max() - ref.min()) > 1e-2  # rewards differ between frames: the test can fail

    # [CLS] 101 is kept at token 0; replacing it by [ENC] (BLIP ITM style) changes the reward
    ids_enc = ids.clone()
    ids_enc[0, 0] = tok.enc_token_id
    assert not torch.allclose(tiny_model(pixels, ids_enc, mask), out, atol=1e-3)


def test_batched_equals_per_frame_loop(tiny_model, tok):
    pixels = preprocess(_smooth_frames(4, 224, 300, seed=3))
    ids, mask = tok("a red car on a road")
    batched = tiny_model(pixels, ids, mask)
    loop = torch.cat([tiny_model(pixels[i:i + 1], ids, mask) for i in range(4)])
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-5)  # fp32, only BLAS blocking differs
    # ids given per frame ([N, 35]) == the shared prompt broadcast ([1, 35])
    torch.testing.assert_close(tiny_model(pixels, ids.expand(4, -1), mask.expand(4, -1)), batched,
                               atol=1e-6, rtol=1e-6)


def test_padding_tokens_do_not_matter(tiny_model, tok):
    pixels = preprocess(_smooth_frames(2, 224, 224, seed=5))
    ids, mask = tok("a dog")
    noisy = ids.clone()
    noisy[0, 10:] = 1037  # change only masked positions
    # exp(-10000) is exactly 0 in fp32, so padded keys have exactly zero weight
    torch.testing.assert_close(tiny_model(pixels, noisy, mask), tiny_model(pixels, ids, mask),
                               atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------


def test_quantisation_rule_and_nan():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 1 / 255, 0.999, 1.0, 1.5]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    # round((x + 1) * 127.5), half to even (0 -> 127.5 -> 128), clamped to [0, 255]
    assert frames_to_uint8(x)[0, 0, 0].tolist() == [0, 0, 0, 128, 128, 255, 255, 255]
    assert frames_to_uint8(x.bfloat16()).dtype == torch.uint8
    frames = _smooth_frames(2, 240, 320)
    frames[1, 0, 100, 100] = float("nan")
    px = preprocess(frames)
    assert torch.isfinite(px[0]).all() and torch.isnan(px[1]).any()  # NaN is not hidden as a level


# (H, W): the 832x480 video both ways, odd portrait/landscape sizes, identity, an upscale
@pytest.mark.parametrize("h,w", [(480, 832), (832, 480), (333, 250), (225, 301), (224, 224), (64, 96)])
def test_preprocess_matches_pil_pipeline(h, w):
    frames = _smooth_frames(2, h, w, seed=h + w)
    ours = preprocess(frames)
    assert ours.shape == (2, 3, 224, 224) and ours.dtype == torch.float32
    # reference (ImageReward's _transform): the saved uint8 frame as a PIL image -> Resize(224, BICUBIC)
    # (short side 224, long side int(224*long/short)) -> CenterCrop(224) -> ToTensor -> Normalize
    levels = np.clip(np.round((frames.numpy() + 1) * np.float32(127.5)), 0, 255).astype(np.uint8)
    short, long = min(h, w), max(h, w)
    size = (224, int(224 * long / short)) if h <= w else (int(224 * long / short), 224)  # (H, W)
    top, left = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
    mean, std = np.array(CLIP_MEAN)[:, None, None], np.array(CLIP_STD)[:, None, None]
    refs = []
    for img in levels:
        im = Image.fromarray(img.transpose(1, 2, 0)).resize((size[1], size[0]), Image.BICUBIC)
        im = im.crop((left, top, left + 224, top + 224))
        refs.append((np.asarray(im, dtype=np.float64).transpose(2, 0, 1) / 255.0 - mean) / std)
    ref = np.stack(refs)
    # Tolerance in uint8 levels (1 level = 1/(255*std_c) normalised, <= 0.0150): PIL resamples in
    # 22-bit fixed point, so a pass can land one level apart: <= 1 level when downscaling (spec);
    # when upscaling the bicubic overshoot can carry an intermediate 1-level difference to 2.
    diff = np.abs(ours.numpy() - ref) * np.array(CLIP_STD)[None, :, None, None] * 255.0
    assert diff.max() <= (2.0 if short < 224 else 1.0) + 1e-3, diff.max()
    assert (diff > 0.5).mean() < 0.01  # and almost every value is identical
    if (h, w) == (480, 832):
        # the test is sensitive: bicubic WITHOUT antialias is far from PIL when downscaling
        x = torch.from_numpy(levels).float()
        plain = F.interpolate(x, size=size, mode="bicubic", align_corners=False).round().clamp(0, 255)
        plain = plain[:, :, top:top + 224, left:left + 224].numpy()
        assert np.abs(plain - (ref * std + mean) * 255).max() > 5


def test_resize_geometry():
    assert resize_geometry(480, 832) == (224, 388, 0, 82)  # int(224*832/480) = int(388.27)
    assert resize_geometry(832, 480) == (388, 224, 82, 0)
    assert resize_geometry(224, 224) == (224, 224, 0, 0)


# --------------------------------------------------------------------------------------------
# tokenizer and its silent-failure guards
# --------------------------------------------------------------------------------------------


def test_tokenizer_real_ids_and_shapes(tok):
    assert len(tok) == 30524 and tok.enc_token_id == 30523
    ids, mask = tok("A, the")
    assert ids.shape == mask.shape == (1, 35) and ids.dtype == mask.dtype == torch.int64
    # bert-base-uncased ids: [CLS] 101, "a" 1037 (lowercased), "," 1010, "the" 1996, [SEP] 102, [PAD] 0
    assert ids[0, :6].tolist() == [101, 1037, 1010, 1996, 102, 0]
    assert mask[0].tolist() == [1] * 5 + [0] * 30
    long_ids, long_mask = tok(" ".join(["cat"] * 60))
    assert long_ids[0, 0] == 101 and long_ids[0, -1] == 102 and bool(long_mask.all())  # truncated to 35
    empty, empty_mask = tok("")
    assert empty[0, :3].tolist() == [101, 102, 0] and int(empty_mask.sum()) == 2


def test_tokenizer_rejects_short_vocab(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(synthetic_vocab_lines()[:5000]) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="30522 lines") as e:
        ImageRewardTokenizer(p)
    assert e.value.path == p and "5000 lines" in str(e.value)


def test_tokenizer_rejects_misplaced_specials(tmp_path):
    lines = synthetic_vocab_lines()
    lines[101], lines[102] = lines[102], lines[101]
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"\[CLS\]") as e:
        ImageRewardTokenizer(p)
    assert "id 101" in str(e.value.key)


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="vocab.txt not found"):
        ImageRewardTokenizer(tmp_path / "nope" / "vocab.txt")


def test_tokenizer_guard_catches_silent_fallback(vocab_file, tmp_path, monkeypatch):
    """If the installed transformers ignored the file (as v5 does with vocab_file=), the post-check fires.
    (ImageRewardTokenizer imports transformers.BertTokenizer at call time, so the patch applies.)"""
    import transformers

    small = tmp_path / "vocab.txt"
    small.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    real = transformers.BertTokenizer
    monkeypatch.setattr(transformers, "BertTokenizer", lambda path, **kw: real(str(small), **kw))
    with pytest.raises(CheckpointError, match="did not load the bert-base-uncased vocab") as e:
        ImageRewardTokenizer(vocab_file)
    assert e.value.found["len(tokenizer)"] == 7 and e.value.path == vocab_file
