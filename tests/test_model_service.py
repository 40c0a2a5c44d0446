"""ModelService: concurrent requests share one forward pass; results equal one-by-one pricing."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from server.model import BatchStats, ModelService, NoModel, Overloaded
from spectral_core.pricer import Contracts, DomainError
from storage.chain import VersionChain
from storage.objectstore import MemoryStore, NotFound
from tests.server_fixtures import commit_model
from tests.storage_fixtures import rot_blob


def contracts(n: int, seed: int) -> Contracts:
    rng = np.random.default_rng(seed)
    return Contracts(
        X0=np.full(n, 100.0),
        K=rng.uniform(80, 120, n),
        T=rng.uniform(0.1, 3.0, n),
        r=np.full(n, 0.02),
        d=np.full(n, 0.01),
        v=rng.uniform(0.1, 0.6, n),
    )


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[ModelService]:
    """A started ModelService over a MemoryStore holding one trained version; closed after."""
    store = MemoryStore()
    await commit_model(store)
    service = ModelService(VersionChain(store), poll_interval=10.0, **options)
    await service.start()
    try:
        yield service
    finally:
        await service.aclose()


def hold_pricing_thread(service: ModelService) -> threading.Event:
    """Occupy the service's one pricing thread until the returned event is set, so that a test
    controls when the queue drains (the real executor, not a stand-in)."""
    release = threading.Event()
    service._executor.submit(release.wait, 30.0)
    service._busy = True  # what a batch in flight looks like to the batcher
    return release


async def drain(service: ModelService, release: threading.Event) -> None:
    """Free the pricing thread and hand it the queue, as a finishing batch does."""
    release.set()
    await asyncio.sleep(0.05)
    service._dispatch()


async def test_continuous_batching_dispatches_at_once_and_batches_under_load() -> None:
    batches: list[BatchStats] = []
    async with serving(on_batch=batches.append) as service:
        books = [contracts(n, seed) for n, seed in ((3, 1), (5, 2), (2, 3))]
        together = await asyncio.gather(*(service.price(b) for b in books))
        # the first finds the thread idle and goes alone; the two queued behind it share a pass
        assert [(b.requests, b.rows) for b in batches] == [(1, 3), (2, 7)]
        assert all(d >= 0.0 for b in batches for d in b.queue_delays_s)
        for book, got in zip(books, together, strict=True):
            alone = await service.price(book)
            assert got.model == alone.model and got.model.mode == "tracking"
            for key, value in alone.values.items():
                assert value.tobytes() == got.values[key].tobytes(), key
        assert len(batches) == 5
        assert service.inflight_rows == 0 and service._inflight_bytes == 0


async def test_admission_refuses_past_the_byte_bound_with_retry_after() -> None:
    rejected: list[str] = []
    async with serving(on_reject=rejected.append) as service:
        pricer = service.client.current.value  # type: ignore[union-attr]
        row = pricer.row_bytes()
        service.max_inflight_bytes = 10 * row  # ten rows
        release = hold_pricing_thread(service)
        first = asyncio.ensure_future(service.price(contracts(6, 1)))
        second = asyncio.ensure_future(service.price(contracts(4, 2)))  # exactly at the bound
        await asyncio.sleep(0)
        assert service.inflight_rows == 10
        with pytest.raises(Overloaded, match="queue is full") as refused:
            await service.price(contracts(1, 3))
        assert refused.value.reason == "queue_full" and refused.value.retry_after_s >= 1
        with pytest.raises(Overloaded):  # already full: refused before any parsing
            service.check_admission()
        await drain(service, release)
        a, b = await asyncio.gather(first, second)
        assert a.values["put"].shape == (6,) and b.values["put"].shape == (4,)
        assert rejected == ["queue_full", "queue_full"]
        assert service.inflight_rows == 0 and service._inflight_bytes == 0
        # a lone request larger than the bound is still priced (it cannot starve anyone)
        assert (await service.price(contracts(25, 4))).values["put"].shape == (25,)


async def test_work_past_its_deadline_is_shed_unpriced() -> None:
    batches: list[BatchStats] = []
    async with serving(on_batch=batches.append) as service:
        release = hold_pricing_thread(service)
        late = asyncio.ensure_future(service.price(contracts(3, 1), deadline_s=0.01))
        patient = asyncio.ensure_future(service.price(contracts(2, 2), deadline_s=30.0))
        gone = asyncio.ensure_future(service.price(contracts(4, 3)))
        await asyncio.sleep(0.02)  # past the first one's deadline
        gone.cancel()  # its client went away
        await drain(service, release)
        with pytest.raises(Overloaded, match="past the request's deadline") as shed:
            await late
        assert shed.value.reason == "deadline_expired"
        assert (await patient).values["put"].shape == (2,)
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert [(b.requests, b.rows) for b in batches] == [(1, 2)]  # only the patient one
        assert service.inflight_rows == 0 and service._inflight_bytes == 0


async def test_deadline_admission_uses_the_measured_pricing_time() -> None:
    async with serving() as service:
        for n in (1, 64, 256):  # measured batch times bound what the work ahead can take
            await service.price(contracts(n, n))
        release = hold_pricing_thread(service)
        ahead = asyncio.ensure_future(service.price(contracts(2000, 5)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="past the deadline") as refused:
            # admitted, it would wait on the held thread: time out rather than hang
            await asyncio.wait_for(service.price(contracts(10, 6), deadline_s=1e-6), 10.0)
        assert refused.value.reason == "deadline"
        await drain(service, release)
        assert (await ahead).values["put"].shape == (2000,)


def slow_batches_of(service: ModelService, rows: int, seconds: float) -> None:
    """Make the live pricer's batches of exactly `rows` rows take `seconds` longer, as a batch
    does when the event loop, the trainer or a GC pause holds the CPU; it still prices them."""
    pricer = service.client.current.value  # type: ignore[union-attr]
    price = pricer.price

    def slowed(c: Contracts, **options: Any) -> dict[str, np.ndarray]:
        if len(c) == rows:
            time.sleep(seconds)
        return price(c, **options)

    pricer.price = slowed  # type: ignore[method-assign]


async def test_large_requests_are_not_refused_on_a_slope_fitted_to_small_batches() -> None:
    """Four concurrent 1,000-row requests (default deadline 5 s) after a few small batches, one
    of them slowed: a fit of seconds = a + b * rows made that noise a per-row cost of 20 ms,
    estimated each request at 20 s and refused three of the four, which are priced in
    milliseconds. Refused on estimate is only work that cannot come in time behind what is
    already queued."""
    rejected: list[str] = []
    async with serving(deadline_s=5.0, on_reject=rejected.append) as service:
        slow_batches_of(service, rows=2, seconds=0.02)
        for n in (1, 2, 1, 2):
            await service.price(contracts(n, n))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        books = [contracts(1000, seed) for seed in range(4)]
        answers = await asyncio.gather(*(service.price(b) for b in books), return_exceptions=True)
        assert rejected == [] and not any(isinstance(a, BaseException) for a in answers), answers
        assert loop.time() - t0 < 5.0
        assert service.inflight_rows == 0 and service._inflight_bytes == 0


async def test_deadline_refusal_weighs_the_work_ahead_at_its_least_time() -> None:
    async with serving() as service:
        slow_batches_of(service, rows=500, seconds=0.3)
        await service.price(contracts(500, 1))  # 500 rows measured at >= 0.3 s
        release = hold_pricing_thread(service)
        ahead = asyncio.ensure_future(service.price(contracts(500, 2)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="takes at least") as refused:
            await asyncio.wait_for(service.price(contracts(10, 3), deadline_s=0.1), 10.0)
        assert refused.value.reason == "deadline" and refused.value.retry_after_s >= 1
        # 0.3 s ahead and 0.5 s to wait: it may come in time, so it is queued, not refused
        patient = asyncio.ensure_future(service.price(contracts(500, 4), deadline_s=0.5))
        await asyncio.sleep(0)
        assert not patient.done()
        await drain(service, release)
        assert (await ahead).values["put"].shape == (await patient).values["put"].shape
        assert service._queued_rows == {(False, False): 0} and service._running is None


async def test_each_request_is_checked_against_the_domain_once() -> None:
    """Checked before it is queued (so a bad request fails alone), not again in the batch."""
    async with serving() as service:
        pricer = service.client.current.value  # type: ignore[union-attr]
        check, calls = pricer.check_domain, []

        def counted(c: Contracts) -> None:
            calls.append(len(c))
            check(c)

        pricer.check_domain = counted  # type: ignore[method-assign]
        await asyncio.gather(service.price(contracts(3, 1)), service.price(contracts(5, 2)))
        assert sorted(calls) == [3, 5]
        bad = contracts(2, 3)
        bad.T[1] = 50.0
        with pytest.raises(DomainError, match=r"contracts\[1\]\.T = 50\.0") as refused:
            await service.price(bad)
        assert (refused.value.lower, refused.value.upper) == (0.02, 5.0)


async def test_bad_requests_fail_alone_and_errors_name_the_cause() -> None:
    store = MemoryStore()
    service = ModelService(VersionChain(store), poll_interval=10.0)
    await service.start()
    try:
        with pytest.raises(NoModel):
            await service.price(contracts(2, 0))
        await commit_model(store)
        await service.client.refresh()
        bad = contracts(2, 0)
        bad.v[1] = 5.0
        good, refused = await asyncio.gather(
            service.price(contracts(2, 1)), service.price(bad), return_exceptions=True
        )
        assert isinstance(refused, DomainError) and refused.field == "v" and refused.index == 1
        assert not isinstance(good, BaseException) and good.values["put"].shape == (2,)
        with pytest.raises(NotFound, match="model version 9 does not exist"):
            await service.price(contracts(1, 0), version=9)
    finally:
        await service.aclose()


async def test_a_refused_version_is_counted_in_metrics(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    from tests.server_fixtures import make_settings, start_client

    store = MemoryStore()
    await commit_model(store)
    rec2 = await commit_model(store, which=1)
    await rot_blob(store, rec2.blob_sha256)
    client = await start_client(
        aiohttp_client, store=store, settings=make_settings(poll_interval_s=0.05), wait_ready=False
    )
    line = 'spectralmc_model_load_failures_total{kind="corrupt",model="bs"}'
    for _ in range(200):
        text = await (await client.get("/metrics")).text()
        counted = [ln for ln in text.splitlines() if ln.startswith(line)]
        if counted and float(counted[0].split()[-1]) >= 1:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"no corrupt load counted:\n{text}")


async def test_pricing_on_a_corrupt_explicit_version_is_unavailable() -> None:
    from storage.objectstore import Unavailable

    store = MemoryStore()
    await commit_model(store)
    rec2 = await commit_model(store, which=1)
    await rot_blob(store, rec2.blob_sha256)
    service = ModelService(VersionChain(store), poll_interval=60.0, fixed_target=1)
    await service.start()
    try:
        cols = {"X0": 100.0, "K": 100.0, "T": 1.0, "r": 0.02, "d": 0.0, "v": 0.2}
        c = Contracts.from_columns(cols)
        assert (await service.price(c, version=1)).model.counter == 1
        with pytest.raises(Unavailable, match="version 2 failed its integrity check"):
            await service.price(c, version=2)
    finally:
        await service.aclose()


async def test_the_serial_gate_runs_one_at_a_time_and_refuses_past_its_waiting_bound() -> None:
    import threading

    from server.model import Overloaded, SerialGate

    gate = SerialGate("samplings", max_waiting=1)
    release = threading.Event()
    first = asyncio.create_task(gate.run(lambda: release.wait(10) and "done"))
    await asyncio.sleep(0.05)  # the first holds the gate, waiting on its thread
    with pytest.raises(Overloaded, match="1 samplings are waiting") as info:
        await gate.run(lambda: "never")
    assert info.value.reason == "queue_full" and info.value.retry_after_s == 1
    release.set()
    assert await first == "done"
    assert await gate.run(lambda: 7) == 7  # free again
