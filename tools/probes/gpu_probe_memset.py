"""GPU probe: the cost of kernel boundaries inside a CUDA graph, and where the memset
before every GEMM and SDPA call comes from. For each op (14B-shaped QKV and O GEMMs, self-attention),
a graph of 20 back-to-back calls: replay time per call vs the mean kernel time, and the memsets per call.
Then the 14B forward (block 3) replay. Run once per environment: without arguments the script re-executes
itself with the default environment, CUBLASLT_WORKSPACE_SIZE=0 and CUBLAS_WORKSPACE_CONFIG=:0:0."""
import os
import subprocess
import sys

if len(sys.argv) == 1:
    for env in ({}, {"CUBLASLT_WORKSPACE_SIZE": "0"}, {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}):
        print(f"== environment {env or 'default'}", flush=True)
        subprocess.run([sys.executable, __file__, "child"], env={**os.environ, **env}, check=False)
    sys.exit(0)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from gpu_common import fast_dit_step, graph_of  # noqa: E402
from sdvg_rt.floor import cuda_time  # noqa: E402


def kernels(g):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
    dur = lambda e: (e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total) / 1e3
    mem = [e for e in evs if "emset" in e.name]
    rest = [e for e in evs if "emset" not in e.name]
    return sum(dur(e) for e in rest), len(rest), len(mem)


x = torch.randn(4680, 5120, device="cuda", dtype=torch.bfloat16)
wqkv = torch.randn(15360, 5120, device="cuda", dtype=torch.bfloat16) * 0.02
wo = torch.randn(5120, 5120, device="cuda", dtype=torch.bfloat16) * 0.02
b3, b1 = torch.zeros(15360, device="cuda", dtype=torch.bfloat16), torch.zeros(5120, device="cuda", dtype=torch.bfloat16)
q = torch.randn(1, 40, 4680, 128, device="cuda", dtype=torch.bfloat16)
kv = torch.randn(1, 40, 18720, 128, device="cuda", dtype=torch.bfloat16)
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    for name, fn in (("qkv gemm", lambda: F.linear(x, wqkv, b3)), ("o gemm", lambda: F.linear(x, wo, b1)),
                     ("self sdpa", lambda: F.scaled_dot_product_attention(q, kv, kv))):
        def twenty():
            for _ in range(20):
                fn()
        g = graph_of(twenty)
        per_call = cuda_time(g.replay, iters=5) * 1e3 / 20
        ksum, n, nmem = kernels(g)
        print(f"  {name:10s} graph {per_call:7.3f} ms/call; kernels {ksum / 20:7.3f} ms/call "
              f"({n // 20} kernels + {nmem / 20:.0f} memsets per call); boundary {(per_call - ksum / 20) * 1e3:5.1f} us")

m, step, probe = fast_dit_step("wan2.1-14b")
with torch.no_grad():
    g = graph_of(step)
    t = cuda_time(g.replay, iters=7, warmup=2) * 1e3
    ksum, n, nmem = kernels(g)
print(f"  14B forward graph {t:.1f} ms; kernels {ksum:.1f} ms ({n} kernels, {nmem} memsets)", flush=True)
