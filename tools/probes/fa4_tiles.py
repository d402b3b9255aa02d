"""GPU probe: FlashAttention-4's Hopper forward tile configurations at the DiT's attention shapes.

    python3 tools/probes/fa4_tiles.py [--json out.json]        # after source tools/device_env.sh

FlashAttention-4 picks 128x128 tiles for head dim 128 on sm90 (FlashAttention-3's C++ kernel used 128x176
without a causal mask). For the 14B's self-attention (4680 queries of one block, 40 heads, over a cache of
1, 4 and 7 blocks, token-major cache slices as the runtime passes them), its cross-attention (512 text
keys) and the 1.3B's self-attention (12 heads), each configuration's time (median of CUDA events), TFLOP/s
and largest difference from the default's output.
"""
import argparse
import json

import torch

from sdvg_rt.floor import cuda_time

ap = argparse.ArgumentParser()
ap.add_argument("--json", default=None)
ap.add_argument("--iters", type=int, default=30)
args = ap.parse_args()

from flash_attn.cute.interface import _flash_attn_fwd  # noqa: E402

TPF, FPB = 1560, 3
n = TPF * FPB
# (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap); None: FlashAttention-4's own choice
CONFIGS = [None, (128, 128, True, False), (128, 144, True, True), (128, 160, True, True), (128, 176, True, True),
           (128, 176, True, False), (128, 192, True, True), (128, 192, True, False), (128, 112, True, True),
           (192, 128, True, False), (192, 112, True, False)]
SHAPES = [("14b self, 1 block", 40, 1 * n), ("14b self, 4 blocks", 40, 4 * n), ("14b self, 7 blocks", 40, 7 * n),
          ("14b cross", 40, 512), ("1.3b self, 4 blocks", 12, 4 * n)]
res = []
for label, H, S in SHAPES:
    D = 128
    cache = torch.randn(2, S, H, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, n, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = cache[0][None], cache[1][None]
    flop = 4 * n * S * H * D
    ref = None
    for cfg in CONFIGS:
        kw = {} if cfg is None else dict(tile_mn=cfg[:2], mma_pv_is_rs=cfg[2], intra_wg_overlap=cfg[3])
        name = "default" if cfg is None else f"{cfg[0]}x{cfg[1]} rs={int(cfg[2])} ol={int(cfg[3])}"
        try:
            def call():
                return _flash_attn_fwd(q, k, v, **kw)[0]
            out = call()
            torch.cuda.synchronize()
            t = cuda_time(call, iters=args.iters, warmup=3)
        except Exception as e:  # an infeasible configuration: say so and go on
            print(f"{label:22s} {name:24s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            res.append({"shape": label, "config": name, "error": str(e)[:300]})
            continue
        if cfg is None:
            ref, t0 = out, t
        elif ref is None:  # the default failed: nothing to compare with
            print(f"{label:22s} {name:24s} {t * 1e3:8.3f} ms (no default to compare)", flush=True)
            continue
        diff = (out.float() - ref.float()).abs().max().item()
        row = {"shape": label, "config": name, "ms": t * 1e3, "tflops": flop / t / 1e12, "vs_default": t0 / t,
               "max_diff_vs_default": diff}
        res.append(row)
        print(f"{label:22s} {name:24s} {t * 1e3:8.3f} ms {row['tflops']:6.0f} TFLOP/s  x{row['vs_default']:.3f}"
              f"  max|diff| {diff:.2e}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    del cache, q, ref
    torch.cuda.empty_cache()
