"""The self-attention KV cache of one DiT (drafter or target) and its index arithmetic.

One preallocated tensor ``kv [L, 2, S, H, D]`` per model (``S = window_frames * tokens_per_frame``);
a DiT call for block b writes its K (after norm_k and RoPE) and V into ``kv[i, :, write_start:
write_start + n]`` and attends over ``kv[i, :, :read_end]``. Nothing is ever concatenated or moved.

While the video fits the window, block b writes ``[b*n, (b+1)*n)`` and reads ``[0, (b+1)*n)``. Past
the window the buffer is a ring over whole blocks after the sink: the sink blocks are never
overwritten, block b overwrites the oldest non-sink block and attention reads the whole buffer.
Attention has no mask and is invariant to key order, and keys carry their absolute RoPE, so this
equals the reference block-causal attention with the window+sink mask (``block_causal_mask``):
a query in a block ending at frame e sees key frame f < e iff f < sink or f >= e - (window - sink).

The cache needs no reset between videos: every slot read for a block was written earlier in the
same video (before the window is full only written slots are read; after it, all of them are).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockSlots:
    """Where a DiT call writes and reads in the cache (token indices) and its absolute first frame."""

    write_start: int   # first cache slot written by this call
    read_end: int      # attention reads kv[:, :, :read_end]
    frame_offset: int  # absolute latent frame index of the call's first frame (RoPE position)


class KVCache:
    """Preallocated self-attention K/V of one model: ``kv [layers, 2, S, heads, head_dim]``."""

    def __init__(self, layers: int, heads: int, head_dim: int, tokens_per_frame: int,
                 frames_per_block: int, window_frames: int, sink_frames: int = 0,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        _check_geometry(frames_per_block, window_frames, sink_frames)
        for name, val in (("layers", layers), ("heads", heads), ("head_dim", head_dim),
                          ("tokens_per_frame", tokens_per_frame)):
            if val <= 0:
                raise ValueError(f"KVCache: {name} must be positive, found {val}")
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.tokens_per_frame = tokens_per_frame
        self.frames_per_block = frames_per_block
        self.window_frames, self.sink_frames = window_frames, sink_frames
        self.tokens_per_block = frames_per_block * tokens_per_frame
        self.capacity = window_frames * tokens_per_frame          # S
        self.window_blocks = window_frames // frames_per_block
        self.sink_blocks = sink_frames // frames_per_block
        self.ring_blocks = self.window_blocks - self.sink_blocks  # blocks that rotate
        self.kv = torch.zeros(layers, 2, self.capacity, heads, head_dim, dtype=dtype, device=device)

    @staticmethod
    def nbytes(layers: int, heads: int, head_dim: int, tokens_per_frame: int, window_frames: int,
               dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of the ``kv`` tensor for these sizes (to report memory before allocating)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return layers * 2 * window_frames * tokens_per_frame * heads * head_dim * elem

    def block_slot(self, block: int) -> int:
        """Index (in blocks) of the cache slot that block ``block`` occupies."""
        if block < 0:
            raise ValueError(f"KVCache: block index must be >= 0, found {block}")
        if block < self.window_blocks:
            return block
        return self.sink_blocks + (block - self.sink_blocks) % self.ring_blocks

    def slots(self, block: int, blocks: int = 1) -> BlockSlots:
        """Slots for ``blocks`` consecutive blocks starting at ``block`` (pure index arithmetic).

        ``blocks > 1`` (a multi-block commit, with ``span_mask``) is only exact while no block of the
        span evicts another one, i.e. the span ends inside the window; otherwise commit one by one.
        """
        n = self.tokens_per_block
        if blocks < 1:
            raise ValueError(f"KVCache.slots: blocks must be >= 1, found {blocks}")
        if blocks > 1 and block + blocks > self.window_blocks:
            raise ValueError(
                f"KVCache.slots: blocks {block}..{block + blocks - 1} cannot be committed in one call: "
                f"the window holds {self.window_blocks} blocks and later blocks of the span would "
                "overwrite keys that earlier ones must see; commit them one block at a time"
            )
        slot = self.block_slot(block)
        end = min((block + blocks) * n, self.capacity) if block < self.window_blocks else self.capacity
        return BlockSlots(write_start=slot * n, read_end=end,
                          frame_offset=block * self.frames_per_block)

    def span_mask(self, block: int, blocks: int) -> torch.Tensor:
        """Boolean mask ``[blocks*n, read_end]`` for a multi-block commit of ``slots(block, blocks)``.

        Block-causal among the span: a query in block j sees cache tokens of blocks <= j.
        """
        s = self.slots(block, blocks)
        n, dev = self.tokens_per_block, self.kv.device
        q_block = torch.arange(blocks * n, device=dev) // n + block
        k_block = torch.arange(s.read_end, device=dev) // n
        return k_block[None, :] <= q_block[:, None]


def _check_geometry(frames_per_block: int, window_frames: int, sink_frames: int) -> None:
    fpb = frames_per_block
    if fpb <= 0:
        raise ValueError(f"KVCache: frames_per_block must be positive, found {fpb}")
    if sink_frames < 0 or sink_frames % fpb:
        raise ValueError(
            f"KV cache: sink_frames must be a non-negative multiple of frames_per_block={fpb}, "
            f"found sink_frames={sink_frames}; set it to a multiple of {fpb} (e.g. 0 or {fpb})"
        )
    ring = window_frames - sink_frames
    if ring <= 0 or ring % fpb:
        raise ValueError(
            f"KV cache: window_frames - sink_frames must be a positive multiple of frames_per_block="
            f"{fpb}, found window_frames={window_frames}, sink_frames={sink_frames} (difference "
            f"{ring}); choose window_frames = sink_frames + k*{fpb} with k >= 1"
        )


def block_causal_mask(num_frames: int, tokens_per_frame: int, frames_per_block: int,
                      window_frames: int | None = None, sink_frames: int = 0,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Reference boolean mask ``[N, N]`` (N = num_frames*tokens_per_frame), True = may attend.

    A query in the block ending at frame e sees key frame f iff f < e and (window is None or
    f < sink or f >= e - (window - sink)). This is what the cached path computes (tests, reference).
    """
    if num_frames % frames_per_block:
        raise ValueError(f"num_frames={num_frames} is not a multiple of frames_per_block={frames_per_block}")
    if window_frames is not None:
        _check_geometry(frames_per_block, window_frames, sink_frames)
    frame = torch.arange(num_frames * tokens_per_frame, device=device) // tokens_per_frame
    end = (frame // frames_per_block + 1) * frames_per_block   # end frame of each query's block
    f, e = frame[None, :], end[:, None]
    mask = f < e
    if window_frames is not None:
        mask &= (f < sink_frames) | (f >= e - (window_frames - sink_frames))
    return mask
