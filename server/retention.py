"""Automatic retention: thin the version chain and prune job results every `interval_s`.

`retention_ctx` (a cleanup_ctx) measures the store once shortly after start-up (read-only, for
the `spectralmc_store_bytes` gauge) and then runs `RetentionService.run_once` one interval after
start-up and every interval after that. A run has three steps, each on its own: the chain GC
(storage.retention.apply_retention: last N, refs, the version being served, the thinning ladder,
audited), job-result pruning, and the store byte count. A failing step is logged and counted
(`spectralmc_retention_failures_total{step}`) and never stops the server or the next run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from config.settings import RetentionSettings
from server.jobs import JobScheduler, describe_error
from server.keys import (
    CLOCK_KEY,
    JOBS_KEY,
    METRICS_KEY,
    MODELS_KEY,
    SETTINGS_KEY,
    Clock,
)
from server.metrics import Metrics
from server.models import ServedModel
from storage.chain import VersionChain
from storage.marketdata import format_utc
from storage.objectstore import ObjectStore
from storage.prefixed import ROOT_MODEL
from storage.retention import (
    CHAIN_PREFIXES,
    JobLimits,
    RetentionPolicy,
    apply_retention,
    prefix_bytes,
    prune_job_results,
)

log = structlog.get_logger("spectralmc.retention")

# The root chain's model; each named model's service carries its own name (models/<name>/).
MODEL_NAME = ROOT_MODEL

Sleep = Callable[[float], Awaitable[None]]


def policy_from_settings(settings: RetentionSettings) -> RetentionPolicy:
    return RetentionPolicy.from_pairs(
        settings.keep_last, settings.ladder, max_blob_bytes=settings.max_blob_bytes
    )


@dataclass
class RetentionReport:
    started: str
    finished: str | None = None
    collected: list[int] = field(default_factory=list)
    blobs_deleted: int = 0
    live_versions: int | None = None
    job_results_deleted: int = 0
    store_bytes: int | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RetentionService:
    """One model's chain plus the store's job results; `run_once` never raises (but cancels)."""

    def __init__(
        self,
        settings: RetentionSettings,
        *,
        chain: VersionChain,
        store: ObjectStore,
        clock: Clock,
        metrics: Metrics,
        protect: Callable[[], Iterable[int]] = lambda: (),
        model: str = MODEL_NAME,
        jobs_prefix: str | None = "jobs",
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.policy = policy_from_settings(settings)
        self.job_limits = JobLimits(settings.job_max_age_s, settings.job_max_count)
        self.per_job = {
            name: JobLimits(lim.max_age_s, lim.max_count)
            for name, lim in settings.job_limits.items()
        }
        self.chain = chain
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.protect = protect
        self.model = model
        self.jobs_prefix = jobs_prefix
        self.sleep = sleep
        self.runs = 0
        self.failures = 0
        self.last: RetentionReport | None = None
        self._task: asyncio.Task[None] | None = None

    # -- steps ------------------------------------------------------------------------------------

    def _failed(self, report: RetentionReport, step: str, exc: BaseException) -> None:
        self.failures += 1
        report.errors[step] = describe_error(exc)
        self.metrics.retention_failures.labels(step=step).inc()
        log.warning("retention_step_failed", step=step, model=self.model, error=describe_error(exc))

    async def measure(self, report: RetentionReport | None = None) -> int | None:
        """Bytes of the chain's objects -> the store_bytes gauge (None if the listing failed)."""
        report = report or RetentionReport(started=format_utc(self.clock()))
        try:
            total = await prefix_bytes(self.store, CHAIN_PREFIXES)
        except Exception as exc:
            self._failed(report, "bytes", exc)
            return None
        self.metrics.store_bytes.labels(model=self.model).set(total)
        report.store_bytes = total
        return total

    async def run_once(self) -> RetentionReport:
        report = RetentionReport(started=format_utc(self.clock()))
        try:
            protected = sorted(set(self.protect()))
            plan = await apply_retention(
                self.chain,
                self.policy,
                execute=True,
                actor=self.settings.actor,
                protect=protected,
            )
        except Exception as exc:
            self._failed(report, "gc", exc)
        else:
            report.collected = plan.collect
            report.blobs_deleted = len(plan.delete_blobs)
            report.live_versions = len(plan.kept)
            self.metrics.gc_runs.labels(model=self.model).inc()
            if plan.collect:
                self.metrics.gc_versions_collected.labels(model=self.model).inc(len(plan.collect))
        if self.jobs_prefix is not None:
            await self._prune_jobs(report)
        await self.measure(report)
        report.finished = format_utc(self.clock())
        self.runs += 1
        self.last = report
        (log.info if not report.errors else log.warning)(
            "retention_run",
            model=self.model,
            collected=len(report.collected),
            blobs_deleted=report.blobs_deleted,
            live_versions=report.live_versions,
            job_results_deleted=report.job_results_deleted,
            store_bytes=report.store_bytes,
            errors=report.errors or None,
        )
        return report

    async def _prune_jobs(self, report: RetentionReport) -> None:
        assert self.jobs_prefix is not None
        try:
            pruned = await prune_job_results(
                self.store,
                now=self.clock(),
                limits=self.job_limits,
                per_job=self.per_job,
                prefix=self.jobs_prefix,
            )
        except Exception as exc:
            self._failed(report, "jobs", exc)
        else:
            report.job_results_deleted = len(pruned.delete)
            if pruned.delete:
                self.metrics.job_results_deleted.inc(len(pruned.delete))

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.settings.enabled,
            "interval_s": self.settings.interval_s,
            "policy": self.policy.describe(),
            "runs": self.runs,
            "failures": self.failures,
            "last_run": None if self.last is None else self.last.as_json(),
        }

    # -- the background task ----------------------------------------------------------------------

    async def _loop(self) -> None:
        await self.measure()
        while True:
            await self.sleep(self.settings.interval_s)
            try:
                await self.run_once()
            except Exception as exc:  # run_once catches per step; this is the last guard
                self.failures += 1
                self.metrics.retention_failures.labels(step="run").inc()
                log.error("retention_run_crashed", error=describe_error(exc))

    async def start(self) -> None:
        if self._task is None and self.settings.enabled:
            self._task = asyncio.create_task(self._loop(), name=f"retention-{self.model}")
            log.info("retention_started", model=self.model, **self.policy.describe())

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


