"""After the Tune run: the results table, the best trial's export and the sweep's report.

Each trial's row comes from Tune's result (its validation curve from the result dataframe) and its
MLflow child run, which gets its terminal status (again: the driver's callback may have died first). The
best trial's EMA student at its reported step is exported from its checkpoint (``workflows.checkpoints``),
evaluated on the test set, registered and aliased ``candidate``; the table, the plots and a summary go on
the sweep's parent run. The export opens the best trial's job (``distill.open_job``) without re-preparing
it: no Ray start, no embeddings.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tuning.space import Space
from tuning.sweep_config import SweepConfig
from tuning.trial import SWEEP_TAG, trial_config, trial_job_key
from tuning.trial_lineage import child_run_id, close_child
from workflows import lineage
from workflows.distill_config import DistillConfig
from workflows.progress import console

CANDIDATE = "candidate"  # registry alias of the best trial's model version


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep, as the export needs it."""

    sweep: SweepConfig
    base: DistillConfig  # the validated base config
    trial_base: dict  # the config every trial starts from (named after the sweep), JSON-dumped
    space: Space
    key: str  # the sweep key
    parent_run_id: str
    exp_path: Path  # the Tune experiment folder (the report goes under it)
    command: str
    t_start: float  # time.time() at the start of the run
    cpu0: float  # cpu_seconds() at the start of the run


def cpu_seconds() -> float:
    """CPU seconds of this process and its children, plus the Ray workers' (best effort: psutil tree)."""
    try:
        import psutil

        return sum(sum(p.cpu_times()[:4]) for p in [psutil.Process()] + psutil.Process().children(recursive=True))
    except Exception:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def collect(run: SweepRun, grid, c) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    """One row per trial (sorted best first) and each trial's validation curve; closes the child runs."""
    sweep, space, metric, total = run.sweep, run.space, run.sweep.metric, run.base.train.student_steps
    exp_id = lineage.experiment_id(c, run.base.mlflow.experiment)
    rows, curves = [], {}
    for r in grid:
        cfg_r = r.config or {}
        m = r.metrics or {}
        tid = m.get("trial_id") or Path(r.path).name.removeprefix("trial_")
        key = trial_job_key(run.trial_base, cfg_r)
        rid = child_run_id(c, exp_id, key)
        df = r.metrics_dataframe
        pts = []
        if df is not None and metric in df and "student_steps" in df:
            pts = [(int(s), float(v)) for s, v in zip(df["student_steps"], df[metric]) if v == v]
            # one point per step (a resumed trial may repeat the steps after its last checkpoint)
            pts = sorted(dict(pts).items())
        curves[tid] = pts
        steps = int(m.get("student_steps", 0) or 0)
        failed = r.error is not None
        if rid:
            c.set_tag(rid, "mlflow.parentRunId", run.parent_run_id)
            status = close_child(c, rid, m, total, failed)
        else:
            status = "FAILED" if failed else "MISSING"
        rows.append(
            {
                "trial_id": tid,
                **{p: cfg_r.get(p) for p in space.paths},
                metric: m.get(metric) if not failed or metric in m else None,
                f"best_{metric}": (min if sweep.mode == "min" else max)(v for _, v in pts) if pts else None,
                "student_steps": steps,
                "stopped_early": (not failed) and steps < total,
                "status": status,
                "run_id": rid or "",
                "job_key": key,
                "error": str(r.error).splitlines()[0][:200] if failed else "",
            }
        )
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and not r["error"]]
    if not scored:
        c.set_terminated(run.parent_run_id, status="FAILED")
        errs = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"])[:1000]
        raise RuntimeError(f"sweep {run.key}: no trial reported {metric}" + (f" ({errs})" if errs else ""))
    sign = 1 if sweep.mode == "min" else -1
    rows.sort(key=lambda r: sign * r[metric] if r in scored else math.inf)
    return rows, curves


