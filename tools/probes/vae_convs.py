"""GPU probe: where the VAE block decode's time goes, and other ways to run its 3x3x3 causal convolutions.

    python3 tools/probes/vae_convs.py [--limit N] [--no-micro]   # after source tools/device_env.sh

1. The block decode (3 latents -> 12 frames at 832x480, from a committed state, CUDA-graph replay, the
   runtime's kernels) and the kernels of one profiled replay summed by name (top 15) and by kind.
2. Per distinct 3x3x3 shape of the decoder: cuDNN's channels-last ``conv3d`` as the decoder runs it, against
   - "fold": the three time taps folded into the input channels, a 2D convolution over ``[T, H, W, 3C]``
     (the folded input is built here by a copy, timed apart),
   - "gemm": a plain GEMM ``[T*H*W, 27 C] x [27 C, Cout]`` with the same FLOPs (what an implicit GEMM at
     cuBLAS speed would take; timed over one frame, scaled by T),
   with the outputs' max difference from ``conv3d``.
``--limit N``: ``torch.backends.cudnn.benchmark_limit`` (torch's default 10 cuDNN algorithms tried per shape;
0 tries all). Set in a fresh process: autotuning results are cached per shape.
"""
import argparse

import torch
import torch.nn.functional as F

from gpu_common import graph_of, kernel_times, print_kernel_times, vae_block_decode
from sdvg_rt.floor import cuda_time

# (Cin, Cout, T, H, W) of the decoder's 3x3x3 causal convolutions for one 3-latent block at 832x480 (T without
# the 2 history frames), with how many of each
SHAPES = (
    ((384, 384, 3, 60, 104), 10),
    ((384, 384, 6, 120, 208), 5),
    ((192, 384, 6, 120, 208), 1),
    ((192, 192, 12, 240, 416), 6),
    ((96, 96, 12, 480, 832), 6),
    ((96, 128, 12, 480, 832), 0),  # the decoder's padded form of the 96-wide convolutions
)


def kind(name: str) -> str:
    n = name.lower()
    if "conv" in n or "implicit" in n or "xmma" in n or "cudnn" in n or "fprop" in n or "dgrad" in n:
        return "convolution"
    if name.startswith("_norm_silu"):
        return "triton norm"
    if "gemm" in n or "nvjet" in n or "cutlass" in n:
        return "gemm"
    if "triton" in n:
        return "compiled groups"
    return "other"


def decode_profile():
    decode = vae_block_decode()
    g = graph_of(decode)
    ms = [cuda_time(g.replay, iters=10) * 1e3 for _ in range(3)]
    print("VAE block decode (graph replay): " + ", ".join(f"{m:.1f}" for m in ms) + " ms")
    print_kernel_times(*kernel_times(g.replay, kind), width=150)
    del g, decode
    torch.cuda.empty_cache()


def micro():
    dt = torch.bfloat16
    print(f"{'Cin':>4} {'Cout':>4} {'T x H x W':>14} | {'conv3d':>14} | {'fold conv2d':>14} {'+copy':>6} "
          f"{'diff':>7} | {'gemm':>14}")
    for (cin, cout, t, h, w), n in SHAPES:
        flop = 2 * t * h * w * 27 * cin * cout
        x = torch.randn(1, cin, t + 2, h, w, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last_3d)
        wt = (torch.randn(cout, cin, 3, 3, 3, device="cuda", dtype=dt) / (27 * cin) ** 0.5).contiguous(
            memory_format=torch.channels_last_3d)
        ref = F.conv3d(x, wt, None, padding=(0, 1, 1))
        s3 = cuda_time(lambda: F.conv3d(x, wt, None, padding=(0, 1, 1)), iters=10)
        # fold: X'[t] = [x[t] | x[t+1] | x[t+2]] along channels; W'[o, (dt, c)] = W[o, c, dt]
        xt = x[0].permute(1, 2, 3, 0)  # [T+2, H, W, C], contiguous

        def fold():
            return torch.cat([xt[0:t], xt[1:t + 1], xt[2:t + 2]], dim=-1).permute(0, 3, 1, 2)

        xf = fold()
        wf = wt.permute(0, 2, 1, 3, 4).reshape(cout, 3 * cin, 3, 3).contiguous(memory_format=torch.channels_last)
        yf = F.conv2d(xf, wf, None, padding=1)
        diff = (yf.permute(1, 0, 2, 3).unsqueeze(0).float() - ref.float()).abs().max().item()
        s2 = cuda_time(lambda: F.conv2d(xf, wf, None, padding=1), iters=10)
        sc = cuda_time(fold, iters=10)
        del xf, yf
        # gemm of the same FLOPs over one frame, times T
        a = torch.randn(h * w, 27 * cin, device="cuda", dtype=dt)
        b = torch.randn(27 * cin, cout, device="cuda", dtype=dt)
        sg = cuda_time(lambda: a @ b, iters=10) * t
        del a, b, ref, x
        torch.cuda.empty_cache()

        def fmt(s):
            return f"{s * 1e3:6.2f} ms {flop / s / 1e12:4.0f}T"

        print(f"{cin:4d} {cout:4d} {f'{t}x{h}x{w}':>14} | {fmt(s3)} | {fmt(s2)} {sc * 1e3:6.2f} {diff:7.1e} | "
              f"{fmt(sg)}   (x{n} per block)")


