"""GPU probe: where does a whole video leave the GPU idle?

    python3 tools/probes/loop_gaps.py [--fp8] [--json out.json]     # after source tools/device_env.sh

Full-size random weights (``sdvg_rt.bench``). Per run (target mode, sdvg at 83% acceptance): one video to
capture the graphs, one timed as the benchmark times it, a third timed (every graph replayed before), then
one under the profiler. From the profiled video's GPU activity (kernels, copies, memsets): the wall time,
the time the GPU was busy (the union of its activity), and the idle gaps, the largest first, each with the
activity before and after it, so that a gap can be placed in the loop (``loop.py``). ``--fp8`` calibrates
the target on 2 blocks of itself and quantizes it first (the benchmark's fp8 target).
"""
import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sdvg_rt.bench import accept_pattern, build_runtime, pattern_decisions
from sdvg_rt.bench_fp8 import _reset_loop, calibrate_in_memory
from sdvg_rt.loop import PreparedPrompt
from sdvg_rt.models import fp8

ap = argparse.ArgumentParser()
ap.add_argument("--json", default=None)
ap.add_argument("--fp8", action="store_true")
ap.add_argument("--top", type=int, default=12)
ap.add_argument("--min-gap-us", type=float, default=20.0)
args = ap.parse_args()
dev = torch.device("cuda")
rt = build_runtime("full", dev)
cfg = rt.models["drafter"].cfg
prompt = PreparedPrompt("a red fox", torch.randn(1, cfg.text_len, cfg.text_dim))
if args.fp8:
    calib = PreparedPrompt("calib", torch.randn(1, cfg.text_len, cfg.text_dim,
                                                generator=torch.Generator().manual_seed(5)))
    amax = calibrate_in_memory(rt, calib, 2)
    fp8.quantize_dit(rt.models["target"], amax, fp8.Fp8Config())
    _reset_loop(rt)
rt.allocate()
nb = rt.profile.video.num_blocks


def video(mode, decide):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    frames = sum(b.frames.shape[0] for b in rt.stream(prompt, mode=mode, tau=0.0, seed=0, decide=decide))
    return frames, time.perf_counter() - t0


def kind(name: str) -> str:
    n = name.lower()
    for k, keys in (("attention", ("flash", "fmha", "attention")), ("conv", ("conv", "fprop", "dgrad")),
                    ("gemm", ("nvjet", "gemm", "cutlass", "xmma")), ("triton", ("triton",)),
                    ("copy/memset", ("memcpy", "memset"))):
        if any(x in n for x in keys):
            return k
    return "other"


def gpu_activity(prof):
    """(start_us, end_us, name) of every GPU event, in start order."""
    ev = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type.name == "CUDA"]
    return sorted(ev)


res = {}
for mode, rate in (("target", None), ("sdvg", 0.83)):
    label = mode if rate is None else f"{mode}@{rate:.0%}"
    decide = pattern_decisions(accept_pattern(rate, nb)) if rate is not None else None
    video(mode, decide)
    frames, wall = video(mode, decide)
    _, wall3 = video(mode, decide)  # graphs replayed once before: any first-replay cost (upload) is gone
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        _, wall_p = video(mode, decide)
    ev = gpu_activity(prof)
    busy, gaps, end, prev = 0.0, [], ev[0][0], ev[0][2]
    for a, b, name in ev:
        if a > end:
            if a - end >= args.min_gap_us:
                gaps.append((a - end, prev, name))
        if b > end:
            busy += b - max(a, end)
            end = b
            prev = name
    span = (end - ev[0][0]) / 1e3
    idle = sum(g for g, _, _ in gaps) / 1e3
    r = dict(frames=frames, wall_ms=wall * 1e3, wall_third_ms=wall3 * 1e3, wall_profiled_ms=wall_p * 1e3, gpu_span_ms=span,
             gpu_busy_ms=busy / 1e3, idle_gaps_ms=idle, gaps=len(gaps),
             largest=[(g / 1e3, p[:90], n[:90]) for g, p, n in sorted(gaps, reverse=True)[:args.top]])
    res[label] = r
    print(f"{label}: {frames / wall:.2f} fps, wall {r['wall_ms']:.1f} ms (third video {r['wall_third_ms']:.1f}, "
          f"profiled {r['wall_profiled_ms']:.1f}); "
          f"GPU span {span:.1f} ms, busy {r['gpu_busy_ms']:.1f} ms, {len(gaps)} gaps >= {args.min_gap_us:.0f} us "
          f"= {idle:.1f} ms; before the first GPU work / after the last: {r['wall_profiled_ms'] - span:.1f} ms",
          flush=True)
    by_kind = {}
    for a, b, name in ev:
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + (b - a) / 1e3
    r["kernel_ms_by_kind"] = by_kind
    print("  GPU time by kind: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(by_kind.items(), key=lambda x: -x[1])))
    for g, p, n in r["largest"]:
        print(f"  {g:8.3f} ms  after {p}\n{'':14s}before {n}")
if args.json:
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
