"""Counter-based Gaussian noise keyed by (seed, block, step), bit-identical on CPU and CUDA.

Both models must see the same initial noise and re-noise draws for (block b, step k) whatever was decided
for earlier blocks (sdvg-runtime.md §3), so noise never comes from a stateful generator. Each group of 4
output elements is one Philox4x32-10 call (Salmon et al. 2011, the generator behind cuRAND and JAX) with

    counter = (group index, block, step, 0)        key = (seed & 0xffffffff, seed >> 32)

giving four 32-bit words, turned into four normals by Box-Muller on the pairs (w0, w1) and (w2, w3).

Why it is bit-identical across devices: the integer part uses only int64 tensor ops on values below 2^49
(32x32-bit products are split into 16-bit halves), and the float part uses only IEEE-exact operations in
float64 (+, -, *, /, sqrt, frexp, where): log and sin/cos are our own polynomials, not libm's, whose last
bits differ between CPU and GPU. Every op is its own kernel, so no FMA contraction happens either; do not
torch.compile this function if you need CPU == GPU bits (a fused kernel may contract a*b+c).

No host sync and fixed shapes: the seed lives in a device tensor (``NoiseStream.key``), so a CUDA graph
captured for a block reads whatever seed was set before its replay.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_LN2 = math.log(2.0)
_HALF_PI = math.pi / 2


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product m*x, for x in [0, 2^32); every partial < 2^49."""
    a = x * (m & 0xFFFF)  # < 2^48
    b = x * (m >> 16)  # < 2^48; m*x = a + b*2^16
    low = a + ((b & 0xFFFF) << 16)  # < 2^49
    return (b >> 16) + (low >> 32), low & _M32


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcasting); returns the 4 output words."""
    for r in range(10):
        if r:
            k0 = (k0 + _PHILOX_W0) & _M32
            k1 = (k1 + _PHILOX_W1) & _M32
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _log_u32(w: torch.Tensor) -> torch.Tensor:
    """ln(u) for u = (w + 1) / 2^32 in (0, 1], float64, from IEEE-exact ops only (abs error < 1e-15)."""
    m, e = torch.frexp((w + 1).to(torch.float64))  # w+1 = m * 2^e, m in [0.5, 1), exact
    small = m < math.sqrt(0.5)
    m = torch.where(small, m * 2, m)  # now m in [0.707, 1.414)
    e = (e - small.to(e.dtype) - 32).to(torch.float64)
    s = (m - 1) / (m + 1)  # |s| <= 0.1716, ln m = 2*atanh(s)
    s2 = s * s
    p = torch.full_like(s, 1.0 / 23)
    for k in range(21, 0, -2):  # Horner over 1/(2j+1) s^(2j): 12 terms, truncation < 1e-18
        p = p * s2 + 1.0 / k
    return 2 * s * p + e * _LN2


def _sincos_u32(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of 2*pi*w/2^32 in float64: quadrant from the top 2 bits, Taylor on [0, pi/2) for the rest."""
    q = w >> 30
    phi = (w & 0x3FFFFFFF).to(torch.float64) * (_HALF_PI / 2**30)
    p2 = phi * phi
    sin = torch.full_like(phi, 1.0 / math.factorial(23))
    for k in range(21, 0, -2):  # x - x^3/3! + ... - x^23/23!: truncation < 2e-18 on [0, pi/2)
        sin = sin * -p2 + 1.0 / math.factorial(k)
    sin = sin * phi
    cos = torch.full_like(phi, 1.0 / math.factorial(24))
    for k in range(22, -1, -2):
        cos = cos * -p2 + 1.0 / math.factorial(k)
    s = torch.where(q == 0, sin, torch.where(q == 1, cos, torch.where(q == 2, -sin, -cos)))
    c = torch.where(q == 0, cos, torch.where(q == 1, -sin, torch.where(q == 2, -cos, sin)))
    return s, c


def gaussian_(out: torch.Tensor, key: torch.Tensor, block: int, steps: torch.Tensor,
              groups: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` [S, n] (float32, n % 4 == 0) with N(0, 1) for (seed from ``key``, ``block``, step ``steps[s]``).

    ``key``: int64 [2] device tensor (seed low and high 32 bits). ``steps``: int64 [S, 1]. ``groups``: int64
    [1, n/4] = arange. Element 4*i+j of row s is output j of the Philox call for counter (i, block, step, 0).
    """
    assert out.dim() == 2 and out.shape[1] == 4 * groups.shape[-1], "noise buffer and counters disagree"
    w0, w1, w2, w3 = philox4x32_10(groups, block, steps, 0, key[0], key[1])
    view = out.view(out.shape[0], -1, 4)
    for j, (wr, wa) in enumerate(((w0, w1), (w2, w3))):
        r = torch.sqrt(_log_u32(wr) * -2.0)
        sin, cos = _sincos_u32(wa)
        view[..., 2 * j].copy_(r * cos)
        view[..., 2 * j + 1].copy_(r * sin)
    return out


def seed_key(seed: int) -> torch.Tensor:
    """The host int64 [2] key of a seed (0 <= seed < 2^64)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    return torch.tensor([seed & _M32, seed >> 32], dtype=torch.int64)


class NoiseStream:
    """Preallocated noise for one block: ``fill(block)`` writes every step's draw into ``out`` [S, *shape].

    ``out[k]`` is step k's noise: k = 0 the block's initial noise, k > 0 the re-noise before step k.
    """

    def __init__(self, shape: tuple[int, ...], steps: int, device):
        n = math.prod(shape)
        if n % 4:
            raise ValueError(f"noise shape {shape} must have a multiple of 4 elements")
        self.shape = tuple(shape)
        self.key = torch.zeros(2, dtype=torch.int64, device=device)
        self.out = torch.empty((steps, *shape), dtype=torch.float32, device=device)
        self._steps = torch.arange(steps, dtype=torch.int64, device=device)[:, None]
        self._groups = torch.arange(n // 4, dtype=torch.int64, device=device)[None, :]

    def set_seed(self, seed: int) -> None:
        """Write the key on the device (two fills from host scalars: no wait for the device, unlike a copy
        from pageable memory); call outside captured graphs (graphs then read the new seed)."""
        lo, hi = seed_key(seed).tolist()
        self.key[0].fill_(lo)
        self.key[1].fill_(hi)

    def fill(self, block: int) -> torch.Tensor:
        gaussian_(self.out.view(self.out.shape[0], -1), self.key, block, self._steps, self._groups)
        return self.out