RETENTION_KEY = web.AppKey("retention", RetentionService)  # bs's chain and the job results
# every model's retention, bs's first: each model's chain is collected by its own
MODEL_RETENTIONS_KEY = web.AppKey("model_retentions", list[RetentionService])


def served_versions(served: ServedModel, jobs: JobScheduler | None = None
                    ) -> Callable[[], list[int]]:
    """Counters retention must keep in `served`'s chain beyond refs: the version it serves, a
    pinned_version from its settings and, given the scheduler of the jobs that price with
    this model, the exact model_version of any of them."""

    def protect() -> list[int]:
        out: list[int] = []
        if served.settings.model.pinned_version:
            out.append(served.settings.model.pinned_version)
        cur = served.service.current
        if cur is not None:
            out.append(cur.counter)
        for state in jobs.states.values() if jobs is not None else ():
            if state.spec.model_version is not None:
                out.append(state.spec.model_version)
        return out

    return protect


def build_retention(app: web.Application) -> list[RetentionService]:
    """One RetentionService per served model, bs's first. Jobs price with [server]
    default_model, so their versions are kept in its chain; the job results live at the
    store's root and are pruned once, by bs's."""
    settings = app[SETTINGS_KEY]
    default = settings.server.default_model
    return [
        RetentionService(
            settings.retention,
            chain=served.chain,
            store=served.chain.store,  # the store itself for bs (storage.prefixed.model_store)
            clock=app[CLOCK_KEY],
            metrics=app[METRICS_KEY],
            protect=served_versions(served, app[JOBS_KEY] if name == default else None),
            model=name,
            jobs_prefix="jobs" if name == ROOT_MODEL else None,
        )
        for name, served in app[MODELS_KEY].items()  # bs first (build_models)
    ]


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: start the retention loop (when enabled), yield, cancel and await it."""
    services = app[MODEL_RETENTIONS_KEY]
    for service in services:
        await service.start()
    yield
    for service in services:
        await service.aclose()
