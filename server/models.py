"""Named models: each one process + config, its own chain, serving mode and trainer.

`bs` is the top-level [core] and [model] (a GBM) and its chain is the store's root, so a store
written before named models is served as `bs` unchanged. Every `[models.<name>]` adds a model
whose chain lives under `models/<name>/` (storage/prefixed.py). Each model has its own
`ModelService` (tracking its `serving` ref or pinned), its own promoter and training worker (one
trainer per chain, by lease), its own scenario sampler, and its slice of the per-model metrics
(`model="<name>"`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from config.settings import Settings
from server.keys import MODELS_KEY, SETTINGS_KEY
from server.metrics import Metrics, ModelMetrics
from server.model import BatchStats, ModelInfo, ModelService
from server.scenarios import ScenarioSampler
from server.valuation import BookModel
from server.worker import TrainingWorker
from storage.chain import VersionChain, VersionRecord
from storage.objectstore import NotFound, ObjectStore
from storage.prefixed import ROOT_MODEL, model_prefix, model_store
from storage.promotion import Decision, Promoter, PromotionPolicy
from storage.retry import NO_RETRY

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class ServedModel:
    """One named model of this server."""

    name: str
    settings: Settings  # as the model sees them (Settings.for_model)
    chain: VersionChain
    service: ModelService
    metrics: ModelMetrics
    worker: TrainingWorker | None
    sampler: ScenarioSampler

    @property
    def process(self) -> str:
        return self.settings.core.process

    @property
    def book_model(self) -> BookModel:
        """Its name, process, contract fields and greeks, as the pricing routes need them."""
        return BookModel(self.name, self.process)

    def describe(self) -> dict[str, Any]:
        """The model as GET /v1/models lists it: process, domain, live version, mode, the
        quality metrics of the version it serves, and its trainer's state."""
        core = self.settings.core
        domain = {
            name: [core.domain.bounds(name).lower, core.domain.bounds(name).upper]
            for name in core.domain.names
        }
        loaded = self.service.client.current
        worker = self.worker
        return {
            "name": self.name,
            "process": core.process,
            "domain": domain,
            "chain": "/" if self.name == ROOT_MODEL else model_prefix(self.name),
            "mode": str(self.service.client.mode),
            "live": None if loaded is None else {
                **ModelService.info(loaded).as_json(),
                "quality": dict(loaded.record.quality_metrics),
            },
            "training": "disabled" if worker is None else worker.state,
        }


def _model_service(settings: Settings, chain: VersionChain, metrics: ModelMetrics) -> ModelService:
    m = settings.model
    fixed: int | str | None = None
    if m.mode == "pinned":
        fixed = m.pinned_version if m.pinned_version is not None else m.pin_ref

    def on_swap(info: ModelInfo) -> None:
        metrics.set_model_version(version=info.counter, version_hash=info.version_hash)
        metrics.model_swaps.inc()

    def on_batch(stats: BatchStats) -> None:
        metrics.contracts_priced.inc(stats.rows)
        metrics.pricing_batch_rows.observe(stats.rows)
        metrics.pricing_batch_requests.observe(stats.requests)
        for delay in stats.queue_delays_s:
            metrics.pricing_queue_delay.observe(delay)

    return ModelService(
        chain,
        poll_interval=m.poll_interval_s,
        fixed_target=fixed,
        max_batch_rows=m.max_batch_rows,
        max_inflight_bytes=m.max_inflight_bytes,
        deadline_s=m.deadline_s,
        process=settings.core.process,
        on_swap=on_swap,
        on_batch=on_batch,
        on_admit=metrics.pricing_inflight_rows.observe,
        on_reject=lambda reason: metrics.pricing_rejections.labels(reason=reason).inc(),
        on_load_failure=lambda kind: metrics.model_load_failures.labels(kind=kind).inc(),
    )


def _promoter(
    name: str, settings: Settings, chain: VersionChain, metrics: ModelMetrics,
    service: ModelService
) -> Promoter:
    """The quality gate of the model's `serving` ref, counted in /metrics; a promotion wakes
    the model poller, so the new version serves at once rather than at the next poll."""
    # [promotion] names exactly the policy's fields
    policy = PromotionPolicy(**settings.promotion.model_dump())

    def on_decision(record: VersionRecord, decision: Decision) -> None:
        result = "promoted" if decision.promote else "refused"
        metrics.promotions.labels(result=result, reason=decision.reason).inc()
        error = record.quality_metrics.get("held_out_mean_bp")
        if isinstance(error, int | float):
            metrics.version_held_out_error.labels(version="committed").set(error)
        if decision.promote:
            metrics.serving_version.set(record.counter)
            if isinstance(error, int | float):
                metrics.version_held_out_error.labels(version="served").set(error)
            service.client.poke()

    return Promoter(chain, policy, on_decision=on_decision, label=f"model {name}")


def build_models(
    settings: Settings, store: ObjectStore, *, clock: Clock, metrics: Metrics, owned: bool
) -> dict[str, ServedModel]:
    """Every model the settings name, `bs` first. `owned`: the store was opened from settings
    and is already wrapped in their retry policy (no second layer)."""
    out: dict[str, ServedModel] = {}
    for name in (ROOT_MODEL, *settings.models):
        own = settings.for_model(name)
        chain_store = model_store(store, name)
        chain = VersionChain(chain_store, clock=clock, retry=NO_RETRY if owned else None)
        model_metrics = metrics.for_model(name)
        service = _model_service(own, chain, model_metrics)
        worker = (
            TrainingWorker(own, chain, model_metrics,
                           promoter=_promoter(name, own, chain, model_metrics, service))
            if own.training.enabled else None
        )
        sampler = ScenarioSampler(service, max_samples=settings.server.max_scenario_samples,
                                  spec=BookModel(name, own.core.process))
        out[name] = ServedModel(name, own, chain, service, model_metrics, worker, sampler)
    return out


def served_model(models: dict[str, ServedModel], name: str) -> ServedModel:
    """The model `name`; NotFound (404) naming it and the models served here."""
    try:
        return models[name]
    except KeyError:
        raise NotFound(f"model {name!r} is not served here (models: {sorted(models)})") from None


def request_model(app: web.Application, name: str | None) -> ServedModel:
    """The model a request names, else [server] default_model; NotFound (404) for an unknown
    one."""
    return served_model(app[MODELS_KEY], name or app[SETTINGS_KEY].server.default_model)
