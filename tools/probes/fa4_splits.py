"""GPU probe: FlashAttention-4 over key ranges computed side by side (``attention.split_keys``) at the DiT's
self-attention shapes.

    python3 tools/probes/fa4_splits.py [--json out.json] [--heads 12,40] [--blocks 1,2,4,7]   # after source tools/device_env.sh

The Hopper forward runs one query tile per SM and head: the 1.3B's 12 heads over a block's 4680 queries are 444
tiles of 128 queries, 3.4 waves on 132 SMs. With the keys split into S ranges, computed as a batch of S (the
queries a stride-0 view, each range a view of the cache) and merged by ``dit_kernels.combine_splits``, there
are S times as many tiles, each S times shorter. Per head count and cache size (token-major cache slices, as
the runtime passes them): each variant's time as a CUDA-graph replay (rounds interleaved), TFLOP/s, and the
error against an fp32 reference (SDPA in fp32) beside the unsplit call's; ``q copied``: the split with the
queries copied into a real batch instead of the stride-0 view; ``split 2, MxN``: two ranges with other tiles.
"""
import argparse
import json

import torch
import torch.nn.functional as F

from gpu_common import capture, interleaved_ms
from sdvg_rt.models import attention
from sdvg_rt.models.attention import Attention, split_keys

attention.MIN_SPLIT_KEYS = 0  # every size is measured split, the runtime's minimum aside

TPF, FPB, D = 1560, 3, 128
N = TPF * FPB
# tiles tried with two key ranges (query x key, P@V from registers, intra-warpgroup overlap)
TILES = [(128, 144, True, True), (128, 176, True, True), (192, 128, True, False), (128, 128, True, False)]


def rel(a, ref):
    return float((a.float() - ref).norm() / ref.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--heads", default="12,40")
    ap.add_argument("--blocks", default="1,2,4,7")
    ap.add_argument("--splits", default="2,3,4")
    args = ap.parse_args()
    res = []
    for H in (int(h) for h in args.heads.split(",")):
        for b in (int(x) for x in args.blocks.split(",")):
            S = b * N
            cache = torch.randn(2, 3, S, H, D, device="cuda", dtype=torch.bfloat16)  # [k/v, layer, tokens, H, D]
            k, v = cache[0, 1], cache[1, 1]
            q = torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16)
            ref = F.scaled_dot_product_attention(*(t.float().transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
            variants = {"fa4": Attention("fa4", "cuda", fa4_key_splits={})}
            for s in (int(x) for x in args.splits.split(",")):
                if S % s == 0:
                    variants[f"split {s}"] = Attention("fa4", "cuda", fa4_key_splits={H: s})
            for tm, tn, rs, ol in TILES if S % 2 == 0 else ():
                t = {"tile_mn": (tm, tn), "mma_pv_is_rs": rs, "intra_wg_overlap": ol}
                variants[f"split 2, {tm}x{tn}{' ol' if ol else ''}"] = Attention("fa4", "cuda", fa4_tiles={H: t},
                                                                               fa4_key_splits={H: 2})
            base = variants["fa4"]
            tiles = base._fa4_tiles.get(H, {})

            def copied(q=q, k=k, v=v):
                qc = q[None].expand(2, *q.shape).contiguous()
                return split_keys(lambda _q, *a, **kw: base._fa4_fwd(qc, *a, **kw), q, k, v, 2, **tiles)

            calls = {name: (lambda a=a: a(q, k, v)) for name, a in variants.items()}
            calls["split 2, q copied"] = copied
            graphs, errs = {}, {}
            for name, fn in calls.items():
                try:
                    g, out = capture(fn)
                    out.zero_()
                    g.replay()
                    torch.cuda.synchronize()
                    graphs[name], errs[name] = g, rel(out, ref)
                except Exception as e:  # a variant FlashAttention-4 does not take
                    print(f"  {H} heads, {b} blocks, {name}: failed: {type(e).__name__}: {str(e)[:200]}")
            times = interleaved_ms(graphs, rounds=3, iters=20)
            flop = 4 * N * S * H * D
            t0 = min(times["fa4"])
            for name, ts in times.items():
                t = min(ts)
                row = dict(heads=H, blocks=b, keys=S, variant=name, ms=t, tflops=flop / t / 1e9,
                           speedup=t0 / t, rel_err=errs[name])
                res.append(row)
                print(f"{H:3d} heads {b} blocks {name:18s} {t:7.3f} ms {row['tflops']:6.0f} TFLOP/s "
                      f"{row['speedup']:5.3f}x  err {errs[name]:.2e}", flush=True)
            del cache, graphs
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
