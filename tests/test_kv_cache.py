"""KVCache slot arithmetic (fill, ring with/without sink), masks, sizes and errors."""
import pytest
import torch
from sdvg_rt.kv_cache import BlockSlots, KVCache, block_causal_mask


def _cache(window, sink=0, tpf=2, fpb=3, dtype=torch.float32):
    return KVCache(layers=1, heads=1, head_dim=1, tokens_per_frame=tpf, frames_per_block=fpb,
                   window_frames=window, sink_frames=sink, dtype=dtype, device="cpu")


def test_fill_regime_slots():
    c = _cache(window=12)  # 4 blocks of n = 6 tokens
    assert c.kv.shape == (1, 2, 24, 1, 1)
    assert c.slots(0) == BlockSlots(write_start=0, read_end=6, frame_offset=0)
    assert c.slots(3) == BlockSlots(write_start=18, read_end=24, frame_offset=9)
    assert c.slots(1, blocks=3) == BlockSlots(write_start=6, read_end=24, frame_offset=3)


def test_ring_regime_with_sink():
    c = _cache(window=12, sink=3)  # 1 sink block, 3 ring blocks
    # block 4 overwrites the oldest non-sink block (slot 1), then 2, 3, and wraps to 1 again
    assert [c.block_slot(b) for b in range(10)] == [0, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert c.slots(4) == BlockSlots(write_start=6, read_end=24, frame_offset=12)
    assert c.slots(7) == BlockSlots(write_start=6, read_end=24, frame_offset=21)


def test_ring_regime_without_sink():
    c = _cache(window=6)  # 2 blocks, both rotate
    assert [c.block_slot(b) for b in range(6)] == [0, 1, 0, 1, 0, 1]
    assert c.slots(5) == BlockSlots(write_start=6, read_end=12, frame_offset=15)


@pytest.mark.parametrize("window,sink", [(12, 0), (12, 3), (12, 6), (9, 3), (3, 0), (6, 3)])
def test_ring_contents_equal_reference_mask(window, sink):
    """Write each token's absolute frame index into the cache block by block; the set of frames that a
    block's attention reads (kv[:read_end]) must equal the reference window+sink mask's key frames."""
    tpf, fpb, blocks = 2, 3, 9
    c = _cache(window, sink, tpf=tpf, fpb=fpb)
    ref = block_causal_mask(blocks * fpb, tpf, fpb, window_frames=window, sink_frames=sink)
    key_frame = torch.arange(blocks * fpb * tpf) // tpf
    for b in range(blocks):
        s = c.slots(b)
        n = fpb * tpf
        c.kv[0, 0, s.write_start:s.write_start + n, 0, 0] = key_frame[b * n:(b + 1) * n].float()
        seen = sorted(set(c.kv[0, 0, :s.read_end, 0, 0].long().tolist()))
        want = sorted(set(key_frame[ref[b * n]].tolist()))  # any query row of block b
        assert seen == want, (b, seen, want)
        assert s.frame_offset == b * fpb
        # keys are unique in the buffer (nothing read twice)
        assert s.read_end == len(seen) * tpf


def test_block_causal_mask_rule():
    m = block_causal_mask(9, 1, 3)  # 3 blocks, 1 token per frame
    assert m[0].tolist() == [True] * 3 + [False] * 6       # block 0 sees itself, bidirectionally
    assert m[4].tolist() == [True] * 6 + [False] * 3
    w = block_causal_mask(12, 1, 3, window_frames=6, sink_frames=3)
    # query in block ending at e=12: sink frames 0..2 and f >= 12 - 3 = 9
    assert w[11].tolist() == [True] * 3 + [False] * 6 + [True] * 3
    with pytest.raises(ValueError, match="multiple of frames_per_block"):
        block_causal_mask(10, 1, 3)


def test_span_mask_equals_reference_rows():
    c = _cache(window=15)
    n = 6
    s = c.slots(1, blocks=3)
    m = c.span_mask(1, 3)
    ref = block_causal_mask(12, 2, 3)
    assert m.shape == (3 * n, s.read_end) == (18, 24)
    assert torch.equal(m, ref[n:4 * n, :s.read_end])


def test_span_across_eviction_is_refused():
    c = _cache(window=12, sink=3)
    c.slots(2, blocks=2)  # ends inside the window: fine
    with pytest.raises(ValueError, match="one block at a time"):
        c.slots(3, blocks=2)
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        c.slots(0, blocks=0)
    with pytest.raises(ValueError, match="block index must be >= 0"):
        c.slots(-1)


@pytest.mark.parametrize("window,sink,msg", [
    (12, 2, "sink_frames must be a non-negative multiple of frames_per_block=3"),
    (13, 3, "window_frames - sink_frames must be a positive multiple"),
    (6, 6, "window_frames - sink_frames must be a positive multiple"),
    (12, -3, "sink_frames must be a non-negative multiple"),
])
def test_geometry_errors(window, sink, msg):
    with pytest.raises(ValueError, match=msg) as e:
        _cache(window, sink)
    assert f"sink_frames={sink}" in str(e.value)


def test_sizes():
    c = _cache(window=12, sink=3, dtype=torch.bfloat16)
    assert KVCache.nbytes(1, 1, 1, 2, 12, torch.bfloat16) == c.kv.nbytes == 1 * 2 * 24 * 2
    assert c.kv.dtype == torch.bfloat16
    # wan-models.md §9: bytes per token over all layers x 32760 tokens (21 frames), bf16
    assert KVCache.nbytes(30, 12, 128, 1560, 21) == 184_320 * 32760  # 6.04 GB, 1.3B
    assert KVCache.nbytes(40, 40, 128, 1560, 21) == 819_200 * 32760  # 26.84 GB, 14B
    assert KVCache.nbytes(40, 40, 128, 1560, 6, torch.float32) == 2 * 819_200 * 9360
