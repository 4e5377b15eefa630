"""``cdm sweep``: Ray Tune sweeps of a distillation recipe, with ASHA early stopping and MLflow lineage.

    cdm sweep --config sweep-tiny                       # run; after an interruption: the same command resumes
    cdm sweep --config sweep-tiny --dry-run             # the trials and the resources, without starting Ray
    cdm sweep --config sweep-tiny --set searcher.kind=random --set budget.num_samples=16

Flow: sweep YAML -> validated base config + search space (``tuning.space``) -> the plan (``tuning.plan``)
-> MLflow parent run (found by the sweep key, so a resumed sweep reuses it) -> ``tune.Tuner`` (or
``Tuner.restore`` of the same experiment) running ``tuning.trial.run_trial`` per trial, whose Train workers
log each trial's validation curve into its child run -> child runs closed with a terminal status
(``tuning.trial_lineage``) -> results table + plots on the parent run and the best trial's EMA student
exported, evaluated on the test set, registered and aliased ``candidate`` (``tuning.export``).

The Tuner also runs ``tuning.placement_groups.StoppedTrialGroups``: on Ray 2.60 a trial Tune stops (ASHA)
leaves its Train workers' placement group CREATED until the sweep driver exits, holding the resources later
trials need, and Ray Train's own cleaner only works where the dashboard's state API answers (see there).
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from tuning.export import SweepRun, cpu_seconds, finalize
from tuning.placement_groups import StoppedTrialGroups
from tuning.plan import n_samples, plan, print_plan
from tuning.space import Space, parse_space
from tuning.sweep_config import SweepConfig, load_sweep, sweep_key
from tuning.trial import SWEEP_TAG
from tuning.trial_lineage import TrialLineage  # noqa: F401 (also here: experiments pickled it as tuning.sweep's)
from workflows import lineage
from workflows.config import flatten
from workflows.distill import init_ray
from workflows.distill_config import DistillConfig
from workflows.progress import console


def _check_fits(p: dict) -> None:
    """Fail before any trial when one trial needs more than the whole cluster (it would wait forever)."""
    import ray

    need = p["resources"]["per_trial"]
    have = ray.cluster_resources()
    if need["cpus"] > have.get("CPU", 0) + 1e-9:
        raise RuntimeError(
            f"resources: one trial needs {need['cpus']:g} CPUs (driver {need['driver_cpus']:g} + "
            f"{need['workers']} workers x {need['cpus_per_worker']:g}) but the cluster has "
            f"{have.get('CPU', 0):g}; lower base.scaling or budget.trial_cpus"
        )
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
    return ASHAScheduler(
        time_attr="student_steps",
        max_t=base.train.student_steps,
        grace_period=sweep.scheduler.grace_period * every,
        reduction_factor=sweep.scheduler.reduction_factor,
    )


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _command(config: str, overrides: list[str]) -> str:
    return " ".join(
        ["cdm", "sweep", "--config", shlex.quote(str(config))] + [f"--set {shlex.quote(o)}" for o in overrides]
    )


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
    from workflows.distill import check_prompts, teacher_path

    teacher_path(base)
    check_prompts(base)
    return run(sweep, base, space, key, p, _command(config, overrides))


def _parent_run(c, sweep: SweepConfig, base: DistillConfig, key: str, p: dict, command: str, exp_path: Path) -> str:
    """The sweep's MLflow parent run, found again by the sweep key (a resumed sweep reuses it)."""
    tags = {
        SWEEP_TAG: key,
        "cdm.kind": "sweep",
        "cdm.code_version": lineage.code_version(),
        "cdm.command": command[:1000],
        "cdm.sweep.searcher": sweep.searcher.kind,
        "cdm.sweep.scheduler": sweep.scheduler.kind,
        "cdm.sweep.metric": sweep.metric,
        "cdm.sweep.tune_path": str(exp_path),
        "cdm.sweep.space": json.dumps(p["space"])[:5000],
    }
    parent, resumed = lineage.find_or_create_run(c, base.mlflow.experiment, key, key, tags)
    for k, v in tags.items():
        c.set_tag(parent, k, v)
    lineage.log_params_once(
        c,
        parent,
        {
            **{f"sweep.{k}": v for k, v in flatten(sweep.model_dump(mode="json", exclude={"space", "base"})).items()},
            **{f"base.{k}": v for k, v in flatten(base.model_dump(mode="json")).items()},
        },
    )
    console.print(
        f"\\[sweep] MLflow parent run {parent} ({'resumed' if resumed else 'new'}) at {base.mlflow.tracking_uri}"
    )
    return parent


