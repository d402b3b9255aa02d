"""The single attention call site of sdvg-rt.

Every attention in the DiT (self- and cross-attention) calls an ``Attention`` object, which fixes the
implementation at construction: FlashAttention-4's Hopper kernel (the optional package ``flash-attn-4``,
``pip install 'sdvg-rt[fa4]'``) or one of torch's SDPA backends, applied with ``sdpa_kernel`` around the
one ``scaled_dot_product_attention`` call. A model holds its own (``WanDiT.set_attention``; default
``Attention()``: SDPA, cuDNN first), so two models in one process can run different kernels.

Layout: q ``[Lq, H, D]``, k and v ``[Lk, H, D]`` (token-major, the layout of ``KVCache.kv[i, 0]``), so
a slice of the cache is passed without a copy. FlashAttention-4 takes them as ``[1, L, H, D]``; for
SDPA they are viewed as ``[1, H, L, D]`` (a transpose, no copy; SDPA kernels accept these strides). The
result is ``[Lq, H, D]``. The optional boolean ``mask [Lq, Lk]`` is True where a query may attend to a key
(masked calls, CPU tensors, fp32, tracing and ONNX export always take SDPA).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA priority order per name. "auto" puts cuDNN first (faster than flash at our shapes,
# docs/PERFORMANCE.md); SDPA skips any backend that cannot run the inputs (e.g. on CPU). "fa4" runs
# FlashAttention-4 and takes "auto"'s order where it does not apply.
_BACKENDS = {
    "auto": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
NAMES = ("auto", "fa4", *[n for n in _BACKENDS if n != "auto"])
FA4_INSTALL = "pip install 'sdvg-rt[fa4]' (flash-attn-4 and the CUTLASS DSL; see docs/PERFORMANCE.md)"
# A boolean mask is only used by multi-block commits and reference paths; backends that take no
# arbitrary mask (flash) fall back to these, in this order.
_MASK_FALLBACK = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# FlashAttention-4's forward tiles by head count where a measured configuration beats its own choice (128x128
# for head dim 128 on sm90). The 14B's 40 heads: 192x128 query x key tiles, P@V from registers, no intra-
# warpgroup overlap: 1.01-1.04x on its self-attention over 1-7 cache blocks and 1.11x on the 512 text keys,
# bit-identical outputs (the keys are reduced in the same 128-wide tiles), about 62 ms per target-mode video;
# the 1.3B's 12 heads gain nothing consistent (tools/probes/fa4_tiles.py, H200; docs/PERFORMANCE.md).
FA4_TILES = {40: {"tile_mn": (192, 128), "mma_pv_is_rs": True, "intra_wg_overlap": False}}
# FlashAttention-4's Hopper forward runs one 128-query tile per SM and head, so the 1.3B's 12 heads over a block's
# 4680 queries are 444 tiles: 3.4 waves on 132 SMs, the last one a third full. Splitting the keys into ranges
# computed as a batch of the same queries (``split_keys``) makes 888 half-length tiles (6.7 waves), merged by one
# small kernel. By head count, the number of key ranges (each at least ``MIN_SPLIT_KEYS`` keys). Measured as graph
# replays on the H200 (tools/probes/fa4_splits.py): for 12 heads two ranges are 1.065x over 2 cache blocks, 1.076x
# over 4, 1.103x over 7, 0.994x over 1 (hence the minimum); three or four ranges, and any split of the 14B's 40 heads
# (already 7.6 waves of 192-query tiles), are slower. The merge of two bf16 outputs raises the error to fp32 from
# 2.3e-3 to 2.8e-3.
FA4_KEY_SPLITS = {12: 2}
MIN_SPLIT_KEYS = 4096


def load_fa4():
    """FlashAttention-4's ``flash_attn_func`` (the optional package ``flash-attn-4``); raises RuntimeError
    naming the install command when it cannot be imported. The import takes about 10 s (the CUTLASS DSL);
    each kernel configuration compiles on its first call (about 3 s), before any CUDA-graph capture."""
    return _import_fa4()[0]


def _import_fa4():
    """(``flash_attn_func``, its forward with tile arguments or None). The forward is the pinned version's
    internal ``_flash_attn_fwd``; a release without it (or without its tile arguments) runs every call
    through ``flash_attn_func`` with FlashAttention-4's own tiles."""
    try:
        from flash_attn.cute import interface
        func = interface.flash_attn_func
    except Exception as e:  # ImportError, or the DSL failing to find its CUDA toolkit flavour
        raise RuntimeError(f"attention backend 'fa4' needs FlashAttention-4: {FA4_INSTALL}; import failed: "
                           f"{type(e).__name__}: {e}") from e
    fwd = getattr(interface, "_flash_attn_fwd", None)
    try:
        params = inspect.signature(fwd).parameters if fwd is not None else {}
    except (TypeError, ValueError):
        params = {}
    return func, (fwd if {"tile_mn", "mma_pv_is_rs", "intra_wg_overlap"} <= set(params) else None)


