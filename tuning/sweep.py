"""``cdm sweep``: Ray Tune sweeps of a distillation recipe, with ASHA early stopping and MLflow lineage.

    cdm sweep --config sweep-tiny                       # run; after an interruption: the same command resumes
    cdm sweep --config sweep-tiny --dry-run             # the trials and the resources, without starting Ray
    cdm sweep --config sweep-tiny --set searcher.kind=random --set budget.num_samples=16

Flow: sweep YAML -> validated base config + search space (``tuning.space``) -> MLflow parent run (found
by the sweep key, so a resumed sweep reuses it) -> ``tune.Tuner`` (or ``Tuner.restore`` of the same
experiment) running ``tuning.trial.run_trial`` per trial -> child runs closed with a terminal status ->
results table + plots on the parent run -> the best trial's EMA student exported, evaluated on the
test set, registered and aliased ``candidate``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from pathlib import Path

from tuning.space import Space, parse_space
from tuning.sweep_config import SweepConfig, load_sweep, sweep_key
from workflows import lineage
from workflows.config import flatten
from workflows.distill import init_ray
from workflows.distill_config import DistillConfig
from workflows.progress import console

SWEEP_TAG = "cdm.sweep_key"
HWM_TAG = "cdm.sweep.val_logged_through"
CANDIDATE = "candidate"


# ----------------------------------------------------------------------------------------------- plan
def n_samples(sweep: SweepConfig) -> int:
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
    per_trial = {"driver_cpus": sweep.budget.trial_cpus, "workers": s.num_workers,
                 "cpus_per_worker": s.cpus_per_worker,
                 "cpus": sweep.budget.trial_cpus + s.num_workers * s.cpus_per_worker}
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
        "scheduler": (f"asha (grace {sweep.scheduler.grace_period} rounds = "
                      f"{sweep.scheduler.grace_period * every} student steps, reduction factor "
                      f"{sweep.scheduler.reduction_factor:g}, max {total} steps)")
        if sweep.scheduler.kind == "asha" else "none",
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

    console.print(f"[bold]sweep {p['sweep_key']}[/]: {p['n_trials']} trials, searcher {p['searcher']}, "
                  f"scheduler {p['scheduler']}")
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


# ----------------------------------------------------------------------------------------------- lineage
def _child_run_id(c, exp_id: str, key: str) -> str | None:
    found = c.search_runs([exp_id], filter_string=f"tags.`{lineage.JOB_KEY_TAG}` = '{key}'", max_results=1)
    return found[0].info.run_id if found else None


def _log_val(c, run_id: str, result: dict, metrics: list[str]) -> None:
    """Log a trial's validation metrics at its student step, once (high-water mark on the run)."""
    step = int(result.get("student_steps", -1))
    hwm = int(c.get_run(run_id).data.tags.get(HWM_TAG, -1))
    if step <= hwm:
        return
    vals = {k: float(result[k]) for k in metrics if isinstance(result.get(k), (int, float))}
    if vals:
        lineage.log_metrics(c, run_id, [(step, vals)])
        c.set_tag(run_id, HWM_TAG, str(step))


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - ray is a dependency
    _TuneCallback = object


