"""The application factory: it only assembles; every part is built or injected here."""

from __future__ import annotations

import asyncio
import gc
import math
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from config.settings import Settings, StoreSettings
from server.calibrations import Calibrator
from server.errors import ErrorRule, builtin_rules, error_middleware
from server.http import EDGE_KEY, EdgeAdmission
from server.jobs import build_scheduler, jobs_ctx
from server.keys import (
    CALIBRATOR_KEY,
    CHAIN_KEY,
    CLOCK_KEY,
    JOBS_KEY,
    MARKETDATA_KEY,
    METRICS_KEY,
    MODEL_KEY,
    MODEL_READY_KEY,
    MODELS_KEY,
    REGISTRY_KEY,
    SETTINGS_KEY,
    STORE_KEY,
    WORKER_KEY,
    Clock,
    ModelReadiness,
    Readiness,
)
from server.logging import configure_logging, request_context_middleware
from server.metrics import Metrics, metrics_middleware
from server.model import ModelService, NoModel, Overloaded
from server.models import build_models
from server.retention import (
    MODEL_RETENTIONS_KEY,
    RETENTION_KEY,
    build_retention,
    retention_ctx,
)
from server.routes import setup_routes
from storage.marketdata import MarketDataStore
from storage.objectstore import ObjectStore

log = structlog.get_logger("spectralmc.app")


class StoreConfigError(RuntimeError):
    """No store could be built from settings (and none was injected)."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def open_store_from_settings(settings: StoreSettings) -> ObjectStore:
    """The backend `settings.url` names, wrapped in the retry policy from settings."""
    try:
        from storage.retry import RetryingStore, RetryPolicy
        from storage.url import open_store, parse_store_url
    except ImportError as exc:  # the backends are built beside this module
        raise StoreConfigError(
            f"cannot open store {settings.url!r}: storage.url is unavailable ({exc}); "
            "pass store= to create_app"
        ) from exc
    options: dict[str, Any] = {}
    if parse_store_url(settings.url).scheme == "s3":
        if settings.s3_endpoint_url is not None:
            options["endpoint_url"] = settings.s3_endpoint_url
        if settings.s3_region is not None:
            options["region_name"] = settings.s3_region
        if settings.s3_access_key_id is not None and settings.s3_secret_access_key is not None:
            options["aws_access_key_id"] = settings.s3_access_key_id.get_secret_value()
            options["aws_secret_access_key"] = settings.s3_secret_access_key.get_secret_value()
    policy = RetryPolicy(
        attempts=settings.retry_attempts,
        base_delay_s=settings.retry_backoff_s,
        max_delay_s=settings.retry_backoff_max_s,
    )
    return RetryingStore(open_store(settings.url, **options), policy=policy)


def _close_store(store: ObjectStore, *, owned: bool) -> Callable[[web.Application], Any]:
    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        # An injected store belongs to whoever injected it; only close the one we opened.
        if owned:
            await store.aclose()

    return store_ctx


async def _serve_models(app: web.Application) -> AsyncIterator[None]:
    """Load every model's wanted version (tracking or pinned) and keep it current. Ready once
    the default model serves; the others answer 503 until theirs is loaded."""
    models = app[MODELS_KEY]
    default = app[SETTINGS_KEY].server.default_model
    for served in models.values():
        await served.service.start()

    def ready() -> Readiness:
        cur = models[default].service.current
        if cur is None:
            client = models[default].service.client
            return Readiness(False, client.last_error or client.waiting
                             or "no model version committed yet")
        others = "".join(
            f"; {m.name}: " + ("none" if (c := m.service.current) is None else f"v{c.counter}")
            for m in models.values() if m.name != default
        )
        return Readiness(True, f"serving version {cur.counter} ({cur.mode}){others}")

    app[MODEL_READY_KEY].set(ready)
    services = [m.service for m in models.values()]
    freeze = (asyncio.create_task(_freeze_heap_when_serving(services), name="gc-freeze")
              if app[SETTINGS_KEY].server.gc_freeze else None)
    yield
    if freeze is not None:
        freeze.cancel()
        await asyncio.gather(freeze, return_exceptions=True)
    for served in models.values():
        await served.service.aclose()


async def _freeze_heap_when_serving(services: list[ModelService], poll_s: float = 0.5) -> None:
    """Once a model serves (imports done, kernels compiled, a model loaded), move
    every object alive to the collector's permanent generation (`gc.freeze`). A full
    collection then walks only what was made since: measured on this service's heap of
    ~450,000 start-up objects, 230 ms pauses every ~12 book valuations became ~1 ms
    (bench.inference --book). Frozen objects are still freed by reference counting; only
    cyclic garbage among them would stay."""
    while all(s.current is None for s in services):
        await asyncio.sleep(poll_s)
    # no gc.collect() first: on this heap it is itself a ~230 ms pause of the event loop
    # (measured); the garbage of this moment stays frozen, a one-time bounded cost
    gc.freeze()
    log.info("heap_frozen", objects=gc.get_freeze_count())


async def _train(app: web.Application) -> AsyncIterator[None]:
    """Continuous training, each model's in its own thread; on shutdown: stop, final commit,
    wait for it."""
    workers = [m.worker for m in app[MODELS_KEY].values() if m.worker is not None]
    for worker in workers:
        await worker.start()
    yield
    for worker in workers:
        await worker.stop()


def _error_rules(settings: Settings) -> list[ErrorRule]:
    """This service's domain errors ahead of the built-in ones (the first match wins)."""
    retry_no_model = str(max(1, math.ceil(settings.model.poll_interval_s)))
    return [
        # Load shedding: refused at once with when to come back; counted, not logged.
        ErrorRule(
            Overloaded,
            503,
            "overloaded",
            headers=lambda exc: {
                "Retry-After": str(getattr(exc, "retry_after_s", 1)),
                "X-Overload-Reason": str(getattr(exc, "reason", "")),
            },
            log=False,
        ),
        # No model version loaded yet is a state of the service, not of the request (readiness
        # says so once; a traceback per polling client would only bury the log).
        ErrorRule(NoModel, 503, "unavailable", headers=lambda exc: {"Retry-After": retry_no_model},
                  log=False),
        *builtin_rules(),
    ]


