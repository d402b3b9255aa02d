"""``sdvg-rt bench`` / ``tools/bench.py``: component and end-to-end timings against the hardware floor.

On one GPU with full-size models and random weights (the synthetic init of
``checkpoints.wan_dit``, generated on the device: writing and reading 50 GB of synthetic files would
measure the disk). Reports, per component, the median time of a drafter block (4 denoising steps with
re-noise), a target block, one commit forward of each, a VAE block decode and ImageReward on a block's
frames, with the floor of the same DiT shapes measured in the same run (``sdvg_rt.floor``); then whole
81-frame videos in ``target``, ``draft`` and ``sdvg`` mode at fixed acceptance patterns (benchmark-only
override of the tau test; scores are still computed), with frames per second, time to first block,
speedup over ``target``, loop overhead over the sum of its components, and peak GPU memory.
JSON to ``--json``; a markdown table on stdout. ``--size tiny --device cpu`` runs the same code paths
on the tiny presets (used by the test suite; its numbers mean nothing).

``--devices one,split`` times the videos on one GPU and with the target on a second GPU (drafter, VAE and
scorer on cuda:0, target on cuda:1) in one call, checks that both placements give the same outputs bit
for bit, and reports from per-GPU CUDA-event timelines how much of the target's commit time ran while the
drafter's GPU was busy (``commit_overlap``). On the CPU the split runs the same two-device path with both
sides on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .video import atomic_write_json

SIZES = {
    "full": dict(drafter="wan2.1-1.3b", target="wan2.1-14b", vae="wan2.1", scorer="v1.0",
                 width=832, height=480, latent_frames=21),
    "tiny": dict(drafter="tiny", target="tiny-target", vae="tiny", scorer="tiny",
                 width=64, height=64, latent_frames=9),
}


def accept_pattern(rate: float, blocks: int) -> list[bool]:
    """A fixed pattern over blocks 0..blocks-1 (block 0 is forced anyway) with ``round(rate * (blocks-1))``
    accepts, the rejects spread evenly (deterministic, so runs compare)."""
    judged = blocks - 1
    rejects = judged - round(rate * judged)
    pat = [True] * blocks
    for i in range(rejects):  # evenly spaced over blocks 1..judged
        pat[1 + (i * judged) // rejects + (judged // rejects) // 2] = False
    return pat


def pattern_decisions(pattern: list[bool]):
    """A decision function (``Runtime.stream(decide=...)``) for benchmarks: in sdvg mode, blocks after 0 are accepted or
    rejected by ``pattern`` instead of the tau test (their scores are still computed and recorded)."""
    from .decide import ACCEPTED, FORCED, REJECTED, Decision, decide

    def decide_pattern(mode, block, score, tau, finite=True):
        d = decide(mode, block, score, tau, finite)
        if mode != "sdvg" or d.kind == FORCED:
            return d
        return Decision(ACCEPTED if pattern[block % len(pattern)] else REJECTED, "benchmark acceptance pattern")

    return decide_pattern


def random_init_(model: torch.nn.Module, dim: int, seed: int = 0) -> None:
    """The synthetic init of ``checkpoints.wan_dit.synthetic_init``, drawn on the model's device (one
    generator for the whole model: no host copy, a 14B model in seconds)."""
    from .checkpoints.wan_dit import synthetic_init

    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(synthetic_init(name, torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32), dim))


def random_dit(preset: str, device, dtype: torch.dtype, seed: int = 0):
    """A full-size (or any preset) WanDiT built on the meta device and filled with ``random_init_`` on
    ``device``: no host copy of the weights, so a 14B model is ready in seconds."""
    from .models.wan_dit import WanDiT, WanDiTConfig

    cfg = WanDiTConfig.from_name(preset)
    with torch.device("meta"):
        m = WanDiT(cfg)
    m = m.to_empty(device=device).to(dtype)
    m.rope.build(device)
    random_init_(m, cfg.dim, seed=seed)
    return m.eval()


def random_vae(preset: str, device, dtype: torch.dtype, seed: int = 0):
    """The VAE decoder with the synthetic init of ``checkpoints.wan_vae`` (channels-last on CUDA)."""
    from .checkpoints.wan_vae import synthetic_vae_state_dict
    from .models.wan_vae import WanVAEConfig, WanVAEDecoder

    cfg = WanVAEConfig.from_name(preset)
    vae = WanVAEDecoder(cfg)
    vae.load_state_dict(synthetic_vae_state_dict(cfg, seed, decoder_only=True), strict=True)
    vae = vae.to(device, dtype).eval()
    return vae.to_channels_last() if torch.device(device).type == "cuda" else vae


DEVICES = ("one", "split", "paired")  # --devices: every part on one device | the target on a second GPU |
# the split's two-device path (its streams, events, copies) with both sides on the one device: the check of that
# path where a second GPU is not available (no speed-up expected)
SPLIT_LIKE = ("split", "paired")


def bench_profile(size: str, device: torch.device, devices: str = "one"):
    """The benchmark's profile: the demo profile at ``size``'s models and geometry; ``devices="split"`` on
    CUDA places the drafter, the VAE and the scorer on cuda:0 and the target on cuda:1."""
    from .profiles import demo_profile

    s = SIZES[size]
    prof = demo_profile().replace(models__drafter=s["drafter"], models__target=s["target"], models__vae=s["vae"],
                                  models__scorer=s["scorer"],
                                  width=s["width"], height=s["height"], latent_frames=s["latent_frames"],
                                  window_frames=s["latent_frames"], sink_frames=0, name=f"bench-{size}",
                                  precision="bf16" if device.type == "cuda" else "fp32")
    if devices == "split" and device.type == "cuda":
        prof = prof.replace(devices__drafter="cuda:0", devices__vae="cuda:0", devices__scorer="cuda:0",
                            devices__target="cuda:1")
    return prof


def bench_placement(prof, device: torch.device, devices: str):
    """Where the parts of ``bench_profile(..., devices)`` run: checked against the visible GPUs on CUDA
    (split needs two); paired, and split on the CPU: the two-device path with both sides on ``device``."""
    from .placement import Placement, resolve

    if devices == "paired" or (devices == "split" and device.type != "cuda"):
        return Placement.split(device, device)
    return resolve(prof, device)


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (the memory a CPU run can take), or physical memory elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_bench_fits(size: str, device: torch.device, devices: str = "one") -> None:
    """Refuse a size whose weights, caches and activations do not fit the device(s) (before building anything)."""
    from .api import check_fits
    from .errors import OutOfMemoryError

    prof = bench_profile(size, device, devices)
    pl = bench_placement(prof, device, devices)
    free = ({str(d): torch.cuda.mem_get_info(d)[0] for d in pl.devices} if device.type == "cuda"
            else host_available_bytes())
    try:
        check_fits(prof, free, text_encoder=False, placement=pl)
    except OutOfMemoryError as e:
        if device.type != "cpu":
            raise
        raise OutOfMemoryError(f"{e}; on a machine without a GPU, run `sdvg-rt bench --size tiny`") from None


def build_runtime(size: str, device: torch.device, log=print, attention: str | None = None, devices: str = "one"):
    """A Runtime over in-memory random models of ``size`` (no checkpoint files, no text encoder), each
    drawn on its part's device (``devices``: ``DEVICES``; the same weights whatever the placement);
    ``attention`` overrides the profile's ``performance.attention``."""
    from .api import Runtime
    from .checkpoints.imagereward import synthetic_state_dict, synthetic_vocab_lines
    from .models.imagereward import ImageReward, ImageRewardConfig, ImageRewardTokenizer

    s = SIZES[size]
    prof = bench_profile(size, device, devices)
    if attention is not None:
        prof = prof.replace(attention=attention)
    pl = bench_placement(prof, device, devices)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    models = {}
    for kind in ("drafter", "target"):
        models[kind] = m = random_dit(s[kind], getattr(pl, kind), dt, seed=1 if kind == "drafter" else 2)
        log(f"  {kind} {s[kind]} on {getattr(pl, kind)}: {sum(p.numel() for p in m.parameters()) / 1e9:.2f} B "
            "parameters")
    models["vae"] = random_vae(s["vae"], pl.vae, dt)
    icfg = ImageRewardConfig.preset(s["scorer"])
    ir = ImageReward(icfg)
    ir.load_state_dict({k: v for k, v in synthetic_state_dict(icfg, 0).items() if k in ir.state_dict()}, strict=True)
    models["scorer"] = ir.to(pl.scorer, torch.float32).eval()
    vocab = Path(tempfile.mkdtemp(prefix="sdvg-bench-")) / "vocab.txt"
    vocab.write_text("\n".join(synthetic_vocab_lines()) + "\n", encoding="utf-8")
    models["scorer_tokenizer"] = ImageRewardTokenizer(vocab)
    log(f"  models built in {time.perf_counter() - t0:.1f} s")
    return Runtime(prof, pl.home, models, None, time.perf_counter() - t0, placement=pl)


