"""GPU probe: A/B of the DiT's elementwise paths on one machine, interleaved repeats of CUDA
graph replays (block 3, mean context): the Triton kernels of ``dit_kernels`` vs the torch.compile groups,
for the 14B and the 1.3B; output differences between the two and against an fp32 eager reference of the
same block; a kernel table of the Triton variant (14B)."""
import json
import os
import statistics
import sys

import torch

from gpu_common import dit_step, graph_of
from sdvg_rt.floor import cuda_time
from sdvg_rt.models import wan_dit
from sdvg_rt.models.attention import Attention

out_dir = os.environ.get("OUT", ".")
results = {}
for preset in sys.argv[1].split(",") if len(sys.argv) > 1 else ("wan2.1-14b", "wan2.1-1.3b"):
    m, step, probe = dit_step(preset)
    m.set_attention(Attention("cudnn"))
    m.fuse_qk()
    slots = step.cache.slots(3)
    variants = {"inductor groups": False, "triton kernels": True}
    graphs, outs = {}, {}
    with torch.no_grad():
        for name, use_triton in variants.items():
            m.set_kernels(wan_dit.DiTKernels(triton=use_triton, compile=True))
            outs[name] = step().float()
            graphs[name] = graph_of(step)
        res = {k: [] for k in variants}
        for _ in range(4):
            for name, g in graphs.items():
                res[name].append(cuda_time(g.replay, iters=5, warmup=1) * 1e3)
        a, b = outs.values()
        rel = ((a - b).norm() / a.norm()).item()
        floor = probe.forward(slots.read_end) * 1e3
        print(f"== {preset}: floor {floor:.1f} ms; relative difference inductor vs triton {rel:.2e}")
        for k, v in res.items():
            print(f"  {k:16s} median {statistics.median(v):7.1f} ms  min {min(v):7.1f}  "
                  f"all {[round(x, 1) for x in v]}  ratio {statistics.median(v) / floor:.3f}")
        results[preset] = {"floor_ms": floor, "times_ms": res, "rel_diff": rel}
        if preset == "wan2.1-14b":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18,
                                              max_name_column_width=70)
            print(table)
            with open(os.path.join(out_dir, "prof_14b.txt"), "w") as f:
                f.write(table)
    del m, step, graphs, outs
    torch.cuda.empty_cache()
with open(os.path.join(out_dir, "ab.json"), "w") as f:
    json.dump(results, f, indent=1)
