"""Which loss term pushes where: CA's and DM's per-pixel directions on a run's own samples, by pixel range.

A first-order reading of the student step at a checkpoint (``ablation.py train`` writes ``checkpoint.pt`` with the
student and the fake teacher): the student's 4-step samples of the validation set (seed 100) are re-noised at
``tau ~ U(tau_min, tau_max)`` (DM's levels; the step draws CA's below the anchor's t, here both share one
draw), and each term's direction ``Delta / n`` (weights and alpha
included: CA ``w_ca alpha (D_c - D_u) / n``, DM ``w_dm (D_R - D_F) / n``, ``n = max(mean|D_c - x0|, floor)``) is
averaged over the pixels of each range of the sample: above 1 (past the data range), (0.6, 1], (-0.6, 0.6),
below -1. A positive mean pushes those pixels brighter.

    python benchmarks/term_directions.py --runs OUT/runs/mix1-dmd-fixed-taumax07-a2@s1 OUT/runs/rec-mix1-taumax07-a4@s0

Not measured: L_CDM's term (it is taken at off-trajectory estimates, not at the samples) and the anchors'
estimates the step trains on (these are the final samples). Writes ``benchmarks/results/term_directions.{json,md}``.
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

from cdm_core.conditioning import Cond  # noqa: E402
from cdm_core.flow import interpolate, x0_from_velocity  # noqa: E402
from workflows.config import DEFAULT_TEACHER  # noqa: E402
from workflows.evaluation import eval_set, generate  # noqa: E402
from workflows.model_folder import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RANGES = {  # name -> pixel mask of the sample x0
    "above 1": lambda x: x > 1,
    "(0.6, 1]": lambda x: (x > 0.6) & (x <= 1),
    "(-0.6, 0.6)": lambda x: (x > -0.6) & (x < 0.6),
    "below -1": lambda x: x < -1,
}


@torch.no_grad()
def directions(run: Path, n: int, draws: int, seed: int) -> dict:
    ck = torch.load(run / "checkpoint.pt", weights_only=False, map_location="cpu")
    cfg = json.loads((run / "curve.json").read_text())["cdm"]
    real = load_model(DEFAULT_TEACHER)
    student = load_model(DEFAULT_TEACHER)
    student.module.load_state_dict(ck["student"]["module"])
    fake = load_model(DEFAULT_TEACHER)
    fake.module.load_state_dict(ck["fake"]["module"])
    rv, fv = real.velocity(), fake.velocity()
    es = eval_set(n, seed, real.shape)
    x0 = generate(student.velocity(), es, 4, student.meta.shift, 1.0, 250, torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    acc = {k: [0.0, 0.0, 0] for k in RANGES}
    for _ in range(draws):
        tau = cfg["tau_min"] + (cfg["tau_max"] - cfg["tau_min"]) * torch.rand(n, generator=g)
        z = interpolate(x0, torch.randn(x0.shape, generator=g), tau)
        v = rv(torch.cat([z, z]), torch.cat([tau, tau]), Cond.cat([es.cond, es.uncond]))
        d_c, d_u = x0_from_velocity(z, tau, v[:n]), x0_from_velocity(z, tau, v[n:])
        d_f = x0_from_velocity(z, tau, fv(z, tau, es.cond))
        norm = (d_c - x0).abs().flatten(1).mean(1).clamp_min(cfg["norm_floor"]).view(-1, *[1] * (x0.ndim - 1))
        ca = cfg["w_ca"] * cfg["alpha"] * (d_c - d_u) / norm if cfg["use_ca"] else torch.zeros_like(x0)
        dm = cfg["w_dm"] * (d_c - d_f) / norm if cfg["use_dm"] else torch.zeros_like(x0)
        for k, mask in RANGES.items():
            m = mask(x0)
            acc[k][0] += float(ca[m].sum())
            acc[k][1] += float(dm[m].sum())
            acc[k][2] += int(m.sum())
    out = {"run": run.name, "student_steps": ck["student_steps"], "alpha": cfg["alpha"], "use_cdm": cfg["use_cdm"]}
    for k, (ca_sum, dm_sum, cnt) in acc.items():
        c = max(cnt, 1)
        out[k] = {"share": cnt / (draws * x0.numel()), "ca": ca_sum / c, "dm": dm_sum / c, "net": (ca_sum + dm_sum) / c}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="ablation run folders with checkpoint.pt")
    ap.add_argument("--n-samples", type=int, default=200)
    ap.add_argument("--draws", type=int, default=8, help="noise draws (tau, eps) per sample")
    ap.add_argument("--seed", type=int, default=100, help="the evaluation noise seed (100 = validation)")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    torch.set_num_threads(1)
    bad = [r for r in a.runs if not (Path(r) / "checkpoint.pt").exists() or not (Path(r) / "curve.json").exists()]
    if bad:
        sys.exit("term_directions: no checkpoint.pt / curve.json in " + ", ".join(bad))
    rows = []
    for r in a.runs:
        rows.append(directions(Path(r), a.n_samples, a.draws, a.seed))
        print(json.dumps(rows[-1]), flush=True)
    out = {
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "eval_seed": a.seed,
        "n_samples": a.n_samples,
        "draws": a.draws,
        "rows": rows,
    }
    od = Path(a.out)
    od.mkdir(parents=True, exist_ok=True)
    (od / "term_directions.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [
        "# CA's and DM's per-pixel directions on the students' own samples, by pixel range",
        "",
        f"`{out['command']}` ({out['machine']}, {out['date']}); validation seed {a.seed}, N = {a.n_samples}, "
        f"{a.draws} noise draws a sample. Mean direction over the pixels of each range (positive = brighter); "
        "L_CDM's term is not included.",
        "",
        "| run | step | alpha | L_CDM | " + " | ".join(f"{k}: share / CA / DM / net" for k in RANGES) + " |",
        "|---|---|---|---|" + "---|" * len(RANGES),
    ]
    for r in rows:
        cells = [f"{r[k]['share']:.3f} / {r[k]['ca']:+.3f} / {r[k]['dm']:+.3f} / {r[k]['net']:+.3f}" for k in RANGES]
        md.append(
            f"| {r['run']} | {r['student_steps']} | {r['alpha']:g} | {'yes' if r['use_cdm'] else 'no'} | "
            + " | ".join(cells)
            + " |"
        )
    (od / "term_directions.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