def _median_ms(fn, device, repeats: int) -> float:
    if device.type == "cuda":
        from .floor import cuda_time

        return cuda_time(fn, iters=repeats, warmup=1) * 1e3
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def bench_components(rt, device, repeats: int, log=print, kinds=("drafter", "target")) -> dict:
    """Median ms of each component at the mean context of the video (block n//2) and its floor (``kinds``:
    the DiTs to time; the VAE and the scorer only with both)."""
    from .floor import FloorProbe
    from .loop import PreparedPrompt
    loop, prof = rt.loop, rt.profile
    v = prof.video
    nb = v.num_blocks
    mid = nb // 2
    cfg = loop.drafter.cfg
    prompt = PreparedPrompt("a red fox running through fresh snow", torch.randn(1, cfg.text_len, cfg.text_dim))
    loop.prepare(prompt, seed=0)
    out = {}
    for kind in kinds:
        den = getattr(loop, kind)
        for b in range(mid + 1):  # fill the cache up to the measured block (and capture its graphs)
            x = den.denoise_block(b)
            den.commit_block(b, x)
        out[f"{kind}_block_ms"] = _median_ms(lambda: den.denoise_block(mid), device, repeats)
        out[f"{kind}_commit_ms"] = _median_ms(lambda: den.commit_block(mid, den.out), device, repeats)
        if device.type == "cuda":
            m = den.cfg
            tpb = den.cache.tokens_per_block
            impl = rt.models[kind].attention.implementation
            probe = FloorProbe(m.dim, m.ffn_dim, m.num_layers, m.num_heads, tpb,
                               backend="fa4" if impl == "fa4" else "cudnn")
            fwd = probe.forward((mid + 1) * tpb)
            out[f"{kind}_block_floor_ms"] = 4 * fwd * 1e3
            out[f"{kind}_commit_floor_ms"] = fwd * 1e3
            if impl == "fa4":  # also the specs' floor (cuDNN attention), for comparison with earlier runs
                cudnn = FloorProbe(m.dim, m.ffn_dim, m.num_layers, m.num_heads, tpb, backend="cudnn")
                out[f"{kind}_block_floor_cudnn_ms"] = 4 * cudnn.forward((mid + 1) * tpb) * 1e3
            out[f"{kind}_block_ratio"] = out[f"{kind}_block_ms"] / out[f"{kind}_block_floor_ms"]
            out[f"{kind}_commit_ratio"] = out[f"{kind}_commit_ms"] / out[f"{kind}_commit_floor_ms"]
        log(f"  {kind}: block {out[f'{kind}_block_ms']:.1f} ms, commit {out[f'{kind}_commit_ms']:.1f} ms")
    if tuple(kinds) != ("drafter", "target"):
        return out
    dec = loop.decoder
    z = loop.drafter.out
    dec.decode_commit(z, 0)
    frames = dec.decode_scratch(z, mid)
    out["vae_block_ms"] = _median_ms(lambda: dec.decode_scratch(z, mid), device, repeats)
    out["scorer_block_ms"] = _median_ms(lambda: loop.scorer.score(frames), device, repeats)
    out["scorer_frames"] = int(frames.shape[2])
    log(f"  vae block {out['vae_block_ms']:.1f} ms, scorer {out['scorer_block_ms']:.1f} ms")
    return out


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def commit_overlap(home: list[tuple], target: list[tuple]) -> dict:
    """How much of the target's commit time ran while the drafter's side was busy, from the two devices'
    timelines (``Timer.spans``: ``(block, name, start_ms, end_ms)``, one time base). ``overlap`` is the
    fraction of ``target_commit_ms`` spent beside home's work (1: every commit hidden behind the drafts)."""
    busy = _union([(a, b) for _, _, a, b in home])
    commits = [(a, b) for _, name, a, b in target if name == "target_commit"]
    total = sum(b - a for a, b in commits)
    hidden = sum(max(0.0, min(b, y) - max(a, x)) for a, b in commits for x, y in busy)
    target_busy = sum(b - a for a, b in _union([(a, b) for _, _, a, b in target]))
    return {"target_commit_ms": total, "overlapped_ms": hidden, "overlap": hidden / total if total else None,
            "home_busy_ms": sum(b - a for a, b in busy), "target_busy_ms": target_busy}


