"""``sdvg-rt sweep``: the tau knob measured. For every prompt and seed: the target-only and draft-only
references and sdvg at each tau (same seed, so the same noise), with decisions, acceptance, wall time and
speedup against the target-only run of the same sweep, the runtime's component-time speedup estimate, and
quality (``sdvg_rt.metrics``) against the target-only video.

    sdvg-rt sweep prompts.txt --taus -1.5,-1.0,-0.7,-0.3,0 --profile profiles/paper-832x480.yaml --out sweep/
    sdvg-rt sweep prompts.txt --taus -0.7,0 --seeds 0,1 --ray auto        # one actor per GPU of a cluster

Layout of ``--out``::

    records/<unit>/<setting>.json   one atomic record per prompt x seed x setting (written last)
    videos/<unit>/<setting>.mp4     its video (unless --no-videos)
    sweep.csv, sweep.json           every record as a row; sweep.json and sweep_aggregate.csv per setting
    plots/*.png, plots/*.svg        quality vs speedup, acceptance vs tau, per-block acceptance

``<unit>`` is ``<index>-<slug>-s<seed>``; ``<setting>`` is ``target``, ``draft`` or ``tau-0.7``-style.
A re-run (the same command, or with more taus or seeds) makes only the records that are missing; a
record that exists is never rewritten. The target-only video of a unit whose other settings are missing
is generated again (the references of the remaining settings) and must match its record bit for bit.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

from .errors import OutputError, SdvgError
from .scaleout import add_ray_arguments, clean_stale, execute, placement_from_args

TARGET, DRAFT = "target", "draft"
REFERENCE_FIELDS = ("prompt", "seed", "setting", "profile", "width", "height", "frames")


# ---- settings ----------------------------------------------------------------------------------------
def setting_name(tau: float) -> str:
    if math.isinf(tau):
        return "tau+inf" if tau > 0 else "tau-inf"
    return f"tau{0.0 if tau == 0 else tau:+g}"


def parse_taus(text: str) -> list[float]:
    import argparse

    from .cli import _tau  # one rule for a tau on the command line (a number, inf or -inf; never nan)

    out = []
    for part in text.split(","):
        try:
            out.append(_tau(part))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"--taus: {e} (give e.g. -1.0,-0.7,0,inf)") from None
    if len({setting_name(t) for t in out}) != len(out):
        raise argparse.ArgumentTypeError(f"--taus: {text!r} repeats a value")
    return out


def parse_seeds(text: str) -> list[int]:
    import argparse

    from .cli import _seed

    seeds = [_seed(s) for s in text.split(",")]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds: {text!r} repeats a value")
    return seeds


def settings(taus: list[float]) -> list[tuple[str, str, float | None]]:
    """(name, mode, tau): target-only first (the reference of the others), then draft-only, then the taus."""
    return [(TARGET, "target", None), (DRAFT, "draft", None)] + [(setting_name(t), "sdvg", t) for t in taus]


def units(prompts: list[tuple[int, str]], seeds: list[int]) -> list[dict]:
    from .video import slugify

    width = max(3, len(str(len(prompts) - 1)))
    return [{"key": f"{i:0{width}d}-{slugify(text)}-s{seed}", "index": i, "line": line, "prompt": text, "seed": seed}
            for i, (line, text) in enumerate(prompts) for seed in seeds]


def frames_sha256(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


# ---- the job one worker runs ---------------------------------------------------------------------------
class SweepJob:
    """All settings of one prompt x seed on a warm Runtime; a record per setting, written atomically."""

    def __init__(self, profile, out: str, prompts: list[str], taus: list[float], metrics: list[str],
                 metric_modules: list[str], videos: bool, device: str | None = None):
        self.profile, self.out, self.prompts, self.taus = profile, Path(out), prompts, taus
        self.metric_names, self.metric_modules, self.videos, self.device = metrics, metric_modules, videos, device
        self.rt = None

    def _load(self) -> None:
        from . import metrics as qm
        from .api import Runtime

        qm.import_plugins(self.metric_modules)
        rt = Runtime.from_profile(self.profile, self.device)
        self.encoded = dict(zip(self.prompts, rt.encode_prompts(self.prompts)))
        rt.release_text_encoder()
        rt.allocate()
        if rt.device.type == "cuda":
            rt.warmup()  # CUDA graphs captured before anything is timed
        self.metrics = qm.build(self.metric_names, qm.MetricContext(self.profile, rt.device))
        self.rt = rt

    def paths(self, unit: dict, setting: str) -> tuple[Path, Path]:
        return (self.out / "records" / unit["key"] / f"{setting}.json",
                self.out / "videos" / unit["key"] / f"{setting}.mp4")

    def process(self, unit: dict, on_output=None) -> dict:
        from . import metrics as qm

        todo, target_rec = [], None
        for name, mode, tau in settings(self.taus):
            rec_path, mp4 = self.paths(unit, name)
            if rec_path.exists():
                rec = read_record(rec_path, unit, name, self.profile)
                if name == TARGET:
                    target_rec = rec
            else:
                clean_stale([rec_path, mp4])
                todo.append((name, mode, tau))
        if not todo:
            return {"made": 0}
        if self.rt is None:
            self._load()
        prompt = self.encoded[unit["prompt"]]
        ref = self.rt.generate(prompt, seed=unit["seed"], mode="target")
        ref_sha = frames_sha256(ref.frames)
        if target_rec is not None and target_rec["frames_sha256"] != ref_sha:
            raise SdvgError(
                f"the target-only video of {unit['key']} differs from the one recorded in {self.paths(unit, TARGET)[0]} "
                f"(sha256 {ref_sha[:12]} vs {target_rec['frames_sha256'][:12]}): generation is not reproducible here "
                "(another device, thread count or checkpoint?), so the remaining settings would be compared with "
                "another reference; use a new --out folder")
        made = 0
        for name, mode, tau in todo:
            res = ref if name == TARGET else self.rt.generate(prompt, seed=unit["seed"], mode=mode, tau=tau)
            quality = qm.score(self.metrics, res.frames, unit["prompt"], ref.frames)
            row = make_row(unit, name, res.stats, frames_sha256(res.frames), ref.stats, quality)
            row["quality_ratio"] = {c: bool(m.ratio) for m in self.metrics for c in m.columns}
            rec_path, mp4 = self.paths(unit, name)
            if self.videos:
                from .video import write_video

                o = self.profile.output
                mp4.parent.mkdir(parents=True, exist_ok=True)
                write_video(mp4, res.frames, o.fps, o.crf, o.preset)
                row["video"] = str(mp4.relative_to(self.out))
            from .video import atomic_write_json

            atomic_write_json(rec_path, {**row, "stats": res.stats})  # last: marks the setting done
            made += 1
            if on_output:
                on_output(1)
        return {"made": made}


def make_row(unit: dict, setting: str, stats: dict, sha: str, ref_stats: dict, quality: dict) -> dict:
    blocks = stats["blocks"]
    tot = stats["totals"]
    wall, ref_wall = stats["wall_time_s"], ref_stats["wall_time_s"]
    est = stats["target_only_estimate_s"]
    if est is None:  # draft-only: the target never ran; use the reference run's own estimate
        est = ref_stats["target_only_estimate_s"]
    return {
        "key": unit["key"], "index": unit["index"], "line": unit["line"], "prompt": unit["prompt"],
        "seed": unit["seed"], "setting": setting, "mode": stats["mode"],
        "tau": stats["tau"] if stats["mode"] == "sdvg" else None,
        "profile": stats["profile"], "device": stats["device"], "width": stats["width"], "height": stats["height"],
        "frames": stats["frames"],
        "decisions": "".join(b["decision"][0].upper() for b in blocks),
        "min_scores": [b["min_score"] for b in blocks],
        "forced": tot["forced"], "accepted": tot["accepted"], "rejected": tot["rejected"],
        "acceptance_rate": stats["acceptance_rate"],
        "wall_time_s": wall, "target_wall_time_s": ref_wall,
        "speedup": ref_wall / wall if wall > 0 else None,
        "target_only_estimate_s": est,
        "speedup_estimate": est / wall if est is not None and wall > 0 else None,
        "frames_sha256": sha,
        **quality,
        "video": None,
        "created_unix": time.time(),
    }


def read_record(path: Path, unit: dict | None = None, setting: str | None = None, profile=None) -> dict:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OutputError(f"sweep record {path} cannot be read ({e}); delete it to have it made again") from None
    expect = {}
    if unit is not None:
        expect.update(prompt=unit["prompt"], seed=unit["seed"], setting=setting)
    if profile is not None:
        expect.update(profile=profile.name, width=profile.video.width, height=profile.video.height)
    for k, v in expect.items():
        if rec.get(k) != v:
            raise OutputError(f"sweep record {path} is for {k}={rec.get(k)!r}, this sweep needs {v!r}: the --out folder "
                              "holds another sweep (other prompts file, profile or seed); use a new --out folder")
    return rec


# ---- tables -----------------------------------------------------------------------------------------
CSV_SKIP = ("min_scores", "stats", "quality_ratio")


def collect(out: Path, unit_list: list[dict], names: list[str]) -> list[dict]:
    """The records of this sweep's units and settings that exist, in order (one per file: no duplicates)."""
    rows = []
    for u in unit_list:
        for name in names:
            p = out / "records" / u["key"] / f"{name}.json"
            if p.exists():
                rec = read_record(p)
                rec.pop("stats", None)
                rows.append(rec)
    return rows


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, str))]
    return float(np.mean(xs)) if xs else None


