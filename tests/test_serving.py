"""Real Ray Serve over HTTP on 127.0.0.1, serving a registered model version (the built-in teacher's
weights registered in a tmp sqlite MLflow store and aliased ``champion``) at 4 steps."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

APP = "cdmtest"
NAME = "cdm-serve-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real registry: the built-in teacher folder logged as a run's ``student`` artifact, version 1 @champion."""
    from mlflow.tracking import MlflowClient

    from workflows.config import DEFAULT_TEACHER

    d = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("serve-test", artifact_location=str(d / "artifacts"))
    run = c.create_run(exp)
    c.log_artifacts(run.info.run_id, str(DEFAULT_TEACHER), "student")
    c.set_terminated(run.info.run_id)
    c.create_registered_model(NAME)
    mv = c.create_model_version(
        NAME, f"{run.info.artifact_uri}/student", run_id=run.info.run_id, tags={"cdm.teacher": str(DEFAULT_TEACHER)}
    )
    c.set_registered_model_alias(NAME, "champion", mv.version)
    return {"uri": uri, "client": c, "version": str(mv.version), "run_id": run.info.run_id, "cache": str(d / "cache")}


@pytest.fixture(scope="module")
def service(ray_cluster, registry):
    from ray import serve

    from serving.launch import application, resolve_args

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = resolve_args(
        {"cache_dir": registry["cache"], "app_name": APP}, f"models:/{NAME}@champion", registry["uri"], url
    )

    def deploy(**opts):
        base = {
            "name": "ImageService",
            "num_replicas": 1,
            "max_ongoing_requests": 16,
            "max_queued_requests": 32,
            "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02},
            "ray_actor_options": {"num_cpus": 0.5},
            "graceful_shutdown_timeout_s": 2,
            "graceful_shutdown_wait_loop_s": 0.5,
        }
        base.update(opts)
        if base.get("autoscaling_config"):
            base.pop("num_replicas")
        else:
            base["autoscaling_config"] = None
        serve.run(application(args, [base]), name=APP, route_prefix="/", blocking=False)
        _wait_running(serve, base.get("num_replicas", 1))
        return url

    deploy()
    yield deploy, url
    serve.delete(APP)
    serve.shutdown()


def _replicas(serve) -> dict:
    st = serve.status().applications.get(APP)
    if st is None or "ImageService" not in st.deployments:
        return {}
    return dict(st.deployments["ImageService"].replica_states)


