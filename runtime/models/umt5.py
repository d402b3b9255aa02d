"""umT5-xxl text encoder (wan-models.md §6): transformers' `UMT5EncoderModel` + the umT5 tokenizer.

This is a thin wrapper, not a re-implementation: the network is transformers' UMT5 encoder (the
independent implementation the spec asks us to trust), fed with Wan's official weights through the
key map in `sdvg_rt.checkpoints.umt5`. What is ours is the Wan-specific plumbing around it:

1. prompt cleaning exactly as Wan's `HuggingfaceTokenizer(clean='whitespace')` (ftfy, html-unescape
   twice, whitespace collapse),
2. tokenisation to a fixed 512 tokens (pad to max_length, truncate with a warning naming the prompt),
3. the attention mask passed to the encoder (padded keys masked),
4. output rows [seq_len:] zeroed, as Self-Forcing does (WAN's trim + re-pad is equivalent).

Semantics of the transformers encoder vs Wan's `wan/modules/t5.py` (checked against
`transformers/models/umt5/modeling_umt5.py`): RMS T5LayerNorm with fp32 variance, relative position
bias per layer (`has_relative_attention_bias=True` in every UMT5 layer, like Wan's
`shared_pos=False`), bidirectional buckets with relative position = key - query, no 1/sqrt(d)
scaling (`scaling = 1.0`), gated GELU-tanh (`gated-gelu` -> `gelu_new`) applied to `wi_0`, final
RMS norm. The one difference is the softmax precision in bf16: Wan casts the logits to fp32;
transformers (5.x) runs SDPA with the bias as an additive float mask, whose fused kernels
accumulate in fp32, while its eager path would soft-max in bf16. The fp32 parity test pins the
maths; bf16 closeness to Wan on GPU is not measured here.

The encoder runs once per prompt, outside the block loop (sdvg-runtime.md §4): `run` encodes all
prompts, keeps the embeddings on the host and calls `release()` before generation.
"""
from __future__ import annotations

import gc
import html
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, SdvgError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5 / umT5 special ids (sentencepiece: pad 0, eos 1, unk 2)


# --------------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 256384      # embedding rows (the umT5 tokenizer uses fewer; rows are padded)
    d_model: int = 4096
    d_kv: int = 64                # head dim; inner attention dim = num_heads * d_kv
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_buckets: int = 32         # relative position buckets, bidirectional, one table per layer
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512           # tokens per prompt (padding/truncation length)

    @classmethod
    def from_name(cls, name: str) -> "TextEncoderConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown umT5 preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name]

    @property
    def name(self) -> str:
        """The preset this config equals, or 'custom'."""
        return next((k for k, v in PRESETS.items() if v == self), "custom")

    def to_hf(self):
        """The equivalent `transformers.UMT5Config` (encoder only, eval: dropout 0)."""
        from transformers import UMT5Config

        return UMT5Config(
            vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
            num_layers=self.num_layers, num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance,
            layer_norm_epsilon=self.eps, feed_forward_proj="gated-gelu", dropout_rate=0.0,
            is_encoder_decoder=False, use_cache=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        )


PRESETS: dict[str, TextEncoderConfig] = {
    "umt5-xxl": TextEncoderConfig(),
    # d_model 64 equals the tiny DiT's text_dim; vocab 512 holds the synthetic tokenizer.
    "tiny": TextEncoderConfig(vocab_size=512, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2),
}


def build_umt5(cfg: TextEncoderConfig, device: str | torch.device = "meta"):
    """An uninitialised `transformers.UMT5EncoderModel` for `cfg` (on meta by default: no memory)."""
    from transformers import UMT5EncoderModel

    with torch.device(device):
        model = UMT5EncoderModel(cfg.to_hf())
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# prompt cleaning and tokenizer


