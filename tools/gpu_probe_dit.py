"""GPU probe (development): DiT block-step times vs the floor, eager vs CUDA graph, per attention backend.

Usage on the device:  python tools/gpu_probe_dit.py [--models drafter,target]
Writes $OUT/probe_dit.json and prints a table.
"""
import argparse, json, os

import torch

from gpu_common import dit_step, graph_of
from sdvg_rt.floor import cuda_time
from sdvg_rt.models.attention import set_attention_backend


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="drafter,target")
    ap.add_argument("--backends", default="cudnn,flash")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    presets = {"drafter": "wan2.1-1.3b", "target": "wan2.1-14b"}
    for kind in a.models.split(","):
        m, step, probe = dit_step(presets[kind])
        for be in a.backends.split(","):
            set_attention_backend(be)
            probe.backend = be
            for block in (0, 3, 6):
                slots = step.cache.slots(block)
                with torch.no_grad():
                    fn = lambda: step(block)
                    try:
                        te = cuda_time(fn, iters=5, warmup=2)
                    except Exception as ex:
                        res["rows"].append(dict(model=kind, backend=be, block=block, error=str(ex)[:200]))
                        print(kind, be, block, "ERROR", str(ex)[:200], flush=True)
                        continue
                    g = graph_of(fn)  # CUDA graph of one forward
                    tg = cuda_time(g.replay, iters=5, warmup=1)
                    del g
                floor = probe.forward(slots.read_end)
                row = dict(model=kind, backend=be, block=block, kv=slots.read_end, eager_ms=te * 1e3,
                           graph_ms=tg * 1e3, floor_ms=floor * 1e3, ratio_graph=tg / floor)
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
        res[f"{kind}_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        del m, step  # free the model (the step closure holds it too)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print("\n| model | attn | block | kv | eager ms | graph ms | floor ms | graph/floor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        if "error" in r:
            print(f"| {r['model']} | {r['backend']} | {r['block']} | error: {r['error'][:60]} |")
        else:
            print(f"| {r['model']} | {r['backend']} | {r['block']} | {r['kv']} | {r['eager_ms']:.1f} | "
                  f"{r['graph_ms']:.1f} | {r['floor_ms']:.1f} | {r['ratio_graph']:.2f} |")
    od = os.environ.get("OUT")
    if od:
        json.dump(res, open(os.path.join(od, "probe_dit.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
