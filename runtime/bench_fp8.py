"""``bench --quantization fp8``: the target DiT in bf16 and in fp8 side by side in one run (``sdvg_rt.bench``).

After the bf16 rows, on the same random weights and the same prompt: (1) a bf16 reference video in target
mode (eager, every flow prediction recorded); (2) calibration on those weights (``models.fp8`` observers,
``calib_blocks`` blocks, every step), so the static scales are real ones; (3) the target quantized in place
(its bf16 weights freed); (4) the same video in fp8 and the accuracy table against (1): per block the
relative error of the flow predictions (step 0, and the mean over steps) and of the committed latents, the
decoded frames' PSNR, the ImageReward difference; (5) the CUDA-graph self-check, the fp8 kernels against
fp32 at production shapes, the target's block and commit times, and whole videos with peak memory. With
``--fp8-drafter`` the drafter then goes the same way (its reference and fp8 videos in draft mode, its own
calibration), and its block and commit times and the videos are measured again with both DiTs in fp8.

What random weights can tell: the fp8 kernels' and GEMMs' numerical error, how it compounds through 40
layers, 4 steps and the KV cache over 7 blocks, the speed and the memory. What they cannot: whether the
error is visible in real videos (a trained model's activations have outliers random weights lack, and its
flow field is smooth where random weights give noise): ImageReward of noise frames means little; calibrate
and compare on the real checkpoint for that.
"""
from __future__ import annotations

import gc
import math

import numpy as np
import torch


MODE = {"target": "target", "drafter": "draft"}  # the mode in which a DiT makes every block alone


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _reset_loop(rt) -> None:
    """Drop the loop (its CUDA graphs captured the old modules) so that ``allocate`` builds a fresh one."""
    rt.loop = None
    gc.collect()
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()


def reference_video(rt, prompt, seed: int = 0, kind: str = "target") -> dict:
    """A video of ``kind``'s DiT alone (``target`` mode, or ``draft`` mode for the drafter) with its graphs
    off, recording every flow prediction (host fp32)."""
    rt.allocate()
    den = getattr(rt.loop, kind)
    flows = []
    handle = den.step.model.register_forward_hook(lambda m, i, o: flows.append(o.float().cpu()))
    was = den.graphs.enabled
    den.graphs.enabled = False
    try:
        frames = [b.frames for b in rt.stream(prompt, mode=MODE[kind], tau=0.0, seed=seed)]
    finally:
        handle.remove()
        den.graphs.enabled = was
    steps = len(rt.profile.schedule.steps)
    latents = rt.loop.committed_latents().float().cpu()
    rewards = []
    sc = rt.loop.scorer
    sc_was = getattr(sc, "graphs", None) and sc.graphs.enabled
    if sc_was:
        sc.graphs.enabled = False
    with torch.no_grad():
        for f in frames:  # uint8 [f, H, W, 3] -> [1, 3, f, H, W] in [-1, 1]
            x = torch.from_numpy(np.ascontiguousarray(f)).to(rt.device).permute(3, 0, 1, 2)[None]
            rewards.append(sc.score(x.to(rt.dtype) / 127.5 - 1).float().cpu())
    if sc_was:
        sc.graphs.enabled = True
    return {"flows": [flows[i:i + steps] for i in range(0, len(flows), steps)], "latents": latents,
            "frames": frames, "rewards": rewards}


def compare(ref: dict, q: dict, frames_per_block: int) -> dict:
    rows = []
    for b, (fr, fq) in enumerate(zip(ref["flows"], q["flows"])):
        sl = slice(b * frames_per_block, (b + 1) * frames_per_block)
        rows.append({"block": b, "flow_rel_err_step0": _rel(fq[0], fr[0]),
                     "flow_rel_err_mean": sum(_rel(a, r) for a, r in zip(fq, fr)) / len(fr),
                     "latent_rel_err": _rel(q["latents"][:, :, sl], ref["latents"][:, :, sl]),
                     "frames_psnr_db": _psnr(q["frames"][b], ref["frames"][b]),
                     "imagereward_diff": float(q["rewards"][b].mean() - ref["rewards"][b].mean())})
    all_r = np.concatenate(ref["frames"]), np.concatenate(q["frames"])
    return {"blocks": rows, "latents_rel_err": _rel(q["latents"], ref["latents"]),
            "frames_psnr_db": _psnr(all_r[1], all_r[0]),
            "imagereward_bf16": float(torch.cat(ref["rewards"]).mean()),
            "imagereward_fp8": float(torch.cat(q["rewards"]).mean())}


