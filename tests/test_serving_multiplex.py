"""Many students, one deployment: two registered versions (the built-in teacher as v1 @champion, a copy with
perturbed transformer weights as v2) served by one ImageService under the public ids ``team-a`` and ``team-b``,
picked by the request's ``model`` (or Serve's ``serve_multiplexed_model_id`` header), with Ray Serve's model
multiplexing holding one model per replica (``max_models_per_replica: 1``: every switch evicts). Real Ray Serve
over HTTP on 127.0.0.1 and a real sqlite MLflow registry; the Catalog's rules also without a cluster."""

from __future__ import annotations

import base64
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from test_serving import _assert_no_leaks, _free_port, small_deployment

APP = "cdmmulti"
NAME = "cdm-serve-multi"
MODELS = {"team-a": f"models:/{NAME}/1", "team-b": f"models:/{NAME}/2"}
PROMPT = "a photo of a sneaker"


def _perturbed_copy(src: Path, dst: Path) -> Path:
    """The teacher folder with every float weight of its transformer moved a little (another student)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    g = torch.Generator().manual_seed(0)
    for k, w in weights.items():
        if w.is_floating_point():
            weights[k] = (w + 0.05 * w.float().std().nan_to_num(0.0) * torch.randn(w.shape, generator=g)).to(w.dtype)
    save_file(weights, str(path))
    return dst


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """v1 (@champion): the built-in teacher's folder; v2: its perturbed copy. Each logged by its own run."""
    from mlflow.tracking import MlflowClient

    from workflows.config import DEFAULT_TEACHER

    d = tmp_path_factory.mktemp("multi-registry")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("serve-multi", artifact_location=str(d / "artifacts"))
    c.create_registered_model(NAME)
    tags = {"cdm.teacher": str(DEFAULT_TEACHER), "cdm.teacher_hash": "0123abcd"}
    runs = []
    for folder in (Path(DEFAULT_TEACHER), _perturbed_copy(Path(DEFAULT_TEACHER), d / "student-v2")):
        run = c.create_run(exp)
        c.log_artifacts(run.info.run_id, str(folder), "student")
        c.set_terminated(run.info.run_id)
        c.create_model_version(NAME, f"{run.info.artifact_uri}/student", run_id=run.info.run_id, tags=tags)
        runs.append(run.info.run_id)
    c.set_registered_model_alias(NAME, "champion", "1")
    hidden = [str(d), str(DEFAULT_TEACHER), str(Path(__file__).resolve().parent.parent), str(Path.home()), sys.prefix]
    hidden = [h for h in hidden if len(h) > 4]  # the server's directories: none may appear in an answer
    return {"uri": uri, "client": c, "runs": runs, "cache": str(d / "cache"), "hidden": hidden}


def _replicas(serve) -> dict:
    st = serve.status().applications.get(APP)
    if st is None or "ImageService" not in st.deployments:
        return {}
    return dict(st.deployments["ImageService"].replica_states)


@pytest.fixture(scope="module")
def service(ray_cluster, registry):
    """One replica serving the default (models:/NAME@champion = v1 = team-a) and team-b, one model loaded at once;
    ``deploy(**args)`` redeploys with other args."""
    from ray import serve

    from serving.failover import controller_options
    from serving.launch import application, resolve_args

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options())

    def deploy(max_models: int = 1, batch_wait_timeout_s: float = 0.02) -> int:
        args = {"cache_dir": registry["cache"], "app_name": APP, "models": MODELS, "max_models_per_replica": max_models}
        app_args = resolve_args(args, f"models:/{NAME}@champion", registry["uri"], url)
        deployment = small_deployment(batch_wait_timeout_s=batch_wait_timeout_s)
        serve.run(application(app_args, [deployment]), name=APP, route_prefix="/", blocking=False)
        deadline = time.time() + 120
        while True:  # until the replica of these args is the only one
            if _replicas(serve) == {"RUNNING": 1}:
                h = requests.get(f"{url}/healthz", timeout=30).json()
                if h["max_models_per_replica"] == max_models and h["max_batch_size"] == 8:
                    return h["pid"]
            assert time.time() < deadline, _replicas(serve)
            time.sleep(0.5)

    pid = deploy()
    yield {"url": url, "pid": pid, "deploy": deploy}
    serve.delete(APP)
    serve.shutdown()