def head_and_attention():
    """The head's 96 -> 3 convolution at 12 x 480 x 832 with its outputs padded to wider widths (zero weights),
    and the middle block's single-head attention (3 frames x 6240 positions, width 384) per SDPA backend and
    as two batched GEMMs around an fp32 softmax."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dt = torch.bfloat16
    x = torch.randn(1, 96, 14, 480, 832, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last_3d)
    w3 = (torch.randn(3, 96, 3, 3, 3, device="cuda", dtype=dt) / 50).contiguous(memory_format=torch.channels_last_3d)
    ref = F.conv3d(x, w3, None, padding=(0, 1, 1))
    for n in (3, 4, 8, 16, 32, 64):
        wp = torch.cat([w3, w3.new_zeros(n - 3, 96, 3, 3, 3)]).contiguous(memory_format=torch.channels_last_3d)
        s = cuda_time(lambda: F.conv3d(x, wp, None, padding=(0, 1, 1)), iters=10)
        d = (F.conv3d(x, wp, None, padding=(0, 1, 1))[:, :3].float() - ref.float()).abs().max().item()
        print(f"head conv 96 -> 3 computed with {n:3d} outputs: {s * 1e3:6.3f} ms (|d| {d:.1e})")
    del x
    torch.cuda.empty_cache()
    q, k, v = (torch.randn(3, 1, 6240, 384, device="cuda", dtype=dt) for _ in range(3))
    o = F.scaled_dot_product_attention(q, k, v)
    for be in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel([be]):
                s = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), iters=10)
                d = (F.scaled_dot_product_attention(q, k, v).float() - o.float()).abs().max().item()
            print(f"VAE attention, SDPA {be.name}: {s * 1e3:.3f} ms (|d| {d:.1e})")
        except RuntimeError as err:
            print(f"VAE attention, SDPA {be.name}: not available ({str(err).splitlines()[0][:80]})")

    def gemms():
        a = (q[:, 0] @ k[:, 0].transpose(1, 2)).float() * 384**-0.5
        return (a.softmax(-1).to(dt) @ v[:, 0]).unsqueeze(1)

    s = cuda_time(gemms, iters=10)
    d = (gemms().float() - o.float()).abs().max().item()
    print(f"VAE attention, bf16 GEMMs around an fp32 softmax: {s * 1e3:.3f} ms (|d| {d:.1e})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="torch.backends.cudnn.benchmark_limit")
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--head", action="store_true", help="only the head convolution and the attention")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    if args.limit is not None:
        torch.backends.cudnn.benchmark_limit = args.limit
    print(f"cuDNN {torch.backends.cudnn.version()}, benchmark_limit {torch.backends.cudnn.benchmark_limit}")
    if args.head:
        head_and_attention()
        return
    decode_profile()
    if not args.no_micro:
        micro()


if __name__ == "__main__":
    main()