def aggregate(rows: list[dict], names: list[str], metric_info: dict[str, bool]) -> list[dict]:
    """Per setting: counts, mean acceptance, throughput speedups (sums of times) and mean quality; for each
    quality column its retention against target-only (ratio for ``ratio`` metrics, else difference)."""
    by = {n: [r for r in rows if r["setting"] == n] for n in names}
    out, tgt = [], {}
    for n in names:
        rs = by[n]
        if not rs:
            continue
        wall = sum(r["wall_time_s"] for r in rs)
        ref = sum(r["target_wall_time_s"] for r in rs)
        ests = [r["target_only_estimate_s"] for r in rs]
        judged = sum(r["accepted"] + r["rejected"] for r in rs)
        agg = {"setting": n, "mode": rs[0]["mode"], "tau": _num(rs[0]["tau"]), "rows": len(rs),
               "acceptance_rate": (sum(r["accepted"] for r in rs) / judged) if judged else None,
               "mean_acceptance_rate": _mean([r["acceptance_rate"] for r in rs]),
               "wall_time_s": wall, "target_wall_time_s": ref, "speedup": ref / wall if wall > 0 else None,
               "speedup_estimate": (sum(ests) / wall) if None not in ests and wall > 0 else None}
        for col in metric_info:
            agg[col] = _mean([_num(r.get(col)) for r in rs])
        if n == TARGET:
            tgt = agg
        out.append(agg)
    for agg in out:
        for col, ratio in metric_info.items():
            q, t = agg[col], tgt.get(col)
            if q is None or t is None or not (math.isfinite(q) and math.isfinite(t)):
                agg[f"{col}_retention"] = None
            elif ratio:
                agg[f"{col}_retention"] = q / t if t else None
            else:
                agg[f"{col}_retention"] = q - t
    return out