def _timeline(loop) -> list[dict]:
    return [{"device": str(t.device), "block": blk, "name": name, "start_ms": a, "end_ms": b}
            for t in dict.fromkeys((loop.timer, loop.target_timer)) for blk, name, a, b in t.spans]


def bench_e2e(rt, device, runs: list[tuple[str, float | None]], log=print, devices: str = "one") -> list[dict]:
    """Whole videos per (mode, acceptance rate). The first video of each run captures graphs (warm), the
    second is timed. With the target on a device of its own, each row also gets the overlap of the
    target's commits with the drafter side's work in the timed video (``commit_overlap``) and the timeline."""
    from .loop import PreparedPrompt

    rt.allocate()
    loop = rt.loop
    apart = rt.placement.target_apart
    for t in (loop.timer, loop.target_timer):
        t.timeline = apart
    cfg = loop.drafter.cfg
    prompt = PreparedPrompt("a red fox running through fresh snow", torch.randn(1, cfg.text_len, cfg.text_dim))
    nb = rt.profile.video.num_blocks
    gpus = [d for d in rt.placement.devices if d.type == "cuda"]
    rows = []
    for mode, rate in runs:
        decide = pattern_decisions(accept_pattern(rate, nb)) if mode == "sdvg" else None
        for attempt in range(2):
            for d in gpus:
                torch.cuda.synchronize(d)
                torch.cuda.reset_peak_memory_stats(d)
            t0 = time.perf_counter()
            first = None
            frames = 0
            for blk in rt.stream(prompt, mode=mode, tau=0.0, seed=attempt, decide=decide):
                if first is None:
                    first = time.perf_counter() - t0
                frames += blk.frames.shape[0]
            wall = time.perf_counter() - t0
        st = rt.last_stats
        comp = sum(st["totals"]["times_ms"].values()) / 1e3
        row = dict(mode=mode, accept_rate_set=rate, accept_rate=st["acceptance_rate"], frames=frames, wall_s=wall,
                   fps=frames / wall, first_block_s=first, components_s=comp,
                   loop_overhead=(wall - comp) / comp if comp else None,
                   peak_GiB=(torch.cuda.max_memory_allocated(gpus[0]) / 2**30) if gpus else None,
                   decisions="".join(b["decision"][0].upper() for b in st["blocks"]),
                   target_commits_skipped=st["totals"]["target_commits_skipped"], devices=devices)
        if apart:
            row["peak_GiB_target"] = torch.cuda.max_memory_allocated(gpus[-1]) / 2**30 if len(gpus) > 1 else None
            row["commit_overlap"] = commit_overlap(loop.timer.spans, loop.target_timer.spans)
            row["timeline"] = _timeline(loop)
        rows.append(row)
        ov = row.get("commit_overlap", {}).get("overlap")
        log(f"  {mode}{'' if rate is None else f' @{rate:.0%}'} ({devices}): {row['fps']:.2f} fps, first block "
            f"{first:.2f} s, decisions {row['decisions']}, loop overhead {row['loop_overhead']:.1%}"
            + ("" if ov is None else f", target commits overlapped {ov:.0%}"))
    for t in (loop.timer, loop.target_timer):
        t.timeline = False
    base = next((r for r in rows if r["mode"] == "target"), None)
    for r in rows:
        r["speedup_vs_target"] = base["wall_s"] / r["wall_s"] if base else None
    return rows


