"""GPU probe 2 (development): DiT baseline vs fused QKV + compiled elementwise; VAE block decode;
ImageReward per block. Eager and CUDA-graph replay. Prints a table; JSON to $OUT/probe2.json."""
import json, os, sys, time

import torch

from gpu_common import dit_step, graph_of
from sdvg_rt.bench import random_vae
from sdvg_rt.floor import cuda_time
from sdvg_rt.models import wan_dit
from sdvg_rt.models.attention import set_attention_backend

rows = []


def log(**r):
    rows.append(r)
    print(json.dumps(r), flush=True)


def dit(kind, preset, variants):
    m, step, probe = dit_step(preset)
    cache = step.cache
    set_attention_backend("cudnn")
    ref = None
    for var in variants:
        if var == "fused":
            m.fuse_qk()
            t0 = time.time()
            wan_dit.compile_elementwise(True)
        for block in (0, 3, 6):
            slots = cache.slots(block)
            with torch.no_grad():
                fn = lambda: step(block)
                if var == "fused" and block == 0:
                    fn(); torch.cuda.synchronize()
                    log(model=kind, variant=var, compile_s=time.time() - t0)
                out = fn()
                if block == 3:
                    if ref is None:
                        ref = out.float().clone()
                    else:
                        err = ((out.float() - ref).norm() / ref.norm()).item()
                        log(model=kind, variant=var, rel_err_vs_baseline=err)
                te = cuda_time(fn, iters=5, warmup=1)
                g = graph_of(fn)
                tg = cuda_time(g.replay, iters=5, warmup=1)
                del g
            fl = probe.forward(slots.read_end)
            log(model=kind, variant=var, block=block, eager_ms=te * 1e3, graph_ms=tg * 1e3, floor_ms=fl * 1e3,
                ratio=tg / fl)
    wan_dit.compile_elementwise(False)
    m = step = cache = None  # free the model (the step closure holds it)
    torch.cuda.empty_cache()


def vae():
    from sdvg_rt.models.wan_vae import VAEStream
    dec = random_vae("wan2.1", "cpu", torch.float32).to("cuda", torch.bfloat16)  # contiguous first
    for cl in (False, True):
        if cl:
            dec.to_channels_last()
        stream = VAEStream(dec, 60, 104, torch.bfloat16, "cuda")
        z = torch.randn(1, 16, 3, 60, 104, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            stream.decode_commit(z, 0)
            fn = lambda: stream.decode_scratch(z, 1)
            torch.cuda.reset_peak_memory_stats()
            te = cuda_time(fn, iters=5, warmup=1)
            peak = torch.cuda.max_memory_allocated() / 2**30
            try:
                g = graph_of(fn)
                tg = cuda_time(g.replay, iters=5, warmup=1) * 1e3
                del g
            except Exception as ex:
                tg = f"graph failed: {str(ex)[:120]}"
        log(part="vae", channels_last=cl, eager_ms=te * 1e3, graph_ms=tg, peak_GiB=peak,
            state_GiB=stream.nbytes / 2**30)
    dec = stream = None
    torch.cuda.empty_cache()


def imagereward():
    from sdvg_rt.checkpoints.imagereward import synthetic_state_dict
    from sdvg_rt.models.imagereward import ImageReward, ImageRewardConfig
    cfg = ImageRewardConfig.preset("v1.0")
    m = ImageReward(cfg)
    sd = synthetic_state_dict(cfg, 0)
    m.load_state_dict({k: v for k, v in sd.items() if k in m.state_dict()}, strict=True)
    m = m.to("cuda", torch.bfloat16).eval()
    m.mlp.float() if hasattr(m, "mlp") else None
    frames = torch.rand(1, 3, 12, 480, 832, device="cuda") * 2 - 1
    ids = torch.randint(1000, 2000, (1, 35), device="cuda")
    ids[0, 0] = 101
    mask = torch.ones(1, 35, dtype=torch.long, device="cuda")
    with torch.no_grad():
        fn = lambda: m.score_frames(frames[0].transpose(0, 1), ids, mask)
        te = cuda_time(fn, iters=10, warmup=2)
        try:
            g = graph_of(fn)
            tg = cuda_time(g.replay, iters=10, warmup=2) * 1e3
        except Exception as ex:
            tg = f"graph failed: {str(ex)[:120]}"
    log(part="imagereward", frames=12, eager_ms=te * 1e3, graph_ms=tg)


def main():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    parts = sys.argv[1].split(",") if len(sys.argv) > 1 else ["drafter", "target", "vae", "ir"]
    for p in parts:
        try:
            if p == "drafter":
                dit("drafter", "wan2.1-1.3b", ["baseline", "fused"])
            elif p == "target":
                dit("target", "wan2.1-14b", ["baseline", "fused"])
            elif p == "vae":
                vae()
            elif p == "ir":
                imagereward()
        except Exception as ex:
            import traceback; traceback.print_exc()
            log(part=p, error=str(ex)[:300])
    print("\n| part | variant | block | eager ms | graph ms | floor ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "eager_ms" in r:
            g = r["graph_ms"]
            g = f"{g:.1f}" if isinstance(g, float) else g
            print(f"| {r.get('model', r.get('part'))} | {r.get('variant', r.get('channels_last', ''))} | "
                  f"{r.get('block', '')} | {r['eager_ms']:.1f} | {g} | {r.get('floor_ms', 0):.1f} | "
                  f"{r.get('ratio', 0):.2f} |")
    od = os.environ.get("OUT")
    if od:
        json.dump(rows, open(os.path.join(od, "probe2.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
