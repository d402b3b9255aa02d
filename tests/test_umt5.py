"""umT5 text encoder: official key map, Wan prompt handling, tokenizer guard (wan-models.md §6-7).

The parity reference below is a direct re-implementation of Wan's T5 encoder forward written from
the spec (RMS T5LayerNorm in fp32, per-layer bidirectional relative position buckets 32/128, no
1/sqrt(d) scaling, fp32 softmax, gated GELU-tanh with the GELU on `gate`, final norm). It reads the
official-key state dict directly, so it checks the key map and transformers' semantics together.
"""
import json
import math
import shutil
import warnings

import pytest
import torch

from sdvg_rt.checkpoints.core import read_state_dict, strict_check
from sdvg_rt.checkpoints.umt5 import (
    FILE_NAME, TOKENIZER_DIR, config_from_state_dict, load_text_encoder, official_shapes, to_hf,
    write_synthetic_umt5,
)
from sdvg_rt.errors import CheckpointError, SdvgError
from sdvg_rt.models.umt5 import PRESETS, TextEncoder, TextEncoderConfig, build_umt5, clean_prompt, load_tokenizer

PROMPTS = [
    "A cat sleeps on a warm windowsill in the afternoon sun.",
    "Waves crash against dark rocky cliffs under a stormy grey sky, seen from a drone that slowly "
    "rises over the water while seagulls circle and the light changes.",
    "x",
]


# --------------------------------------------------------------------------------------------------
# independent reference: Wan's T5Encoder forward from the spec, on official keys


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))


