"""Typed arguments of the serving application (``deploy/serve.yaml`` ``args`` and ``user_config``).

``ServeArgs`` is fixed for a deployment's life (what is served and the request limits);
``BatchingConfig`` is the deployment's ``user_config``: Serve applies a change to running replicas
through ``reconfigure`` without restarting them. The request limits here are what the API enforces and what its
OpenAPI document declares (``serving.openapi``), so a deployment with other limits shows other bounds.

Many students, one deployment: ``models`` maps public model ids (what a request's ``model`` field names, e.g.
``team-a``) to model URIs, served besides the default ``model``; each replica keeps at most
``max_models_per_replica`` of them in memory (Ray Serve's model multiplexing, least recently used first out)::

    args:
      model: models:/cdm-tiny-student@champion      # answers requests that name no model
      models:
        team-a: models:/cdm-tiny-student/2
        team-b: models:/team-b-student@champion
      max_models_per_replica: 2
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from workflows.config import Strict

NATIVE_SCALES = (1, 2, 4, 8)  # OpenAI ``size`` may ask for the native size or these upscales (nearest)
MAX_UPSCALED_PX = 1024  # ... up to this side: a 1024 px SD3 / LongCat student is offered at its native size only
PROMPT_CACHE_SIZE = 4096  # default entries of a replica's prompt-embedding cache
PROMPT_CACHE_MB = 256.0  # ... and its default memory bound
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a public model id: no path, no URI, fits a header
MAX_MODELS = 64  # models one deployment may declare


class ServeArgs(Strict):
    model: str = Field(
        "builtin",
        min_length=1,
        description="models:/<name>@<alias>, models:/<name>/<version>, a local model folder, or "
        "'builtin' (the built-in teacher, run at 4 steps)",
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_MODELS,
        description="more models served by the same deployment, chosen by a request's `model` field (or the "
        "serve_multiplexed_model_id header): public id (letters, digits, . _ -) -> a URI as `model` takes; "
        "empty: one model, as before",
    )
    max_models_per_replica: int = Field(
        3,
        ge=1,
        le=MAX_MODELS,
        description="with `models`: models (the default one included) a replica keeps loaded; "
        "the least recently used is unloaded to load another",
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI for models:/ (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    app_name: str = Field("cdm", min_length=1)
    public_url: str | None = Field(None, description="where clients reach the service (recorded on the model version)")
    allowed_steps: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    default_steps: int = Field(4, ge=1, le=1000)
    max_prompt_chars: int = Field(512, ge=1, le=100_000)
    max_n: int = Field(8, ge=1, le=256, description="images per prompt")
    max_prompts: int = Field(8, ge=1, le=256, description="prompts per /generate request")
    max_images: int = Field(32, ge=1, le=4096, description="images per request in all")
    min_forward_batch: int = Field(
        4,
        ge=1,
        le=256,
        description="pad model forwards to at least this many rows: CPU GEMMs on fewer "
        "rows take another kernel and differ by ~1e-6, which would make the "
        "same seed give different bytes alone and in a batch",
    )
    gil_switch_interval_s: float = Field(
        0.0005, gt=0.0, le=0.1, description="sys.setswitchinterval in replicas (Python default 0.005)"
    )
    cache_dir: str | None = Field(None, description="where models:/ artifacts are downloaded (default ~/.cache/cdm)")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="request bodies beyond this get 413")
    prompt_cache_size: int = Field(
        PROMPT_CACHE_SIZE, ge=0, le=1_000_000, description="prompt embeddings kept per replica (LRU); 0 turns it off"
    )
    prompt_cache_mb: float = Field(
        PROMPT_CACHE_MB,
        gt=0.0,
        le=65536.0,
        description="memory bound of the prompt cache (a large encoder's states are big)",
    )

    @field_validator("models")
    @classmethod
    def _models(cls, v: dict[str, str]) -> dict[str, str]:
        for key, uri in v.items():
            if not MODEL_ID.match(key):
                raise ValueError(
                    f"model id {key[:70]!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
                )
            if not uri.strip():
                raise ValueError(f"models.{key}: empty model URI")
        return v

    @field_validator("allowed_steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if any(s < 1 or s > 1000 for s in v):
            raise ValueError("every allowed step count must be in 1..1000")
        return sorted(set(v))


class BatchingConfig(Strict):
    """``user_config`` of the deployment: live-tunable dynamic batching."""

    max_batch_size: int = Field(16, ge=1, le=1024, description="requests per model call; 1 turns batching off")
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=10.0)
