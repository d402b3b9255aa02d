"""ImageReward v1.0 checkpoint format (imagereward.md §3): load and write.

The official folder holds ``ImageReward.pt`` (a flat state dict of the ``ImageReward`` module, no
prefix), ``med_config.json`` (BLIP's BERT config) and, for an offline runtime, the bert-base-uncased
``vocab.txt``. The module names of ``sdvg_rt.models.imagereward.ImageReward`` equal the file's keys,
so loading is a plain strict load; the keys scoring never uses (``blip.vision_proj.*``,
``blip.text_proj.*`` and the ``position_ids`` buffer) are accepted and dropped.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.imagereward import (
    BERT_VOCAB_LINES,
    PRESETS,
    ImageReward,
    ImageRewardConfig,
    ImageRewardTokenizer,
)
from .core import check_tensors, read_json, read_state_dict, strict_check

CHECKPOINT_NAME = "ImageReward.pt"
MED_CONFIG_NAME = "med_config.json"
VOCAB_NAME = "vocab.txt"

# Keys of the official file that scoring does not use: accepted if present, dropped.
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
UNUSED_KEYS = ("blip.text_encoder.embeddings.position_ids",)
ITC_DIM = 256  # width of BLIP's vision_proj / text_proj (only written by the synthetic writer)

# BLIP configs/med_config.json == ImageReward train/src/config/med_config.json, byte for byte
# (md5 79f15a1d6d89eca832013de0b0c05835, imagereward.md §1.2; the trailing spaces are in the file).
MED_CONFIG_V1_TEXT = """{
  "architectures": [
    "BertModel"
  ],
  "attention_probs_dropout_prob": 0.1,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1,
  "hidden_size": 768,
  "initializer_range": 0.02,
  "intermediate_size": 3072,
  "layer_norm_eps": 1e-12,
  "max_position_embeddings": 512,
  "model_type": "bert",
  "num_attention_heads": 12,
  "num_hidden_layers": 12,
  "pad_token_id": 0,
  "type_vocab_size": 2,
  "vocab_size": 30524,
  "encoder_width": 768,
  "add_cross_attention": true""" + "   \n}\n"  # three trailing spaces, kept out of the editor's reach

# med_config field -> (config field, type)
_MED_FIELDS = {
    "hidden_size": ("text_hidden", int),
    "num_hidden_layers": ("text_layers", int),
    "num_attention_heads": ("text_heads", int),
    "intermediate_size": ("text_intermediate", int),
    "vocab_size": ("vocab_size", int),
    "max_position_embeddings": ("max_positions", int),
    "layer_norm_eps": ("text_eps", float),
}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def resolve_paths(folder_or_pt, med_config=None, vocab=None) -> tuple[Path, Path, Path]:
    """(ImageReward.pt, med_config.json, vocab.txt): all three in a folder, or beside the given .pt file."""
    p = Path(folder_or_pt)
    pt = p / CHECKPOINT_NAME if p.is_dir() else p
    med = Path(med_config) if med_config is not None else pt.parent / MED_CONFIG_NAME
    voc = Path(vocab) if vocab is not None else pt.parent / VOCAB_NAME
    return pt, med, voc


def read_med_config(path: str | os.PathLike) -> dict:
    """Read and validate BLIP's med_config.json; returns the config fields it sets (see ``_MED_FIELDS``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            "ImageReward med_config.json not found; put it beside ImageReward.pt (it comes from the "
            "THUDM/ImageReward repository) or pass its path", path=path)
    med = read_json(path, "ImageReward med_config.json")
    fields = {}
    for name, (field, typ) in _MED_FIELDS.items():
        if name not in med:
            raise CheckpointError("med_config.json lacks a required field", path=path, key=name)
        v = med[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and v != int(v)) or v <= 0:
            raise CheckpointError(f"med_config.json field must be a positive {typ.__name__}",
                                  path=path, key=name, found=v)
        fields[field] = typ(v)
    checks = [
        ("hidden_act", med.get("hidden_act", "gelu") == "gelu", "gelu", med.get("hidden_act")),
        ("add_cross_attention", med.get("add_cross_attention", True) is True, True,
         med.get("add_cross_attention")),
        ("model_type", med.get("model_type", "bert") == "bert", "bert", med.get("model_type")),
        ("num_attention_heads", fields["text_hidden"] % fields["text_heads"] == 0,
         f"a divisor of hidden_size ({fields['text_hidden']})", fields["text_heads"]),
    ]
    for key, ok, expected, found in checks:
        if not ok:
            raise CheckpointError("med_config.json does not describe ImageReward's BLIP text encoder",
                                  path=path, key=key, expected=expected, found=found)
    return fields


