"""The sweep's plots (matplotlib, the optional ``sweep`` extra), each as PNG and SVG under ``plots/``:

- ``pareto_<column>``: a quality column (mean over prompts and seeds) against the measured speedup over
  target-only, one point per setting: the taus joined in order and labelled, target-only (1x) and
  draft-only marked; hollow points are the runtime's component-time speedup estimate. For ``ratio``
  metrics the right axis reads as % of target-only.
- ``acceptance_vs_tau``: acceptance rate (accepted / judged blocks) against tau.
- ``block_acceptance``: per block index, the share of prompts whose draft was accepted, one line per tau.
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import DependencyError


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DependencyError("sweep plots need matplotlib: pip install 'sdvg-rt[sweep]' (or pass --no-plots)") from None
    return plt


def _save(fig, folder: Path, name: str) -> None:
    from .video import atomic_write_bytes
    import io

    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None)
        atomic_write_bytes(folder / f"{name}.{ext}", buf.getvalue())


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_all(folder: Path, rows: list[dict], agg: list[dict], quality: dict[str, bool]) -> list[str]:
    """Writes every plot; returns their names (without extension)."""
    plt = require_matplotlib()
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    by = {a["setting"]: a for a in agg}
    taus = sorted((a for a in agg if a["mode"] == "sdvg" and isinstance(a["tau"], (int, float))),
                  key=lambda a: a["tau"])
    for col, ratio in quality.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        pts = [(a["speedup"], a[col], a) for a in taus if _finite(a["speedup"]) and _finite(a[col])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C0", label="sdvg (tau)")
            for k, (x, y, a) in enumerate(pts):  # staggered, so labels of coinciding points stay readable
                ax.annotate(f"tau={a['tau']:g}", (x, y), textcoords="offset points", xytext=(5, 5 + 9 * (k % 3)),
                            fontsize=8)
            est = [(a["speedup_estimate"], a[col]) for a in taus if _finite(a["speedup_estimate"]) and _finite(a[col])]
            if est:
                ax.plot(*zip(*est), "o", mfc="none", color="C0", alpha=0.5, label="sdvg, component-time estimate")
        for name, marker, color, label in (("target", "*", "C2", "target-only"), ("draft", "X", "C3", "draft-only")):
            a = by.get(name)
            if a and _finite(a["speedup"]) and _finite(a[col]):
                ax.plot([a["speedup"]], [a[col]], marker, color=color, markersize=12, label=label)
        t = by.get("target", {}).get(col)
        if _finite(t):
            ax.axhline(t, color="C2", lw=0.8, ls="--")
            if ratio and t:
                sec = ax.secondary_yaxis("right", functions=(lambda y, t=t: 100 * y / t, lambda p, t=t: p * t / 100))
                sec.set_ylabel("% of target-only")
        ax.set_xlabel("speedup over target-only (measured wall time)")
        ax.set_ylabel(f"{col} (mean over prompts)")
        ax.set_title(f"{col} vs speedup")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, folder, f"pareto_{col}")
        plt.close(fig)
        made.append(f"pareto_{col}")

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pts = [(a["tau"], a["acceptance_rate"]) for a in taus if _finite(a["tau"]) and a["acceptance_rate"] is not None]
    if pts:
        ax.plot(*zip(*pts), "o-")
    ax.set_xlabel("tau (worst-frame ImageReward threshold)")
    ax.set_ylabel("acceptance rate (accepted / judged blocks)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("acceptance vs tau")
    ax.grid(alpha=0.3)
    _save(fig, folder, "acceptance_vs_tau")
    plt.close(fig)
    made.append("acceptance_vs_tau")

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for a in taus:
        rs = [r for r in rows if r["setting"] == a["setting"]]
        n = max((len(r["decisions"]) for r in rs), default=0)
        xs, ys = [], []
        for b in range(1, n):  # block 0 is always the target's
            judged = [r["decisions"][b] for r in rs if len(r["decisions"]) > b and r["decisions"][b] in "AR"]
            if judged:
                xs.append(b)
                ys.append(sum(d == "A" for d in judged) / len(judged))
        if xs:
            ax.plot(xs, ys, "o-", label=f"tau={a['tau']:g}")
    ax.set_xlabel("block index (block 0 is always the target's)")
    ax.set_ylabel("share of prompts whose draft was accepted")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("per-block acceptance")
    ax.grid(alpha=0.3)
    if taus:
        ax.legend(fontsize=8)
    _save(fig, folder, "block_acceptance")
    plt.close(fig)
    made.append("block_acceptance")
    return made
