"""GPU probe: where the scorer's time goes (ImageReward v1.0 over a block's 12 decoded frames at 832x480).

    python3 tools/probes/scorer_profile.py   # after source tools/device_env.sh

As the runtime runs it: fp32 weights, TF32 matmuls and convolutions, GPU preprocessing, one CUDA graph.
Prints the graph replay time, the preprocessing alone, the kernels of one profiled replay summed by name
(top 20) and by kind, and the same forward with each SDPA backend that accepts fp32.
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_common import graph_of, kernel_times, print_kernel_times
from sdvg_rt.checkpoints.imagereward import synthetic_state_dict
from sdvg_rt.floor import cuda_time
from sdvg_rt.models.imagereward import ImageReward, ImageRewardConfig, preprocess


def kind(name: str) -> str:
    n = name.lower()
    if "fmha" in n or "attention" in n or "flash" in n or "softmax" in n:
        return "attention"
    if "gemm" in n or "nvjet" in n or "cutlass" in n or "xmma" in n or "sm90" in n or "sm80" in n:
        return "gemm / conv"
    if "upsample" in n or "interp" in n or "aa_" in n or "bicubic" in n:
        return "resize"
    if "layer_norm" in n or "layernorm" in n:
        return "layernorm"
    return "other"


def main():
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    cfg = ImageRewardConfig.preset("v1.0")
    ir = ImageReward(cfg)
    ir.load_state_dict({k: v for k, v in synthetic_state_dict(cfg, 0).items() if k in ir.state_dict()}, strict=True)
    ir = ir.to("cuda", torch.float32).eval()
    frames = torch.rand(12, 3, 480, 832, device="cuda") * 2 - 1
    ids = torch.full((1, 35), 0, dtype=torch.int64, device="cuda")
    ids[0, :6] = torch.tensor([101, 2023, 2003, 1037, 3899, 102])
    mask = (ids != 0).long()
    mask[0, 0] = 1

    @torch.no_grad()
    def score():
        return ir.score_frames(frames, ids, mask)

    @torch.no_grad()
    def prep():
        return preprocess(frames, size=cfg.image_size, mean=cfg.pixel_mean, std=cfg.pixel_std)

    g = graph_of(score)
    gp = graph_of(prep)
    print(f"score (graph replay): {cuda_time(g.replay, iters=20) * 1e3:.2f} ms; "
          f"preprocess alone: {cuda_time(gp.replay, iters=20) * 1e3:.2f} ms")
    print_kernel_times(*kernel_times(g.replay, kind), top=20)
    ref = score().clone()
    for be in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([be]):
                gb = graph_of(score)
                ms = cuda_time(gb.replay, iters=20) * 1e3
                d = (score() - ref).abs().max().item()
            print(f"SDPA {be.name}: {ms:.2f} ms, max |reward - default| {d:.2e}")
        except RuntimeError as err:
            print(f"SDPA {be.name}: not available ({str(err).splitlines()[0][:100]})")


if __name__ == "__main__":
    main()