def _num(v):
    if isinstance(v, str):  # JSON's non-finite floats
        return {"inf": math.inf, "-inf": -math.inf}.get(v)
    return v


def write_tables(out: Path, rows: list[dict], agg: list[dict], config: dict) -> None:
    from .video import atomic_write_bytes, atomic_write_json

    atomic_write_json(out / "sweep.json", {"config": config, "rows": rows, "aggregate": agg})
    for name, table in (("sweep.csv", rows), ("sweep_aggregate.csv", agg)):
        cols = [c for c in (table[0] if table else {}) if c not in CSV_SKIP]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in table:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        atomic_write_bytes(out / name, buf.getvalue().encode("utf-8"))


# ---- the command -----------------------------------------------------------------------------------
def cmd_sweep(args) -> int:
    from tqdm import tqdm

    from . import metrics as qm
    from .cli import _demo_profile, read_prompts
    from .profiles import load_profile

    prompts, blank = read_prompts(args.prompts)
    if blank:
        print(f"skipping {len(blank)} blank line(s) in {args.prompts}", file=sys.stderr)
    out = Path(args.out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot use {out} as the sweep folder ({e.strerror}); give --out a writable folder") from None
    if not args.no_plots:
        from .sweep_plots import require_matplotlib

        require_matplotlib()
    metric_names = [m for m in args.metrics.split(",") if m]
    qm.import_plugins(args.metrics_module)
    known = qm.available()
    unknown = [m for m in metric_names if m not in known]
    if unknown:
        raise SdvgError(f"unknown quality metric(s) {unknown}; available: {', '.join(sorted(known))}")
    prof = load_profile(args.profile) if args.profile else _demo_profile({})
    seeds = args.seeds if args.seeds is not None else [prof.sampling.seed]
    unit_list = units(prompts, seeds)
    names = [s[0] for s in settings(args.taus)]
    done = len(collect(out, unit_list, names))
    total = len(unit_list) * len(names)
    if done:
        print(f"{done} of {total} record(s) already in {out}; making the other {total - done}", file=sys.stderr)
    from .placement import for_worker

    make_job = functools.partial(SweepJob, for_worker(prof) if args.ray is not None else prof, str(out),
                                 sorted({u["prompt"] for u in unit_list}), args.taus,
                                 metric_names, args.metrics_module, not args.no_videos,
                                 None if args.ray is not None else args.device)
    t0 = time.perf_counter()
    with tqdm(total=total, initial=done, desc="sweep", unit="video", file=sys.stderr, disable=args.quiet) as bar:
        def tick():  # Ray: the records on the shared folder are the progress
            bar.update(len(collect_paths(out, unit_list, names)) - bar.n)
        rep = execute(unit_list, make_job, use_ray=args.ray is not None, ray_address=args.ray,
                      placement=placement_from_args(args, prof) if args.ray is not None else None,
                      on_output=bar.update, on_tick=tick)
        tick()
    rows = collect(out, unit_list, names)
    probe: dict[str, bool] = {}  # quality column -> ratio retention, as the records say
    for r in rows:
        probe.update(r.get("quality_ratio", {}))
    agg = aggregate(rows, names, probe)
    config = {"prompts_file": str(args.prompts), "profile": prof.name,
              "profile_path": str(prof.path) if prof.path else None, "taus": args.taus, "seeds": seeds,
              "settings": names, "metrics": metric_names, "units": len(unit_list), "records": len(rows),
              "run_time_s": time.perf_counter() - t0, "ray": args.ray, "retries": rep.retries}
    write_tables(out, rows, agg, config)
    if not args.no_plots:
        from .sweep_plots import plot_all

        plot_all(out / "plots", rows, agg, probe)
    print(f"sweep: {len(rows)} record(s) ({len(rows) - done} new) -> {out}/sweep.csv, sweep.json"
          + ("" if args.no_plots else ", plots/"), file=sys.stderr)
    for a in agg:
        sp = a["speedup"]
        print(f"  {a['setting']:>9s}  acceptance {_fmt(a['acceptance_rate'], '.0%')}  speedup {_fmt(sp, '.2f')}x"
              + "".join(f"  {c} {_fmt(a[c], '.3f')}" for c in probe), file=sys.stderr)
    return 0


def collect_paths(out: Path, unit_list: list[dict], names: list[str]) -> list[Path]:
    return [p for u in unit_list for n in names if (p := out / "records" / u["key"] / f"{n}.json").exists()]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def add_parser(sub) -> None:
    from .metrics import DEFAULT_METRICS

    s = sub.add_parser("sweep", help="target-only, draft-only and sdvg at each tau per prompt: CSV, JSON, plots",
                       description="Measure the tau knob: speed, acceptance and quality against target-only.")
    s.add_argument("prompts", help="UTF-8 text file, one prompt per line (blank lines are skipped)")
    s.add_argument("--taus", type=parse_taus, default=parse_taus("-1.5,-1.0,-0.7,-0.3,0"),
                   help="comma-separated thresholds (default -1.5,-1.0,-0.7,-0.3,0; inf and -inf allowed)")
    s.add_argument("--profile", help="profile YAML (default: the tiny synthetic demo)")
    s.add_argument("--seeds", type=parse_seeds, help="comma-separated seeds (default: the profile's sampling.seed)")
    s.add_argument("--out", default="sweep", help="output folder (default: sweep/)")
    s.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"quality metrics (default {','.join(DEFAULT_METRICS)}; see sdvg_rt.metrics)")
    s.add_argument("--metrics-module", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers more metrics); repeatable")
    s.add_argument("--no-videos", action="store_true", help="records only, no mp4 per setting")
    s.add_argument("--no-plots", action="store_true", help="no matplotlib plots")
    s.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available; ignored with --ray)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_arguments(s)
    # `--taus -1.5,-1.0` as written in the docs: argparse would take "-1.5,-1.0" for an option, because
    # only a single negative number counts as a value by default
    s._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-(\d|\.\d|inf)[0-9a-z.+,-]*$")
    s.set_defaults(func=cmd_sweep)
