"""ModelService: concurrent requests share one forward pass; results equal one-by-one pricing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.model import ModelService, NoModel
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


async def test_concurrent_requests_are_micro_batched() -> None:
    store = MemoryStore()
    await commit_model(store)
    batches: list[tuple[int, int]] = []
    service = ModelService(
        VersionChain(store),
        poll_interval=10.0,
        batch_wait_s=0.05,
        on_batch=lambda requests, rows: batches.append((requests, rows)),
    )
    await service.start()
    try:
        books = [contracts(n, seed) for n, seed in ((3, 1), (5, 2), (2, 3))]
        together = await asyncio.gather(*(service.price(b) for b in books))
        assert batches == [(3, 10)]  # one pass for all three requests
        for book, got in zip(books, together, strict=True):
            alone = await service.price(book)
            assert got.model == alone.model and got.model.mode == "tracking"
            for key, value in alone.values.items():
                assert value.tobytes() == got.values[key].tobytes(), key
        assert len(batches) == 4
    finally:
        await service.aclose()


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
    line = 'spectralmc_model_load_failures_total{kind="corrupt"}'
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
