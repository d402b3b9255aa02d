"""GPU probe: where a DiT forward's time goes, bf16 against the default fp8 (block 3, CUDA graph, Triton groups,
the runtime's attention: FlashAttention-4 where installed).

    python3 tools/probes/fp8_profile.py [--preset wan2.1-1.3b] [--out DIR]   # after source tools/device_env.sh

For each: the graph replay time and the kernels of one profiled replay summed by name (top 25) and by kind
(GEMM, attention, the Triton kernels, the compiled groups, the rest). Full-size random weights; the fp8 model is
calibrated on one forward of itself (every GEMM input observed) and quantized with the defaults.
"""
import argparse
import collections
import os

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_common import dit_step, graph_of
from sdvg_rt.floor import cuda_time
from sdvg_rt.models import fp8
from sdvg_rt.models.attention import Attention
from sdvg_rt.models.wan_dit import DiTKernels


def kind(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n:
        return "attention"
    if "nvjet" in n or "gemm" in n or "cutlass" in n or "sm90_xmma" in n or "f8f8" in n:
        return "gemm"
    if name.startswith("_"):
        return "triton (" + name.split("_kernel")[0].lstrip("_") + ")"
    if name.startswith("triton_"):
        return "compiled groups"
    return "other"


def breakdown(label, g):
    replay = cuda_time(g.replay, iters=7, warmup=2) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    by_name, count, by_kind = collections.Counter(), collections.Counter(), collections.Counter()
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        t = ev.device_time_total / 1e3
        by_name[ev.name] += t
        count[ev.name] += 1
        by_kind[kind(ev.name)] += t
    total = sum(by_name.values())
    print(f"\n== {label}: graph replay {replay:.1f} ms, kernels {total:.1f} ms", flush=True)
    for k, v in by_kind.most_common():
        print(f"  {k:34s} {v:8.2f} ms  {100 * v / total:5.1f}%")
    print("  -- by kernel --")
    for name, v in by_name.most_common(25):
        print(f"  {v:8.2f} ms {count[name]:4d}x  {name[:110]}")
    with open(os.path.join(args.out, f"profile_{args.preset}_{label.split()[0]}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=100))
    return replay


ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="wan2.1-14b")
ap.add_argument("--out", default=".", help="folder for the profiler tables (profile_<preset>_<dtype>.txt)")
args = ap.parse_args()
m, step, probe = dit_step(args.preset)
m.set_attention(Attention("auto", "cuda"))
m.fuse_qk().set_kernels(DiTKernels(triton=True, compile=True))
print("attention:", m.attention, flush=True)
with torch.no_grad():
    t_bf16 = breakdown("bf16", graph_of(step))
    fp8.quantize_dit(m, None, fp8.Fp8Config(0, 0, cross_kv=True))
    step()
    amax = fp8.collect_amax(m)
    fp8.quantize_dit(m, amax, fp8.Fp8Config())
    t_fp8 = breakdown("fp8 default", graph_of(step))
print(f"\nfp8 / bf16 forward: {t_fp8 / t_bf16:.3f}")
