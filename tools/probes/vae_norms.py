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
3. The kernel's launch (rows per program x warps) at the decoder's shapes.
"""
import torch

from gpu_common import graph_of, graph_variants, interleaved_ms, kernel_times, print_kernel_times, vae_block_decode
from vae_convs import kind
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


def launches():
    """The kernel's launch at the decoder's shapes (with the bias): rows per program (half, once and twice
    ``vae_kernels.block_rows``) x warps, against the default (``block_rows``, ``norm_warps``)."""
    for c, width, t, h, w in SHAPES[:1] + SHAPES[2:]:
        x = torch.randn(1, width, t, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL)[:, :c]
        out = torch.empty(1, c, t, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL)
        gamma = torch.ones(c, 1, 1, 1, device="cuda", dtype=torch.bfloat16)
        bias = torch.zeros(c, device="cuda", dtype=torch.bfloat16)
        r0 = vae_kernels.block_rows(c)
        res = {}
        for r in (r0 // 2, r0, 2 * r0):
            for nw in (2, 4, 8):
                g = graph_of(lambda: vae_kernels.norm_silu_into(x, bias, gamma, 1.0, out, r, nw))
                res[r, nw] = cuda_time(g.replay, iters=20) * 1e3
                del g
        best = min(res, key=res.get)
        w0 = vae_kernels.norm_warps(c)
        print(f"launch, C {c} (stride {width}): default ({r0} rows, {w0} warps) {res[r0, w0]:.3f} ms; fastest "
              f"({best[0]} rows, {best[1]} warps) {res[best]:.3f} ms; all: "
              + ", ".join(f"{k[0]}x{k[1]} {v:.3f}" for k, v in res.items()))
        del x, out
        torch.cuda.empty_cache()


def decodes():
    variants = {"compiled": wan_vae.VAEKernels(compile=True), "triton": wan_vae.VAEKernels(compile=True, triton=True),
                "triton, no pad": wan_vae.VAEKernels(compile=True, triton=True, pad="off")}
    decode = vae_block_decode(variants["compiled"])
    graphs, frames = graph_variants(decode, variants)
    times = interleaved_ms(graphs)
    for m, ts in times.items():
        d = (frames[m].float() - frames["compiled"].float()).abs().max().item()
        print(f"VAE block decode, {m:14s}: " + ", ".join(f"{t:.1f}" for t in ts) + f" ms; frames max |d| {d:.4f}")
    print("triton (the default):")
    print_kernel_times(*kernel_times(graphs["triton"].replay, kind), top=12, width=120)


def main():
    torch.backends.cudnn.benchmark = True
    assert vae_kernels.AVAILABLE
    groups()
    decodes()
    launches()


if __name__ == "__main__":
    main()