def export_best(run: SweepRun, best: dict, c) -> dict:
    """The best trial's EMA student at its reported step: exported, evaluated on the test set, registered,
    aliased ``candidate``. Returns ``workflows.export.finish``'s summary."""
    from workflows import checkpoints, distill, export

    metric = run.sweep.metric
    best_cfg = trial_config(run.trial_base, {p: best[p] for p in run.space.paths})
    job = distill.open_job(
        best_cfg,
        run.command,
        parent_run_id=run.parent_run_id,
        extra_tags={SWEEP_TAG: run.key, "cdm.sweep.best": "true"},
        check_resume=False,
    )
    ck = checkpoints.complete_at(job.job_dir, best["student_steps"])
    if ck is None:
        raise RuntimeError(
            f"sweep {run.key}: the best trial {best['trial_id']} has no complete checkpoint in {job.job_dir}"
        )
    console.print(
        f"\\[sweep] best trial {best['trial_id']}: {metric}={best[metric]:.4g} at step "
        f"{best['student_steps']}; evaluating {ck.name} on the test set"
    )
    summary = export.finish(job, ck, {f"sweep.{metric}": best[metric]})
    best["status"] = close_child(
        c, job.run_id, {"student_steps": best["student_steps"]}, run.base.train.student_steps, False
    )
    name, version = summary["model"], summary["version"]
    c.set_registered_model_alias(name, CANDIDATE, version)
    c.set_model_version_tag(name, version, SWEEP_TAG, run.key)
    c.set_model_version_tag(name, version, f"sweep.{metric}", f"{best[metric]:.6g}")
    return summary


def finalize(run: SweepRun, grid) -> dict:
    """Table, best-trial export and report of a finished Tune run (``grid``: its ``ResultGrid``)."""
    from tuning import report

    c = lineage.client(run.base.mlflow.tracking_uri)
    sweep, space, metric, parent = run.sweep, run.space, run.sweep.metric, run.parent_run_id
    rows, curves = collect(run, grid, c)
    best = rows[0]
    summary = export_best(run, best, c)
    run_id, name, version = summary["run_id"], summary["model"], summary["version"]

    # results table and plots on the parent run
    out = run.exp_path / "report"
    out.mkdir(parents=True, exist_ok=True)
    columns = [
        "trial_id",
        *space.paths,
        metric,
        f"best_{metric}",
        "student_steps",
        "stopped_early",
        "status",
        "run_id",
        "error",
    ]
    csv_path, md_path = report.write_table(rows, columns, out)
    pngs = report.plot_metric_vs_params(rows, [(q.path, q.kind) for q in space.params], metric, out, best["trial_id"])
    pngs.append(report.plot_learning_curves(curves, metric, out, best["trial_id"]))
    n_stopped = sum(1 for r in rows if r["stopped_early"])
    result = {
        "sweep_key": run.key,
        "parent_run_id": parent,
        "tracking_uri": run.base.mlflow.tracking_uri,
        "tune_path": str(run.exp_path),
        "trials": len(rows),
        "stopped_early": n_stopped,
        "errored": sum(1 for r in rows if r["error"]),
        "metric": metric,
        "mode": sweep.mode,
        "best": {
            "trial_id": best["trial_id"],
            "config": {p: best[p] for p in space.paths},
            "val": best[metric],
            "student_steps": best["student_steps"],
            "run_id": run_id,
            "test": {k: summary[k] for k in summary if k.startswith("eval.")},
        },
        "model": name,
        "version": version,
        "alias": CANDIDATE,
        "student_folder": summary["student_folder"],
        "report": {"csv": str(csv_path), "markdown": str(md_path), "plots": [str(q) for q in pngs]},
        "wall_s": time.time() - run.t_start,
        "driver_cpu_s": cpu_seconds() - run.cpu0,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    c.log_artifacts(parent, str(out), "report")
    for pth, v in result["best"]["config"].items():
        c.set_tag(parent, f"cdm.best.{pth}", str(v))
    c.set_tag(parent, "cdm.best.run_id", run_id)
    c.set_tag(parent, "cdm.best.trial_id", best["trial_id"])
    c.set_tag(parent, "cdm.best.model_version", f"{name}/{version}")
    lineage.log_params_once(c, parent, {f"best.{k}": v for k, v in result["best"]["config"].items()})
    lineage.log_metrics(
        c,
        parent,
        [
            (
                0,
                {
                    f"best.{metric}": best[metric],
                    "trials": len(rows),
                    "stopped_early": n_stopped,
                    **{f"best.{k}": v for k, v in result["best"]["test"].items()},
                },
            )
        ],
    )
    c.set_terminated(parent, status="FINISHED")
    console.print(
        f"\\[sweep] done: {len(rows)} trials ({n_stopped} stopped early); best {best['trial_id']} "
        f"{metric}={best[metric]:.4g} -> {name} v{version} @{CANDIDATE}; report {md_path}"
    )
    return result
