"""GPU probe: FlashAttention-4's Hopper forward (``flash_attn.cute``, CuTe DSL) against the
runtime's cuDNN SDPA at the DiT's self-attention shapes (token-major q ``[Lq, H, D]``, cache slices
``[Lk, H, D]``), alone and captured in a CUDA graph.

Needs the flash-attn-4 wheel and its dependencies on PYTHONPATH (carried as wheels to a GPU machine without
network). Prints one table: ms per call for cuDNN and FA4, TFLOP/s, relative difference of the outputs
(both bf16) to an fp32 reference, and whether a graph replay of the FA4 call equals its eager result.
"""
import time

import torch

from sdvg_rt.floor import cuda_time
from sdvg_rt.models.attention import Attention


def timeit(fn):
    """ms per call: 10 calls back to back per event pair, median of 15."""
    return cuda_time(fn, iters=15, inner=10) * 1e3


def main():
    t = time.time()
    from flash_attn.cute.interface import _flash_attn_fwd
    print(f"import flash_attn.cute: {time.time() - t:.1f} s")
    attention = Attention("cudnn")
    torch.manual_seed(0)
    rows = []
    for name, H in (("14B", 40), ("1.3B", 12)):
        for block in (0, 3, 6):
            lq, lk, D = 4680, (block + 1) * 4680, 128
            q = torch.randn(lq, H, D, device="cuda", dtype=torch.bfloat16)
            kv = torch.randn(2, lk, H, D, device="cuda", dtype=torch.bfloat16)
            k, v = kv[0], kv[1]
            out = torch.empty(1, lq, H, D, device="cuda", dtype=torch.bfloat16)

            def fa4():
                _flash_attn_fwd(q[None], k[None], v[None], out=out)

            t = time.time()
            fa4()
            torch.cuda.synchronize()
            compile_s = time.time() - t
            t_cudnn = timeit(lambda: attention(q, k, v))
            t_fa4 = timeit(fa4)
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.float().transpose(0, 1)[None], k.float().transpose(0, 1)[None], v.float().transpose(0, 1)[None]
            )[0].transpose(0, 1) if lk <= 18720 else None
            fa4()
            eager = out.clone()
            err = lambda o: ((o.float() - ref).norm() / ref.norm()).item() if ref is not None else float("nan")
            e_cudnn, e_fa4 = err(attention(q, k, v)), err(out[0])
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fa4()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                fa4()
            out.zero_()
            g.replay()
            torch.cuda.synchronize()
            graph_ok = torch.equal(out, eager)
            t_graph = timeit(g.replay)
            flop = 4 * lq * lk * H * D
            rows.append((name, block, lk, t_cudnn, t_fa4, t_graph, flop / t_cudnn / 1e9, flop / t_fa4 / 1e9,
                         e_cudnn, e_fa4, graph_ok, compile_s))
            del q, kv, out, ref
    print(f"{'model':5s} {'blk':>3s} {'keys':>6s} {'cudnn ms':>9s} {'fa4 ms':>8s} {'fa4 graph':>9s} "
          f"{'cudnn TF/s':>10s} {'fa4 TF/s':>9s} {'cudnn err':>9s} {'fa4 err':>9s} graph==eager first-call s")
    for r in rows:
        print(f"{r[0]:5s} {r[1]:3d} {r[2]:6d} {r[3]:9.3f} {r[4]:8.3f} {r[5]:9.3f} {r[6]:10.0f} {r[7]:9.0f} "
              f"{r[8]:9.2e} {r[9]:9.2e} {str(r[10]):>12s} {r[11]:.1f}")


if __name__ == "__main__":
    main()
