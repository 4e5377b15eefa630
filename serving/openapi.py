"""The OpenAPI document of one deployment: FastAPI's, with every bound the API enforces, read from its ServeArgs.

pydantic declares types and shapes. The limits that differ per deployment (prompt length and count, ``n``,
``steps``, ``size``, the served models' names, the body size) are checked by ``serving.schemas.check_*`` against
``ServeArgs`` and declared here from the same ``ServeArgs``, so a deployment with other limits shows other bounds.
One rule JSON Schema cannot state is declared in words and as ``x-cdm-max-images``: on ``/generate``,
``n`` x the number of prompts is at most ``max_images``. Error responses are the service's JSON ``Error``.
"""

from __future__ import annotations

from fastapi.openapi.utils import get_openapi

from serving.config import ServeArgs
from serving.schemas import NON_BLANK, SEED_MAX, max_n, native_sizes

ERROR = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"type": "string"},
            },
        }
    },
}


def _error(description: str, retry_after: bool = False) -> dict:
    out = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        out["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return out


def _nullable(schema: dict, title: str, description: str | None = None) -> dict:
    out = {"anyOf": [schema, {"type": "null"}], "title": title, "default": None}
    return {**out, "description": description} if description else out


def limits(args: ServeArgs, image_size: int) -> dict:
    """The limits of this deployment, as ``info.x-cdm-limits`` shows them."""
    return {
        "max_prompt_chars": args.max_prompt_chars,
        "max_prompts": args.max_prompts,
        "max_n": max_n(args),
        "max_images": args.max_images,
        "allowed_steps": args.allowed_steps,
        "default_steps": args.default_steps,
        "sizes": native_sizes(image_size),
        "max_body_bytes": args.max_body_bytes,
    }


def document(api, args: ServeArgs, image_size: int, model_names: list[str], default_model: str | None = None) -> dict:
    """The OpenAPI 3.1 document of ``api`` with the bounds of ``args`` (the model's native ``image_size``);
    ``model_names`` are what a request's ``model`` may be (``serving.multiplex.Catalog.request_names``)."""
    doc = get_openapi(
        title=api.title,
        version=api.version,
        openapi_version=api.openapi_version,
        description=api.description,
        routes=api.routes,
    )
    schemas = doc["components"]["schemas"]
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 shape; this service answers 400
        schemas.pop(unused, None)
    schemas["Error"] = ERROR
    prompt = {"type": "string", "minLength": 1, "maxLength": args.max_prompt_chars, "pattern": NON_BLANK}
    n = {"type": "integer", "minimum": 1, "maximum": max_n(args), "default": 1, "title": "N"}
    seed = _nullable(
        {"type": "integer", "minimum": 0, "maximum": SEED_MAX}, "Seed", "decides the bytes (default: random)"
    )
    size = image_size

    images = schemas["ImagesRequest"]["properties"]
    images["prompt"] = {**prompt, "title": "Prompt", "description": "one non-blank prompt"}
    images["n"] = {**n, "description": "images for the prompt"}
    images["size"] = _nullable(
        {"type": "string", "enum": native_sizes(size)}, "Size", f"the native {size}x{size} or a nearest upscale"
    )
    if args.models:
        about = f"which served model answers (default {default_model!r}): a public id or any name of one"
    else:
        about = "the served model, by any name"
    model = _nullable({"type": "string", "enum": model_names}, "Model", about)
    images["model"] = model
    images["response_format"] = {"type": "string", "enum": ["b64_json"], "default": "b64_json", "title": "Format"}
    images["seed"] = seed

    gen = schemas["GenerateRequest"]
    gp = gen["properties"]
    gp["prompt"] = {
        "anyOf": [prompt, {"type": "array", "items": prompt, "minItems": 1, "maxItems": args.max_prompts}],
        "title": "Prompt",
        "description": f"one prompt or a list of 1..{args.max_prompts}",
    }
    gp["n"] = {**n, "description": f"images per prompt; n x the number of prompts is at most {args.max_images}"}
    gp["steps"] = _nullable(
        {"type": "integer", "enum": args.allowed_steps}, "Steps", f"sampler steps (default {args.default_steps})"
    )
    gp["model"] = model
    gp["format"] = {"type": "string", "enum": ["png", "json"], "default": "json", "title": "Format"}
    gp["seed"] = seed
    gen["x-cdm-max-images"] = args.max_images
    gen["description"] = (
        f"{gen.get('description', '')} Cross-field rule: n x the number of prompts <= {args.max_images}."
    ).strip()

    body = f"a JSON object of at most {args.max_body_bytes} bytes (413 beyond)"
    for item in doc["paths"].values():
        for op in item.values():
            responses = op["responses"]
            responses.pop("422", None)
            responses["503"] = _error("overloaded (queue full) or no replica available; retry later", True)
            if "requestBody" in op:
                op["requestBody"]["description"] = body
                op["requestBody"]["x-cdm-max-body-bytes"] = args.max_body_bytes
                responses["400"] = _error("malformed JSON or a field out of its bounds; `param` names it")
                responses["413"] = _error(f"body over {args.max_body_bytes} bytes")
    for route in ("/v1/images/generations", "/generate"):
        doc["paths"][route]["post"]["responses"]["404"] = _error("`model` is not served here")
    doc["info"]["x-cdm-limits"] = limits(args, image_size)
    return doc
