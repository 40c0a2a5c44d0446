"""BackgroundCommitter: commits off the training thread, newest-pending-wins, failures counted,
S3 outage in the middle of a run."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from spectral_core.snapshot import Snapshot
from storage.chain import VersionChain
from storage.commits import BackgroundCommitter, CommitPlan
from storage.localstore import LocalStore
from storage.objectstore import ObjectStore
from storage.retry import RetryPolicy
from storage.s3store import S3Store
from tests.storage_fixtures import (
    CREDS,
    DelegatingStore,
    MotoServer,
    free_port,
    make_snapshot,
    new_bucket,
    s3_store,
)

FAST = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05)


class GatedStore(DelegatingStore):
    """A real LocalStore whose version writes wait for a gate: a commit that is 'still running'."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.entered = threading.Event()

    async def _enter(self, op: str, key: str) -> None:
        if op == "put_if_absent" and key.startswith("versions/"):
            self.entered.set()
            await asyncio.to_thread(self.gate.wait, 10)


def test_plan_validation() -> None:
    assert CommitPlan.every_steps(10).every == 10
    assert CommitPlan.every_seconds(0.5).kind == "every_seconds"
    for kwargs, field in (
        ({"kind": "sometimes"}, "kind"),
        ({"kind": "every_steps", "every": 0}, "every"),
        ({"kind": "every_steps", "every": 2.5}, "every"),
        ({"kind": "every_seconds", "every": -1.0}, "every"),
        ({"message": "step {step"}, "message"),
    ):
        with pytest.raises(ValueError, match=field):
            CommitPlan(**kwargs)  # type: ignore[arg-type]


def test_every_steps_and_final(tmp_path: Path) -> None:
    chain = VersionChain(LocalStore(tmp_path))
    committer = BackgroundCommitter(
        chain, CommitPlan.every_steps(10, message="s{step} l{loss:.2f}")
    )
    handed = 0
    for step in range(1, 46):
        handed += committer.maybe_commit(
            step, lambda s=step: make_snapshot(s, step=s), {"loss": 1 / step}
        )
    assert handed == 4  # steps 10, 20, 30, 40
    assert committer.wait_idle(30)
    rec = committer.final(make_snapshot(999, step=45), metrics={"step": 45, "loss": 0.01})
    committer.close(30)
    assert rec is not None and rec.message.startswith("final: step 45")
    assert committer.commits_ok + committer.superseded == handed + 1
    records = asyncio.run(chain.list())
    steps = [r.training_metrics["step"] for r in records]
    assert steps == sorted(steps) and steps[-1] == 45
    assert any(r.message == "s10 l0.10" for r in records) or committer.superseded > 0
    assert asyncio.run(chain.verify()).ok
    assert committer.stats()["last_counter"] == rec.counter


def test_quality_metrics_are_stored_apart_from_training_metrics(tmp_path: Path) -> None:
    chain = VersionChain(LocalStore(tmp_path))
    committer = BackgroundCommitter(chain, CommitPlan.every_steps(5, message="s{step} {val_loss}"))
    quality = {"val_loss": 0.25, "val_max_abs_bp": 12.5}
    assert committer.maybe_commit(5, lambda: make_snapshot(5, step=5), {"loss": 1.0}, quality)
    assert committer.wait_idle(30)
    # An interval commit without quality stores an empty quality group, not the previous one.
    assert committer.maybe_commit(10, lambda: make_snapshot(10, step=10), {"loss": 0.5})
    assert committer.wait_idle(30)
    final = committer.final(
        make_snapshot(11, step=11),
        metrics={"step": 11, "loss": 0.4},
        quality={"val_loss": 0.2, "val_max_abs_bp": None},
    )
    committer.close(30)
    assert final is not None
    first, second, last = asyncio.run(chain.list())
    assert first.training_metrics == {"step": 5, "loss": 1.0}
    assert first.quality_metrics == quality
    # The message template is filled from training metrics only.
    assert first.message == "s5 n/a"
    assert second.quality_metrics == {}
    assert last.training_metrics == {"step": 11, "loss": 0.4}
    assert last.quality_metrics == {"val_loss": 0.2, "val_max_abs_bp": None}
    assert asyncio.run(chain.verify()).ok


def test_newest_pending_snapshot_wins(tmp_path: Path) -> None:
    store = GatedStore(LocalStore(tmp_path))
    chain = VersionChain(store)
    committer = BackgroundCommitter(chain, CommitPlan.every_steps(1))
    assert committer.maybe_commit(1, lambda: make_snapshot(1, step=1), {"loss": 1.0})
    assert store.entered.wait(10)  # commit of step 1 is now in flight, blocked
    t0 = time.monotonic()
    for step in range(2, 6):
        committer.maybe_commit(step, lambda s=step: make_snapshot(s, step=s), {"loss": 1.0})
    assert time.monotonic() - t0 < 5.0  # never waited for the blocked commit
    assert committer.superseded == 3  # steps 2, 3, 4 replaced by newer ones
    store.gate.set()
    committer.close(30)
    steps = [r.training_metrics["step"] for r in asyncio.run(chain.list())]
    assert steps == [1, 5]  # the next commit carried the newest state
    assert committer.commits_ok == 2 and committer.commits_failed == 0


