"""umT5 text encoder checkpoints: Wan's official `models_t5_umt5-xxl-enc-bf16.pth` (wan-models.md §6-7).

The file is a flat torch pickle of Wan's own `T5Encoder` state dict (bf16). Its keys are mapped to
transformers' `UMT5EncoderModel` keys; the mapping was checked against both sources
(`wan/modules/t5.py`, `transformers/models/umt5/modeling_umt5.py`):

| Wan (official)                               | transformers UMT5EncoderModel                                   |
|----------------------------------------------|-----------------------------------------------------------------|
| `token_embedding.weight` [V, D]              | `shared.weight` and its tied alias `encoder.embed_tokens.weight` |
| `blocks.i.norm1.weight`                      | `encoder.block.i.layer.0.layer_norm.weight`                     |
| `blocks.i.attn.{q,k,v,o}.weight`             | `encoder.block.i.layer.0.SelfAttention.{q,k,v,o}.weight`        |
| `blocks.i.pos_embedding.embedding.weight`    | `encoder.block.i.layer.0.SelfAttention.relative_attention_bias.weight` |
| `blocks.i.norm2.weight`                      | `encoder.block.i.layer.1.layer_norm.weight`                     |
| `blocks.i.ffn.gate.0.weight` (GELU branch)   | `encoder.block.i.layer.1.DenseReluDense.wi_0.weight` (act(wi_0)) |
| `blocks.i.ffn.fc1.weight` (linear branch)    | `encoder.block.i.layer.1.DenseReluDense.wi_1.weight`            |
| `blocks.i.ffn.fc2.weight`                    | `encoder.block.i.layer.1.DenseReluDense.wo.weight`              |
| `norm.weight`                                | `encoder.final_layer_norm.weight`                               |

Both compute the bucket of (key position - query position) with the same bidirectional formula
(half the buckets for key after query), index an `nn.Embedding(num_buckets, heads)` and permute to
[1, H, Lq, Lk], so the relative-bias table is copied as is. Neither scales q.k by 1/sqrt(d).
"""
from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.umt5 import EOS_ID, PAD_ID, PRESETS, UNK_ID, TextEncoder, TextEncoderConfig, build_umt5, load_tokenizer
from .core import check_tensors, read_state_dict, strict_check

FILE_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"

_TIED_ALIAS = "encoder.embed_tokens.weight"
_BLOCK_MAP = {  # Wan per-block suffix -> transformers per-block suffix
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


# --------------------------------------------------------------------------------------------------
# key map and shapes


def official_shapes(cfg: TextEncoderConfig) -> dict[str, tuple]:
    """Key -> shape of the official file for `cfg`, in Wan's module order."""
    d, inner, f = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    shapes = {"token_embedding.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (d,),
            b + "attn.q.weight": (inner, d), b + "attn.k.weight": (inner, d),
            b + "attn.v.weight": (inner, d), b + "attn.o.weight": (d, inner),
            b + "norm2.weight": (d,),
            b + "ffn.gate.0.weight": (f, d), b + "ffn.fc1.weight": (f, d), b + "ffn.fc2.weight": (d, f),
            b + "pos_embedding.embedding.weight": (cfg.num_buckets, cfg.num_heads),
        }
    shapes["norm.weight"] = (d,)
    return shapes


def hf_key(key: str) -> str:
    """Official Wan key -> transformers UMT5EncoderModel key (the tied alias is added by `to_hf`)."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = _BLOCK_RE.fullmatch(key)
    if m and m.group(2) in _BLOCK_MAP:
        return f"encoder.block.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"
    raise KeyError(key)


def to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a (checked) official state dict to transformers keys, adding the tied embedding alias."""
    out = {hf_key(k): v for k, v in sd.items()}
    out[_TIED_ALIAS] = out["shared.weight"]
    return out


def config_from_state_dict(sd: dict[str, torch.Tensor], path=None) -> TextEncoderConfig:
    """Architecture from shapes (a preset when one matches; max_distance/eps are Wan's fixed values)."""
    def need(key, ndim):
        if key not in sd:
            hint = ""
            if any(k.startswith(("shared.", "encoder.block.")) for k in sd):
                hint = " (this looks like a transformers UMT5 state dict, not Wan's file)"
            raise CheckpointError(
                f"not Wan's umT5 encoder checkpoint ({FILE_NAME}){hint}; expected Wan's T5Encoder keys",
                path=path, key=key, found="absent")
        t = sd[key]
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            raise CheckpointError(f"expected a {ndim}-d tensor", path=path, key=key,
                                  found=tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__)
        return t.shape

    vocab, d = need("token_embedding.weight", 2)
    buckets, heads = need("blocks.0.pos_embedding.embedding.weight", 2)
    inner = need("blocks.0.attn.q.weight", 2)[0]
    d_ff = need("blocks.0.ffn.fc1.weight", 2)[0]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.fullmatch(k)))
    if inner % heads:
        raise CheckpointError("attention width is not a multiple of the head count",
                              path=path, key="blocks.0.attn.q.weight", expected=f"multiple of {heads}", found=inner)
    cfg = TextEncoderConfig(vocab_size=vocab, d_model=d, d_kv=inner // heads, num_heads=heads, d_ff=d_ff,
                            num_layers=layers, num_buckets=buckets)
    return next((p for p in PRESETS.values() if p == cfg), cfg)