def clean_prompt(text: str) -> str:
    """Wan's clean='whitespace': ftfy.fix_text, html.unescape twice, strip, collapse whitespace."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


_PROBE = "a photo of a cat"


def load_tokenizer(folder: str | os.PathLike, embedding_rows: int):
    """Load the umT5 tokenizer from a local `google/umt5-xxl`-style folder and check it is real.

    A tokenizer that loads but is not the umT5 one (another model's tokenizer, a folder whose files
    are missing so a library falls back to something else, a vocabulary bigger than the embedding)
    would silently produce wrong ids, so each of these raises `CheckpointError` naming the folder.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            "umT5 tokenizer folder not found; it must be the google/umt5-xxl folder (tokenizer.json "
            "and/or spiece.model, tokenizer_config.json, special_tokens_map.json)", path=folder)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise CheckpointError(
            "umT5 tokenizer folder has neither tokenizer.json nor spiece.model; copy the complete "
            "google/umt5-xxl tokenizer folder", path=folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as e:
        raise CheckpointError(f"cannot load the umT5 tokenizer: {e}", path=folder) from e

    def bad(rule: str, expected, found):
        return CheckpointError(
            f"{rule}; this folder does not hold the umT5 tokenizer (a fallback or foreign tokenizer "
            "would give wrong token ids). Point the profile at the google/umt5-xxl folder",
            path=folder, expected=expected, found=found)

    if len(tok) > embedding_rows:
        raise bad("tokenizer vocabulary is larger than the text encoder's embedding",
                  f"<= {embedding_rows} tokens", len(tok))
    if tok.pad_token_id != PAD_ID or tok.eos_token_id != EOS_ID:
        raise bad("umT5 uses pad id 0 and eos id 1", (PAD_ID, EOS_ID), (tok.pad_token_id, tok.eos_token_id))
    if tok.padding_side != "right":
        raise bad("umT5 pads on the right", "right", tok.padding_side)
    ids = tok(_PROBE, add_special_tokens=True).input_ids
    if not ids or ids[-1] != EOS_ID:
        raise bad(f"encoding {_PROBE!r} must end with eos (id {EOS_ID})", f"[..., {EOS_ID}]", ids)
    if all(i == tok.unk_token_id for i in ids[:-1]):
        raise bad(f"encoding {_PROBE!r} gives only unknown tokens", "known pieces", ids)
    return tok


# --------------------------------------------------------------------------------------------------
# the encoder wrapper


class TextEncoder:
    """umT5 encoder + tokenizer. `encode(prompts)` -> one [1, text_len, d_model] context per prompt."""

    def __init__(self, model, tokenizer, config: TextEncoderConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @classmethod
    def from_files(cls, checkpoint_pth: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> "TextEncoder":
        """Load Wan's `models_t5_umt5-xxl-enc-bf16.pth` and the `google/umt5-xxl` tokenizer folder."""
        from ..checkpoints.umt5 import load_text_encoder

        return load_text_encoder(checkpoint_pth, tokenizer_dir, device, dtype)

    def tokenize(self, prompt: str, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenise one prompt: ids and mask [1, text_len] int64 on the host.

        Over-long prompts are truncated to `text_len` tokens (eos kept last) with a warning that
        names the prompt index and its token count.
        """
        text, n = clean_prompt(prompt), self.config.text_len
        full = len(self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False).input_ids)
        if full > n:
            warnings.warn(
                f"prompt {index} has {full} tokens after cleaning; umT5 takes {n}, so it is truncated "
                f"to its first {n - 1} tokens + eos. Shorten the prompt to keep all of it.",
                stacklevel=3)
        out = self.tokenizer(text, add_special_tokens=True, padding="max_length", truncation=True,
                             max_length=n, return_tensors="pt")
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str], out_device: str | torch.device | None = None) -> list[torch.Tensor]:
        """Encode each prompt to [1, text_len, d_model] (encoder dtype), rows past its length zero.

        Prompts run one at a time (batch is always 1 in the runtime). `out_device` (default: the
        encoder's device) lets the CLI keep all embeddings on the host.
        """
        if self.model is None:
            raise SdvgError("TextEncoder.encode called after release(); load the text encoder again "
                            "(TextEncoder.from_files) to encode more prompts")
        if isinstance(prompts, str):
            prompts = [prompts]
        out = []
        for i, prompt in enumerate(prompts):
            # 1. clean + tokenise (host)
            ids, mask = self.tokenize(prompt, i)
            ids, mask = ids.to(self.device), mask.to(self.device)
            # 2. encoder with the padding mask (padded keys get -inf-like bias)
            h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            # 3. zero rows [seq_len:] (mask multiply: no host sync)
            h = h * mask.unsqueeze(-1).to(h.dtype)
            out.append(h.to(out_device) if out_device is not None else h)
        return out

    def release(self) -> None:
        """Free the encoder weights (the tokenizer is kept; it is small)."""
        on_cuda = self.device.type == "cuda"
        self.model = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
