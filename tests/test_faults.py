"""Fault injection and crash recovery with real server processes and a real S3-protocol server.

Each test runs one scenario of `bench.faults` (which starts `spectralmc serve` subprocesses on a
tiny model against moto, often through `bench.faultproxy`). The cheapest run by default: kill -9
mid-commit with a bit-exact resume, and two servers on one store. A corrupted blob at HEAD (with
and without a training server resuming past it), storage down, slow/hung, flaky and kill -9
mid-training are `slow`; the product fixes they led to are also checked in-process, fast. The
proxy itself is tested directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bench import faults
from bench.faultproxy import FaultProxy
from config.settings import CommitPlan, Settings, TrainingSettings
from server.metrics import Metrics
from server.worker import TrainingWorker, committable_snapshot, training_config
from spectral_core.snapshot import Snapshot
from spectral_core.trainer import Trainer
from storage.chain import VersionChain, VersionRecord, blob_key
from storage.inference import InferenceClient
from storage.objectstore import Conflict, MemoryStore, NotFound, StoredObject, Unavailable
from storage.s3store import S3Store
from tests.core_fixtures import tiny_config
from tests.storage_fixtures import (
    CREDS,
    REGION,
    MotoServer,
    make_snapshot,
    moto_server,
    new_bucket,
)

__all__ = ["moto_server"]  # the session fixture, re-exported for pytest


def check(
    scenario: Callable[[faults.Lab], faults.ScenarioResult], moto: MotoServer, tmp_path: Path
) -> faults.ScenarioResult:
    res = faults.run_scenario(scenario, moto.endpoint, tmp_path)
    assert res.passed, f"{res.name}: {res.error}\n{res.details}"
    assert res.versions_lost == 0 and res.training_crashes == 0, res
    return res


def test_kill9_mid_commit_resumes_bit_exactly(moto_server: MotoServer, tmp_path: Path) -> None:
    res = check(faults.kill9_mid_commit_exact_resume, moto_server, tmp_path)
    replay = res.details["replay"]
    # The server was killed after its version record landed, before the HEAD hint moved.
    assert res.details["head_hint"] < res.details["landed"]
    assert replay["target"] == replay["base"] + 1 and replay["tensors"] > 0


@pytest.mark.slow  # the client's refusal itself is covered in-process below and in test_inference
def test_corrupted_blob_at_head_is_refused(moto_server: MotoServer, tmp_path: Path) -> None:
    res = check(faults.corrupted_blob_at_head, moto_server, tmp_path)
    assert res.details["load_failures"] >= 1


def test_two_servers_one_linear_chain(moto_server: MotoServer, tmp_path: Path) -> None:
    res = check(faults.two_servers_one_chain, moto_server, tmp_path)
    assert res.details["versions"] == sum(res.details["commits_ok"])


@pytest.mark.slow
def test_training_resumes_past_a_corrupted_head(moto_server: MotoServer, tmp_path: Path) -> None:
    res = check(faults.corrupted_blob_at_head_trainer_resumes, moto_server, tmp_path)
    assert res.details["trainer_resumed_from"] == 1


@pytest.mark.slow
def test_kill9_mid_training(moto_server: MotoServer, tmp_path: Path) -> None:
    check(faults.kill9_mid_training, moto_server, tmp_path)


@pytest.mark.slow
def test_storage_down_then_back(moto_server: MotoServer, tmp_path: Path) -> None:
    res = check(faults.storage_down, moto_server, tmp_path)
    assert res.details["commit_errors_counted"] >= 2


@pytest.mark.slow
def test_storage_slow_and_hung(moto_server: MotoServer, tmp_path: Path) -> None:
    check(faults.storage_slow, moto_server, tmp_path)


@pytest.mark.slow
def test_storage_flaky(moto_server: MotoServer, tmp_path: Path) -> None:
    check(faults.storage_flaky, moto_server, tmp_path)


# -- the proxy on its own -------------------------------------------------------------------------


def _store(proxy: FaultProxy, bucket: str) -> S3Store:
    return S3Store(
        bucket=bucket,
        prefix="p",
        endpoint_url=proxy.endpoint,
        region_name=REGION,
        aws_access_key_id=CREDS["aws_access_key_id"],
        aws_secret_access_key=CREDS["aws_secret_access_key"],
    )


def test_fault_proxy_kinds(moto_server: MotoServer) -> None:
    """Each fault kind reaches the client as Unavailable; only `drop_after` lands upstream, and
    a truncated body never does. Down refuses, a hold stops one request where asked."""
    bucket = new_bucket(moto_server)

    async def go(proxy: FaultProxy) -> None:
        store = _store(proxy, bucket)
        try:
            await store.put_if_absent("a", b"x" * 1000)
            assert (await store.get("a")).data == b"x" * 1000
            with pytest.raises(Conflict):
                await store.put_if_absent("a", b"y")
            proxy.fail_fraction = 1.0
            for kind in ("error_503", "drop_before", "drop_after", "truncate"):
                proxy.fail_kinds = (kind,)
                with pytest.raises(Unavailable):
                    await store.put_if_absent(f"k/{kind}", b"z" * 50_000)
            proxy.fail_fraction = 0.0
            assert await store.list("k/") == ["k/drop_after"]
            assert (await store.get("k/drop_after")).data == b"z" * 50_000
            with pytest.raises(NotFound):
                await store.get("k/truncate")
            proxy.set_down(True)
            with pytest.raises(Unavailable):
                await store.get("a")
            proxy.set_down(False)
            assert (await store.get("a")).data == b"x" * 1000
            hold = proxy.hold("PUT", r"/p/held$", after=True)
            task = asyncio.create_task(store.put_if_absent("held", b"1"))
            while not hold.arrived.is_set():
                await asyncio.sleep(0.01)
            assert not task.done() and hold.matched == f"PUT /{bucket}/p/held"
            hold.release()
            await task
        finally:
            await store.aclose()

    with FaultProxy(moto_server.endpoint) as proxy:
        asyncio.run(go(proxy))
        for kind in ("error_503", "drop_before", "drop_after", "truncate"):
            assert proxy.stats[kind] >= 1


def test_scenario_failure_is_reported_not_raised(moto_server: MotoServer, tmp_path: Path) -> None:
    def broken(lab: faults.Lab) -> faults.ScenarioResult:
        faults.expect(False, "expected failure")
        raise AssertionError("unreachable")

    res = faults.run_scenario(broken, moto_server.endpoint, tmp_path)
    assert not res.passed and res.error == "ScenarioFailed: expected failure"
    assert faults.parse_metrics('a_total{result="ok"} 3.0\n# HELP x\nb 1.5\n') == {
        'a_total{result="ok"}': 3.0,
        "b": 1.5,
    }


# -- the product fixes these scenarios led to, checked in-process ---------------------------------


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.gets: list[str] = []

    async def get(self, key: str) -> StoredObject:
        self.gets.append(key)
        return await super().get(key)


async def _rot(store: MemoryStore, record: VersionRecord) -> None:
    key = blob_key(record.blob_sha256)
    blob = await store.get(key)
    flipped = bytearray(blob.data)
    flipped[len(flipped) // 2] ^= 0x01
    await store.put_if_match(key, bytes(flipped), blob.etag)


async def test_worker_resumes_from_the_newest_loadable_version() -> None:
    """HEAD's blob rotted: training resumes from the version below instead of stopping."""
    settings = Settings(
        training=TrainingSettings(
            enabled=True, device="cpu", commit=CommitPlan(kind="every_steps", every_steps=5)
        ),
        core=tiny_config(),
    )
    store = MemoryStore()
    chain = VersionChain(store)
    with Trainer(training_config(settings)) as trainer:
        trainer.train(steps=5)
        await chain.commit(committable_snapshot(trainer), metrics={"step": 5})
        trainer.train(steps=5)
        head = await chain.commit(committable_snapshot(trainer), metrics={"step": 10})
    await _rot(store, head)
    worker = TrainingWorker(settings, chain, Metrics(CollectorRegistry()).for_model("bs"))
    await worker.start()
    try:
        assert worker.state != "error", worker.error
        assert worker.resumed_from == 1
        for _ in range(600):  # the first commit of the resumed run lands on top of version 2
            if worker.status()["commits_ok"] >= 1:
                break
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    assert worker.state == "stopped", worker.error
    status = worker.status()
    assert status["commits_failed"] == 0, status["last_commit_error"]
    third = await chain.get(3)
    assert third.parent_hash == head.version_hash
    # Resumed from version 1 (step 5), the run re-created version 2's exact bytes at step 10:
    # the commit repaired the rotted blob, so the whole chain verifies again.
    assert third.training_metrics["step"] == 10 and third.blob_sha256 == head.blob_sha256
    report = await chain.verify()
    assert report.ok, report.summary()
    assert [e.action for e in await chain.log()] == ["blob.repair"]


