"""GPU probe: A/B of the VAE block decode's pass removals on one machine, interleaved.

The decode of ``gpu_common.vae_block_decode`` (full-size Wan2.1 VAE, bf16, channels-last, compiled norms,
cuDNN autotuning; a 3-latent block 1 from a committed state into the scratch state), in these variants
(all the same function; frames differ by bf16 rounding only):

- ``before``: the pass structure before this change: the compiled norm writes x, then a copy puts it
  after the history (was ``cat([history, x])``); ``time_conv``'s bias and the frame interleave as two
  passes; nearest 2x upsample + 3x3 conv (the shortcut-bias fold and static widths stay on);
- ``before + sub-pixel 3x3``: the same with the sub-pixel upsample alone;
- ``fused``: ``[history | x]`` written by the norm's kernel, bias + interleave in one kernel; upsample;
- ``fused + sub-pixel 3x3``: the sub-pixel upsample as one 3x3 conv of the low-resolution frames;
- ``fused + sub-pixel 2x2``: the 2x2 form (4/9 of the 3x3 form's FLOPs in the resample convs), the
  default GPU fast path (``VAEKernels(subpixel="auto")``).

Prints ms per decode (median of each round, rounds interleaved), the peak memory of one decode, the max
abs difference of the frames from ``before``, and a torch.profiler kernel table of the fastest variant.
Run from tools/probes/ after ``source tools/device_env.sh`` (about 1-2 minutes, compilation included)::

    cd tools && python gpu_probe_vae_ab.py
"""
import statistics
import sys
import time

import torch
from sdvg_rt.models import wan_vae

ROUNDS, ITERS, WARMUP = 3, 5, 1


def _split_store(inner):
    """The old pass structure of a ``*_into`` group: ``inner`` (compiled) writes x, then x is copied into
    the frames after the history (what ``cat([history, x])`` did before)."""

    def group(*args):
        *args, out = args
        out.copy_(inner(*args))

    return group


def variants(fused: wan_vae.VAEKernels) -> dict:
    """name -> (replaced groups, sub-pixel mode); ``fused`` = the compiled kernels."""
    before = {
        "rms_norm_silu_into": _split_store(fused["rms_norm_silu"]),
        "bias_rms_norm_silu_into": _split_store(fused["bias_rms_norm_silu"]),
        "bias_interleave": wan_vae._EAGER["bias_interleave"],  # eager: bias add, then the interleave copy
    }
    return {
        "before": (before, "off"),
        "before + sub-pixel 3x3": (before, "3x3"),
        "fused": ({}, "off"),
        "fused + sub-pixel 3x3": ({}, "3x3"),
        "fused + sub-pixel 2x2": ({}, "2x2"),
    }


def use(decode, fused: wan_vae.VAEKernels, variant: tuple) -> None:
    """``decode``'s model computes with ``fused`` with the variant's groups replaced, in its sub-pixel mode
    (the compiled groups are reused: torch.compile caches per function)."""
    ops, mode = variant
    decode.vae.set_kernels(wan_vae.VAEKernels(compile=True, subpixel=mode, ops={**fused.ops, **ops}))


def ab(decode, timer, rounds: int = ROUNDS, log=print) -> tuple[dict, dict, dict]:
    """Warm up every variant (compiles, cuDNN autotuning) and keep its frames, then time the variants
    interleaved ``rounds`` times (``decode.vae``: the model). Returns (ms lists, frames, peak bytes or None)
    per variant."""
    fused = decode.vae.kernels
    vs = variants(fused)
    frames, peak = {}, {}
    cuda = torch.cuda.is_available()
    for name, v in vs.items():
        t = time.time()
        use(decode, fused, v)
        decode()
        decode()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        frames[name] = decode().float()
        peak[name] = torch.cuda.max_memory_allocated() if cuda else None
        log(f"  warm-up {name}: {time.time() - t:.1f} s")
    ms = {k: [] for k in vs}
    for _ in range(rounds):
        for name, v in vs.items():
            use(decode, fused, v)
            ms[name].append(timer(decode) * 1e3)
    decode.vae.set_kernels(fused)  # leave the default fast path in place
    return ms, frames, peak


def report(ms: dict, frames: dict, peak: dict, log=print) -> str:
    """Prints the table; returns the fastest variant's name."""
    ref = frames["before"]
    base = statistics.median(ms["before"])
    log("| variant | median ms | min ms | rounds | vs before | peak GiB | max abs diff of frames vs before |")
    log("|---|---|---|---|---|---|---|")
    for name, v in ms.items():
        med = statistics.median(v)
        diff = (frames[name] - ref).abs().max().item()
        gib = "" if peak[name] is None else f"{peak[name] / 2**30:.2f}"
        log(f"| {name} | {med:.1f} | {min(v):.1f} | {' '.join(f'{a:.1f}' for a in v)} | {med / base:.3f} | "
            f"{gib} | {diff:.3g} |")
    return min(ms, key=lambda k: statistics.median(ms[k]))


def _self_device_us(event) -> float:
    """Self GPU time of a profiler row in us (``self_device_time_total``; older torch: ``self_cuda_...``)."""
    for key in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, key, None)
        if value is not None:
            return value
    return 0.0


def main() -> None:
    from gpu_common import vae_block_decode
    from sdvg_rt.floor import cuda_time
    from torch.profiler import ProfilerActivity, profile

    t0 = time.time()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    decode = vae_block_decode(wan_vae.VAEKernels(compile=True))  # compiled groups, block 0 decoded and committed
    print(f"setup {time.time() - t0:.1f} s", flush=True)
    fused = decode.vae.kernels  # the compiled groups
    ms, frames, peak = ab(decode, lambda fn: cuda_time(fn, iters=ITERS, warmup=WARMUP))
    best = report(ms, frames, peak)
    use(decode, fused, variants(fused)[best])
    print(f"\nkernel profile of the fastest variant, {best!r} (3 decodes; times are totals over the 3)", flush=True)
    with torch.no_grad():
        decode()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                decode()
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=90))
    total = sum(_self_device_us(e) for e in events) / 3 / 1e3
    print(f"GPU time per decode in the profile: {total:.1f} ms; probe total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_probe_vae_ab.py needs a CUDA device")
    main()
