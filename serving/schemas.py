"""HTTP request bodies. Limits come from :class:`serving.config.ServeArgs` and are checked by the
``check_*`` functions below (prompts, n, steps, size), so one schema serves every deployment; pydantic
checks types and shapes, as JSON Schema reads them (an integer field takes ``2`` or ``2.0``, never ``"2"``
or ``true``). ``serving.openapi`` declares the same limits in the OpenAPI document. Both routes take ``model``
(which served model answers: ``serving.multiplex.Catalog.pick``)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from serving.config import MAX_UPSCALED_PX, NATIVE_SCALES, ServeArgs

# A prompt needs one non-whitespace character: the OpenAPI ``pattern`` of every prompt and the server's own check.
# Spelled out rather than ``\S``, whose meaning differs between regex dialects (Python's covers U+001C-U+001F,
# ECMA's and ASCII-mode ones do not): a schema-driven client once sent "\x1f", valid by the schema's ``\S`` and
# empty by the server's. This class is exactly ``str.isspace``, in ``\uXXXX`` escapes that every dialect reads alike.
NON_BLANK = r"[^\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
SEED_MAX = 2**63 - 1
FREE_TEXT_CHARS = 1000  # the OpenAI fields accepted for compatibility and ignored (quality, style, user)


def _json_int(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("Input should be a valid integer")
    if isinstance(v, float) and not v.is_integer():
        raise ValueError("Input should be a valid integer, got a number with a fractional part")
    return int(v)


JsonInt = Annotated[int, BeforeValidator(_json_int)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX), BeforeValidator(_json_int)]
FreeText = Annotated[str, Field(max_length=FREE_TEXT_CHARS)]


class BadRequest(ValueError):
    """A request that passed JSON parsing but breaks a limit; ``param`` names the field."""

    def __init__(self, param: str, message: str, status: int = 400, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


class ImagesRequest(BaseModel):
    """``POST /v1/images/generations``, the OpenAI Images API shape."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    n: JsonInt = 1
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    seed: Seed | None = None
    # accepted for client compatibility, no effect on a 4-step student:
    quality: FreeText | None = None
    style: FreeText | None = None
    user: FreeText | None = None


class GenerateRequest(BaseModel):
    """``POST /generate``, the native route: one or many prompts."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | list[str]
    model: str | None = None
    n: JsonInt = 1
    seed: Seed | None = None
    steps: JsonInt | None = None
    format: Literal["png", "json"] = "json"


def native_sizes(image_size: int) -> list[str]:
    """The native size and its nearest upscales up to ``MAX_UPSCALED_PX`` a side (upscaling a large image to
    8x would only cost memory and PNG time)."""
    scales = [k for k in NATIVE_SCALES if k == 1 or image_size * k <= MAX_UPSCALED_PX]
    return [f"{image_size * k}x{image_size * k}" for k in scales]


def max_n(args: ServeArgs) -> int:
    """The largest ``n`` any request may ask for (one prompt); more prompts lower it (``max_images``)."""
    return min(args.max_n, args.max_images)


def check_prompts(prompts: list[str], args: ServeArgs, param: str = "prompt") -> list[str]:
    if not prompts:
        raise BadRequest(param, f"{param}: at least one prompt is required")
    if len(prompts) > args.max_prompts:
        raise BadRequest(param, f"{param}: {len(prompts)} prompts, at most {args.max_prompts} per request")
    for p in prompts:
        if not re.search(NON_BLANK, p):
            raise BadRequest(param, f"{param}: empty prompt")
        if len(p) > args.max_prompt_chars:
            raise BadRequest(param, f"{param}: prompt of {len(p)} characters, at most {args.max_prompt_chars}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no text encoder takes it
            raise BadRequest(param, f"{param}: not valid Unicode text (a lone surrogate)") from None
    return prompts


def check_n(n: int, n_prompts: int, args: ServeArgs) -> int:
    if not 1 <= n <= max_n(args):
        raise BadRequest("n", f"n: {n} is out of range 1..{max_n(args)}")
    if n * n_prompts > args.max_images:
        raise BadRequest("n", f"n: {n} images x {n_prompts} prompts exceeds {args.max_images} images per request")
    return n


def check_steps(steps: int | None, args: ServeArgs) -> int:
    s = args.default_steps if steps is None else steps
    if s not in args.allowed_steps:
        raise BadRequest("steps", f"steps: {s} is not one of {args.allowed_steps}")
    return s


def check_size(size: str | None, image_size: int) -> int:
    if size is None:
        return image_size
    sizes = native_sizes(image_size)
    if size not in sizes:
        raise BadRequest("size", f"size: not supported; use one of {sizes}")
    return int(size.split("x")[0])
