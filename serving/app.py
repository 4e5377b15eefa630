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
from serving.generator import Generator, Job
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
    def __init__(self, args: dict):
        from serving import replica_state
        from serving.metrics import ReplicaMetrics
        from serving.openapi import document
        from serving.source import record_serving, resolve

        self.args = ServeArgs.model_validate(args)
        if self.args.default_steps not in self.args.allowed_steps:
            raise ValueError(
                f"default_steps {self.args.default_steps} is not in allowed_steps {self.args.allowed_steps}"
            )
        # the sampler releases the GIL in every torch op; with Serve's request threads busy it would then wait
        # out the default 5 ms switch interval each time (a GIL convoy that halved throughput under load)
        sys.setswitchinterval(self.args.gil_switch_interval_s)
        self.served = resolve(self.args.model, self.args.tracking_uri, self.args.cache_dir)
        self.gen = Generator(
            self.served.folder,
            self.args.min_forward_batch,
            cache_size=self.args.prompt_cache_size,
            cache_mb=self.args.prompt_cache_mb,
        )
        self.metrics = ReplicaMetrics(self.served.name, self.served.version)
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        ctx = serve.get_replica_context()
        replica_state.identity.update(
            {
                "X-CDM-Model": self.served.name,
                "X-CDM-Model-Version": self.served.version,
                "X-CDM-Replica": ctx.replica_id.unique_id,
            }
        )
        replica_state.max_body_bytes = self.args.max_body_bytes
        replica_state.openapi = document(api, self.args, self.gen.meta.image_size, self.served.names())
        where = self.args.public_url or f"ray-serve app '{ctx.app_name}'"
        try:
            record_serving(self.served, self.args.app_name, where)
        except Exception as e:  # a tracking-server outage must not stop serving; it is logged
            logger.warning(f"could not record serving lineage: {e}")
        logger.info(f"serving {self.served.name} v{self.served.version} from {self.served.folder} (pid {os.getpid()})")

    def reconfigure(self, user_config: dict) -> None:
        cfg = BatchingConfig.model_validate(user_config or {})
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batching = cfg

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batched(self, queued: list[tuple[Job, float]]) -> list[tuple]:
        # Let the loop flush the previous batch's responses and take in new requests first: the sampler then
        # runs inline (in a thread it would fight the event loop for the GIL after every torch op).
        await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        jobs = [job for job, _ in queued]
        images = self.gen.run(jobs)
        ms = (time.perf_counter() - t0) * 1000
        waits = [(t0 - t) * 1000 for _, t in queued]
        self.batch_sizes.append(len(jobs))
        self.metrics.batch(len(jobs), sum(len(im) for im in images), waits, ms, self.gen.prompt_cache.stats())
        return [(im, len(jobs), ms, wait) for im, wait in zip(images, waits)]

    async def _run(self, job: Job, endpoint: str):
        images, batch, ms, wait = await self._batched((job, time.perf_counter()))
        self.metrics.served(len(images), endpoint)
        return images, {
            "X-CDM-Seed": str(job.seed),
            "X-CDM-Batch-Size": str(batch),
            "X-CDM-Steps": str(job.steps),
            "Server-Timing": f"queue;dur={wait:.1f}, sample;dur={ms:.1f}",
        }

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served.names():
            raise BadRequest(
                "model",
                f"model: not served here; this service serves {self.served.name!r}",
                status=404,
                code="model_not_found",
            )

    @api.post("/v1/images/generations", summary="OpenAI Images API: generate images from a prompt")
    async def images(self, body: ImagesRequest = Body(...)):
        self._check_model(body.model)
        check_prompts([body.prompt], self.args)
        n = check_n(body.n, 1, self.args)
        size = check_size(body.size, self.gen.meta.image_size)
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        images, headers = await self._run(Job([body.prompt], n, seed, self.args.default_steps), "openai")
        data = [{"b64_json": base64.b64encode(png_bytes(im, size)).decode(), "revised_prompt": None} for im in images]
        return JSONResponse({"created": int(time.time()), "data": data}, headers=headers)

    @api.post(
        "/generate",
        summary="Native: one or many prompts, seed, steps; PNG or JSON",
        responses={200: {"content": {"image/png": {}, "application/json": {}}}},
    )
    async def generate(self, body: GenerateRequest = Body(...)):
        prompts = check_prompts([body.prompt] if isinstance(body.prompt, str) else list(body.prompt), self.args)
        n = check_n(body.n, len(prompts), self.args)
        steps = check_steps(body.steps, self.args)
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        images, headers = await self._run(Job(prompts, n, seed, steps), "native")
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
        return JSONResponse(
            {"model": self.served.name, "version": self.served.version, "seed": seed, "steps": steps, "images": out},
            headers=headers,
        )

    @api.get("/v1/models", summary="What is served: registry name, version, alias, run id, teacher")
    async def models(self):
        s = self.served
        entry = {
            "id": s.name,
            "object": "model",
            "created": int(os.path.getmtime(s.folder)),
            "owned_by": "cdm",
            **s.public(),
            "default_steps": self.args.default_steps,
            "allowed_steps": self.args.allowed_steps,
            "image_size": self.gen.meta.image_size,
            "sizes": native_sizes(self.gen.meta.image_size),
        }
        return {"object": "list", "data": [entry]}

    @api.get("/healthz", summary="Liveness of this replica, its batching and its prompt cache")
    async def healthz(self):
        recent = list(self.batch_sizes)[-100:]
        return {
            "status": "ok",
            "model": self.served.name,
            "version": self.served.version,
            "pid": os.getpid(),
            "max_batch_size": self.batching.max_batch_size,
            "recent_batch_sizes": recent,
            "prompt_cache": self.gen.prompt_cache.stats(),
        }

    def check_health(self) -> None:
        if self.gen is None:
            raise RuntimeError("model not loaded")


def build_app(args: dict) -> serve.Application:
    """Application builder for ``serve run``/``serve deploy``: ``import_path: serving.app:build_app``."""
    cfg = ServeArgs.model_validate(args or {})
    return ImageService.bind(cfg.model_dump(mode="json"))
