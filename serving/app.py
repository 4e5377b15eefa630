"""The Serve application: one deployment that is both the FastAPI ingress and the model replica.

Putting the HTTP routes on the model's own replicas saves a hop per request (proxy -> replica, not
proxy -> ingress -> model), which is most of the serving overhead for a 4-step student on CPU.
Concurrent requests meet in ``@serve.batch`` and run as one padded forward batch per step count.

    serve run deploy/serve.yaml                       # Ray's own CLI
    cdm serve --model models:/cdm-tiny-student@champion

Errors are JSON in the OpenAI shape (``serving.errors``): bad input is a 4xx naming the field, a full queue a 503,
never a 500 for a client mistake or a lost replica (``serving.failover`` resends the request from Serve's proxy).
The OpenAPI document declares this deployment's limits (``serving.openapi``); each replica keeps a prompt-embedding
cache (``serving.prompt_cache``) and reports Ray Serve metrics tagged with the model version (``serving.metrics``).

Many students, one deployment (``serving.multiplex``): with ``args.models`` declared, the request's ``model`` (or
Serve's ``serve_multiplexed_model_id`` header) picks which model answers, through Serve's model multiplexing with at
most ``args.max_models_per_replica`` loaded per replica. Requests for different models share a ``@serve.batch``
queue but never a forward pass: each batch is sampled in one group per loaded model. Each loaded model keeps its
own prompt cache and metrics tags; an answer names its model in ``X-CDM-Model``, ``X-CDM-Model-Version`` and
``X-CDM-Model-Id``, and ``/v1/models`` lists every declared model. Without ``models``: one model, as always.

A model may be a distilled diffusers pipeline folder (SD3, LongCat-Image): the replica runs its own text encoders
and VAE and samples the export's recorded levels (``serving.latent``); ``/v1/models`` lists the steps each runs.
"""

import asyncio
import base64
import logging
import os
import secrets
import sys
import time
from collections import deque

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse, Response
from ray import serve

from serving import errors
from serving.config import BatchingConfig, ServeArgs
from serving.generator import Job
from serving.multiplex import Catalog, Loaded, ModelPool, record_serving_all, resolve_declared
from serving.schemas import (
    BadRequest,
    GenerateRequest,
    ImagesRequest,
    check_n,
    check_prompts,
    check_size,
    check_steps,
    native_sizes,
)
from workflows.images import grid, png_bytes

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="CDM image service",
    version="1",
    description="4-step CDM students behind Ray Serve: an OpenAI Images route and a native route. "
    "Every bound a request must keep is in the schemas; `info.x-cdm-limits` lists this deployment's limits.",
)
errors.install(api)


def _openapi() -> dict:
    """This deployment's document (its limits), or FastAPI's plain one outside a replica."""
    from serving import replica_state  # imported, not captured: Serve pickles the app with this function

    return replica_state.openapi or FastAPI.openapi(api)


api.openapi = _openapi