def _images(url: str, model: str | None, seed: int = 3, headers: dict | None = None) -> requests.Response:
    body = {"prompt": PROMPT, "seed": seed, "n": 2, **({"model": model} if model else {})}
    return requests.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=120)


def _bytes(r: requests.Response) -> bytes:
    assert r.status_code == 200, r.text
    if r.headers["content-type"].startswith("image/png"):
        return r.content
    return b"".join(base64.b64decode(d["b64_json"]) for d in r.json()["data"])


def _loaded(url: str, max_models: int = 1) -> list[str]:
    h = requests.get(f"{url}/healthz", timeout=30).json()
    assert h["status"] == "ok" and h["max_models_per_replica"] == max_models
    return [m["id"] for m in h["models_loaded"]]


def test_the_model_field_picks_the_model_and_one_stays_loaded(service):
    url = service["url"]
    assert _loaded(url) == ["team-a"]  # the default, loaded at start
    a = _images(url, "team-a")
    assert (a.headers["X-CDM-Model"], a.headers["X-CDM-Model-Version"], a.headers["X-CDM-Model-Id"]) == (
        NAME,
        "1",
        "team-a",
    )
    b = _images(url, "team-b")
    assert (b.headers["X-CDM-Model"], b.headers["X-CDM-Model-Version"], b.headers["X-CDM-Model-Id"]) == (
        NAME,
        "2",
        "team-b",
    )
    assert _loaded(url) == ["team-b"]  # team-a was evicted to load team-b
    assert _bytes(a) != _bytes(b)  # same prompt and seed, another student
    again = _images(url, "team-a")  # reloaded after its eviction: the seed still decides the bytes
    assert again.headers["X-CDM-Model-Version"] == "1" and _bytes(again) == _bytes(a)
    assert _loaded(url) == ["team-a"]
    default = _images(url, None)  # no model: the default (v1 @champion, declared as team-a)
    assert default.headers["X-CDM-Model-Version"] == "1" and _bytes(default) == _bytes(a)
    by_name = _images(url, f"{NAME}/2")  # a registry name of a declared version picks it too
    assert by_name.headers["X-CDM-Model-Id"] == "team-b" and _bytes(by_name) == _bytes(b)

    def gen(model):
        r = requests.post(
            f"{url}/generate", json={"prompt": PROMPT, "seed": 3, "format": "png", "model": model}, timeout=120
        )
        return r.headers["X-CDM-Model-Version"], _bytes(r)

    (va, png_a), (vb, png_b), (vb2, png_b2) = gen("team-a"), gen("team-b"), gen("team-b")
    assert (va, vb, vb2) == ("1", "2", "2") and png_a != png_b and png_b == png_b2
    r = requests.post(f"{url}/generate", json={"prompt": PROMPT, "seed": 3, "model": "team-b"}, timeout=120)
    assert (r.json()["model"], r.json()["version"], r.json()["id"]) == (NAME, "2", "team-b")


def test_concurrent_requests_for_both_models_never_share_a_forward_pass(service):
    """Interleaved requests for both models (half by the header Serve routes on) while each switch evicts the other:
    every answer has its own model's bytes for the seed, so no batch sampled one model's requests with another."""
    url = service["url"]
    reference = {m: _bytes(_images(url, m, seed=5)) for m in ("team-a", "team-b")}

    def call(i):
        model = ("team-a", "team-b")[i % 2]
        if i % 4 < 2:
            return model, _images(url, model, seed=5)
        return model, _images(url, None, seed=5, headers={"serve_multiplexed_model_id": model})

    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(call, range(24)))
    for model, r in out:
        assert r.headers["X-CDM-Model-Id"] == model, r.headers
        assert r.headers["X-CDM-Model-Version"] == {"team-a": "1", "team-b": "2"}[model]
        assert _bytes(r) == reference[model], model
    assert len(_loaded(url)) == 1


