"""ImageReward v1.0: native PyTorch scorer, GPU preprocessing and tokenizer (imagereward.md).

A BLIP ViT-L/16 encodes each frame; a BERT-base with cross-attention in every layer reads the prompt
against the image tokens; the token-0 ([CLS]) feature goes through an affine 5-layer head and is
normalised with the published mean/std. Module names equal the keys of ``ImageReward.pt``
(``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.{0,2,4,6,7}``), so loading is a
plain strict load. Eval only: no dropout / drop-path modules (they have no keys).

Usage (DESIGN.md "ImageReward")::

    tok = ImageRewardTokenizer(vocab_txt)      # silent-failure guards (len 30524, cls 101, pad 0)
    ids, mask = tok(prompt)                    # [1, 35] int64 each, once per prompt (host)
    pixels = preprocess(frames)                # [N, 3, H, W] in [-1, 1] -> [N, 3, 224, 224]
    rewards = model(pixels, ids, mask)         # [N] float32

The forward has no host syncs and no data-dependent branches; shapes are static for a given N.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

# CLIP normalisation constants used by ImageReward's _transform (imagereward.md §2.1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRewardConfig:
    # visual encoder (BLIP ViT, timm-0.6 layout)
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    vision_eps: float = 1e-6
    # text encoder (BLIP med.py BERT with cross-attention; med_config.json)
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 30524
    max_positions: int = 512
    text_eps: float = 1e-12
    text_length: int = 35
    # reward head: text_hidden -> 1024 -> 128 -> 64 -> 16 -> 1, affine (no activations)
    head_widths: tuple = (1024, 128, 64, 16)
    reward_mean: float = 0.16717362830052426
    reward_std: float = 1.0333394966054072
    pixel_mean: tuple = CLIP_MEAN
    pixel_std: tuple = CLIP_STD

    @property
    def encoder_width(self) -> int:
        """Input width of the cross-attention key/value (BLIP overrides med_config's with the ViT width)."""
        return self.vision_width

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def preset(cls, name: str) -> "ImageRewardConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown ImageReward preset {name!r}; known presets: {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS = {
    "v1.0": ImageRewardConfig(),
    # Small towers, but the real image size / patch / text length / vocab so preprocessing,
    # tokenisation and all sequence shapes are the real ones.
    "tiny": ImageRewardConfig(
        vision_width=32, vision_depth=2, vision_heads=2, vision_mlp=64,
        text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
    ),
}


# ---------------------------------------------------------------------------------------------
# Preprocessing (tensor ops only: GPU-capable, CUDA-graph capturable, no PIL)
# ---------------------------------------------------------------------------------------------


def quantise_frames(frames: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Frames in [-1, 1] -> float32 uint8 levels: ``clamp(round((x + 1) * 127.5), 0, 255)``.

    This is THE quantisation rule of sdvg-rt: a saved video frame has exactly these levels
    (``frames_to_uint8`` is the same rule cast to uint8 for the mp4 writer). ``round`` is
    round-half-to-even (torch.round). NaN stays NaN (so a broken frame gives a NaN reward, which the
    loop counts as a reject) instead of silently becoming a valid level. ``out``: a preallocated float32
    buffer of the frames' shape to compute in (no temporaries); the same arithmetic either way.
    """
    x = frames.float().add(1.0) if out is None else out.copy_(frames).add_(1.0)
    return x.mul_(127.5).round_().clamp_(0.0, 255.0)


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """The uint8 frames a saved video holds (same rule as ``quantise_frames``); NaN must be checked before."""
    return quantise_frames(frames).to(torch.uint8)


def resize_geometry(height: int, width: int, size: int = 224) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, crop_top, crop_left) of torchvision ``Resize(size)`` + ``CenterCrop(size)``.

    The short side becomes ``size`` and the long side ``int(size * long / short)`` (PIL/torchvision);
    the crop offsets are ``int(round((resized - size) / 2))`` as torchvision's center_crop.
    """
    if height <= width:
        rh, rw = size, int(size * width / height)
    else:
        rh, rw = int(size * height / width), size
    return rh, rw, int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))


