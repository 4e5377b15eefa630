"""MLflow lineage, owned by the project (Ray Train v2 has no MLflow integration).

One run per job, found again by the deterministic tag ``cdm.job_key`` so a resumed or restarted job
continues its run; flattened params; lineage tags; metrics buffered by rank 0 and flushed only after a
checkpoint is committed, so a restart from that checkpoint never logs a step twice.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

JOB_KEY_TAG = "cdm.job_key"


def tracking_uri(configured: str | None, base_dir: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI``, else the config's, else ``sqlite:///<base_dir>/mlflow.db`` (never ``file:``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        uri = f"sqlite:///{(Path(base_dir).resolve() / 'mlflow.db')}"
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("databricks"):
        raise ValueError(f"mlflow.tracking_uri: {uri!r} is a file store; use sqlite:///path/mlflow.db or a server URL")
    return uri


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def code_version() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if sha:
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from cdm_core import __version__

    return f"cdm-platform-{__version__}"


def ray_job_id() -> str:
    """The Ray job submission id when run through ``ray job submit`` (else the Ray job id)."""
    import json

    blob = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if blob:
        try:
            sub = json.loads(blob).get("metadata", {}).get("job_submission_id")
            if sub:
                return str(sub)
        except ValueError:
            pass
    if os.environ.get("RAY_JOB_SUBMISSION_ID"):
        return os.environ["RAY_JOB_SUBMISSION_ID"]
    import ray

    return ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def find_or_create_run(
    c, experiment: str, job_key: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None
) -> tuple[str, bool]:
    """The run tagged ``cdm.job_key = job_key`` (resumed), or a new one. Returns (run_id, resumed)."""
    exp_id = experiment_id(c, experiment)
    found = c.search_runs([exp_id], filter_string=f"tags.`{JOB_KEY_TAG}` = '{job_key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    all_tags = {JOB_KEY_TAG: job_key, "mlflow.runName": run_name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, tags=all_tags, run_name=run_name)
    return run.info.run_id, False


def log_params_once(c, run_id: str, params: dict) -> None:
    """Log flattened params; on a resumed run, only those not logged yet (MLflow params are immutable)."""
    from mlflow.entities import Param

    have = c.get_run(run_id).data.params
    new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
    for i in range(0, len(new), 100):
        c.log_batch(run_id, params=new[i : i + 100])


def log_metrics(c, run_id: str, rows: list[tuple]) -> None:
    """``rows`` = [(step, {name: value})] or [(step, {name: value}, unix seconds measured)] -> one log_batch
    per 500 points (timestamped now unless the row says when it was measured)."""
    from mlflow.entities import Metric

    now = time.time()
    pts = [
        Metric(k.replace("/", "."), float(v), int((r[2] if len(r) > 2 else now) * 1000), int(r[0]))
        for r in rows
        for k, v in r[1].items()
        if v == v and abs(v) != float("inf")
    ]
    for i in range(0, len(pts), 500):
        c.log_batch(run_id, metrics=pts[i : i + 500])


LOGGED_THROUGH_TAG = "cdm.metrics_logged_through"


class MetricBuffer:
    """Rank 0's metrics since the last committed checkpoint.

    ``flush`` skips steps at or below the run's high-water mark (tag ``cdm.metrics_logged_through``),
    so a group that restarts from an older checkpoint than the one the metrics were flushed at (the
    controller had not registered it yet) still logs every step exactly once.
    """

    def __init__(self, c=None, run_id: str | None = None):
        self.rows: list[tuple[int, dict[str, float], float]] = []
        self.logged_through = -1
        if c is not None and run_id:
            self.logged_through = int(c.get_run(run_id).data.tags.get(LOGGED_THROUGH_TAG, -1))

    def add(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer ``metrics`` of ``step``, timestamped now (when they were measured, not when flushed)."""
        self.rows.append((step, dict(metrics), time.time()))

    def flush(self, c, run_id: str) -> None:
        rows = [r for r in self.rows if r[0] > self.logged_through]
        if rows:
            log_metrics(c, run_id, rows)
            self.logged_through = max(r[0] for r in rows)
            c.set_tag(run_id, LOGGED_THROUGH_TAG, str(self.logged_through))
        self.rows = []


def register_version(c, name: str, run_id: str, tags: dict, metrics: dict) -> str:
    """Register the run's ``student`` artifact as a version of ``name`` (once per run)."""
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="CDM 4-step students")
    for mv in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return mv.version
    run = c.get_run(run_id)
    mv_tags = {**tags, **{k: f"{v:.6g}" for k, v in metrics.items()}, "cdm.mlflow_run_id": run_id}
    mv = c.create_model_version(name, f"{run.info.artifact_uri}/student", run_id=run_id, tags=mv_tags)
    return mv.version


def promote(c, name: str, version: str | None, source: str, alias: str, note: str, force: bool = False) -> str:
    """Point ``alias`` at ``version`` (default: the version aliased ``source``) and tag the version with
    ``note`` (the command that did it). A version whose quality gate failed (tag ``cdm.gate``) is refused
    unless ``force``, which is tagged on the version. Returns the version; bad names raise ValueError."""
    from mlflow.exceptions import MlflowException

    try:
        v = version or c.get_model_version_by_alias(name, source).version
        mv = c.get_model_version(name, v)
        verdict = (mv.tags or {}).get("cdm.gate")
        if verdict == "failed" and not force:
            report = (mv.tags or {}).get("cdm.gate.report", "")
            raise ValueError(
                f"promote: {name} version {v} failed the quality gate ({report}); pass --force to promote it anyway"
            )
        c.set_registered_model_alias(name, alias, v)
        c.set_model_version_tag(name, v, f"cdm.promoted_to.{alias}", note)
        if force:
            c.set_model_version_tag(name, v, f"cdm.promoted_to.{alias}.forced", f"true (gate: {verdict or 'none'})")
    except MlflowException as e:
        raise ValueError(f"promote: {e.message.splitlines()[0]}") from None
    return v