def placement_outputs(rt, blocks: int = 3) -> dict:
    """A fixed sdvg prefix (forced, rejected, accepted: the self-check's pattern) for comparing placements:
    committed latents, frames and decisions."""
    from .loop import PreparedPrompt

    rt.allocate()
    cfg = rt.loop.drafter.cfg
    prompt = PreparedPrompt("placement check", torch.randn(1, cfg.text_len, cfg.text_dim,
                                                              generator=torch.Generator().manual_seed(11)))
    frames = [b.frames for b in rt.stream(prompt, mode="sdvg", tau=0.0, seed=5, max_blocks=blocks,
                                          decide=pattern_decisions([True, False, True, True]))]
    n = blocks * rt.profile.video.frames_per_block
    return {"latents": rt.loop.committed_latents()[:, :, :n].cpu(), "frames": frames,
            "decisions": [b["decision"] for b in rt.last_stats["blocks"]]}


def same_outputs(a: dict, b: dict) -> dict:
    """``placement_outputs`` of two placements, compared bit for bit."""
    return {"decisions": a["decisions"], "decisions_equal": a["decisions"] == b["decisions"],
            "latents_equal": bool(torch.equal(a["latents"], b["latents"])),
            "frames_equal": len(a["frames"]) == len(b["frames"])
            and all(x.shape == y.shape and (x == y).all() for x, y in zip(a["frames"], b["frames"]))}


