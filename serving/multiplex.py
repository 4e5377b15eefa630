"""Many students, one deployment: which served model a request names, and what each replica keeps loaded.

``ServeArgs.models`` declares, besides the default ``model``, more models under public ids (``team-a: models:/
cdm-tiny-student/2``). A request picks one by its ``model`` field (``/v1/images/generations`` and ``/generate``)
or by Ray Serve's ``serve_multiplexed_model_id`` header (``MODEL_HEADER``); neither picks the default model. Both
may be given when they agree. An unknown name is a 404 naming ``model`` and listing the public ids, nothing else.

Every declared model is resolved when a replica starts (registry lookup, artifacts downloaded to the local cache,
its ``cdm_model.json`` checked), so ``GET /v1/models`` lists them all and a bad URI fails the deployment up front;
an alias is read then and held for the replica's life, as for the default model. Weights are loaded into memory on
demand by the replica's ``@serve.multiplexed`` loader, at most ``max_models_per_replica`` at once (the default
model among them, loaded at start); Serve unloads the least recently used to load another and tells its router
which replica holds which id, so a request that sends the id as the header goes to a replica that has it loaded.
(A model unloaded while its requests are still sampling stays in memory until they finish.)

Ids that load the same folder (``team-a`` and the default pointing at one version) share one loaded model: it
is multiplexed under the first of them (``Catalog.canonical``). A request may also name a model by any of its
registry names (``cdm-tiny-student/2``, ``models:/cdm-tiny-student@champion``, ...); a bare registered name
picks the default model when it has that name, else the first declared model of that name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.schemas import BadRequest

if TYPE_CHECKING:
    from serving.config import ServeArgs
    from serving.generator import Generator
    from serving.metrics import ModelMetrics, ReplicaMetrics
    from serving.source import ServedModel

logger = logging.getLogger("ray.serve")

MODEL_HEADER = "serve_multiplexed_model_id"  # Ray Serve's header (also spelled serve-multiplexed-model-id)


class Catalog:
    """The models one deployment serves: public id -> identity, the default first; what requests may call them."""

    def __init__(self, default: ServedModel, declared: dict[str, ServedModel] | None = None):
        declared = dict(declared or {})
        self.multi = bool(declared)
        same = [k for k, s in declared.items() if s.folder == default.folder]
        self.default_id = same[0] if same else default.name
        other = declared.get(self.default_id)
        if other is not None and other.folder != default.folder:
            raise ValueError(
                f"models.{self.default_id}: is the default model's name but declares another model; give it another id"
            )
        self.entries: dict[str, ServedModel] = {self.default_id: default}
        self.entries.update((k, s) for k, s in declared.items() if k != self.default_id)
        first: dict[str, str] = {}
        self.canonical = {k: first.setdefault(s.folder, k) for k, s in self.entries.items()}
        self.names: dict[str, str] = {k: k for k in self.entries}  # request name -> public id; ids win
        for n in default.names():
            self.names.setdefault(n, self.default_id)
        for k, s in self.entries.items():
            for n in s.names():
                self.names.setdefault(n, k)

    @property
    def default(self) -> ServedModel:
        return self.entries[self.default_id]

    def request_names(self) -> list[str]:
        """Every ``model`` value a request may send (the OpenAPI enum): the ids first, then the other names."""
        if not self.multi:
            return sorted(self.names)
        return [*self.entries, *sorted(set(self.names) - set(self.entries))]

    def _served_list(self) -> str:
        if not self.multi:
            return repr(self.default.name)
        return ", ".join(repr(k) for k in self.entries) + f" (default {self.default_id!r})"

    def pick(self, model: str | None, header: str | None = None) -> str:
        """The public id of the model a request names by its ``model`` field and/or the multiplexing header."""
        chosen = None
        for value in (model, header or None):
            if value is None:
                continue
            mid = self.names.get(value)
            if mid is None:
                raise BadRequest(
                    "model",
                    f"model: not served here; this service serves {self._served_list()}",
                    status=404,
                    code="model_not_found",
                )
            if chosen is not None and self.canonical[mid] != self.canonical[chosen]:
                raise BadRequest(
                    "model", f"model: the body and the {MODEL_HEADER} header name different models", code="conflict"
                )
            chosen = chosen or mid
        return chosen or self.default_id


def resolve_declared(args: ServeArgs, default: ServedModel, resolve) -> dict[str, ServedModel]:
    """``args.models`` resolved by ``resolve`` (downloaded, not loaded) and checked against the default model: a
    text encoder this server runs, the deployment's default steps and the default's native image size (one
    deployment, one set of sizes)."""
    from serving.generator import check_supported
    from serving.latent import levels_of
    from workflows.model_folder import read_meta

    out: dict[str, ServedModel] = {}
    by_uri: dict[str, ServedModel] = {}
    size = read_meta(default.folder).image_size if args.models else None
    for mid, uri in args.models.items():
        if uri not in by_uri:
            try:
                by_uri[uri] = resolve(uri, args.tracking_uri, args.cache_dir)
            except ValueError as e:
                raise ValueError(f"models.{mid}: {e}") from None
        m = out[mid] = by_uri[uri]
        meta = read_meta(m.folder)
        check_supported(meta, f"models.{mid}")
        check_default_steps(levels_of(m.folder, meta), args, f"models.{mid}")
        if meta.image_size != size:
            raise ValueError(
                f"models.{mid}: native image size {meta.image_size} differs from the default model's {size}; "
                "one deployment serves one image size (its OpenAPI sizes)"
            )
    return out


def check_default_steps(levels, args: ServeArgs, where: str = "model") -> None:
    """The deployment's ``default_steps`` (what the OpenAI route runs) must be steps this model runs."""
    if not levels.supports(args.default_steps):
        raise ValueError(
            f"{where}: runs {levels.native_steps} steps only (its recorded levels); "
            f"default_steps {args.default_steps} cannot be served"
        )