def test_failures_are_counted_never_raised(tmp_path: Path) -> None:
    missing = S3Store(
        bucket="no-such-bucket-x",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        connect_timeout_s=0.2,
        read_timeout_s=0.2,
        **CREDS,
    )
    committer = BackgroundCommitter(
        VersionChain(missing, retry=FAST), CommitPlan.every_steps(1), close_store=True
    )

    def broken() -> Snapshot:
        raise RuntimeError("trainer bug")

    assert not committer.maybe_commit(1, broken, {})
    assert committer.snapshot_failures == 1 and "trainer bug" in (committer.last_error or "")
    assert committer.maybe_commit(2, lambda: make_snapshot(2), {})
    assert committer.wait_idle(30)
    assert committer.commits_failed == 1 and "Unavailable" in (committer.last_error or "")
    assert committer.final(make_snapshot(3)) is None
    committer.close(30)
    assert committer.commits_failed == 2 and committer.commits_ok == 0
    none = BackgroundCommitter(VersionChain(LocalStore(tmp_path)), CommitPlan.none())
    assert not none.maybe_commit(10**6, lambda: make_snapshot(1), {})
    assert none.final(make_snapshot(1)) is None
    none.close(5)
    assert list(tmp_path.glob("versions/*")) == []


async def test_commits_run_on_a_given_loop(tmp_path: Path) -> None:
    """The server's case: the chain lives on the app loop; training runs in its own thread."""
    chain = VersionChain(LocalStore(tmp_path))
    committer = BackgroundCommitter(
        chain, CommitPlan.every_steps(5), loop=asyncio.get_running_loop()
    )

    def train() -> None:
        for step in range(1, 21):
            if committer.maybe_commit(
                step, lambda s=step: make_snapshot(s, step=s), {"loss": 0.5}
            ):
                # Wait for it, so no commit is superseded by a newer one (that depends on timing).
                assert committer.wait_idle(30)
        committer.final(make_snapshot(21, step=21), metrics={"step": 21})
        committer.close(30)

    await asyncio.to_thread(train)
    records = await chain.list()
    assert [r.training_metrics["step"] for r in records] == [5, 10, 15, 20, 21]
    assert committer.commits_ok == 5 and committer.superseded == 0
    assert (await chain.verify()).ok


def test_s3_outage_during_interval_commits() -> None:
    """moto's S3 server stops listening mid-run and comes back on the same port.

    moto keeps its buckets in the process, not in the server thread, so a restart behaves like a
    real endpoint outage: the data survives, the network does not. The chain written before the
    outage must continue, unforked, after it.
    """
    server = MotoServer(free_port())
    server.start()
    bucket = new_bucket(server)
    chain = VersionChain(s3_store(server, bucket), retry=FAST)
    committer = BackgroundCommitter(chain, CommitPlan.every_seconds(0.05), close_store=True)
    step = 0
    stopped = threading.Event()

    def produce_until(cond: object, timeout: float = 30.0) -> int:
        nonlocal step
        start_step = step
        deadline = time.monotonic() + timeout
        while not cond():  # type: ignore[operator]
            assert time.monotonic() < deadline, committer.stats()
            step += 1
            committer.maybe_commit(
                step, lambda s=step: make_snapshot(s, size=2, step=s), {"loss": 1 / step}
            )
            time.sleep(0.005)
        return step - start_step

    try:
        produce_until(lambda: committer.commits_ok >= 3)
        ok_before = committer.commits_ok
        server.stop()
        stopped.set()
        steps_down = produce_until(lambda: committer.commits_failed >= 3)
        assert steps_down >= 10  # training kept going while every commit failed
        assert committer.commits_ok <= ok_before + 1  # at most one was already past the store
        assert "Unavailable" in (committer.last_error or "")
        server.start()
        stopped.clear()
        ok_at_restart = committer.commits_ok
        produce_until(lambda: committer.commits_ok >= ok_at_restart + 3)
        final = committer.final(
            make_snapshot(10**6, size=2, step=step + 1), metrics={"step": step + 1}
        )
        assert final is not None
    finally:
        committer.close(30)
        if stopped.is_set():
            server.start()
    reader = s3_store(server, bucket)

    async def check() -> None:
        rchain = VersionChain(reader)
        records = await rchain.list()
        report = await rchain.verify()
        assert report.ok, report.summary()
        assert [r.counter for r in records] == list(range(1, len(records) + 1))
        assert len(records) == committer.commits_ok
        assert records[-1].version_hash == final.version_hash
        await reader.aclose()

    asyncio.run(check())
    server.stop()