def _resize_pass(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One antialiased bicubic pass (a = -0.5 with antialias, PIL's kernel) back to uint8 levels.

    Rounds half up (floor(x + 0.5)) and clips, as PIL's 8-bit resampler does after each pass.
    """
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return x.add_(0.5).floor_().clamp_(0.0, 255.0)


def preprocess(frames: torch.Tensor, *, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decoded frames -> ImageReward pixels, as the reference sees the saved video (imagereward.md §2.1).

    frames: [N, 3, H, W] in [-1, 1], any float dtype, any device. Returns [N, 3, size, size] ``dtype``.
    Steps: 1. quantise to the uint8 levels of the saved frame (``quantise_frames``);
    2. resize the short side to ``size`` as PIL's ``Image.resize(BICUBIC)`` does on a uint8 image:
    a horizontal then a vertical antialiased bicubic pass, each rounded and clipped to uint8 levels
    (the intermediate clipping matters where bicubic overshoots); 3. centre crop; 4. /255 and the CLIP
    mean/std. Matches PIL Resize + CenterCrop + ToTensor + Normalize to <= 1 level when downscaling.
    """
    channels, h, w = frames.shape[1:]
    if channels != 3:
        raise ValueError(f"preprocess expects frames [N, 3, H, W]; got shape {tuple(frames.shape)}")
    # 1. uint8 levels (float32)
    x = quantise_frames(frames)
    # 2. resize the short side to `size`, horizontal pass first (a pass is skipped when its side
    #    already has the size, as in PIL)
    rh, rw, top, left = resize_geometry(h, w, size)
    if rw != w:
        x = _resize_pass(x, (h, rw))
    if rh != h:
        x = _resize_pass(x, (rh, rw))
    # 3. centre crop (a view)
    x = x[:, :, top:top + size, left:left + size]
    # 4. /255 and normalise per channel with Python scalars: no host->device constant copy (capturable),
    #    and plain Slice/Mul/Sub/Concat when exported
    x = torch.cat([x[:, c:c + 1] * (1.0 / (255.0 * std[c])) - mean[c] / std[c] for c in range(3)], dim=1)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# Tokenizer (host side, once per prompt)
# ---------------------------------------------------------------------------------------------

BERT_VOCAB_LINES = 30522
_BERT_SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


class ImageRewardTokenizer:
    """bert-base-uncased WordPiece from a local vocab.txt, plus BLIP's [DEC] / [ENC] (ids 30522/30523).

    Guards against the silent failures of transformers 5.x (imagereward.md §4): the keyword
    ``vocab_file=`` is silently ignored there and offline ``from_pretrained('bert-base-uncased')``
    falls back to a 5-token vocab. The vocab path is passed positionally, which is ``vocab_file`` on
    transformers 4.x (slow tokenizer) and ``vocab`` (a file path) on 5.x (verified on 4.46.3 and
    5.23.0), and the result is checked: 30524 tokens, [CLS] 101, [SEP] 102, [PAD] 0, lowercasing.
    ``tok(prompt) -> (ids, mask)``: [1, 35] int64 each, [CLS] kept at position 0 (not [ENC]).
    """

    def __init__(self, vocab_txt: str | Path, max_length: int = 35):
        from transformers import BertTokenizer

        self.vocab_path = Path(vocab_txt)
        self.max_length = max_length
        _check_vocab_file(self.vocab_path)
        tok = BertTokenizer(str(self.vocab_path), do_lower_case=True)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        found = {
            "len(tokenizer)": len(tok), "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id, "[ENC] id": tok.convert_tokens_to_ids("[ENC]"),
        }
        expected = {
            "len(tokenizer)": BERT_VOCAB_LINES + 2, "cls_token_id": 101, "sep_token_id": 102,
            "pad_token_id": 0, "[ENC] id": BERT_VOCAB_LINES + 1,
        }
        if found != expected:
            raise CheckpointError(
                "the tokenizer did not load the bert-base-uncased vocab from this file (the installed "
                "transformers may have ignored it and fallen back to a default vocab); ImageReward scores "
                "would be silently wrong. Use the 30522-line bert-base-uncased vocab.txt and a supported "
                "transformers version",
                path=self.vocab_path, expected=expected, found=found,
            )
        if tok.tokenize("A") != tok.tokenize("a"):
            raise CheckpointError("the tokenizer does not lowercase (bert-base-uncased must)",
                                  path=self.vocab_path)
        self.enc_token_id = found["[ENC] id"]
        self._tok = tok

    def __len__(self) -> int:
        return len(self._tok)

    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._tok(prompt, padding="max_length", truncation=True, max_length=self.max_length,
                        return_tensors="pt")
        return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


def _check_vocab_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(
            "ImageReward vocab.txt not found; ship the 30522-line bert-base-uncased vocab.txt with the "
            "checkpoint (offline tokenizer downloads fail silently)", path=path)
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"vocab file is not UTF-8 text ({e})", path=path) from e
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != BERT_VOCAB_LINES:
        raise CheckpointError(
            "vocab file does not have the bert-base-uncased size; use the original vocab.txt",
            path=path, expected=f"{BERT_VOCAB_LINES} lines", found=f"{len(lines)} lines")
    for i, tok in _BERT_SPECIALS.items():
        if lines[i].rstrip("\r") != tok:
            raise CheckpointError(
                "vocab file has BERT's special tokens at the wrong ids; use the original vocab.txt",
                path=path, key=f"line {i + 1} (id {i})", expected=tok, found=lines[i])


# ---------------------------------------------------------------------------------------------
# Shared attention (eval only, no dropout). q, k, v: [N, heads, L, head_dim]
# ---------------------------------------------------------------------------------------------


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, s, c = x.shape
    return x.view(n, s, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    n, h, s, d = x.shape
    return x.transpose(1, 2).reshape(n, s, h * d)


# ---------------------------------------------------------------------------------------------
# Visual encoder: BLIP ViT (blip.visual_encoder)
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.vision_width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, 196, W]


class VitAttention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.heads = cfg.vision_heads
        self.qkv = nn.Linear(cfg.vision_width, 3 * cfg.vision_width)
        self.proj = nn.Linear(cfg.vision_width, cfg.vision_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, c = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))