def test_unknown_or_conflicting_model_is_a_4xx_naming_model(service, registry):
    url = service["url"]
    calls = [
        ("/v1/images/generations", {"prompt": PROMPT, "model": "team-z"}, None, 404),
        ("/generate", {"prompt": PROMPT, "model": f"models:/{NAME}/99"}, None, 404),
        ("/generate", {"prompt": PROMPT}, {"serve_multiplexed_model_id": "team-z"}, 404),
        ("/generate", {"prompt": PROMPT, "model": "team-a"}, {"serve_multiplexed_model_id": "team-b"}, 400),
        ("/generate", {"prompt": PROMPT, "model": 3}, None, 400),
    ]
    for route, body, headers, status in calls:
        r = requests.post(f"{url}{route}", json=body, headers=headers, timeout=60)
        assert r.status_code == status, (route, body, r.text)
        err = r.json()["error"]
        assert err["param"] == "model" and "model" in err["message"], err
        _assert_no_leaks(r, registry["hidden"])
        if status == 404:
            assert "'team-a', 'team-b'" in err["message"] and "models:/" not in err["message"], err
    ok = _images(url, "team-b", headers={"serve_multiplexed_model_id": "team-b"})  # both, agreeing
    assert ok.headers["X-CDM-Model-Version"] == "2"


def test_v1_models_and_openapi_list_every_model_without_internals(service, registry):
    url = service["url"]
    r = requests.get(f"{url}/v1/models", timeout=30)
    _assert_no_leaks(r, registry["hidden"])
    data = {m["id"]: m for m in r.json()["data"]}
    assert list(data) == ["team-a", "team-b"]
    for mid, version, run, default in (("team-a", "1", 0, True), ("team-b", "2", 1, False)):
        m = data[mid]
        assert (m["name"], m["version"], m["run_id"], m["default"]) == (NAME, version, registry["runs"][run], default)
        assert (m["teacher"], m["teacher_hash"], m["image_size"]) == ("teacher-tiny", "0123abcd", 32)
        assert not {"source", "folder", "tracking_uri", "uri"} & set(m), m
    assert data["team-a"]["alias"] == "champion" and data["team-b"]["alias"] is None
    doc = requests.get(f"{url}/openapi.json", timeout=30)
    _assert_no_leaks(doc, registry["hidden"])
    schemas = doc.json()["components"]["schemas"]
    for schema in ("ImagesRequest", "GenerateRequest"):
        enum = schemas[schema]["properties"]["model"]["anyOf"][0]["enum"]
        assert enum[:2] == ["team-a", "team-b"] and f"{NAME}/2" in enum, enum
        assert not any(h in e for e in enum for h in registry["hidden"])
    paths = doc.json()["paths"]
    assert "404" in paths["/generate"]["post"]["responses"]
    tags = registry["client"].get_model_version(NAME, "2").tags  # lineage: where each version is served
    assert tags[f"cdm.serving.{APP}.where"] == url


def test_metrics_are_tagged_with_each_models_version(service):
    import ray

    url = service["url"]
    for model in ("team-a", "team-b"):
        _bytes(_images(url, model, seed=11))
    port = ray._private.worker.global_worker.node.metrics_export_port
    want = {('model_version="1"', "ray_cdm_images_generated_total"), ('model_version="2"', "ray_cdm_sampler_ms_bucket")}
    found: set = set()
    deadline = time.time() + 60
    while time.time() < deadline and not want <= found:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_cdm_") and f'model="{NAME}"' in ln]
        found = {(v, ln.split("{")[0]) for ln in lines for v in ('model_version="1"', 'model_version="2"') if v in ln}
        time.sleep(2)
    assert want <= found, sorted(found)


