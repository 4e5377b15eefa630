"""The serving layer's parts that need no cluster: the proxy failover, the replica's HTTP edge, the prompt cache,
the OpenAPI bounds and what ``/v1/models`` may say about the teacher. (``test_serving.py`` runs them for real.)"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from pydantic import BaseModel
from starlette.testclient import TestClient

from cdm_core.conditioning import Cond


def _inner(script: list[str], seen: list[bytes]):
    """A stand-in for Serve's proxy app: per call, 'lost' (returns without answering, as the proxy does when the
    replica died), 'hang', 'queue_full' (the proxy's plain-text 503), 'bad' (the service's 400) or 'ok'."""

    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        seen.append(body)
        what = script[min(len(seen), len(script)) - 1]
        if what == "lost":
            return
        if what == "hang":
            await asyncio.sleep(30)
        status, headers, out = {
            "ok": (200, [(b"x-cdm-model", b"m")], body),
            "bad": (400, [(b"x-cdm-model", b"m")], b'{"error": {}}'),
            "queue_full": (503, [], b"Request dropped due to backpressure (num_queued_requests=2)."),
        }[what]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    return app


def _client(script, seen, **kw):
    from serving.failover import Failover

    return TestClient(Failover(_inner(script, seen), **{"attempts": 3, "wait_s": 0.5, "retry_after_s": 2, **kw}))


def test_failover_resends_the_same_body_after_a_lost_replica():
    seen: list[bytes] = []
    body = json.dumps({"prompt": "a bag", "seed": 7}).encode()
    r = _client(["lost", "ok"], seen).post("/v1/images/generations", content=body)
    assert r.status_code == 200 and r.headers["x-cdm-attempts"] == "2"
    assert seen[0] == seen[1] == r.content == body


def test_failover_answers_503_with_retry_after_when_no_replica_answers():
    seen: list[bytes] = []
    r = _client(["lost"], seen).post("/generate", json={"prompt": "a bag"})
    assert r.status_code == 503 and r.headers["retry-after"] == "2" and len(seen) == 3
    assert r.json()["error"]["code"] == "unavailable"
    seen.clear()
    r = _client(["lost", "hang"], seen).post("/generate", json={"prompt": "a bag"})  # a resend waits wait_s at most
    assert r.status_code == 503 and len(seen) == 2


def test_failover_rewrites_the_proxys_own_errors_and_passes_the_services():
    seen: list[bytes] = []
    r = _client(["queue_full"], seen).post("/generate", json={"prompt": "a bag"})
    assert r.status_code == 503 and r.headers["retry-after"] == "2" and len(seen) == 1
    assert r.json()["error"]["code"] == "overloaded" and "backpressure" not in r.text
    r = _client(["bad"], []).post("/generate", json={"prompt": ""})
    assert r.status_code == 400 and r.content == b'{"error": {}}' and r.headers["x-cdm-attempts"] == "1"
    r = _client(["ok"], seen := []).post("/other-app/predict", content=b"x")  # not this service's: passed through
    assert r.status_code == 200 and len(seen) == 1 and "x-cdm-attempts" not in r.headers
    with pytest.raises(AssertionError, match="did not receive any response"):  # ... also when lost: not resent
        _client(["lost", "ok"], seen := []).post("/other-app/predict", content=b"x")
    assert len(seen) == 1
    from serving.failover import ROUTES

    assert ROUTES.search("/cdm/v1/images/generations") and ROUTES.search("/healthz") and ROUTES.search("/generate")
    assert not ROUTES.search("/-/healthz") and not ROUTES.search("/regenerated")


def test_failover_streams_a_body_too_large_to_hold_once(monkeypatch):
    import serving.failover as failover

    monkeypatch.setattr(failover, "MAX_REPLAY_BYTES", 1000)
    seen: list[bytes] = []
    chunks = (b"x" * 300 for _ in range(10))
    r = _client(["ok"], seen).post("/generate", content=chunks)
    assert r.status_code == 200 and seen == [b"x" * 3000]


class _Body(BaseModel):
    prompt: str


def _edge_app(monkeypatch):
    from fastapi import Body, FastAPI

    from serving import errors, replica_state

    monkeypatch.setattr(replica_state, "identity", {"X-CDM-Model": "m", "X-CDM-Model-Version": "3"})
    monkeypatch.setattr(replica_state, "max_body_bytes", 1000)
    api = FastAPI()
    errors.install(api)

    @api.post("/g")
    async def g(body: _Body = Body(...)):
        if body.prompt == "bug":
            raise ZeroDivisionError("/secret/path/in/a/message")
        return {"ok": body.prompt}

    return TestClient(api, raise_server_exceptions=False)


def test_edge_limits_the_body_also_when_chunked_and_answers_a_bug_without_details(monkeypatch):
    c = _edge_app(monkeypatch)
    ct = {"content-type": "application/json"}
    r = c.post("/g", content=(b" " * 100 for _ in range(20)), headers=ct)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large" and r.headers["x-cdm-model"] == "m"
    assert c.post("/g", content=b" " * 1001, headers=ct).status_code == 413
    assert c.post("/g", content=b'{"prompt": "a"}' + b" " * 985, headers=ct).json() == {"ok": "a"}  # 1000 bytes
    r = c.post("/g", json={"prompt": "bug"})
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: ZeroDivisionError"
    assert r.headers["x-cdm-model-version"] == "3" and "secret" not in r.text


def _cache(capacity=2, max_bytes=10**6):
    from serving.prompt_cache import PromptCache

    calls: list[list[str]] = []

    def encode(prompts):
        calls.append(list(prompts))
        g = torch.Generator().manual_seed(sum(map(ord, "".join(prompts))))
        return Cond(torch.randn(len(prompts), 3, 4, generator=g), torch.randn(len(prompts), 4, generator=g))

    return PromptCache(encode, "enc:3", capacity, max_bytes), calls


def test_prompt_cache_is_a_bounded_lru_of_rows_counting_hits():
    cache, calls = _cache()
    first = cache.encode(["a", "b"])
    assert calls == [["a", "b"]] and cache.stats()["misses"] == 2
    again = cache.encode(["b", "a"])  # both hit; rows in the order asked
    assert calls == [["a", "b"]] and torch.equal(again.tokens, first.tokens[[1, 0]])
    cache.encode(["c"])  # evicts the least recently used: 'b' (then 'a' was used last)
    cache.encode(["a", "b"])
    assert calls[-1] == ["b"]
    s = cache.stats()
    assert (s["hits"], s["misses"], s["size"], s["capacity"]) == (3, 4, 2, 2) and s["hit_rate"] == round(3 / 7, 4)
    assert s["bytes"] == 2 * (3 * 4 + 4) * 4


def test_prompt_cache_bounds_bytes_and_can_be_off():
    cache, calls = _cache(capacity=100, max_bytes=2 * (3 * 4 + 4) * 4)
    cache.encode(["a", "b", "c"])
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    off, calls = _cache(capacity=0)
    off.encode(["a"])
    off.encode(["a"])
    assert calls == [["a"], ["a"]] and len(off) == 0


@pytest.mark.parametrize(
    "ref,name",
    [
        ("/abs/path/to/teacher-tiny", "teacher-tiny"),
        ("/abs/path/to/teacher-tiny/", "teacher-tiny"),
        ("file:///srv/models/sd3", "sd3"),
        ("s3://bucket/teachers/longcat", "longcat"),
        ("stabilityai/stable-diffusion-3-medium-diffusers", "stabilityai/stable-diffusion-3-medium-diffusers"),
        ("builtin", "builtin"),
        (None, None),
    ],
)
def test_teacher_is_shown_by_name_not_by_where_it_lies(ref, name):
    from serving.source import teacher_name

    assert teacher_name(ref) == name


def test_openapi_bounds_come_from_the_deployments_args():
    from serving.app import api
    from serving.config import ServeArgs
    from serving.openapi import document

    args = ServeArgs(max_n=3, max_images=5, max_prompts=2, max_prompt_chars=40, allowed_steps=[1, 3], default_steps=3)
    doc = document(api, args, 32, ["m", "m@champion"])
    s = doc["components"]["schemas"]
    gen, img = s["GenerateRequest"]["properties"], s["ImagesRequest"]["properties"]
    assert (img["n"]["minimum"], img["n"]["maximum"], gen["n"]["maximum"]) == (1, 3, 3)
    assert img["prompt"]["maxLength"] == 40 and gen["prompt"]["anyOf"][1]["maxItems"] == 2
    assert img["size"]["anyOf"][0]["enum"] == ["32x32", "64x64", "128x128", "256x256"]
    assert img["response_format"]["enum"] == ["b64_json"] and img["model"]["anyOf"][0]["enum"] == ["m", "m@champion"]
    assert gen["steps"]["anyOf"][0]["enum"] == [1, 3] and s["GenerateRequest"]["x-cdm-max-images"] == 5
    assert gen["seed"]["anyOf"][0]["maximum"] == 2**63 - 1 and isinstance(gen["seed"]["anyOf"][0]["maximum"], int)
    post = doc["paths"]["/generate"]["post"]
    assert post["requestBody"]["x-cdm-max-body-bytes"] == 1 << 20 and "422" not in post["responses"]
    assert {"400", "413", "503"} <= set(post["responses"]) and "HTTPValidationError" not in s


def test_a_blank_prompt_means_the_same_to_the_schema_and_to_the_server():
    """The OpenAPI ``pattern`` of a prompt is the server's own check, and it reads alike in every regex dialect: a
    schema-driven client found "\\x1f" valid by a ``\\S`` pattern (ECMA / ASCII semantics) and blank to the server."""
    import re

    from serving.config import ServeArgs
    from serving.errors import BadRequest
    from serving.schemas import NON_BLANK, check_prompts

    for cp in range(0x3100):  # every whitespace character str.isspace knows lies below U+3100
        c = chr(cp)
        want = not c.isspace()
        assert bool(re.search(NON_BLANK, c)) == want == bool(re.search(NON_BLANK, c, re.ASCII)), hex(cp)
    args = ServeArgs(model="builtin")
    for blank in ("\x1f", " \u3000\t", "\u2028\x85"):
        with pytest.raises(BadRequest, match="empty prompt"):
            check_prompts([blank], args)
    assert check_prompts(["\x1fa"], args) == ["\x1fa"]