@serve.deployment(
    name="ImageService",
    max_ongoing_requests=32,
    max_queued_requests=64,
    user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.0},
    health_check_period_s=5,
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress(api)
class ImageService:
    async def __init__(self, args: dict):  # async: with `models`, Serve's multiplexed loader loads the default
        from serving import replica_state
        from serving.latent import steps_run
        from serving.metrics import ReplicaMetrics
        from serving.openapi import document
        from serving.source import resolve

        self.args = ServeArgs.model_validate(args)
        if self.args.default_steps not in self.args.allowed_steps:
            raise ValueError(
                f"default_steps {self.args.default_steps} is not in allowed_steps {self.args.allowed_steps}"
            )
        self._ready = False
        # the sampler releases the GIL in every torch op; with Serve's request threads busy it would then wait
        # out the default 5 ms switch interval each time (a GIL convoy that halved throughput under load)
        sys.setswitchinterval(self.args.gil_switch_interval_s)
        self.served = resolve(self.args.model, self.args.tracking_uri, self.args.cache_dir)
        self.catalog = Catalog(self.served, resolve_declared(self.args, self.served, resolve))
        self.metrics = ReplicaMetrics(self.served.name, self.served.version)
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self.pool = ModelPool(self.catalog, self.args, self.metrics)
        self.steps = {mid: steps_run(m.folder, self.args.allowed_steps) for mid, m in self.catalog.entries.items()}
        self.image_size = (await self.pool.start()).gen.meta.image_size
        ctx = serve.get_replica_context()
        replica_state.identity.update(
            {
                "X-CDM-Model": self.served.name,
                "X-CDM-Model-Version": self.served.version,
                "X-CDM-Replica": ctx.replica_id.unique_id,
            }
        )
        replica_state.max_body_bytes = self.args.max_body_bytes
        names = self.catalog.request_names()
        replica_state.openapi = document(api, self.args, self.image_size, names, self.catalog.default_id)
        record_serving_all(self.catalog, self.args.app_name, self.args.public_url or f"ray-serve app '{ctx.app_name}'")
        for mid, m in self.catalog.entries.items():
            logger.info(f"serving {mid}: {m.name} v{m.version} from {m.folder} (pid {os.getpid()})")
        self._ready = True

    def _pick(self, name: str | None) -> str:
        """The public id of the model a request names (body ``model``, Serve's multiplexing header), or 4xx."""
        return self.catalog.pick(name, serve.get_multiplexed_model_id())

    def reconfigure(self, user_config: dict) -> None:
        cfg = BatchingConfig.model_validate(user_config or {})
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batching = cfg

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batched(self, queued: list[tuple[Loaded, Job, float]]) -> list[tuple]:
        # Let the loop flush the previous batch's responses and take in new requests first: the sampler then
        # runs inline (in a thread it would fight the event loop for the GIL after every torch op).
        await asyncio.sleep(0.001)
        groups: dict[int, list[int]] = {}  # one forward batch per loaded model, never two models in one
        for i, (model, _, _) in enumerate(queued):
            groups.setdefault(id(model.gen), []).append(i)
        out: list[tuple | None] = [None] * len(queued)
        for idx in groups.values():
            model = queued[idx[0]][0]
            t0 = time.perf_counter()
            jobs = [queued[i][1] for i in idx]
            images = model.gen.run(jobs)
            ms = (time.perf_counter() - t0) * 1000
            waits = [(t0 - queued[i][2]) * 1000 for i in idx]
            self.batch_sizes.append(len(jobs))
            stats = model.gen.prompt_cache.stats()
            model.metrics.batch(len(jobs), sum(len(im) for im in images), waits, ms, stats)
            for i, im, wait in zip(idx, images, waits):
                out[i] = (im, len(jobs), ms, wait)
        return out

    async def _run(self, model: Loaded, mid: str, job: Job, endpoint: str):
        images, batch, ms, wait = await self._batched((model, job, time.perf_counter()))
        model.metrics.served(len(images), endpoint)
        headers = {
            "X-CDM-Seed": str(job.seed),
            "X-CDM-Batch-Size": str(batch),
            "X-CDM-Steps": str(job.steps),
            "Server-Timing": f"queue;dur={wait:.1f}, sample;dur={ms:.1f}",
        }
        if self.catalog.multi:  # the replica's identity headers name the default model; this answer names its own
            s = model.served
            headers.update({"X-CDM-Model": s.name, "X-CDM-Model-Version": s.version, "X-CDM-Model-Id": mid})
        return images, headers

    @api.post("/v1/images/generations", summary="OpenAI Images API: generate images from a prompt")
    async def images(self, body: ImagesRequest = Body(...)):
        mid = self._pick(body.model)
        check_prompts([body.prompt], self.args)
        n = check_n(body.n, 1, self.args)
        size = check_size(body.size, self.image_size)
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        model = await self.pool.get(mid)
        images, headers = await self._run(model, mid, Job([body.prompt], n, seed, self.args.default_steps), "openai")
        data = [{"b64_json": base64.b64encode(png_bytes(im, size)).decode(), "revised_prompt": None} for im in images]
        return JSONResponse({"created": int(time.time()), "data": data}, headers=headers)

    @api.post(
        "/generate",
        summary="Native: one or many prompts, seed, steps; PNG or JSON",
        responses={200: {"content": {"image/png": {}, "application/json": {}}}},
    )
    async def generate(self, body: GenerateRequest = Body(...)):
        mid = self._pick(body.model)
        prompts = check_prompts([body.prompt] if isinstance(body.prompt, str) else list(body.prompt), self.args)
        n = check_n(body.n, len(prompts), self.args)
        steps = check_steps(body.steps, self.args)
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        if steps not in self.steps[mid]:  # a pipeline export runs its distilled step count (serving.latent)
            raise BadRequest("steps", f"steps: this model runs {self.steps[mid]}")
        model = await self.pool.get(mid)
        images, headers = await self._run(model, mid, Job(prompts, n, seed, steps), "native")
        if body.format == "png":
            img = images[0] if len(images) == 1 else grid(images, n)
            return Response(png_bytes(img), media_type="image/png", headers=headers)
        out = [
            {
                "prompt": prompts[i // n],
                "index": i % n,
                "seed": seed + i // n,
                "b64_png": base64.b64encode(png_bytes(im)).decode(),
            }
            for i, im in enumerate(images)
        ]
        s = model.served
        answer = {"model": s.name, "version": s.version, "seed": seed, "steps": steps, "images": out}
        if self.catalog.multi:
            answer["id"] = mid
        return JSONResponse(answer, headers=headers)

    @api.get("/v1/models", summary="What is served: registry name, version, alias, run id, teacher (each model)")
    async def models(self):
        data = []
        for mid, s in self.catalog.entries.items():
            entry = {
                "id": mid,
                "object": "model",
                "created": int(os.path.getmtime(s.folder)),
                "owned_by": "cdm",
                **s.public(),
                "default_steps": self.args.default_steps,
                "allowed_steps": self.steps[mid],
                "image_size": self.image_size,
                "sizes": native_sizes(self.image_size),
            }
            if self.catalog.multi:
                entry["default"] = mid == self.catalog.default_id
            data.append(entry)
        return {"object": "list", "data": data}

    @api.get("/healthz", summary="Liveness of this replica, its batching, its prompt cache and loaded models")
    async def healthz(self):
        recent = list(self.batch_sizes)[-100:]
        return {
            "status": "ok",
            "model": self.served.name,
            "version": self.served.version,
            "pid": os.getpid(),
            "max_batch_size": self.batching.max_batch_size,
            "recent_batch_sizes": recent,
            **self.pool.health(),
        }

    def check_health(self) -> None:
        if not self._ready:
            raise RuntimeError("model not loaded")


def build_app(args: dict) -> serve.Application:
    """Application builder for ``serve run``/``serve deploy``: ``import_path: serving.app:build_app``."""
    cfg = ServeArgs.model_validate(args or {})
    return ImageService.bind(cfg.model_dump(mode="json"))