def kernel_check(cfg, device, grid: tuple[int, int, int] = (3, 30, 52),
                 vae_grid: tuple[int, int, int] = (2, 240, 416)) -> dict:
    """The Triton kernels at production shapes against the eager groups that define them, both measured
    against an fp32 evaluation of the same groups: relative errors ``{group: [kernel, eager bf16]}`` (the
    kernel should be as accurate as eager bf16). The DiT's at one block of ``cfg``'s model (``grid`` = frames
    and patches per frame), the VAE's norm + SiLU with the bias at its last stage's width (96 channels of the
    padded 128-wide convolution output, ``vae_grid`` = frames, height, width), bf16. On CUDA, or on the CPU
    under Triton's interpreter (tests)."""
    from .models import dit_kernels, vae_kernels, wan_dit, wan_vae

    if not dit_kernels.AVAILABLE or (device.type != "cuda" and not dit_kernels.INTERPRETED):
        return {}
    g = torch.Generator(device=device).manual_seed(1)
    bf = dict(device=device, dtype=torch.bfloat16)
    frames, gh, gw = grid
    tpf, dim, heads, eps = gh * gw, cfg.dim, cfg.num_heads, cfg.eps
    x, y = (torch.randn(frames, tpf, dim, generator=g, **bf) for _ in range(2))
    gate, shift, scale = (0.3 * torch.randn(frames, 6, dim, generator=g, **bf)).unsqueeze(2).unbind(1)[:3]
    q, k = torch.randn(frames * tpf, 2 * dim, generator=g, **bf).chunk(2, -1)
    wq, wk = (1 + 0.1 * torch.randn(dim, generator=g, **bf) for _ in range(2))
    cos, sin = wan_dit.WanRoPE(cfg).to(device).factors(frames, gh, gw, frame_offset=9)

    def rel(a, ref):
        return float((a.float() - ref).norm() / ref.norm())

    with torch.no_grad():
        f32 = [t.float() for t in (x, y, gate, shift, scale)]
        ref = wan_dit._gated_add_modulated_ln(*f32, eps)[1]
        out = {"residual_ln": [rel(dit_kernels.residual_ln(x, y, gate, None, None, shift, scale, eps)[1], ref),
                               rel(wan_dit._gated_add_modulated_ln(x, y, gate, shift, scale, eps)[1], ref)]}
        kv = torch.empty(2, frames * tpf, heads, dim // heads, **bf)
        fast = dit_kernels.qk_to_cache(q, k, wq, wk, eps, cos, sin, heads, kv, 0)
        ref_q, ref_k = (wan_dit._norm_rope(t.float(), w.float(), eps, cos, sin, heads) for t, w in ((q, wq), (k, wk)))
        eager_q, eager_k = (wan_dit._norm_rope(t, w, eps, cos, sin, heads) for t, w in ((q, wq), (k, wk)))
        out["qk_to_cache q"] = [rel(fast, ref_q), rel(eager_q, ref_q)]
        out["qk_to_cache k"] = [rel(kv[0], ref_k), rel(eager_k, ref_k)]
        vt, vh, vw = vae_grid
        c, padded = 96, wan_vae.PADDED_OUTPUTS[96]
        xv = (3 * torch.randn(1, padded, vt, vh, vw, generator=g, **bf)).contiguous(
            memory_format=torch.channels_last_3d)[:, :c]
        bias, gamma = torch.randn(c, generator=g, **bf), (1 + 0.1 * torch.randn(c, 1, 1, 1, generator=g, **bf))
        ref = wan_vae._bias_rms_norm_silu(xv.float(), bias.float(), gamma.float(), c**0.5)
        fast = torch.empty_like(xv, memory_format=torch.channels_last_3d)
        vae_kernels.norm_silu_into(xv, bias, gamma, c**0.5, fast)
        out["vae norm_silu"] = [rel(fast, ref), rel(wan_vae._bias_rms_norm_silu(xv, bias, gamma, c**0.5), ref)]
    return {"kernels_rel_err": out}


def self_check(rt, device, blocks: int = 3, log=print) -> dict:
    """Graph replay equals eager execution: the same sdvg video prefix (accept/reject pattern fixed) with
    every component's CUDA graphs on, then off; committed latents and frames must be bit-identical (the
    same kernels run, only the launches differ). The compared passes run under
    ``torch.cuda.set_sync_debug_mode("error")`` with only the loop's named sync allowed, so any other
    host sync in the block loop fails the check. Without CUDA there are no graphs: reported "not run"."""
    from .loop import PreparedPrompt

    rt.allocate()
    cfg = rt.loop.drafter.cfg
    prompt = PreparedPrompt("self check", torch.randn(1, cfg.text_len, cfg.text_dim,
                                                         generator=torch.Generator().manual_seed(7)))
    loop = rt.loop
    comps = [loop.drafter, loop.target, loop.decoder, loop.scorer]
    decide = pattern_decisions([True, False, True, True])
    outs = []
    # graphs on twice (the first pass captures: a key's first call runs eagerly; the second replays every
    # graph the prefix uses), then graphs off; the replay pass is compared with the eager one
    cuda = device.type == "cuda"
    sync_error = None
    for i, enabled in enumerate((True, True, False) if cuda else ()):
        for c in comps:
            if hasattr(c, "graphs"):
                c.graphs.enabled = enabled
        try:
            with _only_named_syncs(loop) if i > 0 else contextlib.nullcontext():
                frames = [b.frames for b in rt.stream(prompt, mode="sdvg", tau=0.0, seed=3, max_blocks=blocks,
                                                   decide=decide)]
        except RuntimeError as e:  # an implicit sync inside the block loop
            sync_error = sync_error or f"{'replay' if enabled else 'eager'} pass: {e}"
            frames = []
        outs.append((loop.committed_latents()[:, :, : blocks * rt.profile.video.frames_per_block].float().cpu(),
                     frames, [b["decision"] for b in rt.last_stats["blocks"]]))
    replays = sum(len(c.graphs.graphs) for c in comps if hasattr(c, "graphs"))
    for c in comps:
        if hasattr(c, "graphs"):
            c.graphs.enabled = cuda and rt.profile.performance.cuda_graphs
    if cuda:
        (lg, fg, dg), (le, fe, de) = outs[1:]
        res = {"graph_check": "run", "blocks": blocks, "decisions": dg, "graphs_replayed": replays,
               "latents_equal": bool(torch.equal(lg, le)), "latents_max_abs_diff": float((lg - le).abs().max()),
               "frames_equal": len(fg) == len(fe) == blocks and dg == de
               and all(a.shape == b.shape and (a == b).all() for a, b in zip(fg, fe)),
               "sync_check": "passed" if sync_error is None else f"failed: {sync_error}"}
    else:
        res = {"graph_check": "not run (no CUDA device: no graphs to compare)", "blocks": blocks, "decisions": [],
               "graphs_replayed": 0, "latents_equal": None, "latents_max_abs_diff": None, "frames_equal": None,
               "sync_check": "not run (no CUDA device)"}
    # the CUDA-only FFN path (GELU in the cuBLASLt epilogue) vs the plain modules, fp32 reference
    from .models.wan_dit import _ffn
    ffn = rt.models["drafter"].blocks[0].ffn
    x = torch.randn(1, 256, cfg.dim, device=device, dtype=next(ffn.parameters()).dtype,
                    generator=torch.Generator(device=device).manual_seed(0))
    with torch.no_grad():
        ref = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(
            x.float(), ffn[0].weight.float(), ffn[0].bias.float()), approximate="tanh"), ffn[2].weight.float(),
            ffn[2].bias.float())
        fused, plain = _ffn(ffn, x).float(), ffn(x).float()
    res["ffn_fused_rel_err"] = float((fused - ref).norm() / ref.norm())
    res["ffn_plain_rel_err"] = float((plain - ref).norm() / ref.norm())
    res.update(kernel_check(loop.target.cfg, device))
    if cuda:
        log(f"  self-check (graph replay vs eager, {blocks} blocks, {res['decisions']}, {replays} graphs): latents "
            f"equal {res['latents_equal']} (max |diff| {res['latents_max_abs_diff']:.3g}), frames equal "
            f"{res['frames_equal']}; host syncs outside the named one: {res['sync_check']}")
    else:
        log(f"  self-check: graph replay vs eager {res['graph_check']}")
    return res


