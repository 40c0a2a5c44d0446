"""One trainer per chain: the training lease, its fence, and a standby server taking over."""

from __future__ import annotations

import asyncio
import functools
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from bench.soak import SERVER_TOML, ServerProcess
from storage.chain import VersionChain
from storage.lease import LEASE_KEY, LeaseLost, TrainingLease
from storage.localstore import LocalStore
from storage.objectstore import MemoryStore
from tests.server_fixtures import until


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 3, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def test_lease_terms_renewal_takeover_and_fence() -> None:
    clock = Clock()
    chain = VersionChain(MemoryStore(), clock=clock)
    a = TrainingLease(chain, ttl_s=10.0, holder="a")
    b = TrainingLease(chain, ttl_s=10.0, holder="b")
    assert await a.acquire() == 1
    assert await b.acquire() is None  # a's term runs
    assert await a.check() == 1
    clock.advance(6.0)
    assert await a.renew() == 1  # renewed: expires 10 s from now
    clock.advance(6.0)
    assert await b.acquire() is None  # 12 s after the start, but 6 s after the renewal
    with pytest.raises(LeaseLost, match="held by a"):
        await b.check()
    clock.advance(5.0)  # a missed its renewals: expired
    assert await b.acquire() == 2  # a new term
    with pytest.raises(LeaseLost, match="taken over by b"):
        await a.renew()
    with pytest.raises(LeaseLost, match="held by b"):
        await a.check()
    assert a.epoch is None
    assert await a.acquire() is None
    await b.release()  # a clean stop hands over at once
    assert await a.acquire() == 3
    state, _ = await a.read()
    assert state is not None and (state.holder, state.epoch) == ("a", 3)
    assert state.expires_at == clock.now + timedelta(seconds=10)


async def test_two_contenders_one_winner() -> None:
    chain = VersionChain(MemoryStore())
    leases = [TrainingLease(chain, ttl_s=30.0, holder=f"s{i}") for i in range(8)]
    epochs = await asyncio.gather(*(lease.acquire() for lease in leases))
    assert sorted(e for e in epochs if e is not None) == [1]  # exactly one term


def test_lease_document_is_one_small_key() -> None:
    assert LEASE_KEY == "lease/training.json"


# ------------------------------------------------------------------------- two real servers
# two real servers answer slower than an in-process app: poll less often, wait longer
wait_for_servers = functools.partial(until, timeout=90.0, interval=0.2)
LEASE_TOML = SERVER_TOML.replace('device = "cpu"\n', 'device = "cpu"\nlease_ttl_s = 2.0\n', 1)


async def _status(session: aiohttp.ClientSession, server: ServerProcess) -> dict:
    from bench.soak import AUTH

    async with session.get(f"{server.base}/v1/admin/training", headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["training"]


async def test_standby_server_takes_over_after_kill_9_one_lineage(tmp_path: Path) -> None:
    """Two real servers on one store: one trains, the other stands by; kill -9 the trainer;
    the standby takes the lease when it expires and resumes from HEAD. The chain verifies,
    its counters are contiguous, its lease epochs never decrease, and no version is lost."""
    store = tmp_path / "store"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = ServerProcess(tmp_path / "a", commit_every_s=1.0, template=LEASE_TOML, store=store)
    second = ServerProcess(tmp_path / "b", commit_every_s=1.0, template=LEASE_TOML, store=store)
    chain = VersionChain(LocalStore(store))
    try:
        first.start()
        async with aiohttp.ClientSession() as session:
            await first.wait_ready(session, timeout_s=120)
            second.start()
            await second.wait_ready(session, timeout_s=120)  # serves the first one's versions

            async def standing_by() -> bool:
                return (await _status(session, second))["state"] == "standby"

            await wait_for_servers(standing_by, what="the second server to stand by")

            async def committed_twice() -> bool:
                head = await chain.head()
                return head is not None and head.counter >= 2

            await wait_for_servers(committed_twice, what="the first server to commit twice")
            assert (await _status(session, first))["lease"]["epoch"] == 1
            first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            await asyncio.to_thread(first.proc.wait)  # type: ignore[union-attr]
            killed_at = await chain.head()
            assert killed_at is not None

            async def took_over() -> bool:
                t = await _status(session, second)
                return t["state"] == "running" and t["lease"]["epoch"] == 2

            await wait_for_servers(took_over, what="the standby server to take the lease")
            t = await _status(session, second)
            assert t["resumed_from"] is not None and t["resumed_from"] >= killed_at.counter

            async def committed_after() -> bool:
                head = await chain.head()
                return head is not None and head.training_metrics.get("lease_epoch") == 2

            await wait_for_servers(committed_after, what="the new leaseholder to commit")
        assert await second.stop(signum=signal.SIGTERM) == 0
    finally:
        for s in (first, second):
            if s.proc is not None and s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()

    report = await chain.verify()
    assert report.ok, report.summary()
    records = await chain.list()
    assert [r.counter for r in records] == list(range(1, len(records) + 1))
    epochs = [r.training_metrics["lease_epoch"] for r in records]
    assert epochs == sorted(epochs) and set(epochs) == {1, 2}
    # the second server's first commit continues the first one's training, not a fresh run
    handover = next(r for r in records if r.training_metrics["lease_epoch"] == 2)
    before = records[handover.counter - 2]
    assert handover.parent_hash == before.version_hash
    assert handover.training_metrics["step"] > before.training_metrics["step"]


async def test_a_fenced_commit_is_refused_and_records_the_epoch(tmp_path: Path) -> None:
    """The committer checks the lease right before each commit: the holder's commits record
    its epoch; once another server has taken the lease, commits fail and nothing is written."""
    from spectral_core.trainer import Trainer
    from storage.commits import BackgroundCommitter, CommitPlan
    from tests.core_fixtures import tiny_config

    clock = Clock()
    chain = VersionChain(LocalStore(tmp_path / "store"), clock=clock)
    mine = TrainingLease(chain, ttl_s=10.0, holder="mine")
    other = TrainingLease(chain, ttl_s=10.0, holder="other")
    assert await mine.acquire() == 1

    async def fence() -> dict[str, int]:
        return {"lease_epoch": await mine.check()}

    loop = asyncio.get_running_loop()
    committer = BackgroundCommitter(chain, CommitPlan.every_steps(1), loop=loop, fence=fence)
    trainer = Trainer(tiny_config())
    try:
        assert committer.maybe_commit(1, trainer.snapshot, {})
        await asyncio.to_thread(committer.wait_idle, 30)
        head = await chain.head()
        assert head is not None and head.training_metrics["lease_epoch"] == 1
        clock.advance(11.0)
        assert await other.acquire() == 2
        assert committer.maybe_commit(2, trainer.snapshot, {})
        await asyncio.to_thread(committer.wait_idle, 30)
        assert committer.commits_failed == 1 and "LeaseLost" in (committer.last_error or "")
        assert (await chain.head()).counter == 1  # nothing written past the fence
    finally:
        await asyncio.to_thread(committer.close)
        trainer.close()