class VitMlp(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vision_width, cfg.vision_mlp)
        self.fc2 = nn.Linear(cfg.vision_mlp, cfg.vision_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VitBlock(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.vision_width, eps=cfg.vision_eps)
        self.attn = VitAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.vision_width, eps=cfg.vision_eps)
        self.mlp = VitMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # 1. pre-norm self-attention
        return x + self.mlp(self.norm2(x))  # 2. pre-norm MLP


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.vision_width))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VitBlock(cfg) for _ in range(cfg.vision_depth))
        self.norm = nn.LayerNorm(cfg.vision_width, eps=cfg.vision_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # 1. patches + [CLS] + learned positions
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        # 2. blocks
        for block in self.blocks:
            x = block(x)
        # 3. final norm: all 197 tokens are the cross-attention memory
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# Text encoder: BLIP med.py BERT with cross-attention (blip.text_encoder)
# ---------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm. No token-type embeddings (med.py has none)."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.text_hidden)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.text_hidden)
        self.LayerNorm = nn.LayerNorm(cfg.text_hidden, eps=cfg.text_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # positions 0..L-1 are a slice of the table (no position_ids buffer)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]])


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.text_heads
        self.query = nn.Linear(cfg.text_hidden, cfg.text_hidden)
        self.key = nn.Linear(kv_width, cfg.text_hidden)
        self.value = nn.Linear(kv_width, cfg.text_hidden)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = _heads(self.query(x), self.heads)
        k, v = _heads(self.key(memory), self.heads), _heads(self.value(memory), self.heads)
        return _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_hidden, cfg.text_hidden)
        self.LayerNorm = nn.LayerNorm(cfg.text_hidden, eps=cfg.text_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, memory, mask), x)  # residual = the queries' input