class DownStore(MemoryStore):
    down = True

    async def get(self, key: str) -> StoredObject:
        if self.down:
            raise Unavailable("injected outage")
        return await super().get(key)


async def test_worker_waits_for_the_store_at_start() -> None:
    """Store down at start-up: training neither fails for good nor starts from scratch; it
    waits (reporting why), then resumes from HEAD once the store answers."""
    settings = Settings(training=TrainingSettings(device="cpu"), core=tiny_config())
    store = DownStore()
    store.down = False
    chain = VersionChain(store)
    with Trainer(training_config(settings)) as trainer:
        trainer.train(steps=3)
        await chain.commit(committable_snapshot(trainer))
    store.down = True
    worker = TrainingWorker(settings, chain, Metrics(CollectorRegistry()).for_model("bs"))
    await worker.start()
    try:
        assert worker.state == "starting" and "waiting for the store" in (worker.error or "")
        await asyncio.sleep(0.7)
        assert worker.state == "starting" and worker.resumed_from is None
        store.down = False
        for _ in range(400):
            if worker.state == "running":
                break
            await asyncio.sleep(0.05)
        assert worker.state == "running" and worker.error is None
        assert worker.resumed_from == 1
    finally:
        await worker.stop()


async def test_worker_refuses_when_no_version_loads() -> None:
    settings = Settings(training=TrainingSettings(device="cpu"), core=tiny_config())
    store = MemoryStore()
    chain = VersionChain(store)
    with Trainer(training_config(settings)) as trainer:
        trainer.train(steps=2)
        only = await chain.commit(committable_snapshot(trainer))
    await _rot(store, only)
    worker = TrainingWorker(settings, chain, Metrics(CollectorRegistry()).for_model("bs"))
    await worker.start()
    assert worker.state == "error" and "no loadable version" in (worker.error or "")
    await worker.stop()