class TrialLineage(_TuneCallback):
    """Tune callback in the sweep driver: each trial's validation curve into its MLflow child run, a
    terminal status when it ends (also when ASHA stops it), and a progress line per result."""

    def __init__(self, uri: str, experiment: str, base: dict, total: int, metric: str):
        self.uri, self.experiment, self.base, self.total, self.metric = uri, experiment, base, total, metric
        self._c = None
        self._runs: dict[str, str] = {}
        self._reap: dict[str, tuple[float, Path]] = {}
        self._t0 = time.time()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_c"], d["_runs"], d["_reap"] = None, {}, {}
        return d

    def _client(self):
        if self._c is None:
            self._c = lineage.client(self.uri)
        return self._c

    def run_id(self, trial) -> str | None:
        from tuning.trial import trial_config
        from workflows.distill import job_key

        tid = trial.trial_id
        if tid not in self._runs:
            c = self._client()
            exp = c.get_experiment_by_name(self.experiment)
            rid = _child_run_id(c, exp.experiment_id, job_key(trial_config(self.base, trial.config))) if exp else None
            if rid is None:
                return None
            self._runs[tid] = rid
        return self._runs[tid]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        try:
            rid = self.run_id(trial)
            if rid:
                _log_val(self._client(), rid, result, [k for k in result if k.startswith("val_")])
        except Exception as e:  # lineage must not kill the sweep; the post-sweep pass reconciles
            console.print(f"\\[sweep] warning: could not log {trial.trial_id}'s result to MLflow: {e}")
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        v = result.get(self.metric)
        vs = f"{v:.4g}" if isinstance(v, (int, float)) else str(v)
        console.print(f"\\[sweep] {time.time() - self._t0:6.0f}s trial {trial.trial_id} step "
                      f"{result.get('student_steps')}/{self.total} {self.metric}={vs} "
                      f"({done}/{len(trials)} trials done)")

    def _end(self, trial, failed: bool) -> None:
        try:
            rid = self.run_id(trial)
            if rid:
                close_child(self._client(), rid, trial.last_result or {}, self.total, failed)
        except Exception as e:
            console.print(f"\\[sweep] warning: could not close {trial.trial_id}'s MLflow run: {e}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, failed=False)
        self._reap_later(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, failed=True)
        self._reap_later(trial)

    # A trial stopped by the scheduler is killed with its Train controller; Ray Train v2's own cleaner of
    # the workers' placement group needs the dashboard's state API, so the sweep frees it (after a delay,
    # once Tune has killed the trial's actor; a group already removed is left alone).
    def _reap_later(self, trial) -> None:
        from tuning.trial import trial_config
        from workflows.distill import job_key

        job_dir = Path(self.base["storage_path"]) / job_key(trial_config(self.base, trial.config))
        self._reap[trial.trial_id] = (time.time() + REAP_DELAY_S, job_dir)

    def _reap_due(self, force: bool = False) -> None:
        for tid, (due, job_dir) in list(getattr(self, "_reap", {}).items()):
            if force or time.time() >= due:
                if force:
                    time.sleep(max(0.0, due - time.time()))
                free_placement_groups(job_dir)
                del self._reap[tid]

    def on_step_begin(self, iteration, trials, **info):
        self._reap_due()

    def on_experiment_end(self, trials, **info):
        self._reap_due(force=True)


REAP_DELAY_S = 8.0


def free_placement_groups(job_dir: Path) -> int:
    """Remove the still-live placement groups a trial's Train workers ran in (see ``train_worker``)."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    f = job_dir / "pids" / "placement_groups.txt"
    if not f.exists() or not ray.is_initialized():
        return 0
    n = 0
    for h in dict.fromkeys(f.read_text().split()):
        try:
            pg = PlacementGroup(PlacementGroupID(bytes.fromhex(h)))
            state = ray.util.placement_group_table(pg).get("state")
            if state in ("CREATED", "PENDING", "RESCHEDULING"):
                remove_placement_group(pg)
                n += 1
        except Exception as e:  # an id from an earlier cluster, or already gone
            console.print(f"\\[sweep] note: placement group {h[:12]}: {type(e).__name__}", markup=True)
    return n


def close_child(c, run_id: str, last: dict, total: int, failed: bool) -> str:
    """Terminal status of a trial's run: FINISHED (all steps), KILLED (stopped early by the scheduler), FAILED."""
    steps = int(last.get("student_steps", 0) or 0)
    if failed:
        status = "FAILED"
    else:
        status = "FINISHED" if steps >= total else "KILLED"
    c.set_tag(run_id, "cdm.sweep.stopped_early", str(not failed and steps < total).lower())
    c.set_tag(run_id, "cdm.sweep.last_step", str(steps))
    c.set_terminated(run_id, status=status)
    return status


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# ----------------------------------------------------------------------------------------------- run
def _check_fits(p: dict) -> None:
    import ray

    need = p["resources"]["per_trial"]
    have = ray.cluster_resources()
    if need["cpus"] > have.get("CPU", 0) + 1e-9:
        raise RuntimeError(f"resources: one trial needs {need['cpus']:g} CPUs (driver {need['driver_cpus']:g} + "
                           f"{need['workers']} workers x {need['cpus_per_worker']:g}) but the cluster has "
                           f"{have.get('CPU', 0):g}; lower base.scaling or budget.trial_cpus")
    if need.get("gpus", 0) > have.get("GPU", 0) + 1e-9:
        raise RuntimeError(f"resources: one trial needs {need['gpus']:g} GPUs, the cluster has {have.get('GPU', 0):g}")


def _searcher(sweep: SweepConfig):
    if sweep.searcher.kind == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=sweep.searcher.seed)
    if sweep.searcher.kind == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sweep.searcher.seed)
    return None  # grid: Tune's default generator expands grid_search


