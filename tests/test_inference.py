"""InferenceClient: pinned and tracking modes, hot swap under a stream of commits, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from spectral_core.snapshot import Snapshot
from storage.chain import VersionChain, VersionRecord
from storage.inference import InferenceClient, Pinned, Tracking
from storage.objectstore import MemoryStore, ObjectStore, Unavailable
from storage.retry import RetryPolicy
from tests.storage_fixtures import DelegatingStore, make_snapshot, rot_blob

FAST = RetryPolicy(attempts=2, base_delay_s=0.0, max_delay_s=0.0)


@dataclass
class Model:
    """A 'model' whose parts must agree: a reader seeing mixed versions would catch it."""

    counter: int
    weight: torch.Tensor
    check: float


def build_model(snapshot: Snapshot, record: VersionRecord) -> Model:
    time.sleep(0.005)  # loaders are CPU-heavy; this one runs in a worker thread
    w = snapshot.tensors["w"].clone()
    return Model(counter=record.counter, weight=w, check=float(w.sum()))


def snap(k: int) -> Snapshot:
    return Snapshot(tensors={"w": torch.full((64,), float(k), dtype=torch.float64)}, meta={"k": k})


class SwitchableStore(DelegatingStore):
    """A real MemoryStore behind a switch that makes every call fail like a store outage."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.down = False

    async def _enter(self, op: str, key: str) -> None:
        if self.down:
            raise Unavailable("store is down")


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_tracking_under_a_stream_of_commits() -> None:
    store = MemoryStore()
    writer = VersionChain(store)
    await writer.commit(snap(1))
    poll = 0.02
    client: InferenceClient[Model] = InferenceClient(
        VersionChain(store), loader=build_model, mode=Tracking(), poll_interval=poll
    )
    await client.start()
    assert client.current is not None and client.current.record.counter == 1
    bad_reads = 0
    reads = 0
    stop = asyncio.Event()

    async def reader() -> None:
        nonlocal bad_reads, reads
        while not stop.is_set():
            cur = client.current
            assert cur is not None
            m = cur.value
            reads += 1
            # complete and self-consistent: weights, checksum and record all from one version
            if not (
                m.counter == cur.record.counter
                and bool(torch.all(m.weight == float(m.counter)))
                and m.check == 64.0 * m.counter
            ):
                bad_reads += 1
            await asyncio.sleep(0)

    readers = [asyncio.create_task(reader()) for _ in range(4)]
    lags = []
    for k in range(2, 12):
        rec = await writer.commit(snap(k))
        t0 = time.monotonic()
        await wait_for(lambda rec=rec: client.current.record.counter == rec.counter)  # type: ignore[union-attr]
        lags.append(time.monotonic() - t0)
    stop.set()
    await asyncio.gather(*readers)
    await client.aclose()
    assert bad_reads == 0 and reads > 100
    # The swap lands within one poll interval plus the load itself (generous on a shared CPU).
    assert sorted(lags)[len(lags) // 2] < poll + 0.25
    assert client.loads_ok == 11 and client.load_failures == 0
    assert client.current.mode == "tracking"  # type: ignore[union-attr]


async def test_pinned_by_counter_and_ref_and_switching() -> None:
    store = MemoryStore()
    chain = VersionChain(store)
    for k in range(1, 5):
        await chain.commit(snap(k))
    await chain.set_ref("production", 2, actor="ops")
    client: InferenceClient[Model] = InferenceClient(
        VersionChain(store), loader=build_model, mode=Pinned("production"), poll_interval=0.02
    )
    await client.start()
    assert client.current.value.counter == 2 and client.current.mode == "pinned:production"  # type: ignore[union-attr]
    await chain.set_ref("production", 3, actor="ops")  # the ref moves: the client follows
    await wait_for(lambda: client.current.record.counter == 3)  # type: ignore[union-attr]
    client.set_pin(1)
    await wait_for(lambda: client.current.record.counter == 1)  # type: ignore[union-attr]
    await chain.commit(snap(5))
    await asyncio.sleep(0.1)
    assert client.current.record.counter == 1  # type: ignore[union-attr]  # pinned ignores new versions
    client.track()
    await wait_for(lambda: client.current.record.counter == 5)  # type: ignore[union-attr]
    await client.aclose()
    with pytest.raises(ValueError, match="ref name"):
        Pinned("../x")
    with pytest.raises(ValueError, match=">= 1"):
        Pinned(0)


async def test_failures_keep_the_last_good_version_and_recover() -> None:
    inner = MemoryStore()
    store = SwitchableStore(inner)
    chain = VersionChain(store, retry=FAST)
    await chain.commit(snap(1))
    client: InferenceClient[Model] = InferenceClient(
        VersionChain(store, retry=FAST), loader=build_model, poll_interval=0.01, max_backoff=0.05
    )
    await client.start()
    assert client.current.record.counter == 1  # type: ignore[union-attr]
    # A corrupt newest blob: refused, version 1 keeps serving, the error is reported.
    rec2 = await chain.commit(snap(2))
    await rot_blob(inner, rec2.blob_sha256)
    await wait_for(lambda: client.load_failures >= 2)
    assert client.current.record.counter == 1 and "Corrupt" in (client.last_error or "")  # type: ignore[union-attr]
    # Store outage: still serving, failures counted, no give-up.
    store.down = True
    before = client.load_failures
    await wait_for(lambda: client.load_failures >= before + 3)
    assert client.current.record.counter == 1  # type: ignore[union-attr]
    assert "Unavailable" in (client.last_error or "")
    store.down = False
    await chain.commit(snap(3))  # a good newer version: picked up after the outage
    await wait_for(lambda: client.current.record.counter == 3)  # type: ignore[union-attr]
    assert client.consecutive_failures == 0
    await client.aclose()


async def test_client_starts_empty_then_loads_first_version() -> None:
    store = MemoryStore()
    client: InferenceClient[Model] = InferenceClient(
        VersionChain(store), loader=build_model, poll_interval=0.01
    )
    await client.start()
    assert client.current is None and client.last_error is None
    await VersionChain(store).commit(snap(7))
    await wait_for(lambda: client.current is not None)
    await client.aclose()
    await client.aclose()  # idempotent


async def test_load_version_and_lru_cache() -> None:
    store = MemoryStore()
    chain = VersionChain(store)
    for k in range(1, 6):
        await chain.commit(snap(k))
    loads: list[int] = []

    def counting(snapshot: Snapshot, record: VersionRecord) -> Model:
        loads.append(record.counter)
        return build_model(snapshot, record)

    client: InferenceClient[Model] = InferenceClient(
        chain, loader=counting, poll_interval=1.0, cache_size=2
    )
    a = await client.load_version(2)
    assert a.value.counter == 2 and a.mode == "version:2"
    assert await client.load_version(2) is a
    await client.load_version(3)
    await client.load_version(4)  # evicts 2
    await client.load_version(2)
    assert loads == [2, 3, 4, 2]


async def test_aclose_cancels_the_poll_loop() -> None:
    """The loop does not swallow CancelledError: aclose returns and the task ends cancelled."""
    client: InferenceClient[Model] = InferenceClient(
        VersionChain(MemoryStore()), loader=build_model, poll_interval=0.01
    )
    await client.start()
    task = client._task
    assert task is not None and not task.done()
    await asyncio.wait_for(client.aclose(), timeout=2.0)
    assert task.cancelled()


def test_bad_settings_are_refused() -> None:
    chain = VersionChain(MemoryStore())
    with pytest.raises(ValueError, match="poll_interval"):
        InferenceClient(chain, loader=build_model, poll_interval=0)
    with pytest.raises(ValueError, match="cache_size"):
        InferenceClient(chain, loader=build_model, cache_size=-1)
    assert make_snapshot(1).tensors  # the shared fixture builds
