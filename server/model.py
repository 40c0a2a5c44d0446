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
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import structlog

from spectral_core.pricer import Contracts, Pricer
from spectral_core.snapshot import Snapshot
from storage.chain import PIN_REF, VersionChain, VersionRecord
from storage.inference import InferenceClient, Loaded, Pinned, Tracking
from storage.objectstore import Corrupt, NotFound, Unavailable
from storage.tasks import cancel_and_wait

log = structlog.get_logger(__name__)


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


def load_pricer(snapshot: Snapshot, record: VersionRecord) -> Pricer:
    """InferenceClient loader: a fresh, reproducible (float64, batch-invariant) CPU pricer,
    warmed up (numba kernels compiled or loaded) before it can be swapped in: a cold cache
    would otherwise make the first request on it wait ~30 s."""
    pricer = Pricer.from_snapshot(snapshot, device="cpu", reproducible=True)
    pricer.warm_up()
    return pricer


class Overloaded(Exception):
    """Admission refused (HTTP 503 with Retry-After): the pricing work in flight is at its bound,
    or the request's deadline cannot be (or was not) met. `reason` names which."""

    def __init__(self, reason: str, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class _Pending:
    contracts: Contracts
    future: asyncio.Future[dict[str, np.ndarray]]
    cost: int  # bytes held against max_inflight_bytes until answered
    seconds: float  # its estimated pricing time, held against the drain-time estimate
    enqueued: float  # loop time
    deadline: float | None  # loop time past which the answer is no use to the client


@dataclass
class _Queue:
    pricer: Pricer
    greeks: bool
    metrics: bool
    items: deque[_Pending] = field(default_factory=deque)


class _CostModel:
    """Pricing time of a batch, seconds = a + b * rows, fitted by least squares over the recent
    batches (exponential forgetting): `b` prices a request's rows, `a` is the per-batch cost."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self._s = [0.0] * 5  # weight, sum x, sum y, sum xx, sum xy

    def add(self, rows: int, seconds: float) -> None:
        d, (w, sx, sy, sxx, sxy) = self.decay, self._s
        x = float(rows)
        self._s = [d * w + 1, d * sx + x, d * sy + seconds, d * sxx + x * x, d * sxy + x * seconds]

    def coefficients(self) -> tuple[float, float]:
        w, sx, sy, sxx, sxy = self._s
        if w == 0.0:
            return 0.0, 0.0
        var = w * sxx - sx * sx
        if var <= 1e-9 * max(1.0, w * sxx):
            # one batch size so far: fixed and per-row cost cannot be told apart, and taking
            # it all as per-row would refuse large requests on a few slow single-row passes
            return 0.0, 0.0
        b = max(0.0, (w * sxy - sx * sy) / var)
        a = max(0.0, (sy - b * sx) / w)
        return a, b


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
        bring a shorter or longer one); work whose deadline has passed is shed unpriced.

        Callbacks: `on_batch(stats)` per priced batch, `on_admit(rows_in_flight)` per admitted
        request, `on_reject(reason)` per refusal, `on_load_failure(kind)` per failed model poll
        ("corrupt", "Unavailable", ...)."""
        self.chain = chain
        # A replica told by its settings to serve a fixed version or ref ignores the shared pin.
        self.fixed_target = fixed_target
        self.client: InferenceClient[Pricer] = InferenceClient(
            chain,
            loader=load_pricer,
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
        # Pricing time per (greeks, metrics), fitted on the batches priced, and the estimated
        # seconds of the work in flight: the drain time behind Retry-After and the deadline
        # admission. No estimate (0 s) for a kind not priced yet.
        self._costs: dict[tuple[bool, bool], _CostModel] = {}
        self._inflight_s = 0.0
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
            info = self.info(loaded, mode="version")
        else:
            cur = self.client.current
            if cur is None:
                raise NoModel(self.client.last_error or "no model version has been committed yet")
            loaded, info = cur, self.info(cur)
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

    def _retry_after(self) -> int:
        """Whole seconds until the work in flight is priced at the measured rates (>= 1)."""
        return max(1, math.ceil(self._inflight_s))

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
               deadline_s: float | None) -> tuple[int, float]:
        """The request's cost (bytes, estimated seconds) once admitted; Overloaded if it may
        not enter."""
        cost = rows * pricer.row_bytes(greeks=greeks, metrics=metrics)
        if self._inflight_bytes and self._inflight_bytes + cost > self.max_inflight_bytes:
            raise self._refuse(
                "queue_full",
                f"pricing queue is full: {rows} rows ({cost} bytes) would pass the bound of "
                f"{self.max_inflight_bytes} bytes with {self._inflight_bytes} bytes in flight",
            )
        cost_model = self._costs.get((greeks, metrics))
        a, b = cost_model.coefficients() if cost_model is not None else (0.0, 0.0)
        seconds = b * rows
        # Work ahead plus its own (and one batch's fixed cost): a request that could not be
        # answered in time is refused now, not priced after its client has gone; alone it is
        # always tried.
        wait = self._inflight_s + seconds + a
        if deadline_s is not None and self._inflight_s > 0.0 and wait > deadline_s:
            raise self._refuse(
                "deadline",
                f"the answer would take about {wait * 1e3:.0f} ms at the measured pricing rate "
                f"({self._inflight_rows} rows ahead), past the deadline of "
                f"{deadline_s * 1e3:.0f} ms",
            )
        self._inflight_bytes += cost
        self._inflight_rows += rows
        self._inflight_s += seconds
        if self.on_admit is not None:
            self.on_admit(self._inflight_rows)
        return cost, seconds

    def _release(self, p: _Pending) -> None:
        self._inflight_bytes -= p.cost
        self._inflight_rows -= len(p.contracts)
        self._inflight_s = max(0.0, self._inflight_s - p.seconds)

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
        cost, seconds = self._admit(
            pricer, len(contracts), greeks=greeks, metrics=metrics, deadline_s=deadline_s
        )
        loop = asyncio.get_running_loop()
        now = loop.time()
        fut: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        deadline = None if deadline_s is None else now + deadline_s
        pending = _Pending(contracts, fut, cost, seconds, now, deadline)
        key = (id(pricer), greeks, metrics)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue(pricer, greeks, metrics)
        q.items.append(pending)
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
            while q.items and (not items or rows + len(q.items[0].contracts) <= cap):
                p = q.items.popleft()
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
                rows += len(p.contracts)
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
            return
        self._busy = True
        q, items = taken
        loop = asyncio.get_running_loop()
        now = loop.time()
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
            out = q.pricer.price(merged, greeks=q.greeks, metrics=q.metrics)
            return out, time.perf_counter() - t0

        cf = loop.run_in_executor(self._executor, work)

        def done(f: asyncio.Future[tuple[dict[str, np.ndarray], float]]) -> None:
            exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
            res: dict[str, np.ndarray] | None = None
            if exc is None:
                res, seconds = f.result()
                self._costs.setdefault((q.greeks, q.metrics), _CostModel()).add(
                    len(merged), seconds
                )
                if self.on_batch is not None:
                    self.on_batch(BatchStats(len(items), len(merged), delays))
                log.debug("priced batch", requests=len(items), rows=len(merged), s=seconds)
            lo = 0
            for p in items:
                n = len(p.contracts)
                self._release(p)
                if not p.future.done():
                    if res is None:
                        p.future.set_exception(exc if exc is not None else RuntimeError())
                    else:
                        p.future.set_result({k: v[lo : lo + n] for k, v in res.items()})
                lo += n
            # the thread is free: the next batch goes at once
            self._dispatch()

        cf.add_done_callback(done)
