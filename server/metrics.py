"""Prometheus instruments on a per-app registry and the middleware that feeds the HTTP ones."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROW_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)


class Metrics:
    """Every instrument the service exports. HTTP ones are fed here; the rest by their owners."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ns = "spectralmc"
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests handled",
            ["route", "method", "status"],
            namespace=ns,
            registry=registry,
        )
        self.http_latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency",
            ["route", "method"],
            namespace=ns,
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.http_rejections = Counter(
            "http_rejections",
            "Requests refused with 503 at the HTTP edge before their body was read, by reason",
            ["reason"],
            namespace=ns,
            registry=registry,
        )
        self.valuations = Counter(
            "valuations",
            "Valuation requests answered",
            ["result"],
            namespace=ns,
            registry=registry,
        )
        self.contracts_priced = Counter(
            "contracts_priced", "Contracts priced", ["model"], namespace=ns, registry=registry
        )
        # The continuous batcher and its admission control (server/model.py).
        self.pricing_queue_delay = Histogram(
            "pricing_queue_delay_seconds",
            "Time a pricing request waited in the queue before its batch started",
            ["model"],
            namespace=ns,
            registry=registry,
            buckets=(0.0001, 0.0005, *_LATENCY_BUCKETS),
        )
        self.pricing_batch_rows = Histogram(
            "pricing_batch_rows",
            "Contract rows per forward pass",
            ["model"],
            namespace=ns,
            registry=registry,
            buckets=_ROW_BUCKETS,
        )
        self.pricing_batch_requests = Histogram(
            "pricing_batch_requests",
            "Requests per forward pass",
            ["model"],
            namespace=ns,
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.pricing_inflight_rows = Histogram(
            "pricing_inflight_rows",
            "Rows queued or being priced, observed as each request is admitted",
            ["model"],
            namespace=ns,
            registry=registry,
            buckets=_ROW_BUCKETS,
        )
        self.pricing_rejections = Counter(
            "pricing_rejections",
            "Pricing requests refused with 503, by reason (queue_full, deadline, deadline_expired)",
            ["model", "reason"],
            namespace=ns,
            registry=registry,
        )
        self.model_version_info = Gauge(
            "model_version_info",
            "The model version serving (value 1)",
            ["model", "version", "hash"],
            namespace=ns,
            registry=registry,
        )
        self.model_swaps = Counter(
            "model_swaps",
            "Hot swaps of the serving model",
            ["model"],
            namespace=ns,
            registry=registry,
        )
        self.model_load_failures = Counter(
            "model_load_failures",
            "Failed model polls or loads, by kind (corrupt, Unavailable, ...)",
            ["model", "kind"],
            namespace=ns,
            registry=registry,
        )
        self.training_step = Gauge(
            "training_step", "Last training step", ["model"], namespace=ns, registry=registry
        )
        self.training_loss = Gauge(
            "training_loss", "Last training loss", ["model"], namespace=ns, registry=registry
        )
        self.training_validation_error = Gauge(
            "training_validation_error",
            "Last validation error",
            ["model"],
            namespace=ns,
            registry=registry,
        )
        self.training_samples_per_second = Gauge(
            "training_samples_per_second",
            "Monte-Carlo samples per second",
            ["model"],
            namespace=ns,
            registry=registry,
        )
        self.commits = Counter(
            "commits",
            "Checkpoint commits by result",
            ["model", "result"],
            namespace=ns,
            registry=registry,
        )
        # Quality-gated promotion (storage/promotion.py): each decision, and what it looked at.
        self.promotions = Counter(
            "promotions",
            "Promotion decisions on committed versions: promoted or refused",
            ["model", "result", "reason"],
            namespace=ns,
            registry=registry,
        )
        self.serving_version = Gauge(
            "serving_version",
            "Version counter the serving ref names",
            ["model"],
            namespace=ns,
            registry=registry,
        )
        self.version_held_out_error = Gauge(
            "version_held_out_error_bp",
            "Held-out mean put error (bp of spot) of the last committed and the served version",
            ["model", "version"],
            namespace=ns,
            registry=registry,
        )
        self.job_runs = Counter(
            "job_runs", "Job runs by result", ["job", "result"], namespace=ns, registry=registry
        )
        self.job_misses = Counter(
            "job_misses",
            "Job runs skipped because the previous one overran",
            ["job"],
            namespace=ns,
            registry=registry,
        )
        self.job_lag = Histogram(
            "job_lag_seconds",
            "Start delay of a job run after its scheduled time",
            ["job"],
            namespace=ns,
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        # Retention (server/retention.py): store size per model and what each run collected.
        self.store_bytes = Gauge(
            "store_bytes",
            "Bytes of every object of the model's version chain in the store",
            ["model"],
            namespace=ns,
            registry=registry,
        )
        self.gc_runs = Counter(
            "gc_runs",
            "Retention GC runs of a model's chain that completed",
            ["model"],
            namespace=ns,
            registry=registry,
        )
        self.gc_versions_collected = Counter(
            "gc_versions_collected",
            "Versions whose checkpoint blob retention collected",
            ["model"],
            namespace=ns,
            registry=registry,
        )
        self.job_results_deleted = Counter(
            "job_results_deleted",
            "Job result documents deleted by retention",
            namespace=ns,
            registry=registry,
        )
        self.retention_failures = Counter(
            "retention_failures",
            "Failed retention steps, by step (gc, jobs, bytes)",
            ["step"],
            namespace=ns,
            registry=registry,
        )

    def for_model(self, model: str) -> ModelMetrics:
        """The per-model instruments with their `model` label bound."""
        return ModelMetrics(self, model)


class _Bound:
    """A labelled metric with its `model` label fixed: `.labels(**rest)` adds it."""

    def __init__(self, metric: Counter | Gauge, model: str) -> None:
        self._metric = metric
        self._model = model

    def labels(self, **labels: str) -> Any:
        return self._metric.labels(model=self._model, **labels)


class ModelMetrics:
    """One named model's slice of the per-model instruments, under the names `Metrics` gives
    them: the model service, its trainer and its promoter write here without knowing the
    model's name (every series carries `model="<name>"`)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.model = model
        self.registry = metrics.registry
        self.contracts_priced = metrics.contracts_priced.labels(model=model)
        self.pricing_queue_delay = metrics.pricing_queue_delay.labels(model=model)
        self.pricing_batch_rows = metrics.pricing_batch_rows.labels(model=model)
        self.pricing_batch_requests = metrics.pricing_batch_requests.labels(model=model)
        self.pricing_inflight_rows = metrics.pricing_inflight_rows.labels(model=model)
        self.pricing_rejections = _Bound(metrics.pricing_rejections, model)
        self.model_swaps = metrics.model_swaps.labels(model=model)
        self.model_load_failures = _Bound(metrics.model_load_failures, model)
        self.training_step = metrics.training_step.labels(model=model)
        self.training_loss = metrics.training_loss.labels(model=model)
        self.training_validation_error = metrics.training_validation_error.labels(model=model)
        self.training_samples_per_second = metrics.training_samples_per_second.labels(model=model)
        self.commits = _Bound(metrics.commits, model)
        self.promotions = _Bound(metrics.promotions, model)
        self.serving_version = metrics.serving_version.labels(model=model)
        self.version_held_out_error = _Bound(metrics.version_held_out_error, model)
        self._version_info = metrics.model_version_info
        self._version_series: tuple[str, str] | None = None

    def set_model_version(self, *, version: int, version_hash: str) -> None:
        """Exactly one labelled series per model: the version it serves."""
        if self._version_series is not None:
            self._version_info.remove(self.model, *self._version_series)
        self._version_series = (str(version), version_hash)
        self._version_info.labels(self.model, *self._version_series).set(1)


# HTTP label values come from fixed sets, so clients choosing odd methods (the parser accepts
# WebDAV's and others) cannot grow the registry: every other method counts as "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(request: web.Request) -> str:
    return request.method if request.method in _METHODS else "other"


def route_label(request: web.Request) -> str:
    """The route's canonical path (`/v1/marketdata/{namespace}`): bounded label cardinality."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"
    return resource.canonical


def metrics_middleware(metrics: Metrics) -> Middleware:
    """Counts and times every request under its route's canonical path and final status."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            route, method = route_label(request), method_label(request)
            metrics.http_requests.labels(route, method, str(status)).inc()
            metrics.http_latency.labels(route, method).observe(time.perf_counter() - start)

    return middleware


def exposition(metrics: Metrics) -> tuple[bytes, str]:
    """The registry in Prometheus text format, and its content type."""
    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST
