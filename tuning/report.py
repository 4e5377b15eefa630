"""The sweep's results table (CSV + markdown) and plots (PNG, matplotlib Agg): metric vs each swept
parameter, and the learning curves (validation metric vs student step) of every trial."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_table(rows: list[dict], columns: list[str], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_params(
    rows: list[dict], params: list[tuple[str, str]], metric: str, out_dir: Path, best_trial: str | None
) -> list[Path]:
    """One PNG per swept parameter: the trial's last ``metric`` vs its value (x in log for loguniform)."""
    plt = _plt()
    out = []
    for path, kind in params:
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
        for stopped, marker, label in ((False, "o", "completed"), (True, "x", "stopped early")):
            pts = [
                (r[path], r[metric])
                for r in rows
                if r.get(metric) is not None and bool(r.get("stopped_early")) == stopped and r.get(path) is not None
            ]
            if pts:
                xs, ys = zip(*pts)
                if all(isinstance(x, (int, float)) for x in xs):
                    ax.scatter(xs, ys, marker=marker, label=label)
                else:
                    ax.scatter([str(x) for x in xs], ys, marker=marker, label=label)
        best = [r for r in rows if r["trial_id"] == best_trial and r.get(metric) is not None]
        if best and isinstance(best[0][path], (int, float)):
            ax.scatter([best[0][path]], [best[0][metric]], s=160, facecolors="none", edgecolors="red", label="best")
        if kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(path)
        ax.set_ylabel(f"{metric} (last reported)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out_dir / f"{metric}_vs_{path.replace('.', '_')}.png"
        fig.savefig(p)
        plt.close(fig)
        out.append(p)
    return out


def plot_learning_curves(
    curves: dict[str, list[tuple[int, float]]], metric: str, out_dir: Path, best_trial: str | None
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for tid, pts in sorted(curves.items()):
        if not pts:
            continue
        xs, ys = zip(*sorted(pts))
        ax.plot(
            xs,
            ys,
            marker=".",
            lw=2.5 if tid == best_trial else 1.0,
            label=f"{tid}{' (best)' if tid == best_trial else ''}",
        )
    ax.set_xlabel("student steps")
    ax.set_ylabel(metric)
    ax.set_title(f"validation {metric} of every trial")
    ax.grid(alpha=0.3)
    if len(curves) <= 16:
        ax.legend(fontsize=6)
    fig.tight_layout()
    p = out_dir / "learning_curves.png"
    fig.savefig(p)
    plt.close(fig)
    return p
