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
    assert len(rows) == 3 and all("fd2" in r and "near_white" in r for r in rows.values())

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