def calibrate_in_memory(rt, prompt, blocks: int, log=print, kind: str = "target") -> dict:
    """Observe ``kind``'s GEMM inputs over ``blocks`` blocks of its own mode (every step and commit)."""
    from .models import fp8

    model = rt.models[kind]
    fp8.quantize_dit(model, None, fp8.Fp8Config(0, 0, cross_kv=True))
    _reset_loop(rt)
    rt.allocate()
    for _ in rt.stream(prompt, mode=MODE[kind], tau=0.0, seed=11, max_blocks=blocks):
        pass
    amax = fp8.collect_amax(model)
    log(f"  {kind}: calibrated {len(amax)} GEMM inputs over {blocks} blocks (amax "
        f"{min(float(v) for v in amax.values()):.3g}..{max(float(v) for v in amax.values()):.3g})")
    return amax


def quantize_part(rt, kind: str, prompt, calib, a, log=print) -> dict:
    """``kind``'s DiT: a bf16 reference video of its own mode, calibration on ``calib``, quantization in
    place (its bf16 weights freed), the same video in fp8 and the accuracy against the reference."""
    from .models import fp8

    model = rt.models[kind]
    res = {"weights_GiB_bf16": _model_bytes(model) / 2**30}
    log(f"  fp8: bf16 reference video ({MODE[kind]} mode, eager)")
    ref = reference_video(rt, prompt, kind=kind)
    amax = calibrate_in_memory(rt, calib, a.calib_blocks, log, kind=kind)
    fp8.quantize_dit(model, amax, fp8.Fp8Config(weight_scaling=a.fp8_weight_scaling, cross_kv=a.fp8_cross_kv))
    _reset_loop(rt)
    res["weights_GiB_fp8"] = _model_bytes(model) / 2**30
    res["quantized_blocks"] = sum(isinstance(b.ffn[0], fp8.Fp8Linear) for b in model.blocks)
    res["blocks"] = len(model.blocks)
    log(f"  fp8: {kind} quantized ({res['quantized_blocks']}/{len(model.blocks)} blocks); weights "
        f"{res['weights_GiB_bf16']:.1f} -> {res['weights_GiB_fp8']:.1f} GiB")
    q = reference_video(rt, prompt, kind=kind)
    res["accuracy"] = compare(ref, q, rt.profile.video.frames_per_block)
    for r in res["accuracy"]["blocks"]:
        log(f"  fp8 {kind} block {r['block']}: flow rel err {r['flow_rel_err_step0']:.3e} "
            f"(mean {r['flow_rel_err_mean']:.3e}), latents {r['latent_rel_err']:.3e}, PSNR {r['frames_psnr_db']:.1f} dB")
    return res


