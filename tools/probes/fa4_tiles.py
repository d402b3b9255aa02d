"""GPU probe: FlashAttention-4's Hopper forward tile configurations at the DiT's attention shapes.

    python3 tools/probes/fa4_tiles.py [--json out.json] [--blocks 1,4,7]   # after source tools/device_env.sh

FlashAttention-4 picks 128x128 tiles for head dim 128 on sm90 (FlashAttention-3's C++ kernel used 128x176
without a causal mask). For the 14B's and the 1.3B's self-attention (4680 queries of one block, 40 or 12
heads, over a cache of each number of blocks in ``--blocks``, default 1-7, token-major cache slices as the
runtime passes them) and their cross-attention (512 text keys), each configuration's time as a CUDA-graph
replay (as the runtime runs it: no host launch cost), TFLOP/s and largest difference from the default's
output. Then what the fastest configuration per shape would save per video: target mode (each block b has
4 denoising forwards over b + 1 cache blocks, and all but the last a commit forward) and a draft-mode video
for the 1.3B, 40 or 30 layers a forward.
"""
import argparse
import json

import torch

from gpu_common import graph_of
from sdvg_rt.floor import cuda_time

TPF, FPB, D = 1560, 3, 128
N = TPF * FPB
# (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap); None: FlashAttention-4's own choice
CONFIGS = [None, (128, 128, True, False), (128, 144, True, True), (128, 160, True, True), (128, 176, True, True),
           (128, 176, True, False), (128, 192, True, True), (128, 192, True, False), (128, 112, True, True),
           (192, 128, True, False), (192, 112, True, False)]
MODELS = {"14b": (40, 40), "1.3b": (12, 30)}  # heads, layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--blocks", default="1,2,3,4,5,6,7", help="cache sizes (blocks) of the self-attention")
    args = ap.parse_args()
    from flash_attn.cute.interface import _flash_attn_fwd

    blocks = [int(b) for b in args.blocks.split(",")]
    shapes = [(m, f"self, {b} blocks", b * N) for m in MODELS for b in blocks] + [(m, "cross", 512) for m in MODELS]
    res, best = [], {}
    for model, label, S in shapes:
        H = MODELS[model][0]
        cache = torch.randn(2, S, H, D, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16)
        k, v = cache[0][None], cache[1][None]
        flop = 4 * N * S * H * D
        ref = t0 = None
        for cfg in CONFIGS:
            kw = {} if cfg is None else dict(tile_mn=cfg[:2], mma_pv_is_rs=cfg[2], intra_wg_overlap=cfg[3])
            name = "default" if cfg is None else f"{cfg[0]}x{cfg[1]} rs={int(cfg[2])} ol={int(cfg[3])}"
            out = {}
            try:
                def call():
                    out["o"] = _flash_attn_fwd(q, k, v, **kw)[0]
                call()
                g = graph_of(call)
                g.replay()
                torch.cuda.synchronize()
                t = cuda_time(g.replay, iters=args.iters, warmup=3, inner=5)
            except Exception as e:  # an infeasible configuration: say so and go on
                print(f"{model} {label:16s} {name:24s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                res.append({"model": model, "shape": label, "config": name, "error": str(e)[:300]})
                continue
            if cfg is None:
                ref, t0 = out["o"].clone(), t
            if ref is None:  # the default failed: nothing to compare with
                print(f"{model} {label:16s} {name:24s} {t * 1e3:8.3f} ms (no default to compare)", flush=True)
                continue
            diff = (out["o"].float() - ref.float()).abs().max().item()
            row = {"model": model, "shape": label, "keys": S, "config": name, "ms": t * 1e3,
                   "tflops": flop / t / 1e12, "vs_default": t0 / t, "max_diff_vs_default": diff}
            res.append(row)
            print(f"{model} {label:16s} {name:24s} {t * 1e3:8.3f} ms {row['tflops']:6.0f} TFLOP/s  "
                  f"x{row['vs_default']:.3f}  max|diff| {diff:.2e}", flush=True)
            if (model, label) not in best or t < best[(model, label)][1]:
                best[(model, label)] = (name, t, t0)
        del cache, q, ref
        torch.cuda.empty_cache()
    print("\nfastest per shape (against the default):")
    for (model, label), (name, t, t0) in best.items():
        print(f"  {model} {label:16s} {name:24s} {t * 1e3:7.3f} ms vs {t0 * 1e3:7.3f} ms  x{t0 / t:.3f}")
    saved = {}
    for model, (_, layers) in MODELS.items():
        def gain(label):
            _, t, t0 = best.get((model, label), (None, 0.0, 0.0))
            return t0 - t
        n_blocks = max(blocks)
        if blocks != list(range(1, n_blocks + 1)):
            continue
        # target mode: block b = 4 denoising forwards over b + 1 cache blocks, a commit forward but for the last
        per_video = sum((4 + (b < n_blocks - 1)) * layers * (gain(f"self, {b + 1} blocks") + gain("cross"))
                        for b in range(n_blocks))
        saved[model] = per_video * 1e3
        print(f"  {model}: the fastest tiles would save {per_video * 1e3:.1f} ms per video "
              f"({'target' if model == '14b' else 'draft'} mode, {n_blocks} blocks)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": res, "saved_ms_per_video": saved}, f, indent=1)


if __name__ == "__main__":
    main()
