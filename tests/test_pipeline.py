"""``cdm pipeline`` end to end on a minimal budget (real Ray Train + DeepSpeed, MLflow, Ray Serve, HTTP): the lineage
walked back from a served response, rerun = resume, and a gate forced to fail leaves no ``champion`` alias."""

import json
import subprocess
import sys
from pathlib import Path

import requests

from tests.distill_helpers import mlflow_client, tiny_overrides
from tests.test_serving import _free_port


def test_pipeline_serves_a_gated_student_whose_lineage_walks_back_to_teacher_and_config(ray_cluster, distill_env):
    from ray import serve

    from serving.smoke import serve_and_smoke
    from workflows import checkpoints
    from workflows.config import DEFAULT_TEACHER, load_config
    from workflows.distill import job_hash, job_key
    from workflows.distill_config import DistillConfig
    from workflows.evaluation import folder_hash
    from workflows.pipeline import run_pipeline

    tmp = distill_env
    # 4 student steps cannot move the pixel panel into its band; the gate here is only both judges' FD with slack
    sets = tiny_overrides(tmp, **{"eval.val_every": 2, "gate.bands": "{}", "gate.factor": 1.05})
    cfg = load_config(DistillConfig, "tiny", sets)
    port = _free_port()
    out = run_pipeline(cfg, command="pytest", port=port, keep_serving=True, serve_stage=serve_and_smoke)
    try:
        assert out["gate"]["passed"] and out["smoke"]["served_version"] == out["version"]
        r = requests.post(
            f"http://127.0.0.1:{port}/v1/images/generations", json={"prompt": "a photo of a bag", "seed": 3}, timeout=60
        )
        assert r.status_code == 200, r.text
        name, version = r.headers["X-CDM-Model"], r.headers["X-CDM-Model-Version"]
    finally:
        serve.shutdown()

    # served response -> registered version -> source run -> checkpoint -> teacher content hash -> config hash
    c = mlflow_client(tmp)
    mv = c.get_model_version(name, version)
    assert str(c.get_model_version_by_alias(name, "champion").version) == version
    assert mv.tags["cdm.gate"] == "passed" and json.loads(mv.tags["cdm.gate.rule"])["factor"] == 1.05
    run = c.get_run(mv.run_id)
    assert run.data.tags["cdm.job_key"] == job_key(cfg)
    ckpt = checkpoints.latest(Path(run.data.tags["cdm.checkpoint_path"]))
    assert ckpt is not None and checkpoints.read_meta(ckpt)["config_hash"] == job_hash(cfg)
    assert run.data.tags["cdm.teacher_hash"] == folder_hash(DEFAULT_TEACHER)
    assert run.data.tags["cdm.config_hash"] == job_hash(cfg)
    assert out["lineage"]["run_id"] == mv.run_id and out["lineage"]["checkpoint"] == str(ckpt.parent)

    folder = Path(out["job_dir"]) / "pipeline"
    for f in ("evaluate.json", "gate.json", "serve.json", "summary.json", "summary.md", "comparison.png", "smoke.png"):
        assert (folder / f).stat().st_size > 0, f
    rows = json.loads((folder / "summary.json").read_text())["rows"]
    # the gate's row (the first) is the teacher's 4-step Euler at the student's own levels; the teacher's own shift-3
    # Euler is a row of its own when those differ
    first = next(iter(rows))
    assert f"shift {cfg.cdm.shift:g}" in first, list(rows)
    assert len(rows) == (3 if cfg.cdm.shift == 3 else 4) and all(
        "fd2" in r and "near_white" in r for r in rows.values()
    )

    # the same job under a gate it cannot pass: distill and evaluate are skipped (same job key: the gate is not
    # part of it), the CLI exits 3, and the alias it had is taken off the failing version
    argv = [a for s in tiny_overrides(tmp, **{"eval.val_every": 2, "gate.factor": 0.01}) for a in ("--set", s)]
    cli = subprocess.run(
        [sys.executable, "-m", "cdm_cli", "pipeline", "--config", "tiny", "--no-serve", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,
    )
    assert cli.returncode == 3, cli.stderr[-2000:]
    assert "quality gate NOT passed" in cli.stderr and "--force" in cli.stderr
    assert "distill: done earlier, skipped" in cli.stdout and "evaluate: done earlier, skipped" in cli.stdout
    assert "champion" not in c.get_registered_model(name).aliases
    assert c.get_model_version(name, version).tags["cdm.gate"] == "failed"


def _sweep_yaml(tmp: Path, **base_over) -> Path:
    """Two 4-step trials on the tiny teacher: a usable learning rate and one that wrecks the student at once."""
    import yaml

    base = {
        "storage_path": str(tmp / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "train": {"student_steps": 4, "batch_size_per_worker": 4, "log_every": 1, "sample_every": 100},
        "cdm": {"n_max": 3},
        "optim": {"warmup_steps": 0},
        "scaling": {"num_workers": 1},
        "eval": {"n_samples": 20},
        **base_over,
    }
    d = {
        "name": "pipe",
        "preset": "tiny",
        "base": base,
        "validation": {"every": 2, "n_samples": 50},
        "space": {"optim.lr_student": [1.0e-4, 0.3]},
        "searcher": {"kind": "grid"},
        "scheduler": {"kind": "none"},
        "budget": {"max_concurrent_trials": 2, "trial_cpus": 0.25},
    }
    p = tmp / "sweep.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def test_pipeline_with_a_sweep_distills_the_best_trials_values_and_reads_the_sweep_back_on_rerun(
    ray_cluster, distill_env
):
    from functools import partial

    from tuning.sweep import run_or_reuse
    from workflows.config import load_config
    from workflows.distill_config import DistillConfig
    from workflows.pipeline import run_pipeline

    tmp = distill_env
    sweep = partial(run_or_reuse, str(_sweep_yaml(tmp)), [])
    # the gate is not what this test is about: only both judges' FD, with room for a 4-step student
    cfg = load_config(DistillConfig, "tiny", tiny_overrides(tmp, **{"gate.bands": "{}", "gate.factor": 10}))
    assert cfg.optim.lr_student != 1.0e-4
    out = run_pipeline(cfg, command="pytest", sweep_stage=sweep)
    assert out["sweep"]["recipe"] == {"optim.lr_student": 1.0e-4} and out["sweep"]["trials"] == 2
    assert out["times"]["sweep"]["skipped"] is False
    c = mlflow_client(tmp)
    run = c.get_run(out["run_id"])
    assert float(run.data.params["optim.lr_student"]) == 1.0e-4  # the distillation trained the sweep's value
    assert float(run.data.params["train.student_steps"]) == 4  # at the pipeline's budget, not the trials'
    assert run.data.tags["cdm.recipe.sweep_key"] == out["sweep"]["sweep_key"]
    parent = c.get_run(run.data.tags["cdm.recipe.sweep_run_id"])
    assert parent.data.tags["cdm.kind"] == "sweep"
    assert run.info.run_id not in {
        r.info.run_id
        for r in c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    }  # the pipeline's job is not one of the sweep's trials
    folder = Path(out["job_dir"]) / "pipeline"
    assert json.loads((folder / "sweep.json").read_text())["sweep_key"] == out["sweep"]["sweep_key"]
    assert "Recipe from sweep" in (folder / "summary.md").read_text()

    again = run_pipeline(cfg, command="pytest", sweep_stage=sweep)
    assert again["times"]["sweep"]["skipped"] is True and again["times"]["distill"]["skipped"] is True
    assert again["version"] == out["version"]


def test_a_sweep_on_other_prompts_than_the_pipelines_is_refused_naming_both(distill_env):
    import pytest

    from tuning.sweep import run_or_reuse
    from workflows.config import ConfigError, load_config
    from workflows.distill_config import DistillConfig

    tmp = distill_env
    (tmp / "mine.txt").write_text("a photo of a shoe\na photo of a bag\n")
    cfg = load_config(DistillConfig, "tiny", tiny_overrides(tmp, prompts=str(tmp / "mine.txt")))
    with pytest.raises(ConfigError, match="prompts .*builtin.* are not the pipeline's .*mine.txt"):
        run_or_reuse(str(_sweep_yaml(tmp)), [], cfg)
