"""Serving distilled pipeline folders: a tiny SD3 export (registered in a tmp sqlite MLflow store, @champion) and a
tiny LongCat-Image export (a local folder, public id ``longcat``) behind one real Ray Serve replica over HTTP. Each
export is what ``workflows.pipeline_folders.export_pipeline`` writes (the user's folder, the student transformer,
a shift-1 scheduler and ``cdm_model.json`` with the exact ``inference_sigmas``; the "student" here is the tiny
teacher's transformer). The replica runs the folders' own text encoders and VAE; the served PNGs must equal the
project's own 4-step sampling of the recorded levels, in-process (and, for SD3, plain diffusers' pipeline)."""

from __future__ import annotations

import base64
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from test_serving import _assert_no_leaks, _free_port, small_deployment

APP = "cdmpipes"
NAME = "tiny-sd3-student"
PROMPT = "a photo of a red bag"
SIZES = ["64x64", "128x128", "256x256", "512x512"]  # native 64 and the upscales up to 1024 px


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from cdm_core.schedule import inference_levels
    from tests.tiny_pipelines import build_tiny_longcat, build_tiny_sd3
    from workflows.model_folder import load_transformer, read_meta
    from workflows.pipeline_folders import export_pipeline

    d = tmp_path_factory.mktemp("pipeline-exports")
    out = {}
    for kind, build in (("sd3", build_tiny_sd3), ("longcat", build_tiny_longcat)):
        teacher = build(d / f"{kind}-teacher")
        if kind == "longcat":
            (teacher / "cdm_model.json").write_text(json.dumps({"image_size": 64}))
        card = {**vars(read_meta(teacher)), "shift": 1.0, "default_steps": 4, "default_guidance": 1.0}
        levels = [float(v) for v in inference_levels(4, 3.0)]
        out[kind] = export_pipeline(teacher, load_transformer(teacher), d / f"{kind}-student", levels, card)
    out["root"] = d
    return out


@pytest.fixture(scope="module")
def registry(exports):
    from mlflow.tracking import MlflowClient

    d = exports["root"] / "registry"
    uri = f"sqlite:///{d / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("serve-pipelines", artifact_location=str(d / "artifacts"))
    run = c.create_run(exp)
    c.log_artifacts(run.info.run_id, str(exports["sd3"]), "student")
    c.set_terminated(run.info.run_id)
    c.create_registered_model(NAME)
    tags = {"cdm.teacher": str(exports["root"] / "sd3-teacher"), "cdm.teacher_hash": "feedbeef"}
    mv = c.create_model_version(NAME, f"{run.info.artifact_uri}/student", run_id=run.info.run_id, tags=tags)
    c.set_registered_model_alias(NAME, "champion", mv.version)
    hidden = [str(exports["root"]), str(Path(__file__).resolve().parent.parent), str(Path.home()), sys.prefix]
    return {"uri": uri, "cache": str(d / "cache"), "hidden": [h for h in hidden if len(h) > 4]}


@pytest.fixture(scope="module")
def url(ray_cluster, exports, registry):
    from ray import serve

    from serving.failover import controller_options
    from serving.launch import application, resolve_args

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options())
    args = {"cache_dir": registry["cache"], "app_name": APP, "models": {"longcat": str(exports["longcat"])}}
    app_args = resolve_args(args, f"models:/{NAME}@champion", registry["uri"], url)
    deployment = small_deployment()
    serve.run(application(app_args, [deployment]), name=APP, route_prefix="/", blocking=False)
    deadline = time.time() + 120
    while True:
        st = serve.status().applications.get(APP)
        if st is not None and st.status == "RUNNING":
            break
        assert time.time() < deadline and (st is None or st.status != "DEPLOY_FAILED"), st
        time.sleep(0.5)
    yield url
    serve.delete(APP)
    serve.shutdown()


def _rgb(png: bytes) -> np.ndarray:
    from PIL import Image

    assert png[:4] == b"\x89PNG"
    im = Image.open(io.BytesIO(png))
    assert im.mode == "RGB", im.mode
    return np.asarray(im)


