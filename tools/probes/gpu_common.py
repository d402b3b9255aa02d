"""Shared setup of the development GPU probes (tools/gpu_probe*.py): one DiT block step at 832x480 with
full-size random weights and a filled cache, and CUDA-graph capture of a callable."""
import torch

from sdvg_rt.bench import random_dit, random_vae
from sdvg_rt.floor import FloorProbe
from sdvg_rt.kv_cache import KVCache

TPF, FPB = 1560, 3  # tokens per latent frame, latent frames per block (832x480)


def dit_step(preset: str, block: int = 3, t: float = 937.5):
    """(model, step, floor_ms): ``step()`` is one cached forward of ``block`` over a random 21-frame cache;
    ``floor_ms(read_end)`` the floor of the same shapes. ``step.slots`` is the block's cache slots."""
    m = random_dit(preset, "cuda", torch.bfloat16)
    c = m.cfg
    cache = KVCache(c.num_layers, c.num_heads, c.head_dim, TPF, FPB, 21, 0, torch.bfloat16, "cuda")
    cache.kv.normal_()
    ctx_kv = m.prepare_context(torch.randn(1, c.text_len, c.text_dim, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(1, c.in_dim, FPB, 60, 104, device="cuda", dtype=torch.bfloat16)
    tt = torch.full((FPB,), t, device="cuda")

    def step(block=block):
        return m(x, tt, ctx_kv, cache.kv, cache.slots(block))

    probe = FloorProbe(c.dim, c.ffn_dim, c.num_layers, c.num_heads, FPB * TPF)
    step.cache = cache
    return m, step, probe


def fast_dit_step(preset: str, block: int = 3):
    """``dit_step`` on the runtime's GPU fast path: cuDNN attention, fused QKV, the compiled elementwise
    groups (the DiT's Triton kernels)."""
    from sdvg_rt.models.attention import Attention
    from sdvg_rt.models.wan_dit import DiTKernels

    m, step, probe = dit_step(preset, block)
    m.set_attention(Attention("cudnn"))
    m.fuse_qk().set_kernels(DiTKernels(triton=True, compile=True))
    return m, step, probe


def vae_block_decode(kernels=None):
    """``decode()``: the full-size VAE (channels-last, cuDNN autotuning, ``kernels``: by default the runtime's,
    Triton norms and the other groups compiled) decoding a random 3-latent block from a committed state, into
    the scratch state (what every draft costs). ``decode.vae`` is the model (``decode.vae.set_kernels(...)``
    switches its kernels)."""
    from sdvg_rt.backends.torch_backend import vae_decoder
    from sdvg_rt.models.wan_vae import VAEKernels

    torch.backends.cudnn.benchmark = True  # this probe process's setting (the runtime's steps: MathFlags)
    vae = random_vae("wan2.1", "cuda", torch.bfloat16).set_kernels(kernels or VAEKernels(compile=True, triton=True))
    stream = vae_decoder(vae, 60, 104, torch.bfloat16, "cuda")
    z = torch.randn(1, 16, FPB, 60, 104, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        stream.decode_commit(z, 0)

    @torch.no_grad()
    def decode():
        return stream.decode_scratch(z, 1)

    decode.vae = vae
    return decode


def capture(fn):
    """(a CUDA graph of ``fn()`` after two warm-up calls on a side stream, the output the graph writes)."""
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


def graph_of(fn):
    """A CUDA graph of ``fn()`` after two warm-up calls on a side stream."""
    return capture(fn)[0]


def graph_variants(decode, variants: dict):
    """For each ``label: VAEKernels`` of ``variants``: ``decode`` (``vae_block_decode``) with those kernels run
    eagerly, then captured; prints whether the graph's replay equals the eager frames. Returns (graphs, eager
    frames), both by label."""
    graphs, frames = {}, {}
    for label, kernels in variants.items():
        decode.vae.set_kernels(kernels)
        frames[label] = decode().clone()
        graphs[label], out = capture(decode)
        out.zero_()
        graphs[label].replay()
        torch.cuda.synchronize()
        print(f"{label}: graph replay equals eager: {torch.equal(out, frames[label])}")
    return graphs, frames


def interleaved_ms(graphs: dict, rounds: int = 3, iters: int = 10) -> dict:
    """Replay times (ms, the median of ``iters``) of each graph, ``rounds`` rounds interleaved: {label: [ms]}."""
    from sdvg_rt.floor import cuda_time

    times = {label: [] for label in graphs}
    for _ in range(rounds):
        for label, g in graphs.items():
            times[label].append(cuda_time(g.replay, iters=iters) * 1e3)
    return times


def kernel_times(run, kind):
    """The CUDA kernels of one profiled ``run()``: (ms by name, calls by name, ms by ``kind(name)``)."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    by_name, counts, by_kind = collections.Counter(), collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            t = e.device_time / 1e3
            by_name[e.name] += t
            counts[e.name] += 1
            by_kind[kind(e.name)] += t
    return by_name, counts, by_kind


def print_kernel_times(by_name, counts, by_kind, top: int = 15, width: int = 140) -> None:
    """``kernel_times``' result as a table: the total, each kind with its share, the ``top`` kernels."""
    total = sum(by_kind.values())
    print(f"kernels: {total:.2f} ms in all")
    for k, t in by_kind.most_common():
        print(f"  {k:16s} {t:7.2f} ms {100 * t / total:5.1f}%")
    for n, t in by_name.most_common(top):
        print(f"  {t:7.3f} ms x{counts[n]:3d} {n[:width]}")
