"""The HTTP edge of a replica: the JSON error shape, the exception handlers, the body limit and identity headers.

Errors are JSON in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: bad input is a 4xx naming
the field, a body over ``ServeArgs.max_body_bytes`` a 413 (by ``content-length`` or, for a chunked body, by
counting), a bug inside a request a 500 naming only the exception's class. Messages never carry a path, a URI, a
stack trace or the value the client sent: what leaves the service is the field, the rule and the limit.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.schemas import BadRequest

logger = logging.getLogger("ray.serve")


class BodyTooLarge(HTTPException):
    """The body grew past the limit while being read (no ``content-length`` to refuse it up front).

    FastAPI's ``HTTPException``, because FastAPI turns any other exception from reading the body into a 400."""

    def __init__(self):
        super().__init__(413, "body too large")


def error(status: int, message: str, param: str | None, code: str, kind: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _too_large() -> JSONResponse:
    from serving import replica_state  # imported, not captured: Serve pickles the app with its handlers

    return error(413, f"body: larger than {replica_state.max_body_bytes} bytes", "body", "too_large")


async def _validation_error(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return error(400, "body: malformed JSON", "body", "json_invalid")
    if first.get("type") == "model_attributes_type" or not loc:
        return error(400, f"body: {first.get('msg')} (expected a JSON object)", "body", "invalid_body")
    param = loc[0]  # the top-level field (deeper parts are union members / list indices)
    if first.get("type") == "extra_forbidden":
        return error(400, f"{param}: unknown field", param, "unknown_field")
    msg = str(first.get("msg", "invalid value")).replace("Value error, ", "")
    return error(400, f"{param}: {msg}", param, "invalid_value")


async def _bad_request(request: Request, exc: BadRequest):
    return error(exc.status, str(exc), exc.param, exc.code)


async def _http_error(request: Request, exc: StarletteHTTPException):
    return error(exc.status_code, str(exc.detail), None, "http_error")


async def _body_too_large(request: Request, exc: BodyTooLarge):
    return _too_large()


class Edge:
    """Pure ASGI, outside the app: identity headers on every response (those it does not set itself: the answer of
    a multiplexed model carries that model's name and version), 413 for a body over the limit, JSON 500 for
    a bug. (Starlette's ``BaseHTTPMiddleware`` would run ``receive`` in a task group, turning the chunked-body 413
    into an exception group that FastAPI answers with a 400.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        from serving import replica_state  # imported, not captured: Serve pickles the app with its middleware

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        identity = [(k.lower().encode(), v.encode()) for k, v in replica_state.identity.items()]
        started = False

        async def send_with_identity(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                own = {k.lower() for k, _ in headers}  # a multiplexed model's answer names that model itself
                message = {**message, "headers": [*headers, *(h for h in identity if h[0] not in own)]}
            await send(message)

        limit = replica_state.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _too_large()(scope, receive, send_with_identity)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge()
            return message

        try:
            await self.app(scope, counted if length is None else receive, send_with_identity)
        except Exception as e:  # a bug must not take the replica down; it is logged and answered
            logger.exception("request failed")
            if started:
                raise
            response = error(500, f"internal error: {type(e).__name__}", None, "internal", "server_error")
            await response(scope, receive, send_with_identity)


def install(api: FastAPI) -> None:
    """Register the exception handlers and the edge middleware on the service's app."""
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(BadRequest, _bad_request)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(BodyTooLarge, _body_too_large)
    api.add_middleware(Edge)
