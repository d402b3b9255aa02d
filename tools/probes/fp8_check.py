"""GPU self-test of the FP8 path (sdvg_rt.models.fp8) on one CUDA GPU of compute capability >= 8.9.

    python3 tools/probes/fp8_check.py [--json out.json]

1. The fp8 Triton kernels (residual/LayerNorm with fp8 output, GELU+quant, cast) at the 14B's shapes against
   fp32 references. 2. ``Fp8Linear`` (``torch._scaled_mm``, rowwise and tensorwise, with bias, with ``out=``)
   against its dequantized fp32 reference at the 14B's GEMM shapes. 3. A cached 1.3B forward in fp8 (random
   weights, calibrated on itself): eager twice (deterministic) and CUDA-graph replay against eager, bit for
   bit, and its error against bf16. 4. A timing table at M = 4680 (one 832x480 block): bf16 ``F.linear``
   against fp8 GEMMs on pre-quantized input (what the fused kernels feed), the cast kernels, and the per-layer
   sum. Exits 1 if a check fails.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from sdvg_rt.bench_fp8 import kernel_check_fp8
from sdvg_rt.floor import cuda_time
from sdvg_rt.models import fp8, wan_dit
from sdvg_rt.models.wan_dit import WanDiTConfig

M = 4680
SHAPES_14B = [("q/k (fused)", 5120, 10240, 1), ("v", 5120, 5120, 1), ("self o", 5120, 5120, 1),
              ("cross q", 5120, 5120, 1), ("cross o", 5120, 5120, 1), ("ffn 0", 5120, 13824, 1),
              ("ffn 2", 13824, 5120, 1)]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_layers(dev, failures):
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for scaling in ("channel", "tensor"):
        for name, K, N, _ in [SHAPES_14B[i] for i in (0, 1, 5, 6)]:
            w = torch.randn(N, K, device=dev, generator=g, dtype=torch.bfloat16) / K ** 0.5
            b = 0.02 * torch.randn(N, device=dev, generator=g, dtype=torch.bfloat16)
            x = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
            s = (x.float().abs().amax() / fp8.FP8_MAX).reshape(())
            lin = fp8.Fp8Linear(w, b, s, scaling)
            with torch.no_grad():
                y = lin(x)
                act = fp8.quantize(x, s, lin.rowwise)
                ref = F.linear(act.dequantize(), lin.dequantized_weight(), b.float())
                out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
                lin(act, out=out)
                exact = F.linear(x.float(), w.float(), b.float())
            r = {"scaling": scaling, "layer": name, "K": K, "N": N, "vs_dequantized_ref": rel(y, ref),
                 "out_equal": bool(torch.equal(out, y)), "vs_bf16_exact": rel(y, exact),
                 "bias_in_gemm": lin._bias_in_gemm}
            rows.append(r)
            print(f"  Fp8Linear {scaling:7s} {name:11s} K{K} N{N}: vs dequantized ref {r['vs_dequantized_ref']:.2e}, "
                  f"vs exact {r['vs_bf16_exact']:.2e}, out= equal {r['out_equal']}, bias in epilogue {lin._bias_in_gemm}")
            if r["vs_dequantized_ref"] > 1e-2 or not r["out_equal"]:
                failures.append(f"Fp8Linear {scaling} {name}")
    return rows


def check_graph(dev, failures):
    sys.path.insert(0, "tools")
    from gpu_common import dit_step

    m, step, _ = dit_step("wan2.1-1.3b")
    m.set_kernels(wan_dit.DiTKernels(triton=True, compile=True))
    with torch.no_grad():
        y_bf16 = step().clone()
        fp8.quantize_dit(m, None, fp8.Fp8Config(0, 0))
        step()
        fp8.quantize_dit(m, fp8.collect_amax(m))
        y1, y2 = step().clone(), step().clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=s):
                y_static = step()
        torch.cuda.current_stream().wait_stream(s)
        graph.replay()
        torch.cuda.synchronize()
    r = {"eager_deterministic": bool(torch.equal(y1, y2)), "graph_equals_eager": bool(torch.equal(y_static, y1)),
         "fp8_vs_bf16_rel": rel(y1, y_bf16),
         "quantized_blocks": sum(isinstance(b.ffn[0], fp8.Fp8Linear) for b in m.blocks)}
    print(f"  1.3B cached forward in fp8 ({r['quantized_blocks']} blocks): eager deterministic {r['eager_deterministic']}, "
          f"graph replay == eager {r['graph_equals_eager']}, vs bf16 {r['fp8_vs_bf16_rel']:.3e}")
    if not (r["eager_deterministic"] and r["graph_equals_eager"]) or not r["fp8_vs_bf16_rel"] < 0.2:
        failures.append("fp8 forward graph/eager")
    del m
    torch.cuda.empty_cache()
    return r


def timings(dev):
    rows, tot = [], {"bf16": 0.0, "fp8 channel": 0.0, "fp8 tensor": 0.0}
    g = torch.Generator(device=dev).manual_seed(1)
    for name, K, N, _ in SHAPES_14B:
        w = torch.randn(N, K, device=dev, generator=g, dtype=torch.bfloat16) / K ** 0.5
        b = torch.zeros(N, device=dev, dtype=torch.bfloat16)
        x = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
        s = (x.float().abs().amax() / fp8.FP8_MAX).reshape(())
        r = {"layer": name, "K": K, "N": N, "bf16_ms": cuda_time(lambda: F.linear(x, w, b)) * 1e3}
        for scaling in ("channel", "tensor"):
            lin = fp8.Fp8Linear(w, b, s, scaling)
            act = fp8.quantize(x, s, lin.rowwise)
            lin(act)  # bias layout probe outside the timing
            r[f"fp8_{scaling}_ms"] = cuda_time(lambda: lin(act)) * 1e3
            r[f"fp8_{scaling}_with_cast_ms"] = cuda_time(lambda: lin(x)) * 1e3
        gelu_in = K == 13824
        xx = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
        r["quant_kernel_ms"] = cuda_time(lambda: fp8.quantize(xx, s, True, gelu=gelu_in)) * 1e3
        r["speedup_channel"] = r["bf16_ms"] / r["fp8_channel_ms"]
        r["speedup_tensor"] = r["bf16_ms"] / r["fp8_tensor_ms"]
        tot["bf16"] += r["bf16_ms"]
        tot["fp8 channel"] += r["fp8_channel_ms"]
        tot["fp8 tensor"] += r["fp8_tensor_ms"]
        rows.append(r)
    print("\n| layer (M=4680) | K x N | bf16 ms | fp8 rowwise ms | fp8 tensorwise ms | x rowwise | x tensorwise | "
          "rowwise incl. cast ms | cast kernel ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['K']}x{r['N']} | {r['bf16_ms']:.3f} | {r['fp8_channel_ms']:.3f} | "
              f"{r['fp8_tensor_ms']:.3f} | {r['speedup_channel']:.2f} | {r['speedup_tensor']:.2f} | "
              f"{r['fp8_channel_with_cast_ms']:.3f} | {r['quant_kernel_ms']:.3f}{' (GELU+quant)' if r['K'] == 13824 else ''} |")
    print(f"| one 14B layer's GEMMs | | {tot['bf16']:.3f} | {tot['fp8 channel']:.3f} | {tot['fp8 tensor']:.3f} | "
          f"{tot['bf16'] / tot['fp8 channel']:.2f} | {tot['bf16'] / tot['fp8 tensor']:.2f} | | |")
    return {"rows": rows, "per_layer_ms": tot}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-graph", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda")
    cc = torch.cuda.get_device_capability(dev)
    print(f"fp8 check on {torch.cuda.get_device_name(dev)} (cc {cc[0]}.{cc[1]}), torch {torch.__version__}")
    if not fp8.fp8_supported(dev):
        print("this GPU has no fp8 tensor cores (compute capability < 8.9)")
        return 1
    t0 = time.perf_counter()
    failures, res = [], {}
    res["kernels"] = kernel_check_fp8(WanDiTConfig.from_name("wan2.1-14b"), dev)["fp8_kernels"]
    for k, (err, same, xerr) in res["kernels"].items():
        print(f"  Triton {k:16s}: {err:.2e} relative to fp32 after dequantization, {same:.4%} codes as torch's "
              f"rounding{'' if xerr is None else f', residual {xerr:.2e}'}")
        if not (err < 0.05 and same > 0.99 and (xerr is None or xerr < 5e-3)):
            failures.append(f"kernel {k}")
    res["layers"] = check_layers(dev, failures)
    if not a.skip_graph:
        res["graph"] = check_graph(dev, failures)
    res["timings"] = timings(dev)
    res["failures"] = failures
    print(f"\nfp8 check {'FAILED: ' + ', '.join(failures) if failures else 'passed'} in {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
