"""GPU probe: which fp8 configuration is fastest, for the target and for the drafter?

    python3 tools/probes/fp8_variants.py [--json out.json]       # after source tools/device_env.sh

Full-size random weights (``sdvg_rt.bench``), one process: the target and drafter block (4 steps) and commit
times in bf16, then each DiT calibrated on 2 blocks of itself and quantized (a copy of the calibrated model
per variant: channel or tensor weight scales; the first/last transformer block kept in bf16 or not), then
whole videos (target mode, sdvg at 83% acceptance) for the shipped default and the fastest target variant,
with the drafter in bf16, then with both DiTs in fp8 (the same variant). Peak memory here includes the calibrated bf16 copies, so it is not the
runtime's (``tools/bench.py --quantization fp8`` reports that). Speed only: the accuracy of the default is in
``tools/bench.py --quantization fp8``'s table.
"""
import argparse
import copy
import gc
import json

import torch

from sdvg_rt.bench import _median_ms, bench_e2e, build_runtime
from sdvg_rt.bench_fp8 import _reset_loop, calibrate_in_memory
from sdvg_rt.loop import PreparedPrompt
from sdvg_rt.models import fp8

ap = argparse.ArgumentParser()
ap.add_argument("--json", default=None)
ap.add_argument("--device", default="cuda")
ap.add_argument("--size", default="full")
args = ap.parse_args()
dev = torch.device(args.device)
rt = build_runtime(args.size, dev)
rt.allocate()
cfg = rt.models["drafter"].cfg
prompt = PreparedPrompt("a red fox", torch.randn(1, cfg.text_len, cfg.text_dim))
calib = PreparedPrompt("calib", torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(5)))
res = {"comp": {}, "e2e": {}}



def save():
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def comp(kind, label, reps=3):
    rt.allocate()
    loop = rt.loop
    loop.prepare(prompt, seed=0)
    den = getattr(loop, kind)
    mid = rt.profile.video.num_blocks // 2
    for b in range(mid + 1):
        den.commit_block(b, den.denoise_block(b))
    blk = _median_ms(lambda: den.denoise_block(mid), dev, reps)
    com = _median_ms(lambda: den.commit_block(mid, den.out), dev, reps)
    res["comp"][f"{kind} {label}"] = [blk, com]
    print(f"{kind:8s} {label:28s} block {blk:8.1f} ms  commit {com:7.1f} ms", flush=True)
    save()


def e2e(label, runs=(("target", None), ("sdvg", 0.83))):
    rows = bench_e2e(rt, dev, list(runs), log=lambda *a: None)
    res["e2e"][label] = [(r["mode"], r["accept_rate_set"], r["fps"], r["peak_GiB"]) for r in rows]
    print(f"e2e {label:34s} " + "  ".join(
        f"{r['mode']}@{r['accept_rate_set']}: {r['fps']:.2f} fps" for r in rows), flush=True)
    save()


def calibrate(kind):
    """``kind``'s amax over 2 blocks of its own mode (the benchmark's calibration), the loop dropped after."""
    amax = calibrate_in_memory(rt, calib, 2, kind=kind)
    _reset_loop(rt)
    return amax


def swap(kind, model):
    rt.models[kind] = model
    _reset_loop(rt)

VARIANTS = {"channel k1/1": fp8.Fp8Config(1, 1, "channel"),  # the shipped default
            "tensor k1/1": fp8.Fp8Config(1, 1, "tensor"), "tensor k0/0": fp8.Fp8Config(0, 0, "tensor")}

comp("target", "bf16")
comp("drafter", "bf16")
e2e("bf16 / bf16", (("target", None), ("draft", None), ("sdvg", 1.0), ("sdvg", 0.83)))
amax = {"target": calibrate("target"), "drafter": calibrate("drafter")}
calibrated = dict(rt.models)  # the calibrated bf16 models (observers): each variant quantizes a copy


def quantized(kind, label):
    return fp8.quantize_dit(copy.deepcopy(calibrated[kind]), amax[kind], VARIANTS[label])


for kind in ("target", "drafter"):
    for label in VARIANTS:
        swap(kind, quantized(kind, label))
        comp(kind, label)
        swap(kind, calibrated[kind])
        gc.collect()
        torch.cuda.empty_cache()
best = min(VARIANTS, key=lambda k: res["comp"][f"target {k}"][0])
print(f"fastest target variant: {best}", flush=True)
for label in dict.fromkeys(("channel k1/1", best)):
    swap("target", quantized("target", label))
    e2e(f"target fp8 {label} / drafter bf16")
ALL = (("target", None), ("draft", None), ("sdvg", 1.0), ("sdvg", 0.83))
for label in dict.fromkeys(("channel k1/1", best)):  # both DiTs in fp8, the same variant
    swap("target", quantized("target", label))
    swap("drafter", quantized("drafter", label))
    e2e(f"target fp8 {label} / drafter fp8 {label}", ALL)
