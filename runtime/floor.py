"""The physical floor of one DiT forward at the exact shapes of a block step.

Plain torch GEMMs and attention on random bf16 data, as ``shared/tools/floor_probe.py`` measures them:
for each layer the linear layers (fused QKV, O, cross-attention Q and O, FFN in and out) plus the
cross-attention over the 512 text tokens and the self-attention over the block's context. Attention is
timed with cuDNN SDPA (the specs' probe) or with the kernel the runtime runs (FlashAttention-4, which is
faster). The benchmark reports every DiT number as a ratio to this floor, measured in the same run on the
same GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cuda_time(fn, iters: int = 20, warmup: int = 3, inner: int = 1) -> float:
    """Median seconds of ``fn()`` timed with CUDA events (one sync per repeat, outside the region); with
    ``inner`` > 1 each repeat times that many calls back to back and reports their mean."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / inner)
    times.sort()
    return times[len(times) // 2]


@dataclass
class FloorProbe:
    """Floor of one forward of a DiT with ``dim``/``ffn_dim``/``num_layers``/``num_heads`` over
    ``q_tokens`` query tokens, cached per (context length) so a whole video costs a few probes."""

    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    q_tokens: int
    text_len: int = 512
    backend: str = "cudnn"
    device: str = "cuda"

    def __post_init__(self):
        self._linear = None
        self._attn: dict[int, float] = {}

    def _gemm(self, m: int, k: int, n: int) -> float:
        a = torch.randn(m, k, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=self.device, dtype=torch.bfloat16)
        return cuda_time(lambda: a @ b)

    def _sdpa(self, lq: int, lkv: int) -> float:
        """One attention call at these lengths with ``backend``: an SDPA backend ("cudnn", as the specs'
        floor probe) or "fa4" (FlashAttention-4, token-major like the runtime's call)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        hd = self.dim // self.num_heads
        if self.backend == "fa4":
            from .models.attention import Attention

            fa4 = Attention("fa4")  # the runtime's call, its tiles included
            q = torch.randn(lq, self.num_heads, hd, device=self.device, dtype=torch.bfloat16)
            k = torch.randn(lkv, self.num_heads, hd, device=self.device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            fa4(q, k, v)  # compiles once; then timed as a CUDA-graph replay, as the runtime runs it (the
            g = torch.cuda.CUDAGraph()  # Python call alone takes longer than the text attention's kernel)
            with torch.cuda.graph(g):
                fa4(q, k, v)
            return cuda_time(g.replay)
        q = torch.randn(1, self.num_heads, lq, hd, device=self.device, dtype=torch.bfloat16)
        k = torch.randn(1, self.num_heads, lkv, hd, device=self.device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        backends = {
            "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "flash": [SDPBackend.FLASH_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        }[self.backend]
        with sdpa_kernel(backends):
            return cuda_time(lambda: F.scaled_dot_product_attention(q, k, v))

    def linear_per_layer(self) -> float:
        """Seconds of one layer's linear layers plus its cross-attention (context independent)."""
        if self._linear is None:
            d, f, m = self.dim, self.ffn_dim, self.q_tokens
            self._linear = (
                self._gemm(m, d, 3 * d)  # self-attn QKV
                + 3 * self._gemm(m, d, d)  # self-attn O, cross-attn Q and O
                + self._gemm(m, d, f)
                + self._gemm(m, f, d)
                + self._sdpa(m, self.text_len)
            )
        return self._linear

    def attention(self, kv_tokens: int) -> float:
        if kv_tokens not in self._attn:
            self._attn[kv_tokens] = self._sdpa(self.q_tokens, kv_tokens)
        return self._attn[kv_tokens]

    def forward(self, kv_tokens: int) -> float:
        """Floor seconds of one forward whose self-attention reads ``kv_tokens`` keys."""
        return self.num_layers * (self.linear_per_layer() + self.attention(kv_tokens))


def copy_bandwidth(nbytes: int = 2 * 1024**3, device: str = "cuda") -> float:
    """Device-to-device copy rate in TB/s, counting bytes read plus written."""
    x = torch.empty(nbytes // 2, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), iters=10)
    return 2 * nbytes / t / 1e12