def infer_config(sd: dict, med_fields: dict, path=None, med_path=None) -> ImageRewardConfig:
    """Architecture from the state-dict shapes (ViT) and med_config (BERT), cross-checked.

    ViT heads are not visible in shapes: a preset with the same widths gives them, otherwise BLIP's
    head dim 64 is used. ``encoder_width`` is the ViT width (BLIP overrides med_config's value).
    The result is a preset when it equals one (``v1.0``, ``tiny``).
    """
    for key in ("blip.visual_encoder.cls_token", "blip.visual_encoder.blocks.0.mlp.fc1.weight",
                "blip.text_encoder.embeddings.word_embeddings.weight"):
        if key not in sd:
            raise CheckpointError("not an ImageReward checkpoint (a key every ImageReward.pt has is absent)",
                                  path=path, key=key, expected="present", found="absent")
    width = sd["blip.visual_encoder.cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd
                    if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k)))
    mlp = sd["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
    # the text tower as the file has it, against med_config.json
    word_key = "blip.text_encoder.embeddings.word_embeddings.weight"
    word = sd[word_key]
    text_layers = 1 + max((int(m.group(1)) for k in sd
                           if (m := re.match(r"blip\.text_encoder\.encoder\.layer\.(\d+)\.", k))), default=-1)
    in_file = {
        ("hidden_size", word_key): ("text_hidden", word.shape[1]),
        ("vocab_size", word_key): ("vocab_size", word.shape[0]),
        ("num_hidden_layers", "blip.text_encoder.encoder.layer.*"): ("text_layers", text_layers),
    }
    for (name, key), (field, value) in in_file.items():
        if med_fields[field] != value:
            raise CheckpointError(
                f"med_config.json field {name} = {med_fields[field]} does not match the checkpoint "
                f"(file {path}); are they from the same model?",
                path=med_path, key=f"{name} (checkpoint key {key})",
                expected=value, found=med_fields[field])
    base = next((p for p in PRESETS.values()
                 if (p.vision_width, p.vision_depth, p.vision_mlp) == (width, depth, mlp)), None)
    heads = base.vision_heads if base is not None else width // 64
    if heads < 1 or width % heads:
        raise CheckpointError(
            "cannot tell the ViT head count: width is not a multiple of BLIP's head dim 64 and no preset "
            "matches", path=path, key="blip.visual_encoder.cls_token", found=(width,))
    cfg = replace(ImageRewardConfig(), vision_width=width, vision_depth=depth, vision_heads=heads,
                  vision_mlp=mlp, **med_fields)
    return next((p for p in PRESETS.values() if p == cfg), cfg)


def load_imagereward(folder_or_pt, med_config=None, vocab=None, *, device="cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[ImageReward, ImageRewardTokenizer]:
    """Load the official ImageReward v1.0 files -> (model in eval mode, tokenizer).

    ``folder_or_pt``: the folder with ImageReward.pt, med_config.json and vocab.txt, or the .pt file
    (the other two default to its folder). The towers are cast to ``dtype``; the affine head stays
    fp32 (the rewards are float32 either way). Every mismatch raises ``CheckpointError`` naming the
    file, key and shapes.
    """
    pt, med_path, vocab_path = resolve_paths(folder_or_pt, med_config, vocab)
    if not pt.exists():
        raise CheckpointError("ImageReward checkpoint not found; expected ImageReward.pt (or pass the file)",
                              path=pt)
    med_fields = read_med_config(med_path)
    tokenizer = ImageRewardTokenizer(vocab_path)  # checks vocab.txt before the large read
    sd = read_state_dict(pt)
    check_tensors(sd, pt, "the ImageReward module's state_dict")
    if sd and all(k.startswith("module.") for k in sd):  # a DDP-wrapped save
        sd = {k[len("module."):]: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not (k.startswith(UNUSED_PREFIXES) or k in UNUSED_KEYS)}
    cfg = infer_config(sd, med_fields, path=pt, med_path=med_path)
    with torch.device("meta"):
        model = ImageReward(cfg)
    strict_check(model, sd, pt, what="ImageReward")
    model.load_state_dict(sd, strict=True, assign=True)
    model.blip.to(device=device, dtype=dtype)
    model.mlp.to(device=device, dtype=torch.float32)
    return model.eval().requires_grad_(False), tokenizer


# ---------------------------------------------------------------------------------------------
# Writing synthetic checkpoints in the official format
# ---------------------------------------------------------------------------------------------


def synthetic_state_dict(cfg: ImageRewardConfig, seed: int = 0) -> dict:
    """A random ImageReward state dict with every key of the official file (unused ones included).

    Sane scales so the model is non-trivial: matrices N(0, 1/fan_in) (attention logits O(1), and
    the affine head large enough that rewards vary across frames: the original head init
    N(0, 1/769^2) makes every reward the same constant), LayerNorm weights 1 + N(0, 0.1^2), biases
    N(0, 0.02^2), embeddings N(0, 1), ViT cls/pos N(0, 0.02^2).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ImageReward(cfg).state_dict().items()}
    shapes.update({
        "blip.vision_proj.weight": (ITC_DIM, cfg.vision_width), "blip.vision_proj.bias": (ITC_DIM,),
        "blip.text_proj.weight": (ITC_DIM, cfg.text_hidden), "blip.text_proj.bias": (ITC_DIM,),
    })
    sd = {}
    for k, shape in shapes.items():
        x = torch.randn(shape, generator=g)
        if k.endswith(("cls_token", "pos_embed")):
            x.mul_(0.02)
        elif "embeddings." in k and k.endswith("_embeddings.weight"):
            pass
        elif ("norm" in k.lower()) and k.endswith(".weight"):
            x.mul_(0.1).add_(1.0)
        elif k.endswith(".bias"):
            x.mul_(0.02)
        else:  # Linear / Conv weight [out, in, ...]
            x.div_(math.prod(shape[1:]) ** 0.5)
        sd[k] = x
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(cfg.max_positions).unsqueeze(0)
    return sd


def med_config_text(cfg: ImageRewardConfig) -> str:
    """The med_config.json for ``cfg``: the original file byte for byte for v1.0."""
    if cfg == PRESETS["v1.0"]:
        return MED_CONFIG_V1_TEXT
    med = json.loads(MED_CONFIG_V1_TEXT)
    med.update(hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
               num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
               vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions,
               layer_norm_eps=cfg.text_eps, encoder_width=cfg.text_hidden)
    return json.dumps(med, indent=2) + "\n"


# Real bert-base-uncased ids: 999..1066 are the printable ASCII characters without upper case
# ("!" 999, "," 1010, "." 1012, "0" 1014, "a" 1037, "z" 1062, "~" 1066); 1996.. the commonest words.
_ASCII = [chr(c) for c in range(33, 127) if not "A" <= chr(c) <= "Z"]
_COMMON = {1996: "the", 1997: "of", 1998: "and", 1999: "in", 2000: "to"}
_WORDS = ("photo video cat dog man woman person city street car tree sky sea beach forest mountain "
          "river water night day sun light rain snow fire red blue green white black yellow walking "
          "running flying swimming dancing sitting standing playing close up view shot camera slow "
          "motion cinematic realistic beautiful old young small large big little bird horse fish "
          "flower garden house road bridge boat train field grass cloud clouds sunset sunrise").split()


def synthetic_vocab_lines() -> list[str]:
    """30522 tokens with BERT's special tokens and ASCII characters at their real ids, a few words at
    their real ids, "##" continuations of every character (so any ASCII word tokenises without [UNK])
    and ordinary lowercase words."""
    lines = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    lines += [f"[unused{i}]" for i in range(99, 99 + 999 - len(lines))]
    lines += _ASCII
    fill = ["##" + c for c in _ASCII] + [w for w in _WORDS if w not in _COMMON.values()]
    fill += [f"synth{i:05d}" for i in range(BERT_VOCAB_LINES)]
    it = iter(fill)
    while len(lines) < BERT_VOCAB_LINES:
        lines.append(_COMMON.get(len(lines)) or next(it))
    assert lines[101] == "[CLS]" and lines[1037] == "a" and lines[1010] == "," and lines[1996] == "the"
    return lines


def write_synthetic_imagereward(folder: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """Write ImageReward.pt (unused keys included, as the real file), med_config.json and a synthetic
    vocab.txt into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = ImageRewardConfig.preset(preset)
    torch.save(synthetic_state_dict(cfg, seed), folder / CHECKPOINT_NAME)
    (folder / MED_CONFIG_NAME).write_text(med_config_text(cfg), encoding="utf-8")
    (folder / VOCAB_NAME).write_text("\n".join(synthetic_vocab_lines()) + "\n", encoding="utf-8")
    return folder
