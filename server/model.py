"""Model serving: the live pricer from the version chain, and micro-batched inference.

The `InferenceClient` keeps a loaded `Pricer` for the wanted version: the chain's serving pin
(`refs/pin`, set through the admin API so every replica on the store agrees) when it is set,
otherwise the chain's HEAD, or a ref named in settings (`model.mode = pinned`). Pricing runs in
one worker thread, off the event loop; concurrent requests that want the same model and outputs
wait at most `batch_wait_s` and are priced in one pass. Prices are computed in float64 with a
batch-invariant forward pass, so the same request gives the same bytes however it was batched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import structlog

from spectral_core.pricer import CONTRACT_FIELDS, Contracts, Pricer
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


@dataclass
class _Pending:
    contracts: Contracts
    future: asyncio.Future[dict[str, np.ndarray]]


@dataclass
class _Queue:
    pricer: Pricer
    greeks: bool
    metrics: bool
    items: list[_Pending] = field(default_factory=list)
    rows: int = 0


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
        batch_wait_s: float = 0.002,
        max_batch_rows: int = 4096,
        on_swap: Callable[[ModelInfo], None] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        on_load_failure: Callable[[str], None] | None = None,
    ) -> None:
        """`on_load_failure(kind)`: each failed model poll ("corrupt", "Unavailable", ...)."""
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
        )
        self.poll_interval = poll_interval
        self.batch_wait_s = batch_wait_s
        self.max_batch_rows = max_batch_rows
        self.on_swap = on_swap
        self.on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pricing")
        self._queues: dict[tuple[int, bool, bool], _Queue] = {}
        self._flushers: set[asyncio.Task[None]] = set()
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
        for t in list(self._flushers):
            t.cancel()
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
    ) -> PricedBatch:
        """Price on the live model, or on exactly `version` when given (NotFound if absent)."""
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
        values = await self._submit(loaded.value, contracts, greeks=greeks, metrics=metrics)
        return PricedBatch(values=values, model=info)

    async def _submit(
        self, pricer: Pricer, contracts: Contracts, *, greeks: bool, metrics: bool
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        key = (id(pricer), greeks, metrics)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue(pricer, greeks, metrics)
            task = asyncio.create_task(self._flush_later(key))
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        fut: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        q.items.append(_Pending(contracts, fut))
        q.rows += len(contracts)
        if q.rows >= self.max_batch_rows:
            self._queues.pop(key, None)
            self._run(q)
        return await fut

    async def _flush_later(self, key: tuple[int, bool, bool]) -> None:
        await asyncio.sleep(self.batch_wait_s)
        q = self._queues.pop(key, None)
        if q is not None:
            self._run(q)

    def _run(self, q: _Queue) -> None:
        loop = asyncio.get_running_loop()
        items = q.items
        cols = {
            name: np.concatenate([getattr(p.contracts, name) for p in items])
            for name in CONTRACT_FIELDS
        }
        merged = Contracts(**cols)

        def work() -> dict[str, np.ndarray]:
            t0 = time.perf_counter()
            out = q.pricer.price(merged, greeks=q.greeks, metrics=q.metrics)
            if self.on_batch is not None:
                self.on_batch(len(items), len(merged))
            log.debug(
                "priced batch", requests=len(items), rows=len(merged), s=time.perf_counter() - t0
            )
            return out

        cf = loop.run_in_executor(self._executor, work)

        def done(f: asyncio.Future[dict[str, np.ndarray]]) -> None:
            exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
            lo = 0
            for p in items:
                n = len(p.contracts)
                if p.future.done():
                    lo += n
                    continue
                if exc is not None:
                    p.future.set_exception(exc)
                else:
                    res = f.result()
                    p.future.set_result({k: v[lo : lo + n] for k, v in res.items()})
                lo += n

        cf.add_done_callback(done)
