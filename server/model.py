"""Model serving: the live pricer from the version chain, and micro-batched inference.

The `InferenceClient` keeps a loaded `Pricer` for the wanted version: the chain's serving pin
(`refs/pin`, set through the admin API so every replica on the store agrees) when it is set,
otherwise the chain's HEAD, or a ref named in settings (`model.mode = pinned`). Pricing runs in
one worker thread, off the event loop, with continuous batching: a request that finds the thread
idle is priced at once; requests that arrive while a batch runs queue, and all of them (same
model and outputs) go in the next pass. Admission bounds the rows in flight (a byte cap) and
sheds work past its deadline, refusing with `Overloaded` (503 + Retry-After) rather than letting
requests time out. Prices are computed in float64 with a batch-invariant forward pass, so the
same request gives the same bytes however it was batched.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import numpy as np
import structlog

from spectral_core.pricer import Contracts, Pricer
from spectral_core.snapshot import Snapshot
from storage.chain import PIN_REF, VersionChain, VersionRecord
from storage.inference import InferenceClient, Loaded, Pinned, Tracking
from storage.objectstore import Corrupt, NotFound, Unavailable
from storage.tasks import cancel_and_wait

log = structlog.get_logger(__name__)
_T = TypeVar("_T")


class NoModel(Exception):
    """No model version is loaded yet (HTTP 503)."""


@dataclass(frozen=True)
class ModelInfo:
    counter: int
    version_hash: str
    mode: str  # "pinned" | "tracking" | "version" (an exact version asked for by the request)
    since: datetime

    def as_json(self) -> dict[str, object]:
        return {"counter": self.counter, "version_hash": self.version_hash, "mode": self.mode}


@dataclass(frozen=True)
class PricedBatch:
    values: dict[str, np.ndarray]
    model: ModelInfo


def load_pricer(
    snapshot: Snapshot, record: VersionRecord, *, process: str | None = None
) -> Pricer:
    """InferenceClient loader: a fresh, reproducible (float64, batch-invariant) CPU pricer,
    warmed up (numba kernels compiled or loaded) before it can be swapped in: a cold cache
    would otherwise make the first request on it wait ~30 s. `process`: the process the model
    serves (a version of another one fails to load, ProcessMismatch)."""
    pricer = Pricer.from_snapshot(snapshot, device="cpu", reproducible=True, process=process)
    pricer.warm_up()
    return pricer


class Overloaded(Exception):
    """Admission refused (HTTP 503 with Retry-After): the pricing work in flight is at its bound,
    or the request's deadline cannot be (or was not) met. `reason` names which."""

    def __init__(self, reason: str, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after_s = retry_after_s


class SerialGate:
    """Work that runs one at a time off the event loop (scenario sampling, calibration): a
    caller that finds `max_waiting` others waiting is refused at once (Overloaded)."""

    def __init__(self, what: str, *, max_waiting: int = 4) -> None:
        self.what = what
        self.max_waiting = max_waiting
        self._lock = asyncio.Lock()
        self._waiting = 0

    async def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """`fn(*args, **kwargs)` on a worker thread once the gate is free."""
        if self._waiting >= self.max_waiting:
            raise Overloaded("queue_full", f"{self._waiting} {self.what} are waiting",
                             retry_after_s=1)
        self._waiting += 1
        try:
            async with self._lock:
                return await asyncio.to_thread(fn, *args, **kwargs)
        finally:
            self._waiting -= 1


_Kind = tuple[bool, bool]  # (greeks, metrics): what a batch computes, and so what it costs


@dataclass
class _Pending:
    contracts: Contracts
    rows: int  # len(contracts)
    future: asyncio.Future[dict[str, np.ndarray]]
    cost: int  # bytes held against max_inflight_bytes until answered
    enqueued: float  # loop time
    deadline: float | None  # loop time past which the answer is no use to the client
    queued: bool = True  # its rows count as work queued ahead of later requests


@dataclass
class _Queue:
    pricer: Pricer
    greeks: bool
    metrics: bool
    items: deque[_Pending] = field(default_factory=deque)


class _CostModel:
    """The measured times of the recent batches of one kind, and what they bound.

    More rows never take less time, and a larger batch spreads its fixed cost over more rows,
    so never costs more per row. Contention (the event loop, the trainer, a GC pause) only ever
    slows a batch down. So from the fastest recent batches: `rows` rows take at least
    rows x the per-row time of a batch at least that large, and at least the time of a batch
    smaller than them. Nothing is extrapolated from small batches to large ones: a least-squares
    slope over a few noisy small batches, applied to 1,000 rows, refused requests priced in
    milliseconds (the bound this replaced).
    """

    def __init__(self, window: int = 32) -> None:
        self._batches: deque[tuple[int, float]] = deque(maxlen=window)  # (rows, seconds)

    def add(self, rows: int, seconds: float) -> None:
        if rows > 0:
            self._batches.append((rows, seconds))

    def least_seconds(self, rows: int) -> float:
        """A lower bound of the time `rows` rows take to price (0 with no batch measured)."""
        if rows <= 0 or not self._batches:
            return 0.0
        per_row = min((s / n for n, s in self._batches if n >= rows), default=None)
        if per_row is not None:
            return rows * per_row
        largest = max(n for n, _ in self._batches)
        return min(s for n, s in self._batches if n == largest)

    def drain_seconds(self, rows: int) -> float:
        """The time `rows` rows take at the fastest per-row rate of recent batches of their size
        (of the largest measured, beyond it): an estimate, for Retry-After."""
        if rows <= 0 or not self._batches:
            return 0.0
        size = min(rows, max(n for n, _ in self._batches))
        return rows * min(s / n for n, s in self._batches if n >= size)


@dataclass(frozen=True)
class BatchStats:
    """One priced batch, for /metrics: requests, rows and each request's wait in the queue."""

    requests: int
    rows: int
    queue_delays_s: tuple[float, ...]


def _mode_name(mode: str) -> str:
    return "tracking" if mode == "tracking" else "pinned"


class ModelService:
    """Owns the InferenceClient and the micro-batcher."""

    def __init__(
        self,
        chain: VersionChain,
        *,
        poll_interval: float,
        fixed_target: int | str | None = None,
        max_batch_rows: int = 4096,
        max_inflight_bytes: int = 64 * 1024 * 1024,
        deadline_s: float | None = None,
        process: str | None = None,
        on_swap: Callable[[ModelInfo], None] | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_admit: Callable[[int], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
        on_load_failure: Callable[[str], None] | None = None,
    ) -> None:
        """Admission: the bytes of the rows queued or being priced (`Pricer.row_bytes`) stay
        within `max_inflight_bytes`; a request is refused (Overloaded) when it would pass the
        bound, except when nothing is in flight (a lone request cannot starve anyone).
        `deadline_s` is the default time a request may wait for its answer (a request may
        bring a shorter or longer one): a request is refused at once when the work ahead of
        it, at the least time that work can take, passes its deadline, and work whose deadline
        has passed in the queue is shed unpriced.

        Callbacks: `on_batch(stats)` per priced batch, `on_admit(rows_in_flight)` per admitted
        request, `on_reject(reason)` per refusal, `on_load_failure(kind)` per failed model poll
        ("corrupt", "Unavailable", ...). `process`: the process this model serves; a version of
        another one is not loaded."""
        self.chain = chain
        self.process = process
        # A replica told by its settings to serve a fixed version or ref ignores the shared pin.
        self.fixed_target = fixed_target
        self.client: InferenceClient[Pricer] = InferenceClient(
            chain,
            loader=functools.partial(load_pricer, process=process),
            mode=Pinned(fixed_target) if fixed_target is not None else Tracking(),
            poll_interval=poll_interval,
            # After a store outage the next good version is picked up within a few poll
            # intervals, never a fixed minute: back off to at most 8 intervals (and 60 s).
            max_backoff=max(poll_interval, min(60.0, 8.0 * poll_interval)),
            on_failure=on_load_failure,
            on_swap=lambda _loaded: self._note_swap(),
        )
        self.poll_interval = poll_interval
        self.max_batch_rows = max_batch_rows
        self.max_inflight_bytes = max_inflight_bytes
        self.deadline_s = deadline_s
        self.on_swap = on_swap
        self.on_batch = on_batch
        self.on_admit = on_admit
        self.on_reject = on_reject
        # One pricing thread: batches run one at a time, so a batch in flight is the signal to
        # queue (and batch) and an idle thread the signal to dispatch at once.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pricing")
        # Waiting work per (pricer, greeks, metrics), oldest key first.
        self._queues: OrderedDict[tuple[int, bool, bool], _Queue] = OrderedDict()
        self._busy = False
        self._inflight_bytes = 0
        self._inflight_rows = 0
        # Measured pricing times per kind, and the work they are applied to: the rows queued
        # per kind and the batch being priced (kind, rows, loop time it started). They give
        # the deadline admission (a lower bound of the work ahead) and Retry-After (an
        # estimate of the drain time). No bound (0 s) for a kind not priced yet.
        self._costs: dict[_Kind, _CostModel] = {}
        self._queued_rows: dict[_Kind, int] = {}
        self._running: tuple[_Kind, int, float] | None = None
        self._pin_task: asyncio.Task[None] | None = None
        self._last_hash: str | None = None
        self.pin_error: str | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._sync_pin()
        await self.client.start()
        self._note_swap()
        self._pin_task = asyncio.create_task(self._pin_loop(), name="model-pin-sync")

    async def aclose(self) -> None:
        task, self._pin_task = self._pin_task, None
        await cancel_and_wait(task)
        await self.client.aclose()
        for q in self._queues.values():
            for p in q.items:
                if not p.future.done():
                    p.future.set_exception(NoModel("the service is shutting down"))
        self._queues.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _sync_pin(self) -> None:
        """Follow the chain's serving pin: set -> pinned to it, unset -> tracking HEAD."""
        if self.fixed_target is not None:
            return
        try:
            pinned = await self.chain.ref(PIN_REF)
        except Exception as exc:  # store trouble: keep the current mode, report
            self.pin_error = f"{type(exc).__name__}: {exc}"
            return
        self.pin_error = None
        want_pinned = pinned is not None
        is_pinned = isinstance(self.client.mode, Pinned)
        if want_pinned and not is_pinned:
            self.client.set_pin(PIN_REF)
        elif not want_pinned and is_pinned:
            self.client.track()

    async def _pin_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self._sync_pin()
            self._note_swap()

    def _note_swap(self) -> None:
        cur = self.client.current
        if cur is not None and cur.record.version_hash != self._last_hash:
            self._last_hash = cur.record.version_hash
            if self.on_swap is not None:
                self.on_swap(self.info(cur))

    # ------------------------------------------------------------------ admin
    async def pin(self, target: int | str, *, actor: str) -> int:
        counter = await self.chain.pin(target, actor=actor)
        if self.fixed_target is None:
            self.client.set_pin(PIN_REF)
        await self.client.refresh()
        self._note_swap()
        return counter

    async def unpin(self, *, actor: str) -> int | None:
        old = await self.chain.unpin(actor=actor)
        if self.fixed_target is None:
            self.client.track()
        await self.client.refresh()
        self._note_swap()
        return old

    # ------------------------------------------------------------------ status
    @staticmethod
    def info(loaded: Loaded[Pricer], mode: str | None = None) -> ModelInfo:
        return ModelInfo(
            counter=loaded.record.counter,
            version_hash=loaded.record.version_hash,
            mode=mode or _mode_name(loaded.mode),
            since=loaded.since,
        )

    @property
    def current(self) -> ModelInfo | None:
        cur = self.client.current
        return None if cur is None else self.info(cur)

    def status(self) -> dict[str, object]:
        cur = self.current
        return {
            "loaded": None if cur is None else {**cur.as_json(), "since": cur.since.isoformat()},
            "mode": str(self.client.mode),
            "last_error": self.client.last_error,
            "load_failures": self.client.load_failures,
            "pin_error": self.pin_error,
        }

    # ------------------------------------------------------------------ pricing
    async def resolve(self, version: int | None = None) -> tuple[Loaded[Pricer], ModelInfo]:
        """The live model, or exactly `version` (NotFound if absent; Unavailable when its blob
        fails its integrity check; NoModel when nothing is served yet)."""
        if version is not None:
            try:
                loaded = await self.client.load_version(version)
            except NotFound:
                raise NotFound(f"model version {version} does not exist") from None
            except Corrupt:
                # the store's integrity problem, not the client's: 503 with a reason, logged
                log.warning("model version failed its integrity check", version=version)
                raise Unavailable(
                    f"model version {version} failed its integrity check and cannot be served"
                ) from None
            return loaded, self.info(loaded, mode="version")
        cur = self.client.current
        if cur is None:
            raise NoModel(self.client.last_error or self.client.waiting
                          or "no model version has been committed yet")
        return cur, self.info(cur)

    async def price(
        self,
        contracts: Contracts,
        *,
        version: int | None = None,
        greeks: bool = False,
        metrics: bool = False,
        deadline_s: float | None = None,
    ) -> PricedBatch:
        """Price on the live model, or on exactly `version` when given (NotFound if absent).

        `deadline_s`: how long the caller will wait (default: the service's); Overloaded when
        the work in flight is at its bound or the answer cannot come in time."""
        self.check_admission()
        loaded, info = await self.resolve(version)
        # Validate before queueing so one bad request cannot fail a shared batch.
        loaded.value.check_domain(contracts)
        values = await self._submit(
            loaded.value,
            contracts,
            greeks=greeks,
            metrics=metrics,
            deadline_s=self.deadline_s if deadline_s is None else deadline_s,
        )
        return PricedBatch(values=values, model=info)

    # ------------------------------------------------------------------ admission
    @property
    def inflight_rows(self) -> int:
        return self._inflight_rows

    def _work_ahead_s(self, seconds: Callable[[_CostModel, int], float]) -> float:
        """Seconds of the work queued and being priced, each kind's rows by `seconds`, less the
        time the batch being priced has run already."""
        total = 0.0
        for kind, rows in self._queued_rows.items():
            if rows and kind in self._costs:
                total += seconds(self._costs[kind], rows)
        if self._running is not None:
            kind, rows, started = self._running
            if kind in self._costs:
                ran = asyncio.get_running_loop().time() - started
                total += max(0.0, seconds(self._costs[kind], rows) - ran)
        return total

    def _retry_after(self) -> int:
        """Whole seconds until the work in flight is priced at the measured rates (>= 1)."""
        return max(1, math.ceil(self._work_ahead_s(_CostModel.drain_seconds)))

    def _refuse(self, reason: str, detail: str) -> Overloaded:
        if self.on_reject is not None:
            self.on_reject(reason)
        return Overloaded(reason, detail, retry_after_s=self._retry_after())

    def check_admission(self) -> None:
        """Refuse at once (before the body is even parsed) when the bound is already reached."""
        if self._inflight_bytes >= self.max_inflight_bytes:
            raise self._refuse(
                "queue_full",
                f"pricing queue is full: {self._inflight_rows} rows "
                f"({self._inflight_bytes} bytes) in flight, bound {self.max_inflight_bytes} bytes",
            )

    def _admit(self, pricer: Pricer, rows: int, *, greeks: bool, metrics: bool,
               deadline_s: float | None) -> int:
        """The request's cost in bytes once admitted; Overloaded if it may not enter."""
        cost = rows * pricer.row_bytes(greeks=greeks, metrics=metrics)
        if self._inflight_bytes and self._inflight_bytes + cost > self.max_inflight_bytes:
            raise self._refuse(
                "queue_full",
                f"pricing queue is full: {rows} rows ({cost} bytes) would pass the bound of "
                f"{self.max_inflight_bytes} bytes with {self._inflight_bytes} bytes in flight",
            )
        if deadline_s is not None:
            # Refused now, not priced after its client has gone, is only a request that the
            # work ahead of it (at the least time it can take) would already make late; one
            # that may come in time is queued, and shed unpriced if its deadline passes there.
            ahead = self._work_ahead_s(_CostModel.least_seconds)
            if ahead > deadline_s:
                raise self._refuse(
                    "deadline",
                    f"the work ahead ({self._inflight_rows} rows) takes at least "
                    f"{ahead * 1e3:.0f} ms at the fastest pricing rate measured, past the "
                    f"deadline of {deadline_s * 1e3:.0f} ms",
                )
        self._inflight_bytes += cost
        self._inflight_rows += rows
        if self.on_admit is not None:
            self.on_admit(self._inflight_rows)
        return cost

    def _release(self, p: _Pending) -> None:
        self._inflight_bytes -= p.cost
        self._inflight_rows -= p.rows

    def _unqueue(self, q: _Queue, p: _Pending) -> None:
        """`p` leaves the queue (taken, shed or cancelled): its rows are no longer ahead."""
        if p.queued:
            p.queued = False
            self._queued_rows[(q.greeks, q.metrics)] -= p.rows

    # ------------------------------------------------------------------ batching
    async def _submit(
        self,
        pricer: Pricer,
        contracts: Contracts,
        *,
        greeks: bool,
        metrics: bool,
        deadline_s: float | None,
    ) -> dict[str, np.ndarray]:
        """Continuous batching: an idle pricing thread gets the request at once; while a batch
        is in flight requests queue, and the next batch takes every queued request of the
        oldest key (up to `max_batch_rows`) the moment the thread is free."""
        rows = len(contracts)
        cost = self._admit(pricer, rows, greeks=greeks, metrics=metrics, deadline_s=deadline_s)
        loop = asyncio.get_running_loop()
        now = loop.time()
        fut: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        deadline = None if deadline_s is None else now + deadline_s
        pending = _Pending(contracts, rows, fut, cost, now, deadline)
        key = (id(pricer), greeks, metrics)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue(pricer, greeks, metrics)
        q.items.append(pending)
        kind = (greeks, metrics)
        self._queued_rows[kind] = self._queued_rows.get(kind, 0) + rows
        # a caller cancelled while it waits takes its rows out of the work ahead at once
        fut.add_done_callback(lambda _: self._unqueue(q, pending))
        if not self._busy:
            self._dispatch()
        # A caller cancelled while waiting (client gone, request time-out) cancels `fut` with it;
        # the batcher then skips it and frees its place.
        return await fut

    def _next_batch(self) -> tuple[_Queue, list[_Pending]] | None:
        """Take the next batch off the oldest queue; shed cancelled and expired requests."""
        now = asyncio.get_running_loop().time()
        cap = self.max_batch_rows
        while self._queues:
            key, q = next(iter(self._queues.items()))
            items: list[_Pending] = []
            rows = 0
            # whole requests, up to max_batch_rows (a larger request goes alone)
            while q.items and (not items or rows + q.items[0].rows <= cap):
                p = q.items.popleft()
                self._unqueue(q, p)
                if p.future.done():  # cancelled by its caller: nothing to answer
                    self._release(p)
                    continue
                if p.deadline is not None and now > p.deadline:
                    self._release(p)
                    p.future.set_exception(
                        self._refuse(
                            "deadline_expired",
                            f"waited {(now - p.enqueued) * 1e3:.0f} ms in the pricing queue, "
                            "past the request's deadline; it was not priced",
                        )
                    )
                    continue
                items.append(p)
                rows += p.rows
            if not q.items:
                del self._queues[key]
            else:
                self._queues.move_to_end(key)  # the other keys' turn next
            if items:
                return q, items
        return None

    def _dispatch(self) -> None:
        taken = self._next_batch()
        if taken is None:
            self._busy = False
            self._running = None
            return
        self._busy = True
        q, items = taken
        loop = asyncio.get_running_loop()
        now = loop.time()
        kind = (q.greeks, q.metrics)
        batch_rows = sum(p.rows for p in items)
        self._running = (kind, batch_rows, now)
        delays = tuple(now - p.enqueued for p in items)
        if len(items) == 1:
            merged = items[0].contracts
        else:
            merged = Contracts(
                **{
                    name: np.concatenate([getattr(p.contracts, name) for p in items])
                    for name in q.pricer.contract_fields
                }
            )

        def work() -> tuple[dict[str, np.ndarray], float]:
            t0 = time.perf_counter()
            # every request was checked against the domain before it was queued
            out = q.pricer.price(merged, greeks=q.greeks, metrics=q.metrics, checked=True)
            return out, time.perf_counter() - t0

        cf = loop.run_in_executor(self._executor, work)

        def done(f: asyncio.Future[tuple[dict[str, np.ndarray], float]]) -> None:
            exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
            res: dict[str, np.ndarray] | None = None
            if exc is None:
                res, seconds = f.result()
                self._costs.setdefault(kind, _CostModel()).add(batch_rows, seconds)
                if self.on_batch is not None:
                    self.on_batch(BatchStats(len(items), batch_rows, delays))
                log.debug("priced batch", requests=len(items), rows=batch_rows, s=seconds)
            lo = 0
            for p in items:
                n = p.rows
                self._release(p)
                if not p.future.done():
                    if res is None:
                        p.future.set_exception(exc if exc is not None else RuntimeError())
                    elif len(items) == 1:
                        p.future.set_result(res)  # the whole batch is its answer
                    else:
                        p.future.set_result({k: v[lo : lo + n] for k, v in res.items()})
                lo += n
            # the thread is free: the next batch goes at once
            self._dispatch()

        cf.add_done_callback(done)