class BertIntermediate(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_hidden, cfg.text_intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU (ACT2FN["gelu"])


class BertOutput(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_intermediate, cfg.text_hidden)
        self.LayerNorm = nn.LayerNorm(cfg.text_hidden, eps=cfg.text_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.text_hidden)
        self.crossattention = BertAttention(cfg, cfg.encoder_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, image: torch.Tensor,
                first_only: bool = False) -> torch.Tensor:
        # first_only (a static flag): only token 0 is computed; keys/values still use all tokens
        q = x[:, :1] if first_only else x
        # 1. self-attention (post-LN), additive padding mask; queries q, keys/values all of x
        x = self.attention(q, x, self_mask)
        # 2. cross-attention over the image tokens; the all-ones image mask is a no-op, so none
        x = self.crossattention(x, image, None)
        # 3. feed-forward (post-LN)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.text_layers))

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            # exact saving: the last layer computes only token 0, the only row the head reads
            x = layer(x, self_mask, image, first_only=(i == last))
        return x


class BertModel(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """ids/mask [1 | N, L] int, image [N, 197, W] -> token-0 features [N, C]."""
        n = image.shape[0]
        # 1. embeddings of the (shared) prompt, broadcast to the N frames
        x = self.embeddings(ids).expand(n, -1, -1)
        # 2. additive self-attention mask, (1 - m) * -10000 as med.py, [1 | N, 1, 1, L]
        self_mask = (1.0 - mask[:, None, None, :].to(image.dtype)) * -10000.0
        # 3. layers; the last one returns token 0 only
        return self.encoder(x, self_mask, image)[:, 0]


class BLIP(nn.Module):
    """The parts of BLIP_Pretrain that scoring uses (vision_proj / text_proj are dropped at load)."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.visual_encoder = VisionTransformer(cfg)
        self.text_encoder = BertModel(cfg)


# ---------------------------------------------------------------------------------------------
# Reward head and the whole scorer
# ---------------------------------------------------------------------------------------------


class RewardHead(nn.Module):
    """``mlp.layers.{0,2,4,6,7}``: Linear chain with no activations (1, 3, 5 were Dropouts: no keys)."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        widths = (cfg.text_hidden, *cfg.head_widths, 1)
        idx = (0, 2, 4, 6, 7)
        assert len(widths) - 1 == len(idx), "head_widths must have 4 entries"
        self.layers = nn.ModuleDict(
            {str(i): nn.Linear(a, b) for i, a, b in zip(idx, widths[:-1], widths[1:], strict=True)})

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            h = layer(h)
        return h


class ImageReward(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.cfg = cfg
        self.blip = BLIP(cfg)
        self.mlp = RewardHead(cfg)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, 224, 224] (``preprocess``), ids/mask [1, 35] (or [N, 35]) -> rewards [N] float32.

        ``score_gard`` semantics: the prompt is broadcast over the N frames, token 0 ([CLS] 101) is
        read. The head runs in its own dtype (the loader keeps it fp32) and rewards are float32.
        """
        # 1. image tokens [N, 197, W]
        image = self.blip.visual_encoder(pixels.to(self.blip.visual_encoder.pos_embed.dtype))
        # 2. token-0 feature of the prompt read against each frame [N, C]
        h = self.blip.text_encoder(ids, mask, image)
        # 3. affine head and normalisation
        r = self.mlp(h.to(self.mlp.layers["0"].weight.dtype)).float()[:, 0]
        return (r - self.cfg.reward_mean) / self.cfg.reward_std

    def score_frames(self, frames: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoded frames [N, 3, H, W] in [-1, 1] -> rewards [N] float32 (``preprocess`` + forward)."""
        return self(preprocess(frames, size=self.cfg.image_size, mean=self.cfg.pixel_mean,
                               std=self.cfg.pixel_std), ids, mask)