def create_app(
    settings: Settings,
    *,
    store: ObjectStore | None = None,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """Assemble the service; background work joins as cleanup_ctx entries (start, yield, stop)."""
    owned = store is None
    if store is None:
        store = open_store_from_settings(settings.store)
    clock = clock if clock is not None else utc_now
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)

    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[
            request_context_middleware(),
            metrics_middleware(metrics),
            error_middleware(
                request_timeout_s=settings.server.request_timeout_s,
                rules=_error_rules(settings),
            ),
        ],
    )
    app[SETTINGS_KEY] = settings
    app[EDGE_KEY] = EdgeAdmission(
        settings.server.max_inflight_body_bytes,
        on_reject=lambda reason: metrics.http_rejections.labels(reason=reason).inc())
    app[CLOCK_KEY] = clock
    app[REGISTRY_KEY] = registry
    app[METRICS_KEY] = metrics
    app[STORE_KEY] = store
    app[MARKETDATA_KEY] = MarketDataStore(
        store,
        clock=clock,
        max_future=timedelta(seconds=settings.server.max_future_data_asof_s),
    )
    app[MODEL_READY_KEY] = ModelReadiness()
    models = build_models(settings, store, clock=clock, metrics=metrics, owned=owned)
    app[MODELS_KEY] = models
    default = models[settings.server.default_model]
    app[CHAIN_KEY] = default.chain
    app[MODEL_KEY] = default.service
    app[CALIBRATOR_KEY] = Calibrator(models, app[MARKETDATA_KEY],
                                     max_points=settings.server.max_calibration_points)
    app[WORKER_KEY] = default.worker
    app.cleanup_ctx.append(_close_store(store, owned=owned))
    app.cleanup_ctx.append(_serve_models)
    app.cleanup_ctx.append(_train)
    # Jobs start last and stop first: they use the model service and the store.
    app[JOBS_KEY] = build_scheduler(app)
    app.cleanup_ctx.append(jobs_ctx)
    # Retention (GC of the chain, job-result pruning, store bytes) runs every interval_s.
    app[MODEL_RETENTIONS_KEY] = build_retention(app)  # one per model, bs first
    app[RETENTION_KEY] = app[MODEL_RETENTIONS_KEY][0]
    app.cleanup_ctx.append(retention_ctx)
    setup_routes(app)
    return app


def run_app(settings: Settings) -> None:
    """`spectralmc serve`: configure logging, serve until SIGINT/SIGTERM, then clean up."""
    configure_logging(settings.logging)
    app = create_app(settings)
    loop = None
    if settings.server.event_loop == "uvloop":
        import uvloop  # the cli checks it is installed before it gets here

        loop = uvloop.new_event_loop()
    web.run_app(
        app,
        loop=loop,
        host=settings.server.host,
        port=settings.server.port,
        access_log=None,  # the request-context middleware writes the access log
        shutdown_timeout=settings.server.shutdown_timeout_s,
        print=None,
    )