def run(sweep: SweepConfig, base: DistillConfig, space: Space, key: str, p: dict, command: str) -> dict:
    from ray import tune

    from tuning.space import apply
    from tuning.trial import run_trial
    from workflows.distill import embed, teacher_path
    from workflows.evaluation import folder_hash

    t_start, cpu0 = time.time(), cpu_seconds()
    print_plan(p)
    trial_base = apply(base, {"name": key})  # trials are named after the sweep: job key = sweep key + config hash
    base_dict = trial_base.model_dump(mode="json")
    storage = Path(base.storage_path)
    tune_root = storage / "sweeps"
    exp_path = tune_root / key
    uri = base.mlflow.tracking_uri
    parent = _parent_run(lineage.client(uri), sweep, base, key, p, command, exp_path)

    init_ray(p["resources"]["peak"].get("cpus", 1))
    _check_fits(p)
    teacher = teacher_path(base)
    embed(base, folder_hash(teacher), storage, teacher)  # once, before the trials

    sweep_ctx = {"key": key, "parent_run_id": parent, "command": command}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base_dict, sweep=sweep_ctx), {"CPU": sweep.budget.trial_cpus}
    )
    if tune.Tuner.can_restore(str(exp_path)):
        console.print(f"\\[sweep] resuming the Tune experiment at {exp_path} (finished trials are not re-run)")
        tuner = tune.Tuner.restore(str(exp_path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space.to_tune(grid=sweep.searcher.kind == "grid"),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                search_alg=_searcher(sweep),
                scheduler=_scheduler(sweep, base),
                num_samples=n_samples(sweep),
                max_concurrent_trials=sweep.budget.max_concurrent_trials,
                time_budget_s=sweep.budget.time_budget_s or None,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=key,
                storage_path=str(tune_root),
                callbacks=[
                    TrialLineage(uri, base.mlflow.experiment, base_dict, base.train.student_steps, sweep.metric),
                    StoppedTrialGroups(),
                ],
                failure_config=tune.FailureConfig(max_failures=sweep.budget.max_failures),
                verbose=0,
            ),
        )
    grid = tuner.fit()
    return finalize(SweepRun(sweep, base, base_dict, space, key, parent, exp_path, command, t_start, cpu0), grid)


def run_or_reuse(config: str, overrides: list[str] | None, cfg: DistillConfig) -> tuple[dict, bool]:
    """The sweep stage of ``cdm pipeline``: the summary of sweep ``config`` (+ ``overrides``) and whether it was read
    back from an earlier run of the same sweep (same key) instead of run now. The sweep must distill the same
    teacher from the same prompts as the pipeline's ``cfg``, else its recipe is about another problem."""
    from workflows.config import ConfigError
    from workflows.distill import check_prompts, teacher_path
    from workflows.evaluation import folder_hash

    overrides = list(overrides or [])
    sweep, base, _space, key = load(config, overrides)
    if folder_hash(teacher_path(base)) != folder_hash(teacher_path(cfg)):
        raise ConfigError(
            f"--sweep {config}: its teacher ({base.teacher}) is not the pipeline's ({cfg.teacher}); "
            "a recipe found for one teacher is not one for another"
        )

    if check_prompts(base).sha256 != check_prompts(cfg).sha256:  # the same prompts, in any format
        raise ConfigError(
            f"--sweep {config}: its prompts ({base.prompts}) are not the pipeline's ({cfg.prompts}); "
            "set the sweep's base.prompts to the same file"
        )
    done = Path(base.storage_path) / "sweeps" / key / "report" / "summary.json"
    try:
        result = json.loads(done.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return main(config, overrides), False
    console.print(f"\\[sweep] {key}: finished earlier, its report read back from {done}")
    return result, True