def _model_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def kernel_check_fp8(cfg, device, grid=(3, 30, 52)) -> dict:
    """The fp8 kernels at production shapes against fp32: dequantized output vs the exact fp32 values
    (e4m3's own rounding is ~2-3% relative) and the fraction of fp8 codes equal to torch's rounding of
    the fp32 group (only fp32 reassociation inside the kernel can flip a code)."""
    from .models import dit_kernels, fp8, wan_dit

    if device.type != "cuda" or not dit_kernels.AVAILABLE:
        return {}
    g = torch.Generator(device=device).manual_seed(3)
    bf = dict(device=device, dtype=torch.bfloat16)
    frames, gh, gw = grid
    tpf, dim, eps = gh * gw, cfg.dim, cfg.eps
    x, y = (torch.randn(frames, tpf, dim, generator=g, **bf) for _ in range(2))
    gate, shift, scale = (0.3 * torch.randn(frames, 6, dim, generator=g, **bf)).unsqueeze(2).unbind(1)[:3]
    out = {}
    with torch.no_grad():
        f32 = [t.float() for t in (x, y, gate, shift, scale)]
        xr, hr = wan_dit._gated_add_modulated_ln(*f32, eps)
        s = (hr.abs().amax() / fp8.FP8_MAX).reshape(())
        xo, act = fp8.residual_ln("gated_add_modulated_ln", s, True, wan_dit.DiTKernels().ops, x, y, gate, shift,
                                  scale, eps)  # on CUDA: the residual_ln kernel (the table is the fallback)
        # the kernel keeps the residual stream in the model dtype (as the bf16 model does) and normalises
        # that: the fp8 codes are compared with torch's rounding of the LayerNorm of the rounded residual
        h_rounded = wan_dit._modulated_ln(xr.to(x.dtype).float(), f32[3], f32[4], eps)
        codes = fp8.quantize_ref(h_rounded, s)
        out["residual_ln fp8"] = [_rel(act.dequantize(), hr), _same(act.data, codes), _rel(xo, xr)]
        hid = torch.randn(frames * tpf, cfg.ffn_dim, generator=g, **bf)
        gl = torch.nn.functional.gelu(hid.float(), approximate="tanh")
        sg = (gl.abs().amax() / fp8.FP8_MAX).reshape(())
        a = fp8.quantize(hid, sg, True, gelu=True)
        out["gelu+quant"] = [_rel(a.dequantize(), gl), _same(a.data, fp8.quantize_ref(gl, sg)), None]
        att = torch.randn(frames * tpf, dim, generator=g, **bf)
        sa = (att.float().abs().amax() / fp8.FP8_MAX).reshape(())
        a = fp8.quantize(att, sa, True)
        out["cast"] = [_rel(a.dequantize(), att.float()), _same(a.data, fp8.quantize_ref(att, sa)), None]
    return {"fp8_kernels": out}


def _same(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.view(torch.uint8) == b.view(torch.uint8)).float().mean())


def run_fp8(rt, device, a, runs, log=print, checkpoint=None) -> dict:
    """Steps (1)-(5) of the module docstring; ``checkpoint(partial)`` is called after each step."""
    from .bench import bench_components, bench_e2e, self_check
    from .loop import PreparedPrompt

    checkpoint = checkpoint or (lambda res: None)
    cfg = rt.models["drafter"].cfg
    prompt = PreparedPrompt("a red fox running through fresh snow", torch.randn(1, cfg.text_len, cfg.text_dim))
    calib = PreparedPrompt("calibration", torch.randn(1, cfg.text_len, cfg.text_dim,
                                                      generator=torch.Generator().manual_seed(5)))
    res = {"calib_blocks": a.calib_blocks, "weight_scaling": a.fp8_weight_scaling, "cross_kv": a.fp8_cross_kv}
    part = quantize_part(rt, "target", prompt, calib, a, log)
    res.update({"target_weights_GiB_bf16": part["weights_GiB_bf16"], "target_weights_GiB_fp8": part["weights_GiB_fp8"],
                "quantized_blocks": part["quantized_blocks"], "accuracy": part["accuracy"]})
    checkpoint(res)
    res["self_check"] = self_check(rt, device)
    res["self_check"].update(kernel_check_fp8(rt.models["target"].cfg, device))
    checkpoint(res)
    res["components"] = bench_components(rt, device, a.repeats, kinds=("target",))
    checkpoint(res)
    res["e2e"] = bench_e2e(rt, device, runs)
    if a.fp8_drafter:  # then the drafter too: both DiTs in fp8
        checkpoint(res)
        d = quantize_part(rt, "drafter", prompt, calib, a, log)
        d["self_check"] = self_check(rt, device)
        d["self_check"].update(kernel_check_fp8(rt.models["drafter"].cfg, device))
        checkpoint({**res, "drafter": d})
        d["components"] = bench_components(rt, device, a.repeats, kinds=("drafter",))
        checkpoint({**res, "drafter": d})
        d["e2e"] = bench_e2e(rt, device, runs)
        res["drafter"] = d
    return res


