"""Failover in Serve's HTTP proxy: a request whose replica died before answering is sent again.

Serve's router retries a request only while it picks a replica; once a replica has accepted the request and dies
(SIGKILL, OOM, a lost node), the proxy answers 500. Generation is idempotent (the seed decides the bytes), so the
proxy sends the request again: the router has dropped the dead replica by then and picks a live one. When no
replica answers within ``CDM_FAILOVER_WAIT_S`` (default 15 s) of the first loss, the client gets 503 with
``Retry-After``. Error responses the proxy makes itself on these routes (a full queue, a timeout) are rewritten
into the service's JSON error shape, so nothing but ``{"error": ...}`` leaves the service.

Installed through Serve's proxy callback, an environment variable of the Serve controller that its proxies inherit
(``deploy/serve.yaml`` carries the block; ``cdm serve`` passes it to ``serve.start``)::

    controller_options:
      runtime_env:
        env_vars:
          RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: serving.failover:proxy_middlewares

``controller_options`` also puts the proxy on Serve's fast path (``PROXY_FAST_PATH``): requests go to the replica over
gRPC instead of Ray actor calls, the router runs on the proxy's own loop instead of a second thread, and request-path
logs are buffered instead of flushed per record. On the 2-core benchmark box this cut the server's CPU per image at
concurrency 32 from 0.036-0.037 s to 0.025-0.029 s (``benchmarks/results/serving.md``). Each is an ordinary Serve
setting; a value set in the config's block wins, so ``"0"`` / ``"1"`` there turns one back.

Only requests to the service's routes are touched (``ROUTES``); other applications on the cluster are passed through.
Every answered request carries ``X-CDM-Attempts``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serving.failover:proxy_middlewares"
PROXY_FAST_PATH = {  # Serve's own settings, read by each proxy at start (ray/serve/_private/constants.py)
    "RAY_SERVE_PROXY_USE_GRPC": "1",  # proxy -> replica over gRPC rather than Ray actor calls
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",  # no cross-thread hand-off per request
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",  # request-path logs written in blocks, not one flush each
}
# the service's routes under any route prefix; not Serve's own ``/-/healthz`` and ``/-/routes``
ROUTES = re.compile(r"^(?!/-/).*(?:^|/)(?:v1/images/generations|generate|v1/models|healthz)/?$")
MAX_REPLAY_BYTES = 8 << 20  # bodies beyond this are streamed through once, without failover
IDENTITY = b"x-cdm-model"  # set on every response the service itself makes
PROXY_ERRORS = {  # status -> (code, message) for the answers Serve's proxy makes without the service
    404: ("not_found", "no application serves this route"),
    408: ("timeout", "the request timed out"),
    429: ("overloaded", "too many requests; retry later"),
    503: ("overloaded", "the service is overloaded (request queue full); retry later"),
}
logger = logging.getLogger("ray.serve")


def controller_options(base: dict | None = None, **env: str) -> dict:
    """``serve.start(controller_options=...)``: ``base`` (a Serve config's block) plus the failover callback, which
    every proxy the controller starts then runs, and ``PROXY_FAST_PATH`` where the block does not set them; ``env``
    adds settings (``CDM_FAILOVER_WAIT_S="5"``)."""
    out = dict(base or {})
    runtime_env = dict(out.get("runtime_env") or {})
    env_vars = {**dict(runtime_env.get("env_vars") or {}), **{k: str(v) for k, v in env.items()}}
    for k, v in {CALLBACK_ENV: CALLBACK, **PROXY_FAST_PATH}.items():
        env_vars.setdefault(k, v)
    runtime_env["env_vars"] = env_vars
    out["runtime_env"] = runtime_env
    return out


def proxy_middlewares() -> list:
    """The proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): Serve wraps its proxy app in these."""
    from starlette.middleware import Middleware

    return [
        Middleware(
            Failover,
            attempts=int(os.environ.get("CDM_FAILOVER_ATTEMPTS", "3")),
            wait_s=float(os.environ.get("CDM_FAILOVER_WAIT_S", "15")),
            retry_after_s=int(os.environ.get("CDM_FAILOVER_RETRY_AFTER_S", "2")),
        )
    ]


class _Captured:
    """One attempt's response, held back until it is complete (a replica can die after the first message)."""

    def __init__(self):
        self.start: dict | None = None
        self.body: list[bytes] = []
        self.complete = False

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            self.body.append(message.get("body", b""))
            self.complete = not message.get("more_body", False)


