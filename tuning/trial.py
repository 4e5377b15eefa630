"""One sweep trial: a Tune driver function that runs a real distillation job (``workflows.distill``).

Under Ray Train v2 a Tune trial is a small driver process that builds the ``TorchTrainer``; the
trainer's workers (DeepSpeed, ``workflows.train_worker``) report the validation metrics every
``eval.val_every`` student steps through ``ray.train.report``, and ``TuneReportCallback`` forwards
rank 0's report to Tune, where the scheduler (ASHA) reads ``val_selection_score`` against ``student_steps``.
The workers are also the only writers of the ``val_*`` metrics of the trial's MLflow run (flushed with
each checkpoint, so a resumed trial never logs a step twice); the sweep driver only reads Tune's results.

Identity: the trial's config is the sweep's base with the sampled values set, named after the sweep,
so its job key (name + config hash, :func:`trial_job_key`) finds the same checkpoints and the same MLflow
child run when a sweep is resumed. The child run is nested under the sweep's parent run (``mlflow.parentRunId``).
"""

from __future__ import annotations

import json

from tuning.space import apply

SWEEP_TAG = "cdm.sweep_key"  # MLflow tag of the sweep's parent run, its trials' runs and the candidate version


def trial_config(base: dict, params: dict):
    """The DistillConfig a trial with sampled ``params`` (dotted paths) runs."""
    return apply(base, params)


def trial_job_key(base: dict, params: dict) -> str:
    """The job key of a trial (its checkpoint folder under ``storage_path`` and its MLflow run's
    ``cdm.job_key`` tag): the one place a sweep derives it from the trial's sampled ``params``."""
    from workflows.distill import job_key

    return job_key(trial_config(base, params))


def run_trial(config: dict, base: dict, sweep: dict) -> None:
    """Tune trainable (wrapped with ``tune.with_parameters(base=..., sweep=...)``)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from workflows import distill

    cfg = trial_config(base, config)
    trial_id = tune.get_context().get_trial_id()
    job = distill.prepare(
        cfg,
        command=sweep.get("command", ""),
        parent_run_id=sweep["parent_run_id"],
        extra_tags={
            SWEEP_TAG: sweep["key"],
            "cdm.sweep.trial_id": str(trial_id),
            "cdm.sweep.params": json.dumps(config, sort_keys=True)[:5000],
        },
        check_resume=False,
    )
    _, train_s = distill.train(job, callbacks=[TuneReportCallback()])
    job.client.log_metric(job.run_id, "train.wall_s", train_s, step=cfg.train.student_steps)
    job.client.set_terminated(job.run_id, status="FINISHED")
