"""``cdm pipeline``: from a preset to a served, evaluated, lineage-tracked few-step student in one command.

Stages, each writing its output under ``<job dir>/pipeline/`` (a rerun skips a stage whose output exists for
the same inputs, so rerun = resume; the distillation itself resumes from its checkpoints):

  sweep     optional (``cdm pipeline --sweep <sweep preset>``): a Ray Tune sweep on the same teacher and prompts
            (``tuning.sweep.run_or_reuse``: a finished sweep with the same key is read back, an interrupted one
            resumes); the best trial's searched values become the recipe of the distillation below, which then
            trains at the pipeline preset's full budget (its job key includes them); sweep.json
  distill   the job (``workflows.distill``): train, export the EMA student, evaluate it, register a version
  evaluate  evaluation.json: the teacher at the student's steps and at 100 NFE (cached by content) beside the
            student, on the test seeds, both judges and the pixel panel
  gate      gate.json: ``workflows.compare.quality_gate`` under ``cfg.gate``; the verdict tagged on the version
  promote   the alias ``cfg.gate.alias`` (``champion``) on the version when the gate passed; when it failed the
            pipeline stops here (:class:`GateFailed`), the version stays registered without the alias, and
            ``cdm promote --force`` is the human override
  serve     serve.json / smoke.png: Ray Serve with ``deploy/serve.yaml`` serving ``models:/<name>@<alias>``, one
            request through the HTTP API whose ``X-CDM-Model-Version`` must be the version just promoted
  grid      comparison.png: the same prompts and noise through the 100-NFE teacher, the few-step teacher and the
            student; then summary.json / summary.md: one table, the gate, wall times, lineage, the service URL
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from workflows import lineage
from workflows.compare import comparison_rows, quality_gate
from workflows.distill_config import DistillConfig
from workflows.progress import console

STAGES = ("sweep", "distill", "evaluate", "gate", "promote", "serve", "grid")
GATE_TAG = "cdm.gate"  # "passed" | "failed" on the model version; cdm.gate.rule / cdm.gate.report beside it


class GateFailed(RuntimeError):
    """The student did not beat the teacher's own few-step Euler under ``cfg.gate``: no alias was set."""


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write(path: Path, data: dict) -> dict:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)  # a stage's output appears whole or not at all
    return data


class Stages:
    """Wall time and skip bookkeeping of one pipeline run (``times.json``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.times: dict[str, dict] = {}

    def run(self, name: str, done: dict | None, fn):
        if done is not None:
            console.print(f"\\[pipeline] {name}: done earlier, skipped")
            self.times[name] = {"skipped": True, "wall_s": done.get("wall_s")}
            return done
        console.rule(f"pipeline: {name}")
        t0 = time.time()
        out = fn()
        self.times[name] = {"skipped": False, "wall_s": round(time.time() - t0, 1)}
        if isinstance(out, dict):
            self.folder.mkdir(parents=True, exist_ok=True)
            out = {**out, "wall_s": self.times[name]["wall_s"]}
            _write(self.folder / f"{name}.json", out)
        return out


def _registered(summary: dict | None) -> dict | None:
    """The job's summary when its model version is still in the registry for the same run, else None."""
    if not summary:
        return None
    from mlflow.exceptions import MlflowException

    try:
        mv = lineage.client(summary["tracking_uri"]).get_model_version(summary["model"], summary["version"])
    except MlflowException:
        return None
    return summary if mv.run_id == summary["run_id"] else None


def gate_version(cfg: DistillConfig, c, summary: dict, rows: dict) -> dict:
    """Judge the student against the few-step teacher (the first row) and tag the verdict on its version."""
    names = list(rows)
    passed, lines = quality_gate(rows[names[-1]], rows[names[0]], cfg.gate)
    name, version = summary["model"], summary["version"]
    c.set_model_version_tag(name, version, GATE_TAG, "passed" if passed else "failed")
    c.set_model_version_tag(name, version, f"{GATE_TAG}.rule", cfg.gate.model_dump_json())
    c.set_model_version_tag(name, version, f"{GATE_TAG}.report", "; ".join(lines))
    return {"version": version, "passed": passed, "lines": lines, "rule": cfg.gate.model_dump(mode="json")}


def promote_or_stop(cfg: DistillConfig, c, summary: dict, gate: dict, command: str) -> dict:
    """Alias the version when it passed; otherwise make sure the alias is not on it and raise GateFailed."""
    from mlflow.exceptions import MlflowException

    name, version, alias = summary["model"], summary["version"], cfg.gate.alias
    if gate["passed"]:
        lineage.promote(c, name, version, None, alias, command or "cdm pipeline")
        console.print(f"\\[pipeline] {name}@{alias} -> version {version}")
        return {"version": version, "alias": alias}
    try:
        if str(c.get_model_version_by_alias(name, alias).version) == str(version):
            c.delete_registered_model_alias(name, alias)  # an earlier, laxer gate had aliased this very version
            console.print(f"\\[pipeline] removed {name}@{alias} from version {version}: it fails the current gate")
    except MlflowException:
        pass
    raise GateFailed(
        f"quality gate NOT passed: {name} version {version} stays registered without @{alias}.\n  "
        + "\n  ".join(gate["lines"])
        + f"\n  Override (tagged as forced): cdm promote {name} --version {version} --alias {alias} --force"
    )


SWEEP_TAGS = ("cdm.recipe.sweep_key", "cdm.recipe.sweep_run_id")  # on the distillation run the sweep's recipe made


