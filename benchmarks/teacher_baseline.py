"""Baseline table of the built-in teacher: Euler at 100, 28, 8, 4, 2, 1 steps, with and without CFG.

    python benchmarks/teacher_baseline.py --device cuda            # the committed table (GPU)
    python benchmarks/teacher_baseline.py --n-samples 500 --seeds 0 --out /tmp/tb   # quick CPU check

The CFG scale of the "best CFG" rows is chosen on a *validation* noise seed (``--val-seed``, not one of
the reported seeds) at 28 steps, by FD; the rows are then reported on the evaluation seeds. Writes
``teacher.json`` (schema in the Foundation issue), ``teacher.md`` and one PNG grid per row.

Resumable: every finished row (and every validation score) is appended to ``teacher_rows.jsonl`` in
``--out``, keyed by the teacher's content hash, N, the seeds and the validation seed; a rerun skips them.
Two processes can share the work on CPU, then a third call assembles the table without sampling:

    python benchmarks/teacher_baseline.py --n-samples 1000 --steps 100 --out R &
    python benchmarks/teacher_baseline.py --n-samples 1000 --steps 28,8,4,2,1 --out R; wait
    python benchmarks/teacher_baseline.py --n-samples 1000 --out R
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from workflows.config import DEFAULT_EVALUATOR, DEFAULT_TEACHER, EvalConfig, build  # noqa: E402
from workflows.evaluation import METRICS, evaluate_folder, folder_hash  # noqa: E402
from workflows.model_folder import load_transformer  # noqa: E402


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    ap.add_argument("--evaluator", default=str(DEFAULT_EVALUATOR))
    ap.add_argument("--steps", default="100,28,8,4,2,1")
    ap.add_argument("--cfg-grid", default="1.25,1.5,2,3,4")
    ap.add_argument("--val-seed", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-samples", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    model = load_transformer(a.teacher, a.device)

    def ev(steps: int, cfg: float, seeds_: list[int], grid: Path | None) -> dict:
        c = build(EvalConfig, dict(steps=steps, guidance=cfg, n_samples=a.n_samples, seeds=seeds_,
                                   batch_size=a.batch_size, reference_steps=100, device=a.device))
        return evaluate_folder(a.teacher, c, grid, a.teacher, a.evaluator, model=model)

    t0 = time.time()
    log = out / "teacher_rows.jsonl"
    key = {"teacher": folder_hash(a.teacher), "n_samples": a.n_samples, "seeds": seeds, "val_seed": a.val_seed}

    def done() -> dict:
        """Entries finished by this or an earlier (or a parallel) run with the same key."""
        found = {}
        if log.exists():
            for line in log.read_text().splitlines():
                e = json.loads(line)
                if e.get("key") == key:
                    found[(e["kind"], e.get("steps"), e["cfg"])] = e
        return found

    def keep(entry: dict) -> None:
        with log.open("a") as f:  # one short append per entry: parallel runs do not interleave lines
            f.write(json.dumps({**entry, "key": key}) + "\n")

    def validation() -> dict:
        val = {}
        for g in [1.0] + [float(x) for x in a.cfg_grid.split(",")]:
            e = done().get(("val", None, g))
            if e is None:
                e = {"kind": "val", "cfg": g, "fd": ev(28, g, [a.val_seed], None)["fd"]["mean"]}
                keep(e)
            val[g] = e["fd"]
            print(f"validation seed {a.val_seed}, 28 steps, cfg {g}: fd {val[g]:.3f}", flush=True)
        return val

    val: dict = {}
    rows = []
    for steps in [int(s) for s in a.steps.split(",")]:
        for g in [1.0, None]:  # None: the best scale, chosen (once) when first needed
            if g is None:
                val = val or validation()
                g = min(val, key=val.get)
                if g == 1.0:
                    continue
            row = done().get(("row", steps, g))
            if row is None:
                r = ev(steps, g, seeds, out / "teacher_grids" / f"steps{steps}_cfg{g}")
                row = {"kind": "row", "steps": steps, "cfg": g, "nfe": r["nfe"],
                       **{k: r[k] for k in METRICS if k in r}, "s_per_image": r["s_per_image"]}
                keep(row)
            row = {k: v for k, v in row.items() if k not in ("kind", "key")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    val = val or validation()
    best = min(val, key=val.get)
    res = {
        "machine": machine(a.device),
        "command": "python benchmarks/teacher_baseline.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "n_samples": a.n_samples,
        "seeds": seeds,
        "teacher": a.teacher,
        "cfg_selection": {"val_seed": a.val_seed, "steps": 28, "fd_by_cfg": {str(k): v for k, v in val.items()},
                          "best_cfg": best},
        "rows": rows,
        "total_wall_s": round(time.time() - t0, 1),
    }
    (out / "teacher.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Built-in teacher: Euler baseline",
        "",
        f"Machine: {res['machine']}. N = {a.n_samples} samples per seed, seeds {seeds}, mean ± std over seeds.",
        f"Command: `{res['command']}`",
        f"CFG scale chosen on validation seed {a.val_seed} at 28 steps by FD: {best} "
        f"(FD by scale: {', '.join(f'{k}: {v:.2f}' for k, v in val.items())}).",
        "",
        "| steps | cfg | NFE | FD ↓ | adherence ↑ | precision ↑ | recall ↑ | hf gap ↓ | MSE to 100-step ↓ | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = lambda k, d=3: f"{r[k]['mean']:.{d}f} ± {r[k]['std']:.{d}f}"  # noqa: E731
        lines.append(f"| {r['steps']} | {r['cfg']} | {r['nfe']} | {f('fd', 2)} | {f('adherence')} | {f('precision')} | "
                     f"{f('recall')} | {f('hf_gap', 4)} | {f('mse_to_teacher100', 4)} | {r['s_per_image']:.2e} |")
    (out / "teacher.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