def _buckets(lq, lk, num_buckets=32, max_dist=128, flip=False):
    rel = torch.arange(lk)[None, :] - torch.arange(lq)[:, None]  # key - query
    if flip:  # deliberately wrong orientation (query - key), to show the test can fail
        rel = -rel
    half = num_buckets // 2
    out = (rel > 0).long() * half  # upper half: key after query
    a = rel.abs()
    exact = half // 2
    large = exact + (torch.log(a.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return out + torch.where(a < exact, a, large)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def wan_t5_reference(sd, ids, mask, heads, flip_buckets=False):
    """ids, mask [1, L] -> [1, L, D] with rows [seq_len:] zero (WAN trims, the DiT re-pads zeros)."""
    sd = {k: v.float() for k, v in sd.items()}
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = sd["token_embedding.weight"][ids[0]]  # [L, D]
    L = x.shape[0]
    bucket = _buckets(L, L, flip=flip_buckets)
    key_ok = mask[0].bool()[None, None, :]  # [1, 1, L] padded keys masked
    for i in range(n_layers):
        p = f"blocks.{i}."
        # 1. self-attention, per-layer relative bias, no scaling, fp32 softmax
        h = _rms(x, sd[p + "norm1.weight"])
        q, k, v = (torch.einsum("ld,ed->le", h, sd[p + f"attn.{n}.weight"]).view(L, heads, -1) for n in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)  # [H, Lq, Lk]
        logits = torch.einsum("qhc,khc->hqk", q, k) + bias
        logits = logits.masked_fill(~key_ok, torch.finfo(torch.float32).min)
        a = torch.softmax(logits.double(), -1).float()
        o = torch.einsum("hqk,khc->qhc", a, v).reshape(L, -1)
        x = x + o @ sd[p + "attn.o.weight"].T
        # 2. gated GELU-tanh FFN: fc1(x) * gelu(gate(x)), then fc2
        h = _rms(x, sd[p + "norm2.weight"])
        ff = (h @ sd[p + "ffn.fc1.weight"].T) * _gelu_tanh(h @ sd[p + "ffn.gate.0.weight"].T)
        x = x + ff @ sd[p + "ffn.fc2.weight"].T
    # 3. final norm, trim to seq_len and re-pad with zeros
    x = _rms(x, sd["norm.weight"])
    n = int(mask.sum())
    out = torch.zeros_like(x)
    out[:n] = x[:n]
    return out[None]


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_synthetic_umt5(tmp_path_factory.mktemp("umt5"), "tiny", seed=3)


@pytest.fixture(scope="module")
def enc(files):
    return TextEncoder.from_files(files["checkpoint"], files["tokenizer"], "cpu", torch.float32)


@pytest.fixture(scope="module")
def outs(enc):
    return enc.encode(PROMPTS)


@pytest.fixture(scope="module")
def official(files):
    return read_state_dict(files["checkpoint"])


# --------------------------------------------------------------------------------------------------
# parity


def test_matches_wan_reference_fp32(enc, outs, official):
    assert enc.config == PRESETS["tiny"] and enc.config.d_model == 64
    for i, (p, out) in enumerate(zip(PROMPTS, outs)):
        ids, mask = enc.tokenize(p, i)
        ref = wan_t5_reference(official, ids, mask, enc.config.num_heads)
        assert out.shape == (1, 512, 64) and out.dtype == torch.float32
        # fp32 both sides; only op order differs (SDPA vs einsum, fused GELU vs explicit): measured
        # max abs error ~1e-6 on O(1) outputs, so 2e-5 leaves margin while any key-map error
        # (see the next test) is >1e-2.
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_reference_detects_wrong_mapping(enc, outs, official, files, tmp_path):
    """The parity test has teeth: a swapped FFN branch or a flipped bucket orientation is caught."""
    ids, mask = enc.tokenize(PROMPTS[1])
    out = outs[1]
    flipped = wan_t5_reference(official, ids, mask, enc.config.num_heads, flip_buckets=True)
    assert (out - flipped).abs().max() > 1e-2
    swapped = dict(official)
    for i in range(enc.config.num_layers):
        a, b = f"blocks.{i}.ffn.gate.0.weight", f"blocks.{i}.ffn.fc1.weight"
        swapped[a], swapped[b] = official[b], official[a]
    torch.save(swapped, tmp_path / FILE_NAME)
    bad = TextEncoder.from_files(tmp_path / FILE_NAME, files["tokenizer"], "cpu", torch.float32)
    assert (bad.encode([PROMPTS[1]])[0] - out).abs().max() > 1e-2


def test_bf16_load_and_tied_embedding(files):
    te = load_text_encoder(files["checkpoint"], files["tokenizer"], "cpu", torch.bfloat16)
    assert te.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in te.model.parameters())
    m = te.model
    assert m.shared.weight.data_ptr() == m.encoder.embed_tokens.weight.data_ptr()
    out = te.encode(PROMPTS[:1])[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# prompt handling


def test_padding_rows_zero(enc, outs):
    for i, (p, out) in enumerate(zip(PROMPTS, outs)):
        n = int(enc.tokenize(p, i)[1].sum())
        assert 1 < n < 512
        assert (out[0, n:] == 0).all()
        assert (out[0, :n].abs().sum(-1) > 0).all()


def test_cleaning():
    assert clean_prompt("  a \t red\n\n  car  ") == "a red car"
    assert clean_prompt("salt &amp;amp; pepper") == "salt & pepper"  # html-unescaped twice
    assert clean_prompt("caf\u00c3\u00a9 at night") == "caf\u00e9 at night"  # ftfy mojibake fix


def test_cleaning_applied_before_tokenizing(enc):
    dirty, clean = "  a  red &amp;amp; blue\n car ", "a red & blue car"
    assert torch.equal(enc.tokenize(dirty)[0], enc.tokenize(clean)[0])  # same ids -> same encoding


def test_truncation_warns_with_index_and_count(enc):
    long = " ".join(["waves crash against the rocky cliffs"] * 120)
    n_full = len(enc.tokenizer(clean_prompt(long)).input_ids)
    assert n_full > 512
    with pytest.warns(UserWarning, match=rf"prompt 1 has {n_full} tokens"):
        outs = enc.encode(["a cat", long])  # index 1 is named
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = enc.tokenize(long, 1)
    assert mask.all() and ids[0, -1].item() == 1  # truncated to 511 tokens + eos
    assert (outs[1][0].abs().sum(-1) > 0).all()  # no padding rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.tokenize("a short prompt", 0)  # no warning under the limit


def test_release_frees_model(files):
    te = TextEncoder.from_files(files["checkpoint"], files["tokenizer"], "cpu", torch.float32)
    te.release()
    assert te.model is None
    with pytest.raises(SdvgError, match="release"):
        te.encode(["a cat"])


# --------------------------------------------------------------------------------------------------
# tokenizer guard


def _copy_tok(files, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(files["tokenizer"], d)
    return d


def test_tokenizer_guard_missing_and_empty(files, tmp_path):
    with pytest.raises(CheckpointError, match="not found") as e:
        load_tokenizer(tmp_path / "nope", 512)
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither tokenizer.json nor spiece.model"):
        load_tokenizer(tmp_path / "empty", 512)


def test_tokenizer_guard_vocab_and_ids(files, tmp_path):
    with pytest.raises(CheckpointError, match="larger than the text encoder's embedding") as e:
        load_tokenizer(files["tokenizer"], 100)
    assert str(files["tokenizer"]) in str(e.value)
    d = _copy_tok(files, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["pad_token"] = "</s>"  # pad id 1: a misconfigured tokenizer
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    special = {"pad_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (d / "special_tokens_map.json").write_text(json.dumps(special))
    with pytest.raises(CheckpointError, match="pad id 0 and eos id 1") as e:
        load_tokenizer(d, 512)
    assert str(d) in str(e.value)


def test_tokenizer_guard_foreign_tokenizer(tmp_path):
    """A BERT WordPiece folder (what a wrong path might hold) loads in transformers but is refused."""
    d = tmp_path / "bert"
    d.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    with pytest.raises(CheckpointError, match="neither tokenizer.json nor spiece.model"):
        load_tokenizer(d, 512)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(d), local_files_only=True).save_pretrained(str(d))  # adds tokenizer.json
    with pytest.raises(CheckpointError, match="umT5") as e:
        load_tokenizer(d, 512)
    assert str(d) in str(e.value)


# --------------------------------------------------------------------------------------------------
# checkpoint loader


def test_loader_rejects_bad_files(files, official, tmp_path):
    tok = files["tokenizer"]
    sd = dict(official)
    del sd["blocks.1.norm2.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing") as e:
        load_text_encoder(tmp_path / "missing.pth", tok)
    assert "blocks.1.norm2.weight" in str(e.value) and "missing.pth" in str(e.value)

    sd = dict(official)
    sd["blocks.0.attn.o.weight"] = torch.zeros(64, 32, dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        load_text_encoder(tmp_path / "shape.pth", tok)
    assert "blocks.0.attn.o.weight" in str(e.value) and "(64, 64)" in str(e.value) and "(64, 32)" in str(e.value)

    sd = dict(official)
    sd["blocks.1.norm2.weight"] = {"nested": sd["blocks.1.norm2.weight"]}
    torch.save(sd, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match="nested value") as e:
        load_text_encoder(tmp_path / "nested.pth", tok)
    assert "blocks.1.norm2.weight" in str(e.value)

    torch.save(to_hf(official), tmp_path / "hf.pth")
    with pytest.raises(CheckpointError, match="transformers UMT5 state dict"):
        load_text_encoder(tmp_path / "hf.pth", tok)


def test_full_preset_shapes_match_transformers():
    """umt5-xxl: the official shape table maps onto transformers' model (on meta) key for key."""
    cfg = TextEncoderConfig.from_name("umt5-xxl")
    shapes = official_shapes(cfg)
    n = sum(math.prod(s) for s in shapes.values())
    assert 5.6e9 < n < 5.75e9  # spec: about 5.68 B parameters, 11.4 GB in bf16
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert config_from_state_dict(meta) is PRESETS["umt5-xxl"]
    strict_check(build_umt5(cfg, "meta"), to_hf(meta), None)
    assert shapes["blocks.23.pos_embedding.embedding.weight"] == (32, 64)


def test_synthetic_layout(files):
    assert files["checkpoint"].name == FILE_NAME
    assert files["tokenizer"].as_posix().endswith(TOKENIZER_DIR)
    names = {p.name for p in files["tokenizer"].iterdir()}
    assert {"tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json"} <= names
    sd = read_state_dict(files["checkpoint"])
    assert list(sd) == list(official_shapes(PRESETS["tiny"]))  # official keys, Wan's order
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
