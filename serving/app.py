"""The Serve application: one deployment that is both the FastAPI ingress and the model replica.

Putting the HTTP routes on the model's own replicas saves a hop per request (proxy -> replica, not
proxy -> ingress -> model), which is most of the serving overhead for a 4-step student on CPU.
Concurrent requests meet in ``@serve.batch`` and run as one padded forward batch per step count.

    serve run deploy/serve.yaml                       # Ray's own CLI
    cdm serve --model models:/cdm-tiny-student@champion

Errors are JSON in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: bad input is a
4xx naming the field, a full queue a 503 (from Serve's proxy), never a 500 for a client mistake.
"""

import asyncio
import base64
import logging
import os
import secrets
import sys
import time
from collections import deque

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.config import BatchingConfig, ServeArgs
from serving.generator import Generator, Job
from serving.schemas import BadRequest, GenerateRequest, ImagesRequest, check_n, check_prompts, check_size, check_steps
from workflows.images import grid, png_bytes

logger = logging.getLogger("ray.serve")
MAX_BODY_BYTES = 1 << 20

api = FastAPI(
    title="CDM image service",
    version="1",
    description="4-step CDM students behind Ray Serve: an OpenAI Images route and a native route.",
)


def _error(status: int, message: str, param: str | None, code: str, kind: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return _error(400, f"body: malformed JSON ({first.get('msg')})", "body", "json_invalid")
    if first.get("type") == "model_attributes_type" or not loc:
        return _error(400, f"body: {first.get('msg')} (expected a JSON object)", "body", "invalid_body")
    param = loc[0]  # the top-level field (deeper parts are union members / list indices)
    if first.get("type") == "extra_forbidden":
        return _error(400, f"{param}: unknown field", param, "unknown_field")
    return _error(400, f"{param}: {first.get('msg')}", param, "invalid_value")


@api.exception_handler(BadRequest)
async def _bad_request(request: Request, exc: BadRequest):
    return _error(exc.status, str(exc), exc.param, exc.code)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail), None, "http_error")


@api.middleware("http")
async def _limits_and_headers(request: Request, call_next):
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        response = _error(413, f"body: larger than {MAX_BODY_BYTES} bytes", "body", "too_large")
    else:
        try:
            response = await call_next(request)
        except Exception as e:  # a bug must not take the replica down; it is logged and answered
            logger.exception("request failed")
            response = _error(500, f"internal error: {type(e).__name__}", None, "internal", "server_error")
    from serving import replica_state  # imported, not captured: Serve pickles this function by value

    for k, v in replica_state.identity.items():
        response.headers[k] = v
    return response


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
        from serving.source import record_serving, resolve

        self.args = ServeArgs.model_validate(args)
        # the sampler releases the GIL in every torch op; with Serve's request threads busy it would then wait
        # out the default 5 ms switch interval each time (a GIL convoy that halved throughput under load)
        sys.setswitchinterval(self.args.gil_switch_interval_s)
        self.served = resolve(self.args.model, self.args.tracking_uri, self.args.cache_dir)
        self.gen = Generator(self.served.folder, self.args.min_forward_batch)
        if self.args.default_steps not in self.args.allowed_steps:
            raise ValueError(
                f"default_steps {self.args.default_steps} is not in allowed_steps {self.args.allowed_steps}"
            )
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        ctx = serve.get_replica_context()
        from serving import replica_state

        replica_state.identity.update(
            {
                "X-CDM-Model": self.served.name,
                "X-CDM-Model-Version": self.served.version,
                "X-CDM-Replica": ctx.replica_id.unique_id,
            }
        )
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
    async def _batched(self, jobs: list[Job]) -> list[tuple]:
        # Let the loop flush the previous batch's responses and take in new requests first: the sampler then
        # runs inline (in a thread it would fight the event loop for the GIL after every torch op).
        await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        images = self.gen.run(jobs)
        ms = (time.perf_counter() - t0) * 1000
        self.batch_sizes.append(len(jobs))
        return [(im, len(jobs), ms) for im in images]

    async def _run(self, job: Job):
        images, batch, ms = await self._batched(job)
        return images, {
            "X-CDM-Seed": str(job.seed),
            "X-CDM-Batch-Size": str(batch),
            "X-CDM-Steps": str(job.steps),
            "Server-Timing": f"sample;dur={ms:.1f}",
        }

    def _check_model(self, name: str | None) -> None:
        s = self.served
        ok = {s.name, f"models:/{s.name}/{s.version}", f"{s.name}/{s.version}"}
        if s.alias:
            ok |= {f"{s.name}@{s.alias}", f"models:/{s.name}@{s.alias}"}
        if name is not None and name not in ok:
            raise BadRequest(
                "model",
                f"model: {name!r} is not served here; this service serves {s.name!r}",
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
        images, headers = await self._run(Job([body.prompt], n, seed, self.args.default_steps))
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
        images, headers = await self._run(Job(prompts, n, seed, steps))
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
        }
        return {"object": "list", "data": [entry]}

    @api.get("/healthz", summary="Liveness of this replica")
    async def healthz(self):
        recent = list(self.batch_sizes)[-100:]
        return {
            "status": "ok",
            "model": self.served.name,
            "version": self.served.version,
            "pid": os.getpid(),
            "max_batch_size": self.batching.max_batch_size,
            "recent_batch_sizes": recent,
        }

    def check_health(self) -> None:
        if self.gen is None:
            raise RuntimeError("model not loaded")


def build_app(args: dict) -> serve.Application:
    """Application builder for ``serve run``/``serve deploy``: ``import_path: serving.app:build_app``."""
    cfg = ServeArgs.model_validate(args or {})
    return ImageService.bind(cfg.model_dump(mode="json"))
