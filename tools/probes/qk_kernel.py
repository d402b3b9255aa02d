"""GPU probe: the q/k epilogue kernel (``dit_kernels.qk_to_cache``: RMSNorm + RoPE of q and k, k into the cache
slots) at the DiT's block shapes (4680 tokens): layouts and launch configurations against a plain copy of the
q/k bytes, each timed as CUDA-graph replays (as the runtime runs it); bandwidth counts q/k in and out and
the cos/sin rows.

    python3 tools/probes/qk_kernel.py           # after source tools/device_env.sh

Variants: ``first``: the first kernel (a ``[heads, pairs]`` tile of 32-bit words, the 40 heads padded to 64,
the norm weights read with two strided loads) at 4-32 warps; ``runtime``: ``dit_kernels.qk_to_cache`` as it
is now (a row as two power-of-two chunks of 32-bit pairs, weights as pairs) at 4-16 warps. (An intermediate
layout measured on the way, the first tile with the weights as pairs and 1-2 rows per program, 99-124 us at
14B shapes timed with CUDA events, is in the history.) The sum of squares is reduced in another order at
another launch shape, so outputs may differ from the first kernel's in the last bit: each is compared with it
(share of differing elements) and with the eager definition (largest difference in bf16 ulps at the output's
scale)."""
import torch
import triton

from gpu_common import graph_of
from gpu_probe_micro import qkv_f
from sdvg_rt.floor import cuda_time
from sdvg_rt.models import dit_kernels as K
from sdvg_rt.models import wan_dit as W


def runtime(q, k, wq, wk, cos, sin, heads, kv, nw):
    """``dit_kernels.qk_to_cache`` as the runtime calls it, at ``nw`` warps."""
    out = {}

    def f():
        out["q"] = K.qk_to_cache(q, k, wq, wk, 1e-6, cos, sin, heads, kv, 0, num_warps=nw)
    f()
    return f, out


def first(q, k, wq, wk, cos, sin, heads, kv, nw):
    """The first kernel: ``gpu_probe_micro.qkv_f`` at one row per program over q and k (grid (n, 2), so its
    V part never runs), the form ``dit_kernels`` had before this layout."""
    n, dim = q.shape
    half = dim // heads // 2
    q_out = torch.empty(n, heads, dim // heads, dtype=q.dtype, device=q.device)
    i32 = [t.view(torch.int32) for t in (q, k, q_out, kv[0, :n])]
    hp, pp = triton.next_power_of_2(heads), triton.next_power_of_2(half)

    def f():
        qkv_f[(n, 2)](i32[0], i32[1], i32[0], q.stride(0) // 2, wq, wk, cos, sin, i32[2], i32[3], i32[2], heads,
                      dim, 1e-6, n, HALF=half, H_PAD=hp, P_PAD=pp, ROWS=1, PARTS=2, num_warps=nw)
    return f, q_out


for dim, heads in ((5120, 40), (1536, 12)):
    n = 4680
    qk = torch.randn(n, 2 * dim, device="cuda", dtype=torch.bfloat16)
    q, k = qk.chunk(2, -1)
    wq, wk = (torch.randn(dim, device="cuda").bfloat16() for _ in range(2))
    rope = W.WanRoPE(W.WanDiTConfig("p", dim=dim, ffn_dim=8, num_heads=heads, num_layers=1)).cuda()
    cos, sin = rope.factors(3, 30, 52, frame_offset=9)
    nbytes = 2 * 2 * n * dim * 2 + 2 * n * (dim // heads // 2) * 4  # q/k in and out, cos/sin in
    dst = torch.empty(2 * n * dim, device="cuda", dtype=torch.bfloat16)
    tcopy = cuda_time(graph_of(lambda: dst.copy_(qk.view(-1))).replay, iters=30)
    print(f"dim {dim}: copy of q/k (graph replay) {tcopy * 1e6:.0f} us ({2 * 2 * n * dim * 2 / tcopy / 1e12:.2f} TB/s)",
          flush=True)
    kv_ref = torch.zeros(2, n, heads, dim // heads, device="cuda", dtype=torch.bfloat16)
    f, q_ref = first(q, k, wq, wk, cos, sin, heads, kv_ref, 8)
    f()
    kv_e = torch.zeros_like(kv_ref)  # the eager definition, for the ulp distance
    q_e = W._qk_to_cache(q, k, wq, wk, 1e-6, cos, sin, heads, kv_e, 0)

    def ulps(a, b):
        """Largest difference in bf16 ulps (2^-7) at the reference's scale (the unit tests' measure)."""
        return ((a.float() - b.float()).abs().max() / b.float().abs().max() / 2.0**-7).item()
    variants = [(f"first nw={w}", lambda kv, w=w: first(q, k, wq, wk, cos, sin, heads, kv, w)) for w in (4, 8, 16, 32)]
    variants += [(f"runtime nw={w}", lambda kv, w=w: runtime(q, k, wq, wk, cos, sin, heads, kv, w)) for w in (4, 8, 16)]
    for name, make in variants:
        kv = torch.zeros_like(kv_ref)
        try:
            f, q_out = make(kv)
            f()
            g = graph_of(f)  # timed as graph replays, as the runtime runs it (no host launch cost)
            kv.zero_()
            if not isinstance(q_out, dict):
                q_out.zero_()
            g.replay()  # what is compared: the replay's output
            q_out = q_out["q"] if isinstance(q_out, dict) else q_out  # the runtime's: the graph's own tensor
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  {name:16s} failed {type(e).__name__}: {str(e)[:160]}")
            continue
        t = cuda_time(g.replay, iters=30)
        same = torch.equal(q_out, q_ref) and torch.equal(kv, kv_ref)
        differ = ((q_out != q_ref).float().mean().item() + (kv[0] != kv_ref[0]).float().mean().item()) / 2
        u = max(ulps(q_out, q_e), ulps(kv[0], kv_e[0]))
        print(f"  {name:16s} {t * 1e6:6.0f} us ({nbytes / t / 1e12:.2f} TB/s)  identical to the first kernel "
              f"{same} ({100 * differ:.4f}% of elements differ), max difference from eager {u:.2f} bf16 ulps",
              flush=True)
