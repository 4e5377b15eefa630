"""Property-based: schemathesis generates requests from the live service's OpenAPI document, inside and outside
its bounds, and every answer must agree with it: no 5xx, a request the schema accepts is served (bar the one
documented cross-field rule, n x prompts <= ``x-cdm-max-images``), one it rejects gets a 4xx, and status codes,
content types and headers are the documented ones. Needs ``schemathesis`` (skipped without it); runs its own
Serve instance (the fixtures of ``test_serving``)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the skip: hypothesis comes with schemathesis)
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402
from test_serving import registry, service  # noqa: E402, F401  (module fixtures: this module's own service)

MAX_EXAMPLES = 100  # per operation and mode; each accepted example is a real 4-step sample
LIMITS: dict = {}  # the deployment's info.x-cdm-limits, read with the document


OPERATIONS = [("/v1/images/generations", "POST"), ("/generate", "POST"), ("/v1/models", "GET"), ("/healthz", "GET")]


@pytest.fixture(scope="module")
def api_schema(service):  # noqa: F811
    _, url = service
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
    LIMITS.update(schema.raw_schema["info"]["x-cdm-limits"])
    return schema


def _breaks_cross_field_rule(case) -> bool:
    body = case.body if isinstance(case.body, dict) else {}
    if case.path != "/generate" or "prompt" not in body:
        return False
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    return body.get("n", 1) * len(prompts) > LIMITS["max_images"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("path,method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_the_api_agrees_with_its_openapi_document(api_schema, path, method, mode):
    if method == "GET" and not mode.is_positive:
        pytest.skip("no input to break")

    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(
        deadline=None,
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        # schemathesis's checks: no 5xx, documented status codes, content types and headers, a 4xx for data the
        # schema rejects; its "accepted when valid" is replaced by ours, which knows the documented cross-field rule
        response = case.call_and_validate(timeout=120, excluded_checks=[positive_data_acceptance])
        if mode.is_positive and _breaks_cross_field_rule(case):
            assert response.status_code == 400 and response.json()["error"]["param"] == "n", response.text
        elif mode.is_positive:
            assert response.status_code == 200, (case.body, response.status_code, response.text[:300])

    check()