class Failover:
    """ASGI middleware for Serve's proxy: resend a request whose replica was lost, then 503, never a bare 500."""

    def __init__(self, app, attempts: int = 3, wait_s: float = 15.0, retry_after_s: int = 2):
        if attempts < 1 or wait_s <= 0:
            raise ValueError(f"failover: attempts {attempts} must be >= 1 and wait_s {wait_s} > 0")
        self.app, self.attempts, self.wait_s, self.retry_after_s = app, attempts, wait_s, retry_after_s
        self._metrics = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not ROUTES.search(scope.get("path", "")):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_REPLAY_BYTES:
            return await self.app(scope, receive, send)
        body, rest = await _read_body(receive)
        if rest:  # a chunked body too large to hold: one attempt, the rest streamed from the client
            return await self.app(scope, _prepend(body, receive), send)
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(receive, gone))
        loop = asyncio.get_running_loop()
        deadline = None
        try:
            for attempt in range(1, self.attempts + 1):
                out = _Captured()
                run = self.app(dict(scope, headers=list(scope["headers"])), _replay(body, gone), out.send)
                try:
                    if deadline is None:
                        await run
                    else:
                        await asyncio.wait_for(run, max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                except Exception as e:  # the proxy app itself failed: as good as a lost replica
                    logger.warning(f"failover: attempt {attempt} failed in the proxy: {type(e).__name__}")
                if out.complete and out.start is not None:
                    return await self._forward(out, send, attempt)
                if gone.is_set():
                    return None  # the client left; nobody to answer
                logger.warning(f"failover: no answer for {scope['method']} {scope['path']} (attempt {attempt})")
                if attempt == self.attempts:
                    break
                self._count("retries", scope)
                deadline = deadline or loop.time() + self.wait_s
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
            self._count("unavailable", scope)
            message = "no replica is available; retry later"
            await _send_json(send, 503, message, "unavailable", self.retry_after_s, attempt)
        finally:
            watcher.cancel()

    async def _forward(self, out: _Captured, send, attempt: int) -> None:
        status = out.start["status"]
        headers = list(out.start.get("headers") or [])
        if status >= 400 and not any(k.lower() == IDENTITY for k, _ in headers):
            code, message = PROXY_ERRORS.get(status, ("upstream_error", "the request could not be served"))
            retry = self.retry_after_s if status in (429, 503) else None
            retry = _header(headers, b"retry-after") or retry
            return await _send_json(send, status, message, code, retry, attempt)
        headers.append((b"x-cdm-attempts", str(attempt).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"".join(out.body)})

    def _count(self, what: str, scope) -> None:
        try:
            if self._metrics is None:
                from ray.serve.metrics import Counter

                self._metrics = {
                    "retries": Counter("cdm_failover_retries", "requests resent after their replica was lost"),
                    "unavailable": Counter("cdm_failover_unavailable", "requests answered 503: no live replica"),
                }
            self._metrics[what].inc()
        except Exception:  # metrics are best effort; the answer is not
            pass


def _header(headers, name: bytes) -> str | None:
    return next((v.decode() for k, v in headers if k.lower() == name), None)


async def _send_json(send, status: int, message: str, code: str, retry_after=None, attempt: int | None = None):
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if attempt is not None:
        headers.append((b"x-cdm-attempts", str(attempt).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> tuple[bytes, bool]:
    """The request body, and whether more is left to read (over ``MAX_REPLAY_BYTES`` or a disconnect)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body", False):
            return b"".join(chunks), False
        if size > MAX_REPLAY_BYTES:
            return b"".join(chunks), True


def _replay(body: bytes, gone: asyncio.Event):
    """A ``receive`` that gives the held body once, then waits for the client to leave (Serve listens for that)."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


def _prepend(body: bytes, receive):
    first = True

    async def wrapped():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": True}
        return await receive()

    return wrapped


async def _watch_disconnect(receive, gone: asyncio.Event) -> None:
    while True:
        if (await receive())["type"] == "http.disconnect":
            gone.set()
            return
