"""The model store's metrics, registered in the app's own registry (`Metrics.registry`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

# Download durations and sizes are counted as totals (seconds, bytes): rates come from PromQL.


class ModelMetrics:
    """`serverless_model_cache_hits_total`, `..._misses_total`, `..._download_bytes_total`,
    `..._download_seconds_total`, `..._evictions_total`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry(auto_describe=True)
        self.hits = Counter(
            "serverless_model_cache_hits", "Model references the store already held.", registry=registry
        )
        self.misses = Counter(
            "serverless_model_cache_misses", "Model references the store had to download.", registry=registry
        )
        self.download_bytes = Counter(
            "serverless_model_download_bytes", "Bytes of models downloaded into the store.", registry=registry
        )
        self.download_seconds = Counter(
            "serverless_model_download_seconds", "Seconds spent downloading models.", registry=registry
        )
        self.evictions = Counter(
            "serverless_model_evictions",
            "Models evicted to keep the store under MODEL_CACHE_MAX_BYTES.",
            registry=registry,
        )
