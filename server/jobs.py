"""Declarative real-time jobs: value a book every N seconds and keep each result with provenance.

A jobs file (TOML, `settings.jobs.config_file`) lists jobs: a name, `every_s`, a market-data
namespace and a book of instruments (optionally `model_version`, `greeks`, `metrics`). Slots
are aligned to multiples of `every_s` since the Unix epoch on the injected clock, so a feed that
writes snapshots on the same grid is matched exactly. Each slot values the book at
val_datetime = the slot time with data_asof = the clock at start, and writes
`jobs/<name>/<slot token>.json` (storage/jobresults.py; put_if_absent: one document per slot,
whichever replica is first) holding the request, the resolved dataset key+hash, the model
counter+hash, and the scheduled, started and finished times. A slot whose predecessor is still
running is skipped (metrics.job_misses); a failing slot is recorded with its reason
(job_runs{result="error"}) and the scheduler carries on.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.errors import RequestInvalid
from server.keys import (
    CLOCK_KEY,
    JOBS_KEY,
    MARKETDATA_KEY,
    METRICS_KEY,
    MODELS_KEY,
    SETTINGS_KEY,
    STORE_KEY,
    Clock,
)
from server.metrics import Metrics
from server.models import ServedModel, served_model
from server.valuation import (
    Instrument,
    Limits,
    ValuationRequest,
    Version,
    check_book,
    check_valuation_request,
    request_json,
    value_book,
)
from storage.jobresults import job_result_document, job_result_key, put_job_result
from storage.marketdata import MarketDataStore, Name, format_utc
from storage.objectstore import Conflict, ObjectStore

log = structlog.get_logger("spectralmc.jobs")

ValueFn = Callable[[ValuationRequest], Awaitable[dict[str, Any]]]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


class JobsConfigError(ValueError):
    """The jobs file cannot be read or is invalid; the message names the file and each field."""


class JobSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name
    # At least 10 ms: slots are microsecond tokens and each run takes store round trips.
    every_s: Annotated[float, Field(ge=0.01, le=86_400.0, allow_inf_nan=False)]
    namespace: Name
    instruments: list[Instrument] = Field(min_length=1)
    model_version: Version | None = None
    greeks: bool = False
    metrics: bool = False


class JobsFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    jobs: list[JobSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> JobsFile:
        seen: set[str] = set()
        for i, job in enumerate(self.jobs):
            if job.name in seen:
                raise ValueError(f"jobs.{i}.name: duplicate job name {job.name!r}")
            seen.add(job.name)
        return self


def parse_jobs(data: Any, *, limits: Limits, source: str = "jobs file") -> list[JobSpec]:
    """Validate a jobs document (the parsed TOML) against the schema and the server's limits."""
    try:
        parsed = JobsFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise JobsConfigError(f"{source} is invalid: {problems}") from None
    for i, job in enumerate(parsed.jobs):
        try:
            fields = check_book(job.instruments, limits=limits, path=f"jobs.{i}.instruments")
        except RequestInvalid as exc:
            fields = exc.fields
        if fields:
            problems = "; ".join(f"{f.path}: {f.reason}" for f in fields)
            raise JobsConfigError(f"{source} is invalid: {problems}")
    return list(parsed.jobs)


