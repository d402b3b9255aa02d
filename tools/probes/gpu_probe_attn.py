"""GPU probe: why cuDNN SDPA takes longer inside the 14B forward than alone.

1. per-call kernel durations of self- and cross-attention in a profiled CUDA-graph replay of the 14B
   forward (block 3), against the same SDPA alone (same shapes and views);
2. the same SDPA alone, interleaved with the layer's GEMMs (power/clock effects);
3. SM clock and power sampled by nvidia-smi during replays."""
import statistics
import subprocess

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_common import fast_dit_step, graph_of
from sdvg_rt.floor import cuda_time

m, step, probe = fast_dit_step("wan2.1-14b")
slots = step.cache.slots(3)
with torch.no_grad():
    g = graph_of(step)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader",
                            "-lms", "100"], stdout=subprocess.PIPE, text=True)
    replay = cuda_time(g.replay, iters=10, warmup=1) * 1e3
    smi.terminate()
    samples = smi.communicate()[0].strip().splitlines()
    print(f"graph replay {replay:.1f} ms; nvidia-smi during replays: {samples[2:12]}")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
sd = [e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
      for e in prof.events() if e.device_type.name == "CUDA" and "sdpa" in e.name]
self_t, cross_t = sd[0::2], sd[1::2]
print(f"in-model: {len(sd)} sdpa kernels; self median {statistics.median(self_t) / 1e3:.3f} ms "
      f"(min {min(self_t) / 1e3:.3f}, max {max(self_t) / 1e3:.3f}), cross median {statistics.median(cross_t) / 1e3:.3f} ms")
gemm = [e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        for e in prof.events() if e.device_type.name == "CUDA" and "nvjet" in e.name]
print(f"in-model gemm kernels: {len(gemm)}, total {sum(gemm) / 1e3:.1f} ms")

H, D, n, S = 40, 128, 4680, slots.read_end
kv = step.cache.kv[5]
qt = torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16)
args = (qt.transpose(0, 1)[None], kv[0, :S].transpose(0, 1)[None], kv[1, :S].transpose(0, 1)[None])
x = torch.randn(n, 5120, device="cuda", dtype=torch.bfloat16)
w = torch.randn(13824, 5120, device="cuda", dtype=torch.bfloat16)
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.no_grad():
    alone = cuda_time(lambda: F.scaled_dot_product_attention(*args), iters=20) * 1e3
    ts = []
    for _ in range(20):
        for _ in range(6):
            F.linear(x, w)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        F.scaled_dot_product_attention(*args)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
print(f"alone: self sdpa {alone:.3f} ms; after 6 FFN-size GEMMs: median {statistics.median(ts):.3f} ms")
