"""Each trial's MLflow child run, seen from the sweep driver: found by the trial's job key, closed with a
terminal status when the trial ends (also when ASHA stops it, which kills the trial before its own
``set_terminated``), and a progress line per Tune result.

The driver writes no metrics into a child run: its ``val_*`` curve is the Train workers' (``run_trial``).
"""

from __future__ import annotations

import time

from tuning.trial import trial_job_key
from workflows import lineage
from workflows.progress import console

try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - ray is a dependency
    _TuneCallback = object


def child_run_id(c, exp_id: str, key: str) -> str | None:
    """The MLflow run of the job ``key`` (a trial's job key) in experiment ``exp_id``, or None."""
    found = c.search_runs([exp_id], filter_string=f"tags.`{lineage.JOB_KEY_TAG}` = '{key}'", max_results=1)
    return found[0].info.run_id if found else None


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


class TrialLineage(_TuneCallback):
    """Tune callback in the sweep driver: a terminal status on each trial's child run when the trial
    ends, and a progress line per result. A status it could not set is set again by the export."""

    def __init__(self, uri: str, experiment: str, base: dict, total: int, metric: str):
        self.uri, self.experiment, self.base, self.total, self.metric = uri, experiment, base, total, metric
        self._reset()

    def _reset(self) -> None:
        self._c = None
        self._runs: dict[str, str] = {}
        self._t0 = time.time()

    # Tune pickles its callbacks with the experiment (``Tuner.restore`` brings them back): keep the
    # settings, not the client or the cache (an experiment pickled by an older version loads too)
    def __getstate__(self):
        return {k: getattr(self, k) for k in ("uri", "experiment", "base", "total", "metric")}

    def __setstate__(self, state: dict) -> None:
        for k in ("uri", "experiment", "base", "total", "metric"):
            setattr(self, k, state[k])
        self._reset()

    def _client(self):
        if self._c is None:
            self._c = lineage.client(self.uri)
        return self._c

    def run_id(self, trial) -> str | None:
        tid = trial.trial_id
        if tid not in self._runs:
            c = self._client()
            exp = c.get_experiment_by_name(self.experiment)
            rid = child_run_id(c, exp.experiment_id, trial_job_key(self.base, trial.config)) if exp else None
            if rid is None:
                return None
            self._runs[tid] = rid
        return self._runs[tid]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        v = result.get(self.metric)
        vs = f"{v:.4g}" if isinstance(v, (int, float)) else str(v)
        console.print(
            f"\\[sweep] {time.time() - self._t0:6.0f}s trial {trial.trial_id} step "
            f"{result.get('student_steps')}/{self.total} {self.metric}={vs} "
            f"({done}/{len(trials)} trials done)"
        )

    def _end(self, trial, failed: bool) -> None:
        try:
            rid = self.run_id(trial)
            if rid:
                close_child(self._client(), rid, trial.last_result or {}, self.total, failed)
        except Exception as e:  # lineage must not kill the sweep; the export closes every child run again
            console.print(f"\\[sweep] warning: could not close {trial.trial_id}'s MLflow run: {e}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, failed=True)
