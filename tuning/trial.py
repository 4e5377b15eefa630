"""One sweep trial: a Tune driver function that runs a real distillation job (``workflows.distill``).

Under Ray Train v2 a Tune trial is a small driver process that builds the ``TorchTrainer``; the
trainer's workers (DeepSpeed, ``workflows.train_worker``) report the validation metrics every
``eval.val_every`` student steps through ``ray.train.report``, and ``TuneReportCallback`` forwards
rank 0's report to Tune, where the scheduler (ASHA) reads ``val_selection_score`` against ``student_steps``.

Identity: the trial's config is the sweep's base with the sampled values set, named after the sweep,
so its job key (name + config hash) finds the same checkpoints and the same MLflow child run when a
sweep is resumed. The child run is nested under the sweep's parent run (``mlflow.parentRunId``).
"""

from __future__ import annotations

import json

from tuning.space import apply


def trial_config(base: dict, params: dict):
    """The DistillConfig a trial with sampled ``params`` (dotted paths) runs."""
    return apply(base, params)


def run_trial(config: dict, base: dict, sweep: dict) -> None:
    """Tune trainable (wrapped with ``tune.with_parameters(base=..., sweep=...)``)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from workflows import distill

    cfg = trial_config(base, config)
    trial_id = tune.get_context().get_trial_id()
    job = distill.prepare(cfg, command=sweep.get("command", ""), parent_run_id=sweep["parent_run_id"],
                          extra_tags={"cdm.sweep_key": sweep["key"], "cdm.sweep.trial_id": str(trial_id),
                                      "cdm.sweep.params": json.dumps(config, sort_keys=True)[:5000]},
                          check_resume=False)
    # the driver logs the validation curve from Tune's results (this process may be stopped by ASHA)
    _, train_s = distill.train(job, callbacks=[TuneReportCallback()], val_to_mlflow=False)
    job.client.log_metric(job.run_id, "train.wall_s", train_s, step=cfg.train.student_steps)
    job.client.set_terminated(job.run_id, status="FINISHED")
