"""An independent Self-Forcing sampler, written here from the spec (wan-models.md §3-§4), driving the DiT
directly, against the denoiser component's ``denoise_block`` + ``commit_block``, bit for bit.

The reference owns its timesteps (SF's shifted training table and the warp, computed here), its KV buffer
and slot arithmetic (ring after the window: sink slots fixed, the rest rotate), and the per-step maths:
x0 = x_t - sigma_k * v, then x_{k+1} = (1 - sigma_{k+1}) * x0 + sigma_{k+1} * eps_{k+1} with the next
step's fresh noise, output the last x0, then one t = 0 forward on it that writes the block's clean K/V.
Noise comes from the same (seed, block, step) stream (``NoiseStream``, known-answer tested elsewhere).
"""
import pytest
import torch

import seams
from sdvg_rt.kv_cache import BlockSlots
from sdvg_rt.noise import NoiseStream

STEPS, SHIFT = (1000, 750, 500, 250), 5.0
WINDOW, SINK, BLOCKS, F, H, W = 3, 1, 5, 1, 4, 4  # blocks 3, 4 run in the ring phase


def spec_timesteps():
    """SF FlowMatchScheduler(shift=5, extra_one_step=True).set_timesteps(1000, training=True), warped."""
    s = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    t = 1000 * (SHIFT * s / (1 + (SHIFT - 1) * s))
    t = torch.cat([t, torch.zeros(1)])
    return [float(t[1000 - k]) for k in STEPS]


def spec_slots(block, tokens_per_block):
    """Block b's cache slot: b inside the window; afterwards the non-sink slots rotate."""
    ring = WINDOW - SINK
    slot = block if block < WINDOW else SINK + (block - SINK) % ring
    cap = WINDOW * tokens_per_block
    read_end = min((block + 1) * tokens_per_block, cap) if block < WINDOW else cap
    return BlockSlots(write_start=slot * tokens_per_block, read_end=read_end, frame_offset=block * F)


class Reference:
    def __init__(self, model, context, seed, dtype):
        cfg = model.cfg
        self.model, self.dtype = model, dtype
        self.tpb = F * (H // cfg.patch_size[1]) * (W // cfg.patch_size[2])
        self.kv = torch.zeros(cfg.num_layers, 2, WINDOW * self.tpb, cfg.num_heads, cfg.head_dim, dtype=dtype)
        self.ctx_kv = model.prepare_context(context.to(dtype))
        self.ts = spec_timesteps()
        self.noise = NoiseStream((1, cfg.in_dim, F, H, W), len(self.ts), "cpu")
        self.noise.set_seed(seed)

    @torch.no_grad()
    def block(self, b):
        slots = spec_slots(b, self.tpb)
        eps = self.noise.fill(b).clone()
        x = eps[0].to(self.dtype)
        for k, t in enumerate(self.ts):
            sigma = t / 1000
            v = self.model(x, torch.full((F,), t, dtype=torch.float32), self.ctx_kv, self.kv, slots)
            x0 = x.float() - sigma * v.float()
            if k + 1 < len(self.ts):
                s_next = self.ts[k + 1] / 1000
                x = torch.add(x0 * (1 - s_next), eps[k + 1], alpha=s_next).to(self.dtype)
        out = x0.to(self.dtype)
        self.model.write_kv(out, torch.zeros(F, dtype=torch.float32), self.ctx_kv, self.kv, slots)
        return out


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return seams.tiny_runtime(tmp_path_factory, latent_frames=BLOCKS, window_frames=WINDOW, sink_frames=SINK)


def test_spec_timesteps_are_the_published_ones():
    assert spec_timesteps() == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)


@pytest.mark.parametrize("kind", ["drafter", "target"])
def test_denoise_and_commit_match_the_spec_sampler_bit_for_bit(rt, kind):
    model = seams.models(rt)[kind]
    comp = seams.components(rt)[kind]
    den = seams.make_denoiser(model, kind, latent_shape=(F, H, W), window_frames=WINDOW, sink_frames=SINK,
                              schedule=comp.schedule, dtype=rt.dtype)
    ctx = rt.prompts[0].context
    den.prepare(ctx)
    den.set_seed(11)
    ref = Reference(model, ctx, 11, rt.dtype)
    assert [float(t) for t in den.t[:-1, 0]] == ref.ts and float(den.t[-1, 0]) == 0.0
    for b in range(BLOCKS):
        x = den.denoise_block(b).clone()
        den.commit_block(b, x)
        r = ref.block(b)
        assert torch.equal(x, r), f"block {b}: max |diff| {(x.float() - r.float()).abs().max():.3g}"
        assert torch.equal(den.cache.kv, ref.kv), f"block {b}: KV caches differ"
    assert not torch.equal(x, ref.noise.out[0].to(x.dtype))  # the output is not the noise
