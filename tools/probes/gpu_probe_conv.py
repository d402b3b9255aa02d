"""GPU probe: cuDNN's channels-last 3D convolutions at the VAE's widths, and the VAE block
decode with the 96-wide convolutions computed with 128 outputs (``VAEKernels(pad=...)``) or not.

Prints (1) ms and TFLOP/s of a 3x3x3 causal conv at the last stage's 12 x 480 x 832 for output widths
3..128 (and the 192/384 stages), (2) the block decode's CUDA-graph replay with padding off / on, three
interleaved rounds, the frames' max difference, and the graph-vs-eager check. Run from tools/probes/ after
``source tools/device_env.sh`` (about a minute)::

    cd tools && python gpu_probe_conv.py
"""
import torch
import torch.nn.functional as F
from gpu_common import graph_variants, interleaved_ms, vae_block_decode

from sdvg_rt.floor import cuda_time
from sdvg_rt.models import wan_vae


def conv_widths():
    torch.backends.cudnn.benchmark = True
    for cin, couts, t, h, w in ((96, (3, 8, 16, 32, 64, 96, 112, 128), 12, 480, 832), (192, (192, 256), 12, 240, 416),
                                (384, (384,), 6, 120, 208)):
        x = torch.randn(1, cin, t + 2, h, w, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last_3d)
        for cout in couts:
            wt = torch.randn(cout, cin, 3, 3, 3, device="cuda", dtype=torch.bfloat16).to(
                memory_format=torch.channels_last_3d)
            s = cuda_time(lambda: F.conv3d(x, wt, None, padding=(0, 1, 1)), iters=10, inner=3)
            print(f"conv3d {cin:4d} -> {cout:4d} at {t}x{h}x{w}: {s * 1e3:7.3f} ms "
                  f"{2 * t * h * w * 27 * cin * cout / s / 1e12:5.0f} TFLOP/s")
        del x, wt
        torch.cuda.empty_cache()


def decode_ab():
    decode = vae_block_decode()
    graphs, frames = graph_variants(decode, {mode: wan_vae.VAEKernels(compile=True, triton=True, pad=mode)
                                             for mode in ("off", "on")})
    times = interleaved_ms(graphs)
    for m, ts in times.items():
        print(f"VAE block decode, padding {m}: " + ", ".join(f"{t:.1f}" for t in ts) + " ms")
    d = (frames["on"].float() - frames["off"].float()).abs().max().item()
    print(f"frames max |on - off| = {d:.4f}")


if __name__ == "__main__":
    conv_widths()
    decode_ab()
