"""Where the students' near-white pixels come from: the raw sampler output, before the clamp to [-1, 1].

The pixel panel (``cdm_core.metrics.pixel_panel``) sees clamped images, so a stroke pushed to 1.3 and one at 0.96
both count as near-white. This benchmark samples the validation set (seed 100, not the test seeds) from the teacher
and from an ablation run's EMA snapshots, and reports, next to the panel's near-white share, how much of the raw
output lies beyond the data range on either end.

    python benchmarks/pixel_range.py --runs OUT/runs/mix1-dmd-fixed-taumax07-a2@s1 --steps 100,300,1000
    python benchmarks/pixel_range.py --runs OUT/runs/A OUT/runs/B --teacher 1:4,1:100,2:50

``--runs`` are folders written by ``ablation.py train --snapshots`` (``snapshots/ema_<step>.pt``); ``--teacher``
lists guidance:steps pairs of the built-in teacher. Writes ``benchmarks/results/pixel_range.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cdm_core.metrics import near_share  # noqa: E402
from workflows.config import DEFAULT_TEACHER  # noqa: E402
from workflows.evaluation import eval_set, generate  # noqa: E402
from workflows.model_folder import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = [  # key, header, digits
    ("near_white", "near-white (panel)", 4),
    ("above_1", "raw > 1", 4),
    ("above_1_1", "raw > 1.1", 4),
    ("below_minus_1", "raw < -1", 3),
    ("band_0_9_0_95", "in (0.9, 0.95]", 4),
    ("q995", "raw q99.5", 3),
    ("max", "raw max", 2),
]


def range_stats(x: torch.Tensor) -> dict[str, float]:
    """Raw sampler output (B, C, H, W), nominally in [-1, 1]: the panel's near-white share (clamped, 28x28 centre)
    and the whole image's shares beyond the data range; the band is in [0, 1] units, clamped."""
    u = (x.clamp(-1, 1) + 1) / 2
    r = x.flatten().float()
    return {
        "near_white": near_share(x, 0.95),
        "above_1": float((r > 1).float().mean()),
        "above_1_1": float((r > 1.1).float().mean()),
        "below_minus_1": float((r < -1).float().mean()),
        "band_0_9_0_95": float(((u > 0.9) & (u <= 0.95)).float().mean()),
        "q995": float(r.quantile(0.995)),
        "max": float(r.max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="ablation run folders with snapshots/")
    ap.add_argument("--steps", default="100,300,1000", help="student steps of the snapshots to sample")
    ap.add_argument("--teacher", default="1:4", help="guidance:steps pairs of the teacher, comma separated")
    ap.add_argument("--n-samples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=100, help="the evaluation noise seed (100 = validation)")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    torch.set_num_threads(1)
    handle = load_model(DEFAULT_TEACHER)
    es = eval_set(a.n_samples, a.seed, handle.shape)
    dev = torch.device("cpu")
    steps = [int(s) for s in a.steps.split(",") if s]
    missing = [
        f"{r}/snapshots/ema_{s:06d}.pt"
        for r in a.runs
        for s in steps
        if not (Path(r) / "snapshots" / f"ema_{s:06d}.pt").exists()
    ]
    if missing:
        sys.exit("pixel_range: no such snapshot: " + ", ".join(missing))
    rows = []

    def add(name: str, kind: str, step_or_nfe: int, x: torch.Tensor) -> None:
        row = {"name": name, "kind": kind, "at": step_or_nfe, **range_stats(x)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    base = {k: v.clone() for k, v in handle.module.state_dict().items()}
    for pair in a.teacher.split(","):
        if not pair:
            continue
        g, k = pair.split(":")
        x = generate(handle.velocity(), es, int(k), handle.meta.shift, float(g), 250, dev)
        add(f"teacher, {k} steps, guidance {float(g):g}", "teacher", int(k) * (2 if float(g) != 1.0 else 1), x)
    for run in a.runs:
        for s in steps:
            handle.module.load_state_dict(torch.load(Path(run) / "snapshots" / f"ema_{s:06d}.pt", weights_only=True))
            x = generate(handle.velocity(), es, 4, handle.meta.shift, 1.0, 250, dev)
            add(Path(run).name, "student", s, x)
        handle.module.load_state_dict(base)
    out = {
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "eval_seed": a.seed,
        "n_samples": a.n_samples,
        "note": "raw sampler output before the clamp; near_white is the panel's (clamped, 28x28 centre), the other "
        "shares are of every pixel",
        "rows": rows,
    }
    od = Path(a.out)
    od.mkdir(parents=True, exist_ok=True)
    (od / "pixel_range.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [
        "# The raw range of the samples (before the clamp to [-1, 1])",
        "",
        f"`{out['command']}` ({out['machine']}, {out['date']}); evaluation seed {a.seed} (validation), "
        f"N = {a.n_samples}. Students sample 4 steps from the EMA snapshot of the given student step.",
        "",
        "| model | student step / NFE | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        md.append(f"| {r['name']} | {r['at']} | " + " | ".join(f"{r[k]:.{d}f}" for k, _, d in COLUMNS) + " |")
    (od / "pixel_range.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