@contextlib.contextmanager
def _only_named_syncs(loop):
    """``torch.cuda.set_sync_debug_mode("error")`` over the block loop, the loop's named sync excepted."""

    def relaxed(sync):
        torch.cuda.set_sync_debug_mode(0)
        try:
            sync()
        finally:
            torch.cuda.set_sync_debug_mode("error")

    with loop.sync_hook(relaxed):
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)


def markdown(res: dict) -> str:
    c = res["components"]
    impl = res.get("attention_impl", "sdpa")
    lines = [f"Device: {res['device']}, torch {res['torch']}, size {res['size']}, {res['date']}, attention "
             f"{impl} (profile: {res['attention']}); floor = cuBLAS GEMMs + "
             f"{'FlashAttention-4' if impl == 'fa4' else 'cuDNN SDPA'} at the same shapes", "",
             "| component | median ms | floor ms | ratio |", "|---|---|---|---|"]
    for k, label in (("drafter_block", "drafter block (4 steps)"), ("target_block", "target block (4 steps)"),
                     ("drafter_commit", "drafter commit forward"), ("target_commit", "target commit forward")):
        f = c.get(f"{k}_floor_ms")
        lines.append(f"| {label} | {c[f'{k}_ms']:.1f} | {'' if f is None else f'{f:.1f}'} | "
                     f"{'' if f is None else format(c[k + '_ratio'], '.2f')} |")
    for kind in ("drafter", "target"):
        f = c.get(f"{kind}_block_floor_cudnn_ms")
        if f is not None:
            lines.append(f"| {kind} block vs the floor with cuDNN attention | | {f:.1f} | "
                         f"{c[f'{kind}_block_ms'] / f:.2f} |")
    lines.append(f"| VAE block decode | {c['vae_block_ms']:.1f} | | |")
    lines.append(f"| ImageReward ({c['scorer_frames']} frames) | {c['scorer_block_ms']:.1f} | | |")
    sc = res.get("self_check")
    if sc:
        graph = (f"CUDA-graph replay vs eager ({sc['blocks']} blocks, {'/'.join(sc['decisions'])}): latents "
                 f"bit-identical: {sc['latents_equal']}, frames identical: {sc['frames_equal']}, host syncs "
                 f"outside the named one: {sc['sync_check']}" if sc["graph_check"] == "run"
                 else f"CUDA-graph replay vs eager: {sc['graph_check']}")
        lines += ["", f"Self-check, {graph}; "
                      f"FFN with GELU in the GEMM epilogue vs fp32: {sc['ffn_fused_rel_err']:.2e} relative "
                      f"(plain bf16 modules: {sc['ffn_plain_rel_err']:.2e})"]
        for group, (kern, eager) in (sc.get("kernels_rel_err") or {}).items():
            lines.append(f"- Triton `{group}` vs fp32: {kern:.2e} relative (eager bf16 groups: {eager:.2e})")
    for d in SPLIT_LIKE:
        split = res.get(d)
        if not split:
            continue
        pl, sc, same = split["placement"], split["self_check"], split["same_as_one_device"]
        what = "Target on its own GPU" if d == "split" else "The two-device path on one device (paired)"
        lines += ["", f"{what} ({', '.join(f'{k} {v}' for k, v in pl.items())}): "
                  + (f"outputs not compared (run --devices one,{d})" if same is None else
                     f"outputs vs one device ({'/'.join(same['decisions'])}): latents bit-identical: "
                     f"{same['latents_equal']}, frames identical: {same['frames_equal']}")
                  + ("" if sc is None or sc["graph_check"] != "run" else
                     f"; CUDA-graph replay vs eager on both GPUs: latents {sc['latents_equal']}, frames "
                     f"{sc['frames_equal']}, host syncs outside the named one: {sc['sync_check']}")]
    one = {(r["mode"], r["accept_rate_set"]): r for r in res["e2e"] if r.get("devices", "one") == "one"}
    lines += ["", "| devices | mode | accept | frames | fps | vs one GPU | first block s | speedup vs target | "
                  "loop overhead | target commits overlapped | peak GiB | decisions |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["e2e"]:
        acc = "" if r["accept_rate"] is None else f"{r['accept_rate']:.0%}"
        pk = "" if r["peak_GiB"] is None else f"{r['peak_GiB']:.1f}"
        if r.get("peak_GiB_target") is not None:
            pk += f" + {r['peak_GiB_target']:.1f}"
        sp = "" if r["speedup_vs_target"] is None else f"{r['speedup_vs_target']:.2f}"
        ref = one.get((r["mode"], r["accept_rate_set"]))
        vs = "" if ref is None or ref is r else f"{r['fps'] / ref['fps']:.2f}x"
        ov = (r.get("commit_overlap") or {})
        ovs = "" if ov.get("overlap") is None else f"{ov['overlap']:.0%} of {ov['target_commit_ms']:.0f} ms"
        lines.append(f"| {r.get('devices', 'one')} | {r['mode']} | {acc} | {r['frames']} | {r['fps']:.2f} | {vs} | "
                     f"{r['first_block_s']:.2f} | {sp} | {r['loop_overhead']:.1%} | {ovs} | {pk} | {r['decisions']} |")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="component and end-to-end timings (full-size random weights on one GPU)")
    _args(p)
    p.set_defaults(func=lambda a: run(a))


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--accept-rates", default="1.0,0.8", help="sdvg runs at these fixed acceptance rates")
    p.add_argument("--modes", default="target,draft,sdvg")
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--attention", default=None, help="override performance.attention (auto, fa4, cudnn, ...)")
    p.add_argument("--quantization", choices=("bf16", "fp8"), default="bf16",
                   help="fp8: after the bf16 rows, calibrate, quantize the target and report fp8 rows and accuracy "
                        "side by side (sdvg_rt.bench_fp8)")
    p.add_argument("--calib-blocks", type=int, default=2, help="fp8: blocks of calibration on the random weights")
    p.add_argument("--fp8-weight-scaling", choices=("channel", "tensor"), default="channel")
    p.add_argument("--fp8-cross-kv", action="store_true", help="fp8: the text K/V weights in fp8 too (memory)")
    p.add_argument("--fp8-drafter", action="store_true",
                   help="fp8: after the fp8-target rows, calibrate and quantize the drafter too (the same settings) "
                        "and report its accuracy in draft mode, its block and commit times and the videos again "
                        "(profile: quantization: {target: fp8, drafter: fp8})")
    p.add_argument("--skip-self-check", action="store_true", help="skip the bf16 self-check (faster)")
    p.add_argument("--devices", type=_devices, default=["one"], metavar="one,split",
                   help="placements to time, side by side: one (every part on one GPU, default), split (drafter, "
                        "VAE and scorer on cuda:0, the target on cuda:1; needs two GPUs; on --device cpu both "
                        "sides are the CPU), paired (split's two-device path with both sides on the one device: "
                        "checks its streams, events and copies on one GPU); one,split: both in one call, with the "
                        "outputs compared bit for bit")