@dataclass(eq=False)
class Loaded:
    """One model in a replica's memory: the id it is loaded under, identity, sampler (with its prompt cache) and
    metrics (tagged with its name and version)."""

    id: str
    served: ServedModel
    gen: Generator
    metrics: ReplicaMetrics | ModelMetrics

    def describe(self) -> dict:
        s = self.served
        return {"id": self.id, "name": s.name, "version": s.version, "prompt_cache": self.gen.prompt_cache.stats()}


class ModelPool:
    """The models a replica holds: the default alone, pinned (one model), or Serve's multiplexed LRU of at most
    ``args.max_models_per_replica`` (``Catalog.multi``)."""

    def __init__(self, catalog: Catalog, args: ServeArgs, metrics: ReplicaMetrics):
        self.catalog, self.args, self.metrics = catalog, args, metrics
        self._pinned: Loaded | None = None
        if catalog.multi:
            from ray import serve

            async def load_model(model_id: str) -> Loaded:
                t0 = time.perf_counter()
                loaded = await asyncio.to_thread(self._build, model_id)  # the loop keeps serving loaded models
                logger.info(f"loaded model {model_id} in {time.perf_counter() - t0:.2f}s")
                return loaded

            self._target = load_model  # Serve keeps its LRU on the function it wraps (``loaded`` reads it)
            # wired per replica, not on the class: the bound is an arg of the deployment
            self._load = serve.multiplexed(max_num_models_per_replica=args.max_models_per_replica)(load_model)

    def _build(self, key: str) -> Loaded:
        from serving.generator import Generator

        s = self.catalog.entries[key]
        a = self.args
        gen = Generator(s.folder, a.min_forward_batch, cache_size=a.prompt_cache_size, cache_mb=a.prompt_cache_mb)
        check_default_steps(gen.levels, a)
        metrics = self.metrics.for_model(s.name, s.version) if self.catalog.multi else self.metrics
        return Loaded(key, s, gen, metrics)

    async def start(self) -> Loaded:
        """Load the default model (at replica start: a broken one fails the replica, not a request)."""
        if not self.catalog.multi:
            self._pinned = self._build(self.catalog.default_id)
            return self._pinned
        return await self.get(self.catalog.default_id)

    async def get(self, mid: str) -> Loaded:
        """The model of public id ``mid``, loaded (and another unloaded) when it is not in memory."""
        if self._pinned is not None:
            return self._pinned
        return await self._load(self.catalog.canonical[mid])

    def loaded(self) -> list[Loaded]:
        """The models in memory, least recently used first."""
        if self._pinned is not None:
            return [self._pinned]
        wrapper = getattr(self._target, "__serve_multiplex_wrapper", None)
        return list(wrapper.models.values()) if wrapper is not None else []

    def health(self) -> dict:
        """``/healthz`` fields: the default model's prompt cache; with ``models``, each loaded model's."""
        loaded = self.loaded()
        default = self.catalog.canonical[self.catalog.default_id]
        out = {"prompt_cache": next((m.gen.prompt_cache.stats() for m in loaded if m.id == default), None)}
        if self.catalog.multi:
            out["max_models_per_replica"] = self.args.max_models_per_replica
            out["models_loaded"] = [m.describe() for m in loaded]
        return out


def record_serving_all(catalog: Catalog, app_name: str, where: str) -> None:
    """Tag each served model version with where it is served (``serving.source.record_serving``), once each."""
    from serving.source import record_serving

    done = set()
    for m in catalog.entries.values():
        if (m.name, m.version) in done:
            continue
        done.add((m.name, m.version))
        try:
            record_serving(m, app_name, where)
        except Exception as e:  # a tracking-server outage must not stop serving; it is logged
            logger.warning(f"could not record serving lineage of {m.name} v{m.version}: {e}")