def _scheduler(sweep: SweepConfig, base: DistillConfig):
    if sweep.scheduler.kind == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    every = sweep.validation.every
    return ASHAScheduler(time_attr="student_steps", max_t=base.train.student_steps,
                         grace_period=sweep.scheduler.grace_period * every,
                         reduction_factor=sweep.scheduler.reduction_factor)


def _command(config: str, overrides: list[str]) -> str:
    return " ".join(["cdm", "sweep", "--config", shlex.quote(str(config))] +
                    [f"--set {shlex.quote(o)}" for o in overrides])


def load(config: str, overrides: list[str] | None) -> tuple[SweepConfig, DistillConfig, Space, str]:
    sweep, base = load_sweep(config, overrides)
    space = parse_space(sweep.space, base, sweep.searcher.kind)
    key = sweep_key(sweep, base)
    return sweep, base, space, key


def main(config: str = "sweep-tiny", overrides: list[str] | None = None, dry_run: bool = False) -> dict:
    """Run (or resume) a sweep; with ``dry_run`` only return and print its plan. Bad input raises
    ``ConfigError`` (a ValueError), ``FileNotFoundError`` or ``RuntimeError`` naming the problem."""
    overrides = list(overrides or [])
    sweep, base, space, key = load(config, overrides)
    p = plan(sweep, base, space, key)
    if dry_run:
        print_plan(p)
        return p
    from workflows.distill import load_prompts, teacher_path

    teacher_path(base)
    load_prompts(base)
    return run(sweep, base, space, key, p, _command(config, overrides))


def run(sweep: SweepConfig, base: DistillConfig, space: Space, key: str, p: dict, command: str) -> dict:
    from ray import tune

    from tuning.space import apply
    from tuning.trial import run_trial
    from workflows.distill import load_prompts, prompt_embeddings, teacher_path
    from workflows.evaluation import folder_hash

    t_start = time.time()
    cpu0 = _cpu_seconds()
    print_plan(p)
    trial_base = apply(base, {"name": key})  # trials are named after the sweep: job key = sweep key + config hash
    base_dict = trial_base.model_dump(mode="json")
    storage = Path(base.storage_path)
    tune_root = storage / "sweeps"
    exp_path = tune_root / key
    uri = base.mlflow.tracking_uri
    c = lineage.client(uri)

    # the parent run, found again by the sweep key
    tags = {SWEEP_TAG: key, "cdm.kind": "sweep", "cdm.code_version": lineage.code_version(),
            "cdm.command": command[:1000], "cdm.sweep.searcher": sweep.searcher.kind,
            "cdm.sweep.scheduler": sweep.scheduler.kind, "cdm.sweep.metric": sweep.metric,
            "cdm.sweep.tune_path": str(exp_path), "cdm.sweep.space": json.dumps(p["space"])[:5000]}
    parent, resumed = lineage.find_or_create_run(c, base.mlflow.experiment, key, key, tags)
    for k, v in tags.items():
        c.set_tag(parent, k, v)
    lineage.log_params_once(c, parent, {**{f"sweep.{k}": v for k, v in flatten(
        sweep.model_dump(mode="json", exclude={"space", "base"})).items()},
        **{f"base.{k}": v for k, v in flatten(base.model_dump(mode="json")).items()}})
    console.print(f"\\[sweep] MLflow parent run {parent} ({'resumed' if resumed else 'new'}) at {uri}")

    init_ray(p["resources"]["peak"].get("cpus", 1))
    _check_fits(p)
    teacher = teacher_path(base)
    prompt_embeddings(load_prompts(base), folder_hash(teacher), storage)  # once, before the trials

    sweep_ctx = {"key": key, "parent_run_id": parent, "command": command}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base_dict, sweep=sweep_ctx),
                                    {"CPU": sweep.budget.trial_cpus})
    if tune.Tuner.can_restore(str(exp_path)):
        console.print(f"\\[sweep] resuming the Tune experiment at {exp_path} (finished trials are not re-run)")
        tuner = tune.Tuner.restore(str(exp_path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space.to_tune(grid=sweep.searcher.kind == "grid"),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, search_alg=_searcher(sweep), scheduler=_scheduler(sweep, base),
                num_samples=n_samples(sweep), max_concurrent_trials=sweep.budget.max_concurrent_trials,
                time_budget_s=sweep.budget.time_budget_s or None, trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=key, storage_path=str(tune_root),
                callbacks=[TrialLineage(uri, base.mlflow.experiment, base_dict, base.train.student_steps,
                                        sweep.metric)],
                failure_config=tune.FailureConfig(max_failures=sweep.budget.max_failures), verbose=0),
        )
    grid = tuner.fit()
    return finalize(sweep, base, trial_base, space, key, parent, grid, exp_path, t_start, cpu0, command)


