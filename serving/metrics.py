"""Operational metrics of a replica through Ray Serve's metrics API, tagged with the served model.

Ray exports them with the cluster's other metrics (Prometheus format on each node's metrics agent, names prefixed
``ray_``; a counter also gets ``_total``). Serve adds ``deployment``, ``replica`` and ``application`` tags; every
metric here also carries ``model`` and ``model_version`` of the model that did the work (with ``models`` declared,
one replica reports several: :meth:`ReplicaMetrics.for_model`). Serve's own multiplexing metrics
(``serve_num_multiplexed_models``, ``serve_multiplexed_model_load_latency_ms``, ...) show loads and evictions:

    cdm_images_generated        counter    images returned, tag ``endpoint`` (openai | native)
    cdm_batch_requests          histogram  requests per sampler batch
    cdm_batch_images            histogram  images per sampler batch
    cdm_queue_wait_ms           histogram  a request's wait from reaching the replica's batcher to its batch starting
    cdm_sampler_ms              histogram  one sampler batch: prompt encoding (cache misses) + K-step sampling
    cdm_prompt_cache_hits       counter    prompt-embedding cache lookups that hit (one per distinct prompt of a batch)
    cdm_prompt_cache_misses     counter    ... that missed and ran the text encoder
    cdm_prompt_cache_entries    gauge      prompts held in the cache

Serve's proxy adds, when ``serving.failover`` is installed (no model tags: the proxy serves every application):

    cdm_failover_retries        counter    requests resent because the replica holding them was lost
    cdm_failover_unavailable    counter    requests answered 503 because no replica answered in time
"""

from __future__ import annotations

MS_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class ReplicaMetrics:
    """The metric objects of one replica; ``model`` and ``version`` become default tags of each."""

    def __init__(self, model: str, version: str):
        from ray.serve.metrics import Counter, Gauge, Histogram

        keys = ("model", "model_version")
        self.images = Counter("cdm_images_generated", "images returned", tag_keys=(*keys, "endpoint"))
        self.batch_requests = Histogram(
            "cdm_batch_requests", "requests per sampler batch", boundaries=SIZE_BUCKETS, tag_keys=keys
        )
        self.batch_images = Histogram(
            "cdm_batch_images", "images per sampler batch", boundaries=SIZE_BUCKETS, tag_keys=keys
        )
        self.queue_wait_ms = Histogram(
            "cdm_queue_wait_ms",
            "wait in the replica's batcher before sampling, ms",
            boundaries=MS_BUCKETS,
            tag_keys=keys,
        )
        self.sampler_ms = Histogram(
            "cdm_sampler_ms", "time of one sampler batch (encode + sample), ms", boundaries=MS_BUCKETS, tag_keys=keys
        )
        self.cache_hits = Counter("cdm_prompt_cache_hits", "prompt-embedding cache hits", tag_keys=keys)
        self.cache_misses = Counter("cdm_prompt_cache_misses", "prompt-embedding cache misses", tag_keys=keys)
        self.cache_entries = Gauge("cdm_prompt_cache_entries", "prompts held in the cache", tag_keys=keys)
        tags = {"model": model, "model_version": version}
        for m in (
            self.images,
            self.batch_requests,
            self.batch_images,
            self.queue_wait_ms,
            self.sampler_ms,
            self.cache_hits,
            self.cache_misses,
            self.cache_entries,
        ):
            m.set_default_tags(dict(tags))
        self._default = ModelMetrics(self, None)

    def for_model(self, model: str, version: str) -> ModelMetrics:
        """The same metrics tagged with another served model (a multiplexed one); one per loaded model, whose
        prompt-cache counters it follows."""
        return ModelMetrics(self, {"model": model, "model_version": version})

    def batch(self, requests: int, images: int, waits_ms: list[float], sampler_ms: float, cache: dict) -> None:
        """One sampler batch of the default model; see :meth:`ModelMetrics.batch`."""
        self._default.batch(requests, images, waits_ms, sampler_ms, cache)

    def served(self, images: int, endpoint: str) -> None:
        self._default.served(images, endpoint)


class ModelMetrics:
    """A replica's metrics as one model records them: ``tags`` (None: the replica's default model) on each."""

    def __init__(self, metrics: ReplicaMetrics, tags: dict[str, str] | None):
        self.m, self.tags = metrics, tags
        self._hits = self._misses = 0

    def batch(self, requests: int, images: int, waits_ms: list[float], sampler_ms: float, cache: dict) -> None:
        """One sampler batch; ``cache`` is the prompt cache's ``stats()`` after it (counters are cumulative)."""
        m, tags = self.m, self.tags
        m.batch_requests.observe(requests, tags=tags)
        m.batch_images.observe(images, tags=tags)
        for w in waits_ms:
            m.queue_wait_ms.observe(w, tags=tags)
        m.sampler_ms.observe(sampler_ms, tags=tags)
        if cache["hits"] > self._hits:
            m.cache_hits.inc(cache["hits"] - self._hits, tags=tags)
        if cache["misses"] > self._misses:
            m.cache_misses.inc(cache["misses"] - self._misses, tags=tags)
        self._hits, self._misses = cache["hits"], cache["misses"]
        m.cache_entries.set(cache["size"], tags=tags)

    def served(self, images: int, endpoint: str) -> None:
        self.m.images.inc(images, tags={**(self.tags or {}), "endpoint": endpoint})
