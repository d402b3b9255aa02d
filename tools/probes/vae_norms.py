"""GPU probe: the VAE's norm + SiLU groups as the Triton kernel (``vae_kernels.norm_silu_into``) against the
compiled groups, alone and in the block decode.

    python3 tools/probes/vae_norms.py   # after source tools/device_env.sh (a few minutes: compiles)

1. Each group at the decoder's shapes (CUDA-graph replays): ms, GB/s of the bytes it must move (x's channels
   read, the output written), and the largest difference from the eager group in bf16 ulps of the output's
   scale (the compiled group's too).
2. The block decode (3 latents -> 12 frames at 832x480, CUDA-graph replay) with the compiled groups, with the
   Triton norms (padded 96-wide convolutions, the default), and with the Triton norms without the padding:
   three interleaved rounds, the frames' max difference from the compiled decode, graph replay against eager,
   and the kernels of one profiled replay of the default by kind and the top 12 by name.
"""
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_common import graph_of, vae_block_decode
from sdvg_rt.floor import cuda_time
from sdvg_rt.models import vae_kernels, wan_vae

CL = torch.channels_last_3d
# (channels, row stride, T, H, W): the last stage's slice of the padded 128-wide output and its plain form, the
# 192 and 384 stages
SHAPES = ((96, 128, 12, 480, 832), (96, 96, 12, 480, 832), (192, 192, 12, 240, 416), (384, 384, 6, 120, 208))


def ulps(a, b):
    """max |a - b| in bf16 ulps at b's scale."""
    return ((a.float() - b.float()).abs().max() / (b.float().abs().max() * 2.0**-7)).item()


def groups():
    compiled = wan_vae.VAEKernels(compile=True)
    triton = wan_vae.VAEKernels(compile=True, triton=True)
    print(f"{'group':>24} {'C':>4} {'stride':>6} {'T x H x W':>14} | {'compiled':>17} {'ulps':>5} | "
          f"{'triton':>17} {'ulps':>5}")
    for c, width, t, h, w in SHAPES:
        y = torch.randn(1, width, t, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL)
        x = y[:, :c]
        buf = torch.empty(1, c, t + 2, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL)
        out = buf[:, :, 2:]
        gamma = (1 + 0.1 * torch.randn(c, 1, 1, 1, device="cuda")).to(torch.bfloat16)
        bias = torch.randn(c, device="cuda").to(torch.bfloat16)
        nbytes = 2 * x.numel() * 2
        for name, args in (("rms_norm_silu_into", (x, gamma, c**0.5)),
                           ("bias_rms_norm_silu_into", (x, bias, gamma, c**0.5))):
            ref = wan_vae._EAGER[name.removesuffix("_into")](*args)
            row = []
            for k in (compiled, triton):
                fn = k[name]
                g = graph_of(lambda: fn(*args, out))
                g.replay()
                torch.cuda.synchronize()
                s = cuda_time(g.replay, iters=20)
                row.append(f"{s * 1e3:6.3f} ms {nbytes / s / 1e9:5.0f} GB/s {ulps(out, ref):5.2f}")
                del g
            print(f"{name:>24} {c:4d} {width:6d} {f'{t}x{h}x{w}':>14} | " + " | ".join(row))
        del y, buf
        torch.cuda.empty_cache()


def kind(name: str) -> str:
    n = name.lower()
    if "xmma" in n or "conv" in n or "cudnn" in n:
        return "convolution"
    if name.startswith("_norm_silu"):
        return "triton norm"
    if "triton" in n:
        return "compiled groups"
    return "other"


def decodes():
    variants = {"compiled": wan_vae.VAEKernels(compile=True), "triton": wan_vae.VAEKernels(compile=True, triton=True),
                "triton, no pad": wan_vae.VAEKernels(compile=True, triton=True, pad="off")}
    decode = vae_block_decode(variants["compiled"])
    graphs, frames = {}, {}
    for label, k in variants.items():
        decode.vae.set_kernels(k)
        eager = decode().clone()
        graphs[label], out = capture(decode)
        out.zero_()
        graphs[label].replay()
        torch.cuda.synchronize()
        frames[label] = eager
        print(f"{label}: graph replay equals eager: {torch.equal(out, eager)}")
    times = {m: [] for m in graphs}
    for _ in range(3):
        for m, g in graphs.items():
            times[m].append(cuda_time(g.replay, iters=10) * 1e3)
    for m, ts in times.items():
        d = (frames[m].float() - frames["compiled"].float()).abs().max().item()
        print(f"VAE block decode, {m:14s}: " + ", ".join(f"{t:.1f}" for t in ts) + f" ms; frames max |d| {d:.4f}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graphs["triton"].replay()
        torch.cuda.synchronize()
    by_name, by_kind, counts = collections.Counter(), collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            by_name[e.name] += e.device_time / 1e3
            by_kind[kind(e.name)] += e.device_time / 1e3
            counts[e.name] += 1
    print(f"kernels (triton): {sum(by_kind.values()):.1f} ms")
    for k, t in by_kind.most_common():
        print(f"  {k:16s} {t:7.2f} ms")
    for n, t in by_name.most_common(12):
        print(f"  {t:7.2f} ms x{counts[n]:3d} {n[:120]}")


def capture(fn):
    """(a CUDA graph of ``fn()`` after two warm-up calls on a side stream, the output it writes)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def main():
    torch.backends.cudnn.benchmark = True
    assert vae_kernels.AVAILABLE
    groups()
    decodes()


if __name__ == "__main__":
    main()