def _cpu_seconds() -> float:
    """CPU seconds of this process and its children, plus the Ray workers' (best effort: psutil tree)."""
    try:
        import psutil

        return sum(sum(p.cpu_times()[:4]) for p in [psutil.Process()] + psutil.Process().children(recursive=True))
    except Exception:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def _checkpoint_at(job_dir: Path, step: int) -> Path | None:
    """The checkpoint of ``step`` if it is complete, else the latest complete one."""
    from workflows.distill import check_checkpoint

    cands = sorted((p for p in job_dir.glob("step_*") if p.is_dir()), reverse=True)
    exact = [p for p in cands if p.name == f"step_{step:08d}"]
    for ck in exact + [p for p in cands if p not in exact]:
        try:
            check_checkpoint(ck)
            return ck
        except RuntimeError:
            continue
    return None


def finalize(sweep, base, trial_base, space, key, parent, grid, exp_path, t_start, cpu0, command) -> dict:
    from tuning import report
    from tuning.trial import trial_config
    from workflows import distill

    c = lineage.client(base.mlflow.tracking_uri)
    exp_id = lineage.experiment_id(c, base.mlflow.experiment)
    total = base.train.student_steps
    metric = sweep.metric
    rows, curves = [], {}
    for r in grid:
        cfg_r = r.config or {}
        m = r.metrics or {}
        tid = m.get("trial_id") or Path(r.path).name.removeprefix("trial_")
        tcfg = trial_config(trial_base.model_dump(mode="json"), cfg_r)
        rid = _child_run_id(c, exp_id, distill.job_key(tcfg))
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
            for s, v in pts:  # the curve also reaches MLflow when the driver died between result and log
                _log_val(c, rid, {"student_steps": s, metric: v}, [metric])
            c.set_tag(rid, "mlflow.parentRunId", parent)
            status = close_child(c, rid, m, total, failed)
        else:
            status = "FAILED" if failed else "MISSING"
        rows.append({"trial_id": tid, **{p: cfg_r.get(p) for p in space.paths},
                     metric: m.get(metric) if not failed or metric in m else None,
                     f"best_{metric}": (min if sweep.mode == "min" else max)(v for _, v in pts) if pts else None,
                     "student_steps": steps, "stopped_early": (not failed) and steps < total,
                     "status": status, "run_id": rid or "", "job_key": distill.job_key(tcfg),
                     "error": str(r.error).splitlines()[0][:200] if failed else ""})
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and not r["error"]]
    if not scored:
        c.set_terminated(parent, status="FAILED")
        errs = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"])[:1000]
        raise RuntimeError(f"sweep {key}: no trial reported {metric}" + (f" ({errs})" if errs else ""))
    sign = 1 if sweep.mode == "min" else -1
    rows.sort(key=lambda r: (sign * r[metric] if r in scored else math.inf))
    best = rows[0]

    # the best trial: export its EMA student at the reported step, evaluate on the test set, register, alias
    best_cfg = trial_config(trial_base.model_dump(mode="json"), {p: best[p] for p in space.paths})
    job = distill.prepare(best_cfg, command, parent_run_id=parent,
                          extra_tags={SWEEP_TAG: key, "cdm.sweep.best": "true"}, check_resume=False)
    ck = _checkpoint_at(job.job_dir, best["student_steps"])
    if ck is None:
        raise RuntimeError(f"sweep {key}: the best trial {best['trial_id']} has no complete checkpoint in "
                           f"{job.job_dir}")
    console.print(f"\\[sweep] best trial {best['trial_id']}: {metric}={best[metric]:.4g} at step "
                  f"{best['student_steps']}; evaluating {ck.name} on the test set")
    summary = distill.finish(job, ck, {f"sweep.{metric}": best[metric]})
    status = close_child(c, job.run_id, {"student_steps": best["student_steps"]}, total, False)
    best["status"] = status
    name, version = summary["model"], summary["version"]
    c.set_registered_model_alias(name, CANDIDATE, version)
    c.set_model_version_tag(name, version, SWEEP_TAG, key)
    c.set_model_version_tag(name, version, f"sweep.{metric}", f"{best[metric]:.6g}")

    # results table and plots on the parent run
    out = exp_path / "report"
    out.mkdir(parents=True, exist_ok=True)
    columns = ["trial_id", *space.paths, metric, f"best_{metric}", "student_steps", "stopped_early", "status",
               "run_id", "error"]
    csv_path, md_path = report.write_table(rows, columns, out)
    pngs = report.plot_metric_vs_params(rows, [(q.path, q.kind) for q in space.params], metric, out,
                                        best["trial_id"])
    pngs.append(report.plot_learning_curves(curves, metric, out, best["trial_id"]))
    wall = time.time() - t_start
    cpu = _cpu_seconds() - cpu0
    n_stopped = sum(1 for r in rows if r["stopped_early"])
    result = {
        "sweep_key": key, "parent_run_id": parent, "tracking_uri": base.mlflow.tracking_uri,
        "tune_path": str(exp_path), "trials": len(rows), "stopped_early": n_stopped,
        "errored": sum(1 for r in rows if r["error"]), "metric": metric, "mode": sweep.mode,
        "best": {"trial_id": best["trial_id"], "config": {p: best[p] for p in space.paths},
                 "val": best[metric], "student_steps": best["student_steps"], "run_id": job.run_id,
                 "test": {k: summary[k] for k in summary if k.startswith("eval.")}},
        "model": name, "version": version, "alias": CANDIDATE, "student_folder": summary["student_folder"],
        "report": {"csv": str(csv_path), "markdown": str(md_path), "plots": [str(q) for q in pngs]},
        "wall_s": wall, "driver_cpu_s": cpu,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    c.log_artifacts(parent, str(out), "report")
    for pth, v in result["best"]["config"].items():
        c.set_tag(parent, f"cdm.best.{pth}", str(v))
    c.set_tag(parent, "cdm.best.run_id", job.run_id)
    c.set_tag(parent, "cdm.best.trial_id", best["trial_id"])
    c.set_tag(parent, "cdm.best.model_version", f"{name}/{version}")
    lineage.log_params_once(c, parent, {f"best.{k}": v for k, v in result["best"]["config"].items()})
    lineage.log_metrics(c, parent, [(0, {f"best.{metric}": best[metric], "trials": len(rows),
                                         "stopped_early": n_stopped,
                                         **{f"best.{k}": v for k, v in result["best"]["test"].items()}})])
    c.set_terminated(parent, status="FINISHED")
    console.print(f"\\[sweep] done: {len(rows)} trials ({n_stopped} stopped early); best {best['trial_id']} "
                  f"{metric}={best[metric]:.4g} -> {name} v{version} @{CANDIDATE}; report {md_path}")
    return result