def _accuracy_lines(acc: dict) -> list[str]:
    lines = ["| block | flow rel err step 0 | flow rel err mean | committed latents rel err | PSNR dB | "
             "ImageReward diff |", "|---|---|---|---|---|---|"]
    for r in acc["blocks"]:
        lines.append(f"| {r['block']} | {r['flow_rel_err_step0']:.3e} | {r['flow_rel_err_mean']:.3e} | "
                     f"{r['latent_rel_err']:.3e} | {r['frames_psnr_db']:.1f} | {r['imagereward_diff']:+.3f} |")
    lines.append(f"| all | | | {acc['latents_rel_err']:.3e} | {acc['frames_psnr_db']:.1f} | "
                 f"{acc['imagereward_fp8'] - acc['imagereward_bf16']:+.3f} |")
    return lines


def markdown(res: dict, bf16_components: dict, bf16_e2e: list) -> str:
    f = res
    d = f.get("drafter") or {}
    lines = ["", f"FP8 target (e4m3, static scales calibrated on {f['calib_blocks']} blocks of these random weights, "
                 f"{f['weight_scaling']} weight scales, {f['quantized_blocks']} quantized blocks); target weights "
                 f"{f['target_weights_GiB_bf16']:.1f} GiB bf16 -> {f['target_weights_GiB_fp8']:.1f} GiB"]
    if d:
        lines.append(f"Then the drafter in fp8 too ({d['quantized_blocks']}/{d['blocks']} blocks, the same settings); "
                     f"its weights {d['weights_GiB_bf16']:.2f} GiB bf16 -> {d['weights_GiB_fp8']:.2f} GiB")
    lines.append("")
    rows = [(k, f.get("components")) for k in ("target_block_ms", "target_commit_ms")]
    rows += [(k, d.get("components")) for k in ("drafter_block_ms", "drafter_commit_ms")]
    rows = [r for r in rows if r[1]]
    if rows:
        lines += ["| component | bf16 ms | fp8 ms | fp8 / bf16 |", "|---|---|---|---|"]
        for k, c in rows:
            lines.append(f"| {k[:-3].replace('_', ' ')} | {bf16_components[k]:.1f} | {c[k]:.1f} | "
                         f"{c[k] / bf16_components[k]:.3f} |")
    if f.get("e2e"):
        both = d.get("e2e") or [None] * len(f["e2e"])
        pk = lambda r: "" if r["peak_GiB"] is None else f"{r['peak_GiB']:.1f}"  # noqa: E731
        head = "| mode | accept | bf16 fps | fp8 target fps |" + (" fp8 both fps |" if d.get("e2e") else "")
        head += " bf16 peak GiB | fp8 target peak GiB |" + (" fp8 both peak GiB |" if d.get("e2e") else "")
        lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
        for rb, rq, r2 in zip(bf16_e2e, f["e2e"], both):
            acc = "" if rq["accept_rate"] is None else f"{rq['accept_rate']:.0%}"
            fps = f"| {rq['mode']} | {acc} | {rb['fps']:.2f} | {rq['fps']:.2f} |" + (f" {r2['fps']:.2f} |" if r2 else "")
            lines.append(fps + f" {pk(rb)} | {pk(rq)} |" + (f" {pk(r2)} |" if r2 else ""))
    for label, part in (("target (target mode)", f), ("drafter (draft mode)", d)):
        if part.get("accuracy"):
            lines += ["", f"Accuracy of the fp8 {label} against bf16, the same prompt and seed:", ""]
            lines += _accuracy_lines(part["accuracy"])
    for label, part in (("", f), (" (both DiTs in fp8)", d)):
        sc = part.get("self_check")
        if sc:
            lines.append(f"\nfp8 self-check{label}, CUDA-graph replay vs eager: latents bit-identical "
                         f"{sc['latents_equal']}, frames identical {sc['frames_equal']}")
            for k, (err, same, xerr) in (sc.get("fp8_kernels") or {}).items():
                extra = "" if xerr is None else f"; its bf16 residual {xerr:.2e} relative"
                lines.append(f"- Triton `{k}` vs fp32: {err:.2e} relative after dequantization, {same:.4%} of fp8 "
                             f"codes equal to torch's rounding of the fp32 values{extra}")
    return "\n".join(lines)