def sweep_recipe(cfg: DistillConfig, result: dict) -> tuple[DistillConfig, dict]:
    """``cfg`` with the best trial's searched values (``result``: ``cdm sweep``'s summary) and the record of it."""
    from workflows.config import ConfigError, build, flatten, set_values

    best = result["best"]["config"]
    try:
        new = build(DistillConfig, set_values(cfg.model_dump(mode="json"), best))
    except ConfigError as e:
        raise ConfigError(f"sweep {result['sweep_key']}: its best values do not fit this config: {e}") from None
    record = {
        "sweep_key": result["sweep_key"],
        "parent_run_id": result["parent_run_id"],
        "metric": result["metric"],
        "best_trial": result["best"]["trial_id"],
        "best_val": result["best"]["val"],
        "best_at_student_steps": result["best"]["student_steps"],
        "recipe": best,
        "trials": result["trials"],
        "candidate": f"{result['model']}/{result['version']}@{result['alias']}",
        "report": result["report"]["markdown"],
    }
    before = flatten(cfg.model_dump(mode="json"))
    changed = {k: (before[k], v) for k, v in best.items() if before[k] != v}
    console.print(
        f"\\[pipeline] recipe from sweep {result['sweep_key']} (best trial {record['best_trial']}, "
        f"{result['metric']} {result['best']['val']:.4g} on the validation seed): "
        + (", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) or "the preset's values already")
    )
    return new, record


def run_pipeline(
    cfg: DistillConfig,
    command: str = "",
    serve_config: str | Path | None = None,
    port: int | None = None,
    keep_serving: bool = False,
    serve_stage=None,
    sweep_stage=None,
) -> dict:
    """Every stage in order; returns the summary (also ``pipeline/summary.json``). Raises GateFailed.

    ``serve_stage`` is ``serving.smoke.serve_and_smoke`` and ``sweep_stage`` a ``cfg -> (sweep summary, reused)``
    callable (``tuning.sweep.run_or_reuse`` bound to a sweep preset), both passed by ``cdm pipeline`` (workflows
    imports neither serving nor tuning); None skips the stage."""
    from workflows.distill import job_key, run_distill, storage_dir
    from workflows.pipeline_report import comparison_grid, lineage_of, report, write_summary

    t_start = time.time()
    sweep, tags = None, None
    if sweep_stage is not None:
        console.rule("pipeline: sweep")
        result, reused = sweep_stage(cfg)
        cfg, sweep = sweep_recipe(cfg, result)
        sweep["wall_s"] = round(result.get("wall_s", 0.0), 1)
        tags = dict(zip(SWEEP_TAGS, (sweep["sweep_key"], sweep["parent_run_id"])))
    job_dir = storage_dir(cfg) / job_key(cfg)
    folder = job_dir / "pipeline"
    st = Stages(folder)
    if sweep is not None:
        st.times["sweep"] = {"skipped": reused, "wall_s": sweep["wall_s"]}
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "sweep.json", sweep)
    # a job finished by `cdm distill` (job_dir/summary.json) counts as distilled too
    done = _registered(_read(folder / "distill.json")) or _registered(_read(job_dir / "summary.json"))
    summary = st.run("distill", done, lambda: run_distill(cfg, command=command, extra_tags=tags))
    version = str(summary["version"])
    c = lineage.client(summary["tracking_uri"])
    from workflows.distill import teacher_path
    from workflows.model_folder import read_meta

    if read_meta(teacher_path(cfg)).latent:
        raise GateFailed(
            f"quality gate: no judges for this teacher's domain (the built-in judges know Fashion-MNIST only), so "
            f"{summary['model']} version {version} was registered but not judged and stays without "
            f"@{cfg.gate.alias}.\n  Review it, then: cdm promote {summary['model']} --version {version} "
            f"--alias {cfg.gate.alias} --force"
        )

    def same_version(d: dict | None) -> dict | None:
        return d if d and str(d.get("version")) == version else None

    ev = st.run(
        "evaluate",
        same_version(_read(folder / "evaluate.json")),
        lambda: {"version": version, "rows": comparison_rows(cfg, summary)},
    )
    gate = st.run("gate", None, lambda: gate_version(cfg, c, summary, ev["rows"]))  # cheap: always re-judged
    out = {
        "job_key": job_key(cfg),
        "job_dir": str(job_dir),
        "model": summary["model"],
        "version": version,
        "alias": cfg.gate.alias,
        "run_id": summary["run_id"],
        "tracking_uri": summary["tracking_uri"],
        "student_folder": summary["student_folder"],
        "exported_student_steps": summary.get("exported_student_steps"),
        "selection": summary.get("selection"),
        "sweep": sweep,
        "gate": {k: gate[k] for k in ("passed", "lines", "rule")},
        "rows": ev["rows"],
        "times": st.times,
        "lineage": lineage_of(c, summary["model"], version),
    }
    try:
        st.run("promote", None, lambda: promote_or_stop(cfg, c, summary, gate, command))
    except GateFailed:
        out["times"]["total_s"] = round(time.time() - t_start, 1)
        report(write_summary(folder, out))
        raise
    if serve_stage is not None:
        out["smoke"] = st.run(
            "serve",
            None if keep_serving else same_version(_read(folder / "serve.json")),
            lambda: serve_stage(summary, cfg.gate.alias, folder, serve_config, port, keep_serving),
        )
    grid = st.run(
        "grid",
        same_version(_read(folder / "grid.json")),
        lambda: {"version": version, "grid": str(comparison_grid(cfg, summary, folder / "comparison.png"))},
    )
    out.update(grid=grid["grid"], serve_hint=f"cdm serve --model models:/{summary['model']}@{cfg.gate.alias}")
    out["times"]["total_s"] = round(time.time() - t_start, 1)
    report(write_summary(folder, out))
    return out
