"""The cluster configs a platform team applies: the Ray cluster launcher config (validated against the schema
that ships inside ``ray``), the KubeRay RayJob and RayService (structure, entrypoints that exist in the CLI,
images, resources, token auth), the image's Ray version, and the RayService generated from deploy/serve.yaml."""

import importlib
import json
import shlex
import sys
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def test_cluster_yaml_validates_against_rays_own_schema_and_keeps_security_defaults():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = _load(REPO / "cluster.yaml")
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = [t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu) and cfg["max_workers"] >= 1
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # loopback: reached through `ray dashboard` only
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert all("RAY_AUTH_MODE=token" in c for c in cmds if "ray start" in c)
    setup = " ".join(cfg["setup_commands"])
    for needle in (
        "pip install -q -e .",
        "torch==",
        "MLFLOW_TRACKING_URI",
        "CDM_CACHE_DIR=/mnt/shared",
        "/mnt/shared",
        "workflows.deepspeed_engine",
    ):
        assert needle in setup, needle
    assert "~/.ray/auth_token" in cfg["file_mounts"].values()


def _cli_command_resolves(argv: list[str]) -> None:
    """``cdm <command> ...`` parses with the real CLI and its --config/--set resolve to a valid config."""
    from typer.main import get_command

    from cdm_cli import app
    from workflows.config import load_config
    from workflows.distill_config import DistillConfig

    assert argv[0] == "cdm", argv
    cmd = get_command(app).commands[argv[1]]
    params = cmd.make_context(argv[1], argv[2:]).params
    if argv[1] in ("distill", "run"):
        load_config(DistillConfig, params["config"], params["set_"])


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_rayjob_runs_a_real_cli_entrypoint_on_gpu_workers_with_token_auth():
    job = _load(DEPLOY / "kuberay" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    _cli_command_resolves(shlex.split(job["spec"]["entrypoint"]))
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    head = _containers(spec["headGroupSpec"]["template"])
    workers = [c for g in spec["workerGroupSpecs"] for c in _containers(g["template"])]
    submitter = _containers(job["spec"]["submitterPodTemplate"])
    for c in head + workers + submitter:
        assert c["image"], c["name"]
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    for c in head + workers:
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/mnt/shared"}
    assert all(int(c["resources"]["requests"]["nvidia.com/gpu"]) >= 1 for c in workers)
    assert all(int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for c in workers)


def test_rayservice_is_rendered_from_serve_yaml_and_its_import_path_exists():
    sys.path.insert(0, str(DEPLOY / "kuberay"))
    try:
        render = importlib.import_module("render")
    finally:
        sys.path.pop(0)
    committed = (DEPLOY / "kuberay" / "rayservice.yaml").read_text()
    assert committed == render.render(), "deploy/kuberay/rayservice.yaml is stale: python deploy/kuberay/render.py"
    svc = yaml.safe_load(committed)
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    expected = _load(DEPLOY / "serve.yaml")
    for path, value in render.K8S_OVERRIDES.items():  # equal to deploy/serve.yaml but for the documented overrides
        node = expected
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    assert serve_cfg == expected
    for app in serve_cfg["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    for c in _containers(cluster["headGroupSpec"]["template"]) + [
        c for g in cluster["workerGroupSpecs"] for c in _containers(g["template"])
    ]:
        assert c["image"] and c["resources"]["requests"]["cpu"]
        assert {e["name"] for e in c["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"}


def test_the_image_is_built_on_the_ray_version_the_project_runs():
    first = next(ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if ln.startswith("FROM "))
    assert first.split(":")[1].startswith(ray.__version__ + "-"), first
