"""What a sweep would run, before anything starts (``cdm sweep --dry-run``): its trials (the grid
expansion, or how many are sampled from the space), the scheduler, the metric and the resources."""

from __future__ import annotations

from pathlib import Path

from tuning.space import Space
from tuning.sweep_config import SweepConfig
from workflows.distill_config import DistillConfig
from workflows.progress import console


def n_samples(sweep: SweepConfig) -> int:
    """Tune's ``num_samples``: trials of a random/optuna search (default 8), repeats of a grid (default 1)."""
    if sweep.budget.num_samples is not None:
        return sweep.budget.num_samples
    return 1 if sweep.searcher.kind == "grid" else 8


def plan(sweep: SweepConfig, base: DistillConfig, space: Space, key: str) -> dict:
    """What a sweep would run: its trials (grid expansion, or the count sampled from the space) and resources."""
    reps = n_samples(sweep)
    grid_axes = space.params if sweep.searcher.kind == "grid" else space.grid_axes()
    combos = 1
    for p in grid_axes:
        combos *= len(p.args)
    n_trials = reps * combos
    trials: list[dict] = []
    if sweep.searcher.kind == "grid":
        trials = [dict(t) for _ in range(reps) for t in space.grid()]
    s = base.scaling
    per_trial = {
        "driver_cpus": sweep.budget.trial_cpus,
        "workers": s.num_workers,
        "cpus_per_worker": s.cpus_per_worker,
        "cpus": sweep.budget.trial_cpus + s.num_workers * s.cpus_per_worker,
    }
    if s.use_gpu:
        per_trial["gpus"] = s.num_workers * s.gpus_per_worker
    for k, v in s.resources_per_worker.items():
        per_trial[k] = s.num_workers * v
    conc = min(sweep.budget.max_concurrent_trials, n_trials)
    peak = {k: v * conc for k, v in per_trial.items() if k in ("cpus", "gpus") or k in s.resources_per_worker}
    total = base.train.student_steps
    every = sweep.validation.every
    return {
        "sweep_key": key,
        "searcher": sweep.searcher.kind,
        "scheduler": (
            f"asha (grace {sweep.scheduler.grace_period} rounds = "
            f"{sweep.scheduler.grace_period * every} student steps, reduction factor "
            f"{sweep.scheduler.reduction_factor:g}, max {total} steps)"
        )
        if sweep.scheduler.kind == "asha"
        else "none",
        "metric": f"{sweep.metric} ({sweep.mode}) on validation seed {sweep.validation.seed}, "
        f"N={sweep.validation.n_samples}, every {every} student steps",
        "n_trials": n_trials,
        "space": {p.path: p.describe() for p in space.params},
        "trials": trials,
        "student_steps_per_trial": total,
        "resources": {"per_trial": per_trial, "max_concurrent_trials": conc, "peak": peak},
        "storage": str(Path(base.storage_path) / "sweeps" / key),
        "tracking_uri": base.mlflow.tracking_uri,
        "test_eval": {"seeds": list(base.eval.seeds), "n_samples": base.eval.n_samples},
    }


def print_plan(p: dict) -> None:
    from rich.table import Table

    console.print(
        f"[bold]sweep {p['sweep_key']}[/]: {p['n_trials']} trials, searcher {p['searcher']}, scheduler {p['scheduler']}"
    )
    console.print(f"metric: {p['metric']}; {p['student_steps_per_trial']} student steps per trial at most")
    if p["trials"]:
        t = Table(title="trials (grid)")
        t.add_column("#")
        cols = list(p["trials"][0])
        for c in cols:
            t.add_column(c)
        for i, tr in enumerate(p["trials"]):
            t.add_row(str(i), *[str(tr[c]) for c in cols])
        console.print(t)
    else:
        for path, d in p["space"].items():
            console.print(f"  {path}: {d}")
    r = p["resources"]
    console.print(f"resources per trial: {r['per_trial']}; {r['max_concurrent_trials']} at a time, peak {r['peak']}")
    console.print(f"Tune experiment: {p['storage']}; MLflow: {p['tracking_uri']}")
