"""HTTP request bodies. Limits come from :class:`serving.config.ServeArgs` and are checked by the
``check_*`` functions below (prompts, n, steps, size), so one schema serves every deployment; pydantic
checks types and shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.config import NATIVE_SCALES, ServeArgs


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
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    # accepted for client compatibility, no effect on a 4-step student:
    quality: str | None = None
    style: str | None = None
    user: str | None = None


class GenerateRequest(BaseModel):
    """``POST /generate``, the native route: one or many prompts."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | list[str]
    n: int = 1
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    steps: int | None = None
    format: Literal["png", "json"] = "json"


def native_sizes(image_size: int) -> list[str]:
    return [f"{image_size * k}x{image_size * k}" for k in NATIVE_SCALES]


def check_prompts(prompts: list[str], args: ServeArgs, param: str = "prompt") -> list[str]:
    if not prompts:
        raise BadRequest(param, f"{param}: at least one prompt is required")
    if len(prompts) > args.max_prompts:
        raise BadRequest(param, f"{param}: {len(prompts)} prompts, at most {args.max_prompts} per request")
    for p in prompts:
        if not p.strip():
            raise BadRequest(param, f"{param}: empty prompt")
        if len(p) > args.max_prompt_chars:
            raise BadRequest(param, f"{param}: prompt of {len(p)} characters, at most {args.max_prompt_chars}")
    return prompts


def check_n(n: int, n_prompts: int, args: ServeArgs) -> int:
    if not 1 <= n <= args.max_n:
        raise BadRequest("n", f"n: {n} is out of range 1..{args.max_n}")
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
        raise BadRequest("size", f"size: {size!r} is not supported; use one of {sizes}")
    return int(size.split("x")[0])