def load_jobs(path: str | Path, *, limits: Limits) -> list[JobSpec]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise JobsConfigError(f"jobs file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobsConfigError(f"jobs file {p} is not valid TOML: {exc}") from None
    return parse_jobs(data, limits=limits, source=f"jobs file {p}")


def next_slot(now: datetime, every_s: float) -> datetime:
    """The first multiple of `every_s` since the epoch strictly after `now` (microsecond exact)."""
    every_us = round(every_s * 1e6)
    now_us = (now - _EPOCH) // _US
    return _EPOCH + timedelta(microseconds=(now_us // every_us + 1) * every_us)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, RequestInvalid):
        fields = "; ".join(f"{f.path}: {f.reason}" for f in exc.fields)
        return f"{exc.detail}: {fields}" if fields else exc.detail
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class RunRecord:
    scheduled: datetime
    started: datetime
    finished: datetime
    status: str  # ok | error | duplicate (another writer stored this slot first)
    error: str | None
    key: str | None
    lag_s: float

    def as_json(self) -> dict[str, Any]:
        return {
            "scheduled": format_utc(self.scheduled),
            "started": format_utc(self.started),
            "finished": format_utc(self.finished),
            "status": self.status,
            "error": self.error,
            "key": self.key,
            "lag_s": self.lag_s,
        }


@dataclass
class JobState:
    spec: JobSpec
    runs: int = 0
    errors: int = 0
    misses: int = 0
    last: RunRecord | None = None
    running: asyncio.Task[None] | None = None

    def as_json(self) -> dict[str, Any]:
        last = self.last
        return {
            "name": self.spec.name,
            "every_s": self.spec.every_s,
            "namespace": self.spec.namespace,
            "instruments": len(self.spec.instruments),
            "runs": self.runs,
            "errors": self.errors,
            "misses": self.misses,
            "running": self.running is not None and not self.running.done(),
            "last_run": None if last is None else last.as_json(),
            "last_status": None if last is None else last.status,
            "last_error": None if last is None else last.error,
            "last_lag_s": None if last is None else last.lag_s,
        }


def make_valuer(
    *, marketdata: MarketDataStore, models: dict[str, ServedModel], default: str,
    limits: Limits,
) -> ValueFn:
    """The valuation a tick runs: the same checks and code as POST /v1/valuations (the job's
    `model`, else `default`; an unknown model fails the run with a 404 like the route)."""

    async def value(req: ValuationRequest) -> dict[str, Any]:
        check_valuation_request(req, limits=limits)
        served = served_model(models, req.model or default)
        return await value_book(req, marketdata=marketdata, model=served.service,
                                book_model=served.book_model)

    return value


class JobScheduler:
    """One asyncio task per job; each slot's run is its own task so a slow run never piles up.

    `value` is the valuation step (public so a test can wrap it, e.g. to make a run overrun).
    """

    def __init__(
        self,
        jobs: list[JobSpec],
        *,
        value: ValueFn,
        store: ObjectStore,
        clock: Clock,
        metrics: Metrics,
        prefix: str = "jobs",
    ) -> None:
        self.value = value
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.prefix = prefix
        self.states = {job.name: JobState(job) for job in jobs}
        self._loops: list[asyncio.Task[None]] = []

    def status(self) -> list[dict[str, Any]]:
        return [s.as_json() for s in self.states.values()]

    def result_key(self, name: str, scheduled: datetime) -> str:
        return job_result_key(name, scheduled, prefix=self.prefix)

    async def start(self) -> None:
        for state in self.states.values():
            task = asyncio.create_task(self._loop(state), name=f"job-{state.spec.name}")
            self._loops.append(task)
        if self.states:
            log.info("jobs_started", jobs=sorted(self.states))

    async def aclose(self) -> None:
        """Cancel the loops, then any run in flight, and wait for all of them to end."""
        tasks = list(self._loops)
        tasks += [s.running for s in self.states.values() if s.running is not None]
        self._loops.clear()
        for t in tasks:
            t.cancel()
        # return_exceptions: the children's CancelledError is expected here, ours still propagates.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, state: JobState) -> None:
        spec = state.spec
        every = timedelta(microseconds=round(spec.every_s * 1e6))
        slot = next_slot(self.clock(), spec.every_s)
        while True:
            delay = (slot - self.clock()).total_seconds()
            if delay > 0:
                await asyncio.sleep(delay)
            # Slots that passed whole while we were not scheduled never ran: they are misses too.
            behind = (self.clock() - slot) // every
            if behind > 0:
                self._miss(state, behind)
                slot += behind * every
            if state.running is not None and not state.running.done():
                self._miss(state, 1)
            else:
                state.running = asyncio.create_task(
                    self._run(state, slot), name=f"job-{spec.name}-run"
                )
            slot += every

    def _miss(self, state: JobState, n: int) -> None:
        state.misses += n
        self.metrics.job_misses.labels(job=state.spec.name).inc(n)
        log.warning("job_missed", job=state.spec.name, slots=n, misses=state.misses)

    async def _run(self, state: JobState, scheduled: datetime) -> None:
        spec = state.spec
        started = self.clock()
        lag = max((started - scheduled).total_seconds(), 0.0)
        self.metrics.job_lag.labels(job=spec.name).observe(lag)
        req = ValuationRequest(
            valuation_namespace=spec.namespace,
            val_datetime=scheduled,
            data_asof=started,
            instruments=spec.instruments,
            model_version=spec.model_version,
            greeks=spec.greeks,
            metrics=spec.metrics,
        )
        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            result = await self.value(req)
        except Exception as exc:  # a failed run is recorded; CancelledError still propagates
            error = describe_error(exc)
        finished = self.clock()
        key = self.result_key(spec.name, scheduled)
        doc = job_result_document(
            job=spec.name,
            error=error,
            scheduled=scheduled,
            started=started,
            finished=finished,
            lag_s=lag,
            request=request_json(req),
            result=result,
        )
        status = doc["status"]
        stored: str | None = key
        try:
            await put_job_result(self.store, key, doc)
        except Conflict:
            status, error = "duplicate", f"{key} was already written (another replica?)"
        except Exception as exc:  # the store is down: the run failed, the scheduler goes on
            status, error = "error", f"writing the result failed: {describe_error(exc)}"
            stored = None
        state.runs += 1
        if status == "error":
            state.errors += 1
        state.last = RunRecord(scheduled, started, finished, status, error, stored, lag)
        self.metrics.job_runs.labels(job=spec.name, result=status).inc()
        (log.info if status == "ok" else log.warning)(
            "job_run",
            job=spec.name,
            scheduled=format_utc(scheduled),
            status=status,
            error=error,
            lag_s=lag,
        )


def build_scheduler(app: web.Application) -> JobScheduler:
    """The scheduler for `settings.jobs.config_file` (none configured: a scheduler with no jobs)."""
    settings = app[SETTINGS_KEY]
    limits = Limits(
        max_items=settings.server.max_instruments, max_string_len=settings.server.max_string_len,
        max_scenarios=settings.server.max_scenarios,
    )
    path = settings.jobs.config_file
    jobs = load_jobs(path, limits=limits) if path is not None else []
    value = make_valuer(marketdata=app[MARKETDATA_KEY], models=app[MODELS_KEY],
                        default=settings.server.default_model, limits=limits)
    return JobScheduler(
        jobs, value=value, store=app[STORE_KEY], clock=app[CLOCK_KEY], metrics=app[METRICS_KEY]
    )


async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: start every job's loop, yield, cancel and await them."""
    scheduler = app[JOBS_KEY]
    await scheduler.start()
    yield
    await scheduler.aclose()
