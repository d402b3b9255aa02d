"""GPU probe: does a VAE block decode on a second stream overlap with a 14B forward?
Both as CUDA graphs (separate pools); sequential (forward, then decode) vs concurrent (forward on one
stream, decode on another), interleaved repeats."""
import statistics

import torch

from gpu_common import fast_dit_step, graph_of, vae_block_decode

m, step, probe = fast_dit_step("wan2.1-14b")
decode = vae_block_decode()
with torch.no_grad():
    g_dit = graph_of(step)
    g_vae = graph_of(decode)
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()


def timed(fn):
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def sequential():
    g_dit.replay()
    g_vae.replay()


def concurrent():
    main = torch.cuda.current_stream()
    s1.wait_stream(main)
    s2.wait_stream(main)
    with torch.cuda.stream(s1):
        g_dit.replay()
    with torch.cuda.stream(s2):
        g_vae.replay()
    main.wait_stream(s1)
    main.wait_stream(s2)


res = {"dit alone": [], "vae alone": [], "sequential": [], "concurrent": []}
for _ in range(2):
    sequential(), concurrent()
for _ in range(5):
    res["dit alone"].append(timed(g_dit.replay))
    res["vae alone"].append(timed(g_vae.replay))
    res["sequential"].append(timed(sequential))
    res["concurrent"].append(timed(concurrent))
for k, v in res.items():
    print(f"{k:12s} median {statistics.median(v):7.1f} ms  all {[round(x, 1) for x in v]}")
print(f"peak GiB {torch.cuda.max_memory_allocated() / 2**30:.1f}")