async def test_a_rejected_version_is_not_downloaded_again() -> None:
    """A corrupt blob never heals: later polls refuse it without fetching it, at the normal
    poll interval (no backoff), and the next good version is picked up."""
    store = CountingStore()
    chain = VersionChain(store)
    snaps = train_snapshots_for_client()
    await chain.commit(snaps[0])
    bad = await chain.commit(snaps[1])
    await _rot(store, bad)
    store.gets.clear()
    failures: list[str] = []
    client: InferenceClient[int] = InferenceClient(
        VersionChain(store),
        loader=lambda snap, rec: rec.counter,
        poll_interval=0.01,
        on_failure=failures.append,
    )
    await client.start()
    assert client.current is None  # nothing good at HEAD yet, nothing loaded
    while client.load_failures < 5:
        await asyncio.sleep(0.01)
    assert store.gets.count(blob_key(bad.blob_sha256)) == 1
    assert client.consecutive_failures == 0 and "sha256" in (client.last_error or "")
    assert failures[:5] == ["corrupt"] * 5
    await chain.commit(snaps[2])
    while client.current is None:
        await asyncio.sleep(0.01)
    assert client.current.record.counter == 3
    await client.aclose()


def train_snapshots_for_client() -> list[Snapshot]:
    return [make_snapshot(seed) for seed in (1, 2, 3)]