def _devices(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in DEVICES]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--devices takes a comma-separated list of {', '.join(DEVICES)}; got {text!r}")
    return names


def run(a: argparse.Namespace) -> int:
    from .api import resolve_device

    dev = resolve_device(a.device)
    print(f"sdvg-rt bench: size {a.size} on {dev} (random weights), devices {','.join(a.devices)}", flush=True)
    for devices in a.devices:
        check_bench_fits(a.size, dev, devices)
    runs = []
    for m in a.modes.split(","):
        if m == "sdvg":
            runs += [("sdvg", float(r)) for r in a.accept_rates.split(",")]
        else:
            runs.append((m, None))
    res: dict = {}
    order = [d for d in DEVICES if d in a.devices]  # one device first: the reference of the split's outputs
    reference = None
    for i, devices in enumerate(order):
        rt = build_runtime(a.size, dev, attention=a.attention, devices=devices)
        rt.allocate()
        if i == 0:
            impl = rt.models["target"].attention.implementation
            if dev.type == "cuda" and impl != "fa4":
                print("  note: attention runs on torch SDPA; on Hopper, FlashAttention-4 (pip install "
                      "'sdvg-rt[fa4]', or tools/fa4_ferry.sh on a machine without network) makes the DiTs faster "
                      "(docs/PERFORMANCE.md)", flush=True)
            res.update({"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                        "torch": torch.__version__, "size": a.size, "date": time.strftime("%Y-%m-%d"),
                        "attention": rt.profile.performance.attention, "attention_impl": impl,
                        "devices": order})
            res["self_check"] = None if a.skip_self_check else self_check(rt, dev)
            res["components"] = bench_components(rt, dev, a.repeats)
            res["e2e"] = bench_e2e(rt, dev, runs, devices=devices)
        else:
            sc = None if a.skip_self_check else self_check(rt, dev)
            res["e2e"] += bench_e2e(rt, dev, runs, devices=devices)
        if devices == "one" and any(d in order for d in SPLIT_LIKE):
            reference = placement_outputs(rt)
        if devices in SPLIT_LIKE:
            res[devices] = {"placement": rt.placement.describe(), "self_check": res["self_check"] if i == 0 else sc,
                            "same_as_one_device": None if reference is None
                            else same_outputs(placement_outputs(rt), reference)}
        if dev.type == "cuda":
            res.setdefault("peak_GiB", torch.cuda.max_memory_allocated() / 2**30)
        if a.quantization == "fp8" and i == 0:  # the same run on, with the target in fp8
            from . import bench_fp8

            def partial(fp8_res):
                if a.json:
                    atomic_write_json(a.json, {**res, "fp8": fp8_res, "partial": True})

            print(markdown(res), flush=True)
            res["fp8"] = bench_fp8.run_fp8(rt, dev, a, runs, checkpoint=partial)
        if i + 1 < len(order):
            rt.close()  # the next placement's weights take its place
            del rt
    md = markdown(res)
    if "fp8" in res:
        from .bench_fp8 import markdown as fp8_markdown

        md += "\n" + fp8_markdown(res["fp8"], res["components"], [r for r in res["e2e"] if r["devices"] == order[0]])
    print(md)
    if a.json:
        atomic_write_json(a.json, res)
    checks = [res["self_check"], res.get("fp8", {}).get("self_check"),
              (res.get("fp8", {}).get("drafter") or {}).get("self_check"),
              *[(res.get(d) or {}).get("self_check") for d in SPLIT_LIKE]]
    failed = any(sc is not None and sc.get("graph_check", "run") == "run"
                 and not (sc["latents_equal"] and sc["frames_equal"] and sc.get("sync_check", "passed") == "passed")
                 for sc in checks)
    if failed:
        print("SELF-CHECK FAILED: CUDA-graph replay differs from eager execution, or the block loop synced "
              "outside its named sync (see the table above)", file=sys.stderr)
    for d in SPLIT_LIKE:
        same = (res.get(d) or {}).get("same_as_one_device")
        if same is not None and not (same["latents_equal"] and same["frames_equal"] and same["decisions_equal"]):
            print(f"PLACEMENT CHECK FAILED: the {d} placement gives other outputs than one device", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def main(argv=None) -> int:
    from .cli import ALLOC_CONF

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)  # as ``sdvg-rt``: before CUDA starts
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__.splitlines()[0])
    _args(p)
    return run(p.parse_args(argv))
