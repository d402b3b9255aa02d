"""Where the 14B layer's fp8 GEMMs lose against bare ``torch._scaled_mm``: bias epilogue, scale layout, fast
accumulation. One CUDA GPU of compute capability >= 8.9.

    python3 tools/probes/fp8_gemm.py [--json out.json]       # after source tools/device_env.sh

At M = 4680 (one 832x480 block) and each GEMM shape of a 14B layer: bf16 ``F.linear`` with and without bias,
and ``torch._scaled_mm`` e4m3 with tensorwise and rowwise scales, with and without the bias in the epilogue,
with and without ``use_fast_accum``; each fp8 variant's relative error against the fp32 product of the same
fp8 values and scales (the error the GEMM itself adds, on top of e4m3's rounding of its inputs).
"""
import argparse
import json

import torch
import torch.nn.functional as F

from sdvg_rt.floor import cuda_time

M = 4680
SHAPES_14B = [("q/k (fused)", 5120, 10240), ("v", 5120, 5120), ("self o", 5120, 5120), ("cross q", 5120, 5120),
              ("cross o", 5120, 5120), ("ffn 0", 5120, 13824), ("ffn 2", 13824, 5120)]
E4M3, FP8_MAX = torch.float8_e4m3fn, 448.0


def ms(fn):
    return cuda_time(fn, iters=30, warmup=5) * 1e3


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows, tot = [], {}
    for name, K, N in SHAPES_14B:
        w = torch.randn(N, K, device=dev, generator=g, dtype=torch.bfloat16) / K ** 0.5
        b = (torch.randn(N, device=dev, generator=g) * 0.1).to(torch.bfloat16)
        x = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
        r = {"layer": name, "K": K, "N": N,
             "bf16 bias": ms(lambda: F.linear(x, w, b)),
             "bf16": ms(lambda: F.linear(x, w))}
        sx = (x.float().abs().amax() / FP8_MAX).reshape(())
        x8 = (x.float() / sx).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
        for scaling in ("tensor", "channel"):
            wf = w.float()
            ws = (wf.abs().amax(dim=1, keepdim=True) if scaling == "channel" else wf.abs().amax()) / FP8_MAX
            w8 = (wf / ws).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
            sb = ws.reshape(1, -1).contiguous() if scaling == "channel" else ws.reshape(())
            sa = sx.expand(M, 1).contiguous() if scaling == "channel" else sx
            ref = F.linear(x8.float() * sx, w8.float() * ws.reshape(-1, 1) if scaling == "channel" else
                           w8.float() * ws, b.float())
            for bias in (True, False):
                for fast in (False, True):
                    key = f"{scaling}{' bias' if bias else ''}{' fast' if fast else ''}"

                    def run():
                        return torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb, bias=b if bias else None,
                                                out_dtype=torch.bfloat16, use_fast_accum=fast)
                    try:
                        y = run()
                    except RuntimeError as e:
                        r[key] = None
                        r[key + " error"] = str(e).splitlines()[0][:120]
                        continue
                    r[key] = ms(run)
                    r[key + " rel"] = rel(y if bias else y.float() + b.float(), ref)
        for k, v in r.items():
            if isinstance(v, float) and not k.endswith("rel"):
                tot[k] = tot.get(k, 0.0) + v
        rows.append(r)
    keys = ["bf16 bias", "bf16"] + [f"{s}{bb}{ff}" for s in ("tensor", "channel") for bb in (" bias", "")
                                     for ff in ("", " fast")]
    print("| layer (M=4680) | K x N | " + " | ".join(f"{k} ms" for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['layer']} | {r['K']}x{r['N']} | " +
              " | ".join("n/a" if r.get(k) is None else f"{r[k]:.3f}" for k in keys) + " |")
    print("| one layer | | " + " | ".join(f"{tot.get(k, float('nan')):.3f}" for k in keys) + " |")
    print("| x of bf16 bias | | " + " | ".join(f"{tot['bf16 bias'] / tot[k]:.2f}" if k in tot else "n/a"
                                              for k in keys) + " |")
    print("\nrelative error against the fp32 product of the same fp8 values (max over shapes):")
    for k in keys[2:]:
        errs = [r[k + " rel"] for r in rows if (k + " rel") in r]
        print(f"  {k}: {max(errs):.2e}" if errs else f"  {k}: n/a ({rows[0].get(k + ' error')})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "M": M, "rows": rows,
                       "per_layer_ms": tot}, f, indent=1)


if __name__ == "__main__":
    main()