# --------------------------------------------------------------------------------------------------
# loading


def load_text_encoder(pth: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> TextEncoder:
    """Load Wan's umT5 encoder file + tokenizer folder into a `TextEncoder` (strict keys and shapes).

    The model is built on meta and the file's tensors are assigned one by one (cast/moved as they
    go), so host memory stays near one copy of the file (mmap'ed when the file allows it).
    """
    sd = read_state_dict(pth)
    check_tensors(sd, pth, "Wan's umT5 state dict")
    cfg = config_from_state_dict(sd, pth)
    strict_check(official_shapes(cfg), sd, pth, what="umT5 text encoder")
    tokenizer = load_tokenizer(tokenizer_dir, cfg.vocab_size)

    model = build_umt5(cfg, "meta")
    hf = to_hf({k: sd.pop(k).to(device=device, dtype=dtype) for k in list(sd)})  # one tensor moved at a time
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    hf = {k: v for k, v in hf.items() if k in expected or k != _TIED_ALIAS}  # alias only if the class has it
    strict_check(expected, hf, pth, what="umT5 text encoder (transformers layout)")
    model.load_state_dict(hf, strict=True, assign=True)  # shared + alias get the same tensor
    return TextEncoder(model.eval().requires_grad_(False), tokenizer, cfg)


# --------------------------------------------------------------------------------------------------
# synthetic files in the official format (sdvg-runtime.md §6)


def synthetic_state_dict(cfg: TextEncoderConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random bf16 tensors under the official keys, generated in turn (no model is built).

    Scales follow Wan's `init_weights` (embedding std 1, q std (D*inner)^-1/2, k/v std D^-1/2,
    o std (H*inner)^-1/2, gate/fc1 std D^-1/2, fc2 std F^-1/2, bias std (2*32*H)^-1/2). Norm weights
    are 1 + 0.1*N(0,1) rather than ones, so that a swapped norm in a key map changes the output.
    Large tensors are filled in row chunks, so the transient fp32 buffer stays small (<= 64 MiB).
    """
    g = torch.Generator().manual_seed(int(seed))
    d, inner, f, h = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.num_heads
    std = {"token_embedding": 1.0, "attn.q": (d * inner) ** -0.5, "attn.k": d ** -0.5, "attn.v": d ** -0.5,
           "attn.o": (h * inner) ** -0.5, "ffn.gate.0": d ** -0.5, "ffn.fc1": d ** -0.5,
           "ffn.fc2": f ** -0.5, "pos_embedding.embedding": (2 * cfg.num_buckets * h) ** -0.5}
    out = {}
    for key, shape in official_shapes(cfg).items():
        stem = key.rsplit(".", 1)[0]
        stem = stem.split(".", 2)[2] if stem.startswith("blocks.") else stem
        t = torch.empty(shape, dtype=torch.bfloat16)
        rows = max(1, (16 << 20) // max(1, t[0].numel()))  # 16M fp32 values per chunk
        for r in range(0, shape[0], rows):
            chunk = torch.randn((min(rows, shape[0] - r),) + tuple(shape[1:]), generator=g)
            t[r:r + rows] = (1.0 + 0.1 * chunk) if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")) \
                else chunk * std[stem]
        out[key] = t
    return out


_CORPUS = """\
A golden retriever runs across a sunny meadow full of wildflowers.
The camera slowly pans over a quiet city street at night, neon signs reflecting in the puddles.
A chef chops fresh vegetables on a wooden board in a busy restaurant kitchen.
Waves crash against dark rocky cliffs under a stormy grey sky.
A small red boat drifts on a calm lake surrounded by tall pine trees.
Two children build a sandcastle on the beach while the tide slowly comes in.
An astronaut floats inside a space station, looking out of the window at the blue Earth.
Snow falls gently on a wooden cabin in the mountains as smoke rises from the chimney.
A hummingbird hovers near a bright pink flower, its wings a blur of motion.
Traffic moves through a busy intersection in the rain, seen from high above.
A cat sleeps on a warm windowsill in the afternoon sun.
An old man plays the violin on a street corner while people walk past.
A time-lapse of clouds rolling over green hills at sunset.
A young woman rides a bicycle along a river path lined with autumn trees.
Fireworks explode over a harbour, lighting up the water in red, gold and blue.
A horse gallops along the shore, kicking up sand and spray.
Close-up of coffee being poured into a white cup, steam rising.
A drone shot flies over a dense tropical forest with a waterfall in the middle.
A robot walks through an abandoned factory filled with dust and light beams.
Leaves float down a small stream in a quiet forest in the morning.
A panda eats bamboo while sitting in the grass, looking at the camera.
The northern lights dance across the night sky above a frozen lake.
A skateboarder jumps over a set of stairs in slow motion.
A bowl of ramen with an egg, noodles and green onions, filmed from above.
A train crosses a long stone bridge through a misty valley.
A dancer spins on a stage under a single spotlight, her dress flowing.
Rain drops hit the surface of a pond, making circles that spread and fade.
A fox walks carefully through deep snow, then pounces.
A sailboat moves across the open sea on a bright windy day.
Candles flicker on a birthday cake as a family sings in a dark room.
"""
_SPECIAL = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def write_synthetic_tokenizer(folder: str | os.PathLike) -> list[Path]:
    """A small real umT5-style tokenizer (sentencepiece Unigram trained on built-in English text).

    Writes the google/umt5-xxl layout: spiece.model, tokenizer.json (the fast tokenizer converted
    by transformers), tokenizer_config.json and special_tokens_map.json; pad 0, eos 1, unk 2, no
    bos, no extra ids. At most 384 pieces, so it fits the tiny preset's 512 embedding rows.
    Deterministic (single thread, no shuffling), so the bytes depend on nothing but the library.
    """
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    lines = _CORPUS.splitlines()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="unigram", vocab_size=384,
        hard_vocab_limit=False, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        character_coverage=1.0, normalization_rule_name="nmt_nfkc", num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    config = {"tokenizer_class": "T5Tokenizer", **_SPECIAL, "extra_ids": 0, "additional_special_tokens": [],
              "model_max_length": 512, "padding_side": "right", "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(_SPECIAL, indent=2, sort_keys=True) + "\n")
    # tokenizer.json: the same model converted to the `tokenizers` format by transformers itself
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    (folder / "tokenizer.json").write_text(tok.backend_tokenizer.to_str())
    return [folder / n for n in ("spiece.model", "tokenizer.json", "tokenizer_config.json",
                                 "special_tokens_map.json")]


def write_synthetic_umt5(folder: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Write `folder/models_t5_umt5-xxl-enc-bf16.pth` (official keys, bf16) and `folder/google/umt5-xxl/`.

    The full preset ("umt5-xxl", 5.68 B parameters) is 11.4 GB; its tensors are generated one
    after another into a dict and saved with one torch.save, so peak host memory is about one
    file size (11.4 GB) plus a 64 MiB generation buffer. Returns {"checkpoint": path, "tokenizer": dir}.
    The file is saved through a file object, so the zip's inner archive name does not depend on
    the file name (same seed -> identical bytes).
    """
    cfg = TextEncoderConfig.from_name(preset)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = folder / TOKENIZER_DIR
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    write_synthetic_tokenizer(tok_dir)
    sd = synthetic_state_dict(cfg, seed)
    pth = folder / FILE_NAME
    with open(pth, "wb") as fh:
        torch.save(sd, fh)
    return {"checkpoint": pth, "tokenizer": tok_dir}
