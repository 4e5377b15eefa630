"""Which loss term pushes where: CA's and DM's per-pixel directions on a run's own estimates, by pixel range.

A first-order reading of the student step at a checkpoint (``ablation.py train`` writes ``checkpoint.pt`` with the
student and the fake teacher). The student rolls the validation set (seed 100) out over the 4-step sampler's
levels [1, .9, .75, .5] (the fixed schedule's anchors; the last level's estimate is the sample). At each level its
estimate ``x0_hat`` is re-noised as the step does (CA at ``U(0, t)`` clamped to [tau_min, ca_tau_max or tau_max],
DM at ``U(tau_min, tau_max)``), and each term's direction ``Delta / n``, weight and alpha included (CA
``w_ca alpha (D_c - D_u) / n``, DM ``w_dm (D_R - D_F) / n``, ``n = max(mean|D_c - x0_hat|, floor)``), is averaged
over the pixels of each range of ``x0_hat``: above 1 (past the data range), (0.6, 1], (-0.6, 0.6), below -1.
A positive mean pushes those pixels brighter.

    python benchmarks/term_directions.py --runs OUT/runs/mix1-dmd-fixed-taumax07-a2@s1 OUT/runs/rec-mix1-taumax07-a4@s0

Not measured: L_CDM's term (taken at off-trajectory estimates) and a dynamic schedule's own anchors (its rows are
read at the same four levels). Writes ``benchmarks/results/term_directions.{json,md}``.
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

from cdm_core.flow import x0_from_velocity  # noqa: E402
from cdm_core.losses import ca_delta, dm_delta, normalized_direction  # noqa: E402
from cdm_core.schedule import inference_levels  # noqa: E402
from workflows.config import DEFAULT_TEACHER  # noqa: E402
from workflows.evaluation import EvalSet, eval_set  # noqa: E402
from workflows.model_folder import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RANGES = {  # name -> pixel mask of the sample x0
    "above 1": lambda x: x > 1,
    "(0.6, 1]": lambda x: (x > 0.6) & (x <= 1),
    "(-0.6, 0.6)": lambda x: (x > -0.6) & (x < 0.6),
    "below -1": lambda x: x < -1,
}


@torch.no_grad()
def directions(run: Path, real, es: EvalSet, draws: int) -> dict:
    """Per inference level of the 4-step sampler (the fixed schedule's anchors; the last one's estimate is the
    sample): the student's estimate ``x0_hat`` there, and each term's mean direction over its pixel ranges, with
    CA's tau drawn as the step draws it (``U(0, t)`` clamped to [tau_min, ca_tau_max or tau_max]) and DM's from
    ``U(tau_min, tau_max)``."""
    ck = torch.load(run / "checkpoint.pt", weights_only=False, map_location="cpu")
    cfg = json.loads((run / "curve.json").read_text())["cdm"]
    student = load_model(DEFAULT_TEACHER)
    student.module.load_state_dict(ck["student"]["module"])
    fake = load_model(DEFAULT_TEACHER)
    fake.module.load_state_dict(ck["fake"]["module"])
    rv, fv, sv = real.velocity(), fake.velocity(), student.velocity()
    n = es.noise.shape[0]
    levels = inference_levels(4, student.meta.shift)
    ca_hi = cfg["tau_max"] if cfg.get("ca_tau_max") is None else cfg["ca_tau_max"]
    g = torch.Generator().manual_seed(7)
    x = es.noise.clone()
    out = {"run": run.name, "student_steps": ck["student_steps"], "alpha": cfg["alpha"], "use_cdm": cfg["use_cdm"]}
    out["levels"] = []
    for k in range(len(levels) - 1):
        t = levels[k].expand(n)
        v = sv(x, t, es.cond)
        x0 = x0_from_velocity(x, t, v)
        acc = {r: [0.0, 0.0, 0] for r in RANGES}
        for _ in range(draws):
            tau_ca = (t * torch.rand(n, generator=g)).clamp(cfg["tau_min"], ca_hi)
            tau_dm = cfg["tau_min"] + (cfg["tau_max"] - cfg["tau_min"]) * torch.rand(n, generator=g)
            eps_ca, eps_dm = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
            ca = dm = torch.zeros_like(x0)
            if cfg["use_ca"]:  # the step's own formulas (cdm_core.losses), weight in front
                delta, d_c = ca_delta(x0, rv, es.cond, es.uncond, eps_ca, tau_ca, cfg["alpha"])
                ca = cfg["w_ca"] * normalized_direction(x0, delta, d_c, cfg["norm_floor"])[0]
            if cfg["use_dm"]:
                delta, d_r = dm_delta(x0, rv, fv, es.cond, eps_dm, tau_dm)
                dm = cfg["w_dm"] * normalized_direction(x0, delta, d_r, cfg["norm_floor"])[0]
            for r, mask in RANGES.items():
                m = mask(x0)
                acc[r][0] += float(ca[m].sum())
                acc[r][1] += float(dm[m].sum())
                acc[r][2] += int(m.sum())
        row = {"t": round(float(levels[k]), 4)}
        for r, (ca_sum, dm_sum, cnt) in acc.items():
            c = max(cnt, 1)
            row[r] = {
                "share": cnt / (draws * x0.numel()),
                "ca": ca_sum / c,
                "dm": dm_sum / c,
                "net": (ca_sum + dm_sum) / c,
            }
        out["levels"].append(row)
        x = x + (levels[k + 1] - levels[k]) * v  # the sampler's Euler step
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
    real = load_model(DEFAULT_TEACHER)
    es = eval_set(a.n_samples, a.seed, real.shape)
    rows = []
    for r in a.runs:
        rows.append(directions(Path(r), real, es, a.draws))
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
        "# CA's and DM's per-pixel directions on the students' own estimates at the sampler's levels, by pixel range",
        "",
        f"`{out['command']}` ({out['machine']}, {out['date']}); validation seed {a.seed}, N = {a.n_samples}, "
        f"{a.draws} noise draws a sample. Mean direction over the pixels of each range (positive = brighter); "
        "L_CDM's term is not included. Level t: the sampler's level whose estimate is read (0.5: the sample).",
        "",
        "| run | step | alpha | L_CDM | level t | " + " | ".join(f"{k}: share / CA / DM / net" for k in RANGES) + " |",
        "|---|---|---|---|---|" + "---|" * len(RANGES),
    ]
    for r in rows:
        for lv in r["levels"]:
            cells = [
                f"{lv[k]['share']:.3f} / {lv[k]['ca']:+.3f} / {lv[k]['dm']:+.3f} / {lv[k]['net']:+.3f}" for k in RANGES
            ]
            md.append(
                f"| {r['run']} | {r['student_steps']} | {r['alpha']:g} | {'yes' if r['use_cdm'] else 'no'} | "
                f"{lv['t']} | " + " | ".join(cells) + " |"
            )
    (od / "term_directions.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