def _wait_running(serve, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = _replicas(serve)
        if r.get("RUNNING", 0) == n and sum(r.values()) == n:
            return
        time.sleep(0.5)
    raise AssertionError(f"expected {n} running replicas, have {_replicas(serve)}")


def _png(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_routes_and_lineage(service, registry):
    _, url = service
    h = requests.get(f"{url}/healthz", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.headers["X-CDM-Model"] == NAME and h.headers["X-CDM-Model-Version"] == registry["version"]
    models = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    assert (models["id"], models["version"], models["alias"]) == (NAME, registry["version"], "champion")
    assert models["run_id"] == registry["run_id"] and models["teacher"]
    assert "/v1/images/generations" in requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]

    r = requests.post(
        f"{url}/v1/images/generations",
        json={"prompt": "a photo of a sneaker", "n": 3, "size": "64x64", "seed": 1},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-CDM-Model-Version"] == registry["version"]
    data = r.json()["data"]
    assert len(data) == 3 and _png(data[0]["b64_json"]).size == (64, 64)

    g = requests.post(
        f"{url}/generate", json={"prompt": ["a bag", "a dress"], "n": 2, "steps": 2, "seed": 5}, timeout=60
    )
    assert g.status_code == 200 and g.headers["X-CDM-Steps"] == "2"
    imgs = g.json()["images"]
    assert [i["prompt"] for i in imgs] == ["a bag", "a bag", "a dress", "a dress"]
    assert _png(imgs[0]["b64_png"]).size == (32, 32)
    p = requests.post(f"{url}/generate", json={"prompt": "a bag", "format": "png", "seed": 5}, timeout=60)
    assert p.status_code == 200 and p.headers["content-type"] == "image/png" and p.content[:4] == b"\x89PNG"

    tags = registry["client"].get_model_version(NAME, registry["version"]).tags
    assert tags[f"cdm.serving.{APP}.where"] == url and f"cdm.serving.{APP}.since" in tags
    assert tags[f"cdm.serving.{APP}.alias"] == "champion"


def test_openai_client_works_unchanged(service):
    from openai import OpenAI

    _, url = service
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    res = client.images.generate(
        model=NAME, prompt="a photo of a sandal", n=2, size="256x256", response_format="b64_json"
    )
    assert len(res.data) == 2 and _png(res.data[0].b64_json).size == (256, 256)


def test_seeds_reproduce_bytes_alone_and_batched(service):
    _, url = service

    def gen(seed, prompt="a photo of a shirt"):
        r = requests.post(f"{url}/generate", json={"prompt": prompt, "seed": seed, "format": "png"}, timeout=120)
        assert r.status_code == 200, r.text
        return r.content, int(r.headers["X-CDM-Batch-Size"])

    a, _ = gen(7)
    assert gen(7)[0] == a
    assert gen(8)[0] != a
    with ThreadPoolExecutor(12) as ex:  # the same request inside batches with other prompts and seeds
        out = list(ex.map(lambda i: gen(7) if i % 3 == 0 else gen(100 + i, "a bag"), range(24)))
    assert max(b for _, b in out) > 1
    assert all(content == a for i, (content, _) in enumerate(out) if i % 3 == 0)


def test_concurrent_requests_are_batched(service):
    _, url = service
    with ThreadPoolExecutor(16) as ex:
        rs = list(
            ex.map(
                lambda i: requests.post(f"{url}/generate", json={"prompt": "a coat", "seed": i}, timeout=120), range(32)
            )
        )
    assert {r.status_code for r in rs} == {200}
    sizes = [int(r.headers["X-CDM-Batch-Size"]) for r in rs]
    assert max(sizes) > 1, sizes


BAD = [
    ("/v1/images/generations", {"prompt": ""}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "   "}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x" * 513}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "a bag", "n": 0}, 400, "n"),
    ("/v1/images/generations", {"prompt": "a bag", "n": 9}, 400, "n"),
    ("/v1/images/generations", {"prompt": "a bag", "size": "1024x1024"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "a bag", "response_format": "url"}, 400, "response_format"),
    ("/v1/images/generations", {"prompt": "a bag", "model": "dall-e-3"}, 404, "model"),
    ("/v1/images/generations", {"prompt": "a bag", "seed": -1}, 400, "seed"),
    ("/v1/images/generations", {"prompt": "a bag", "colour": "red"}, 400, "colour"),
    ("/v1/images/generations", {"n": 1}, 400, "prompt"),
    ("/v1/images/generations", [1, 2], 400, "body"),
    ("/generate", {"prompt": "a bag", "steps": 3}, 400, "steps"),
    ("/generate", {"prompt": "a bag", "steps": 0}, 400, "steps"),
    ("/generate", {"prompt": []}, 400, "prompt"),
    ("/generate", {"prompt": ["a bag"] * 9}, 400, "prompt"),
    ("/generate", {"prompt": ["a bag"] * 8, "n": 8}, 400, "n"),
    ("/generate", {"prompt": "a bag", "format": "gif"}, 400, "format"),
    ("/generate", {"prompt": 3}, 400, "prompt"),
]


@pytest.mark.parametrize("route,body,status,param", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_name_the_field(service, route, body, status, param):
    _, url = service
    r = requests.post(f"{url}{route}", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err


def test_malformed_json_and_oversized_body(service):
    _, url = service
    r = requests.post(f"{url}/generate", data=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = requests.post(
        f"{url}/generate", data=b"x" * (2 << 20), headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def test_flood_beyond_the_queue_gets_503_then_service_recovers(service):
    deploy, url = service
    deploy(
        max_ongoing_requests=1, max_queued_requests=2, user_config={"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
    )
    try:

        def call(i):
            return requests.post(f"{url}/generate", json={"prompt": "a bag", "n": 8, "seed": i}, timeout=120)

        with ThreadPoolExecutor(40) as ex:
            codes = [r.status_code for r in ex.map(call, range(80))]
        assert 503 in codes and 200 in codes, codes
        assert set(codes) <= {200, 503}, codes
        assert call(0).status_code == 200
    finally:
        deploy()


def test_autoscaling_up_under_load_and_back_down(service):
    from ray import serve

    deploy, url = service
    deploy(
        autoscaling_config={
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
        user_config={"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
    )
    stop = threading.Event()
    codes: list[int] = []

    def load():
        while not stop.is_set():
            codes.append(requests.post(f"{url}/generate", json={"prompt": "a bag", "n": 4}, timeout=120).status_code)

    threads = [threading.Thread(target=load) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        deadline, peak = time.time() + 90, 0
        while time.time() < deadline and peak < 2:
            peak = max(peak, _replicas(serve).get("RUNNING", 0))
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert peak == 2, _replicas(serve)
    assert set(codes) == {200}
    deadline = time.time() + 90
    while time.time() < deadline and sum(_replicas(serve).values()) != 1:
        time.sleep(0.5)
    assert _replicas(serve) == {"RUNNING": 1}
    deploy()


def test_killed_replica_is_replaced_and_serving_continues(service):
    from ray import serve

    deploy, url = service
    deploy(num_replicas=2)
    pids = set()
    deadline = time.time() + 60
    while len(pids) < 2 and time.time() < deadline:
        pids.add(requests.get(f"{url}/healthz", timeout=30).json()["pid"])
    assert len(pids) == 2
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    codes = []
    deadline = time.time() + 120
    new_pids: set[int] = set()
    while time.time() < deadline:
        r = requests.post(f"{url}/generate", json={"prompt": "a bag", "seed": 1}, timeout=60)
        codes.append(r.status_code)
        new_pids.add(requests.get(f"{url}/healthz", timeout=30).json()["pid"])
        running = _replicas(serve).get("RUNNING", 0)
        if len(new_pids - {victim}) == 2 and running == 2 and len(codes) >= 10:
            break
        time.sleep(0.2)
    assert victim not in new_pids and len(new_pids - pids) >= 1, (pids, new_pids)
    assert codes.count(200) >= 0.9 * len(codes) and codes[-5:] == [200] * 5, codes
    deploy()


@pytest.mark.parametrize(
    "edit,needle",
    [
        (
            lambda d: d["applications"][0]["deployments"][0].update(max_replica=3),
            "max_replica: unknown deployment option",
        ),
        (lambda d: d["applications"][0]["deployments"][0]["user_config"].update(max_batch_size=0), "max_batch_size"),
        (lambda d: d["applications"][0]["args"].update(max_n=0), "max_n"),
        (lambda d: d["applications"][0]["args"].update(colour="red"), "colour: unknown field"),
        (lambda d: d.update(applications=[]), "exactly one application"),
    ],
)
def test_bad_serve_config_is_rejected_naming_the_field(tmp_path, edit, needle):
    import yaml

    from serving.launch import DEFAULT_CONFIG, load_serve_config

    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    load_serve_config(DEFAULT_CONFIG)  # the shipped file is valid
    edit(data)
    p = tmp_path / "serve.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=needle):
        load_serve_config(p)