def _openai(url: str, seed: int, n: int = 1, **kw) -> list[bytes]:
    r = requests.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "seed": seed, "n": n, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return [base64.b64decode(d["b64_json"]) for d in r.json()["data"]]


def _generate(url: str, seed: int, **kw) -> requests.Response:
    r = requests.post(f"{url}/generate", json={"prompt": PROMPT, "seed": seed, "format": "png", **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return r


@pytest.fixture(scope="module")
def reference(exports):
    """The project's own sampling, in-process: the pipeline's encoders, the student at the recorded levels, the VAE."""
    from cdm_core.sampling import sample_euler
    from workflows.images import to_uint8
    from workflows.model_folder import load_model
    from workflows.pipeline_folders import LatentDecoder, PipelineTextEncoder

    cache = {}

    def images(kind: str, seed: int, n: int) -> np.ndarray:
        if kind not in cache:
            folder = exports[kind]
            recorded = json.loads((folder / "cdm_model.json").read_text())["inference_sigmas"]
            assert len(recorded) == 4 and recorded[-1] > 0  # 4 steps, 4 NFE; the scheduler adds the terminal 0
            levels = torch.tensor(recorded + [0.0])
            cache[kind] = (load_model(folder), PipelineTextEncoder(folder), LatentDecoder(folder), levels)
        handle, enc, dec, levels = cache[kind]
        noise = torch.randn((n, *handle.shape), generator=torch.Generator().manual_seed(seed))
        x = sample_euler(handle.velocity(), noise, levels, enc.encode([PROMPT]).expand(n))
        return to_uint8(dec(x))

    return images


def test_openai_route_serves_the_students_native_pngs(url, reference, exports, registry):
    a = _openai(url, seed=11, n=2)
    assert _openai(url, seed=11, n=2) == a  # same seed, same bytes
    assert _openai(url, seed=12, n=2) != a
    got = np.stack([_rgb(p) for p in a])
    assert got.shape == (2, 64, 64, 3)
    ref = reference("sd3", 11, 2)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # the in-process sampling, within uint8 rounding

    from diffusers import StableDiffusion3Pipeline  # and what the export gives in plain diffusers

    pipe = StableDiffusion3Pipeline.from_pretrained(str(exports["sd3"]))
    sig = json.loads((exports["sd3"] / "cdm_model.json").read_text())["inference_sigmas"]
    noise = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(11))
    kw = dict(num_inference_steps=4, sigmas=sig, guidance_scale=1.0, num_images_per_prompt=2, output_type="np")
    out = pipe(PROMPT, latents=noise, **kw)
    assert np.abs(got.astype(int) - (out.images * 255).round().astype(int)).max() <= 1

    up = _rgb(_openai(url, seed=11, size="128x128")[0])  # an upscale: nearest, the same pixels
    assert up.shape == (128, 128, 3) and np.array_equal(up[::2, ::2], got[0])
    r = requests.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "size": "1024x1024"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    _assert_no_leaks(r, registry["hidden"])


def test_generate_route_and_steps(url, reference, registry):
    r = _generate(url, seed=5)
    assert r.headers["content-type"] == "image/png" and r.headers["X-CDM-Steps"] == "4"
    assert np.abs(_rgb(r.content).astype(int) - reference("sd3", 5, 1)[0].astype(int)).max() <= 1
    assert _generate(url, seed=5).content == r.content
    _assert_no_leaks(r, registry["hidden"])
    two = _generate(url, seed=5, steps=2)  # other step counts: the distillation shift recovered from the levels
    assert two.headers["X-CDM-Steps"] == "2" and two.content != r.content
    j = requests.post(f"{url}/generate", json={"prompt": [PROMPT, "a dog"], "n": 2, "seed": 5}, timeout=120)
    assert j.status_code == 200, j.text
    imgs = j.json()["images"]
    assert [(i["prompt"], i["seed"]) for i in imgs] == [(PROMPT, 5), (PROMPT, 5), ("a dog", 6), ("a dog", 6)]
    assert base64.b64decode(imgs[0]["b64_png"]) == r.content  # image 0 of seed 5 whatever shares the request
    _assert_no_leaks(j, registry["hidden"])


def test_longcat_student_and_per_model_batches(url, reference, registry):
    lc = _generate(url, seed=9, model="longcat")
    assert lc.headers["X-CDM-Model-Id"] == "longcat"
    assert np.abs(_rgb(lc.content).astype(int) - reference("longcat", 9, 1)[0].astype(int)).max() <= 1
    sd = _generate(url, seed=9)
    with ThreadPoolExecutor(8) as ex:  # both models in one replica's batches: each answers with its own bytes
        out = list(ex.map(lambda i: _generate(url, seed=9, **({"model": "longcat"} if i % 2 else {})), range(12)))
    assert all(r.content == (lc.content if i % 2 else sd.content) for i, r in enumerate(out))


def test_models_list_and_openapi_without_leaks(url, registry):
    r = requests.get(f"{url}/v1/models", timeout=30)
    assert r.status_code == 200
    _assert_no_leaks(r, registry["hidden"])
    by_id = {m["id"]: m for m in r.json()["data"]}
    assert set(by_id) == {NAME, "longcat"}
    sd3 = by_id[NAME]
    assert (sd3["alias"], sd3["teacher"], sd3["teacher_hash"]) == ("champion", "sd3-teacher", "feedbeef")
    assert sd3["image_size"] == 64 and sd3["sizes"] == SIZES and sd3["allowed_steps"] == [1, 2, 4]
    assert not {"source", "folder", "tracking_uri"} & set(sd3)
    doc = requests.get(f"{url}/openapi.json", timeout=30).json()
    size = doc["components"]["schemas"]["ImagesRequest"]["properties"]["size"]["anyOf"][0]
    assert size["enum"] == SIZES
    before = requests.get(f"{url}/healthz", timeout=30).json()["prompt_cache"]
    probe = f"a cat, cache probe {time.time_ns()}"  # the prompt cache sits in front of the pipeline's encoders
    assert _generate(url, seed=1, prompt=probe).content == _generate(url, seed=1, prompt=probe).content
    h = requests.get(f"{url}/healthz", timeout=30)
    after = h.json()["prompt_cache"]
    assert (after["misses"] - before["misses"], after["hits"] - before["hits"]) == (1, 1), (before, after)
    _assert_no_leaks(h, registry["hidden"])


def test_levels_for_pipeline_exports(exports, tmp_path):
    """No Ray: which levels each step count runs, the sizes offered, the encoder identity."""
    import shutil

    from cdm_core.schedule import inference_levels
    from serving.latent import Levels, encoder_identity, levels_of, recover_shift
    from serving.schemas import native_sizes
    from workflows.model_folder import read_meta

    meta = read_meta(exports["sd3"])
    assert meta.latent and meta.shift == 1.0  # inference_levels(4, 1.0) would not be the student's
    lv = levels_of(exports["sd3"], meta)
    assert lv.native_steps == 4 and lv.shift == 3.0
    assert torch.equal(lv(4), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert torch.equal(lv(2), inference_levels(2, 3.0))
    assert recover_shift([round(float(s), 6) for s in inference_levels(8, 2.5)[:-1]]) == 2.5
    one = Levels(1.0, [1.0])  # a 1-step export: its shift is unknown, so it runs 1 step only
    assert one.supports(1) and not one.supports(4)
    odd = Levels(1.0, [1.0, 0.6, 0.55, 0.2])  # levels of no shift: only the recorded step count
    assert odd.supports(4) and not odd.supports(2)
    assert native_sizes(1024) == ["1024x1024"] and native_sizes(32) == ["32x32", "64x64", "128x128", "256x256"]
    ident = encoder_identity(exports["sd3"])
    assert str(exports["root"]) not in ident
    assert encoder_identity(shutil.copytree(exports["sd3"], tmp_path / "elsewhere")) == ident
    assert encoder_identity(exports["longcat"]) != ident