def _sm90(device) -> bool:
    """Whether ``device`` (default: the current CUDA device) is a Hopper GPU: where ``auto`` takes
    FlashAttention-4 and where ``FA4_TILES`` was measured."""
    if not torch.cuda.is_available():
        return False
    d = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    return d.type == "cuda" and torch.cuda.get_device_capability(d)[0] == 9


class Attention:
    """Softmax attention with one implementation chosen at construction (it never changes afterwards).

    "auto": FlashAttention-4 on a Hopper GPU ``device`` where ``flash-attn-4`` is installed (faster than
    cuDNN at the DiT's shapes, docs/PERFORMANCE.md), else SDPA with cuDNN first. "fa4": FlashAttention-4,
    an error if it is not installed. "cudnn" | "flash" | "efficient" | "math": that SDPA backend.
    ``fa4_tiles``: FlashAttention-4's tiles per head count (default ``FA4_TILES``)."""

    def __init__(self, name: str = "auto", device: torch.device | str | None = None,
                 fa4_tiles: dict[int, dict] | None = None, fa4_key_splits: dict[int, int] | None = None):
        if name not in NAMES:
            raise ValueError(
                f"unknown attention backend {name!r}; choose one of {list(NAMES)} "
                "(profile field performance.attention)"
            )
        fa4 = fwd = None
        if name == "fa4":
            fa4, fwd = _import_fa4()
        elif name == "auto" and device is not None and _sm90(device):
            try:
                fa4, fwd = _import_fa4()
            except RuntimeError:
                fa4 = None  # not installed: cuDNN
        self.name, self._fa4 = name, fa4
        # head count -> FlashAttention-4 forward tiles (default ``FA4_TILES``, measured on sm90 at head dim 128;
        # {} keeps its own choice)
        self._fa4_tiles = (FA4_TILES if fa4_tiles is None else fa4_tiles) if fwd is not None and _sm90(device) else {}
        self._fa4_fwd = fwd
        # head count -> key ranges of a FlashAttention-4 call (default ``FA4_KEY_SPLITS``; {} none)
        self._fa4_splits = ((FA4_KEY_SPLITS if fa4_key_splits is None else fa4_key_splits)
                            if fwd is not None and _sm90(device) else {})
        self._backends = list(_BACKENDS["auto" if name == "fa4" else name])
        self._backends_masked = self._backends + [b for b in _MASK_FALLBACK if b not in self._backends]

    @property
    def implementation(self) -> str:
        """What unmasked GPU attention runs: "fa4" or "sdpa:<name>" (for reports)."""
        return "fa4" if self._fa4 is not None else f"sdpa:{self.name}"

    def __repr__(self) -> str:
        return f"Attention({self.name!r}: {self.implementation})"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention with scale 1/sqrt(D). q [Lq, H, D], k/v [Lk, H, D], mask [Lq, Lk] bool.

        Returns [Lq, H, D] (FlashAttention-4's output, or a view of SDPA's). No host sync.
        """
        if self._fa4 is not None and mask is None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) \
                and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            tiles = self._fa4_tiles.get(q.shape[1]) if q.shape[2] == 128 else None
            splits = self._fa4_splits.get(q.shape[1], 1) if q.shape[2] == 128 else 1
            if splits > 1 and k.shape[0] % splits == 0 and k.shape[0] // splits >= MIN_SPLIT_KEYS:
                return split_keys(self._fa4_fwd, q, k, v, splits, **(tiles or {}))
            if tiles is not None:
                return self._fa4_fwd(q[None], k[None], v[None], **tiles)[0][0]
            return self._fa4(q[None], k[None], v[None])[0][0]
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, Lq, D] views
        kh = k.transpose(0, 1).unsqueeze(0)
        vh = v.transpose(0, 1).unsqueeze(0)
        with sdpa_kernel(self._backends if mask is None else self._backends_masked, set_priority=True):
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return out.squeeze(0).transpose(0, 1)


def split_keys(fwd, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, splits: int, **kw) -> torch.Tensor:
    """Attention of q ``[Lq, H, D]`` over k/v ``[Lk, H, D]`` as one FlashAttention-4 call over ``splits`` equal
    key ranges: the queries broadcast over a batch of ranges (a stride-0 view), each range a view of k/v (no
    copy for token-major k/v such as a cache slice), every range's output and log-sum-exp from ``fwd``
    (``_flash_attn_fwd``), merged in fp32 by ``dit_kernels.combine_splits``. ``kw``: the call's tiles."""
    from .dit_kernels import combine_splits

    lq, h, d = q.shape
    n = k.shape[0] // splits
    ranges = [(t if t.stride() == (h * d, d, 1) else t.contiguous()).as_strided((splits, n, h, d), (n * h * d, h * d, d, 1))
              for t in (k, v)]
    o, lse = fwd(q[None].expand(splits, lq, h, d), *ranges, return_lse=True, **kw)[:2]
    return combine_splits(o, lse)