def test_the_replica_stayed_healthy(service):
    from ray import serve

    url = service["url"]
    h = requests.get(f"{url}/healthz", timeout=30).json()
    assert h["status"] == "ok" and h["pid"] == service["pid"]  # no restart through all the evictions
    assert h["model"] == NAME and h["version"] == "1" and len(h["models_loaded"]) == 1
    assert _replicas(serve) == {"RUNNING": 1}
    assert serve.status().applications[APP].status == "RUNNING"


def test_a_batch_with_both_models_loaded_samples_each_model_apart(service):
    """Both models loaded (redeployed with ``max_models_per_replica: 2``) and a wide batch window: interleaved
    requests that name their model only in the body meet in one ``@serve.batch`` call (Serve splits batches only by
    the header), and each still gets its own model's bytes: the batch is sampled one group per model."""
    url = service["url"]
    service["deploy"](max_models=2, batch_wait_timeout_s=0.2)
    reference = {m: _bytes(_images(url, m, seed=9)) for m in ("team-a", "team-b")}  # alone: a batch of one
    assert sorted(_loaded(url, 2)) == ["team-a", "team-b"]
    with ThreadPoolExecutor(8) as ex:
        out = list(
            ex.map(lambda i: (("team-a", "team-b")[i % 2], _images(url, ("team-a", "team-b")[i % 2], 9)), range(16))
        )
    assert max(int(r.headers["X-CDM-Batch-Size"]) for _, r in out) > 1  # requests were batched
    for model, r in out:
        assert r.headers["X-CDM-Model-Version"] == {"team-a": "1", "team-b": "2"}[model]
        assert _bytes(r) == reference[model], model


# --- the catalog's rules, no cluster ---


def _served(version: str, alias: str | None = None):
    from serving.source import ServedModel

    return ServedModel(NAME, version, alias, f"run{version}", None, "internal", f"/srv/cache/{NAME}/{version}")


def test_catalog_names_ids_and_defaults():
    from serving.multiplex import Catalog
    from serving.schemas import BadRequest

    v1, v2 = _served("1", "champion"), _served("2")
    single = Catalog(v1)
    assert not single.multi and single.pick(None) == single.pick(f"{NAME}@champion") == NAME
    assert single.request_names() == sorted(v1.names())
    c = Catalog(v1, {"team-a": v1, "alias-a": v1, "team-b": v2})
    assert c.default_id == "team-a" and list(c.entries) == ["team-a", "alias-a", "team-b"]
    assert c.canonical == {"team-a": "team-a", "alias-a": "team-a", "team-b": "team-b"}  # one folder, one load
    assert c.pick(None) == c.pick(NAME) == "team-a" and c.pick(f"models:/{NAME}/2") == "team-b"
    assert c.pick("alias-a", "team-a") == "alias-a"  # the body and header agree on the model
    with pytest.raises(BadRequest, match="different models") as e:
        c.pick("team-a", "team-b")
    assert e.value.param == "model" and e.value.status == 400
    with pytest.raises(BadRequest, match="not served here") as e:
        c.pick("team-z")
    assert e.value.status == 404 and "/srv" not in str(e.value) and "internal" not in str(e.value)
    apart = Catalog(v1, {"team-b": v2})  # the default not among the declared: its registry name is its id
    assert list(apart.entries) == [NAME, "team-b"] and apart.pick("team-b") == "team-b"
    with pytest.raises(ValueError, match=f"models.{NAME}: is the default model's name"):
        Catalog(v1, {NAME: v2})


def test_serve_args_bound_what_may_be_declared():
    from serving.config import ServeArgs
    from workflows.config import ConfigError, build

    assert build(ServeArgs, {"models": MODELS, "max_models_per_replica": 2}).models == MODELS
    for bad, field in [
        ({"models": {"a/b": "builtin"}}, "models"),
        ({"models": {"team-a": ""}}, "models"),
        ({"max_models_per_replica": 0}, "max_models_per_replica"),
        ({"models": {f"m{i}": "builtin" for i in range(65)}}, "models"),
    ]:
        with pytest.raises(ConfigError, match=field):
            build(ServeArgs, bad)
