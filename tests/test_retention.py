"""Retention: the thinning-ladder plan (pure), its execution through the GC executor, job-result
pruning, store sizes on every backend, a simulated month, and the server's retention task."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from config.settings import RetentionSettings, SettingsError, load_settings
from server.metrics import Metrics
from server.retention import RETENTION_KEY, RetentionService
from storage.chain import VersionChain, VersionRecord, blob_key, tombstone_key
from storage.checkpoint import sha256_hex
from storage.localstore import LocalStore
from storage.marketdata import datetime_token
from storage.objectstore import MemoryStore, ObjectStore, StoredObject, Unavailable
from storage.retention import (
    CHAIN_PREFIXES,
    JobLimits,
    RetentionPolicy,
    Rung,
    apply_retention,
    parse_created_at,
    plan_job_pruning,
    plan_retention,
    prefix_bytes,
    prune_job_results,
)
from storage.retry import NO_RETRY, RetryingStore, RetryPolicy
from tests.server_fixtures import commit_model, make_settings, start_client
from tests.storage_fixtures import MotoServer, any_store, make_snapshot, moto_server

__all__ = ["any_store", "moto_server"]

T0 = datetime(2026, 3, 1, tzinfo=UTC)
HOUR, DAY = 3600.0, 86_400.0
HOURLY_DAILY = (Rung(HOUR, DAY), Rung(DAY, 30 * DAY))


def rec(counter: int, at: datetime | str, *, blob: str | None = None, size: int = 100) -> Any:
    """A record for the pure planner (only counter, created_at, blob and size matter to it)."""
    sha = blob if blob is not None else sha256_hex(str(counter).encode())
    return VersionRecord.build(
        counter=counter,
        parent_hash=None,
        blob_sha256=sha,
        blob_size=size,
        created_at=at if isinstance(at, str) else at.isoformat(),
        message="",
        training_metrics={},
        quality_metrics={},
        config_fingerprint=None,
    )


def every(minutes: float, n: int, start: datetime = T0) -> list[VersionRecord]:
    return [rec(i + 1, start + timedelta(minutes=minutes * i)) for i in range(n)]


class SimClock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# -- the pure plan ----------------------------------------------------------------------------


def test_keep_last_only_keeps_last_n_refs_and_protected() -> None:
    records = every(10, 10)
    policy = RetentionPolicy(keep_last=3, ladder=())
    plan = plan_retention(records, {"prod": 2}, T0 + timedelta(days=1), policy, protect=[5])
    assert sorted(plan.kept) == [2, 5, 8, 9, 10]
    assert plan.kept[2] == ("ref:prod",) and plan.kept[5] == ("protected",)
    assert plan.kept[10] == ("last",)
    assert plan.collect == [1, 3, 4, 6, 7]
    assert len(plan.delete_blobs) == 5


def test_hourly_rung_keeps_the_oldest_of_each_hour() -> None:
    records = every(10, 18)  # 3 hours, six per hour: 1..6, 7..12, 13..18
    now = T0 + timedelta(hours=3)
    plan = plan_retention(records, {}, now, RetentionPolicy(keep_last=1, ladder=(HOURLY_DAILY[0],)))
    assert sorted(plan.kept) == [1, 7, 13, 18]
    assert plan.kept[7] == ("rung:3600/86400",)
    assert plan.kept[18] == ("last",)


def test_horizon_drops_versions_beyond_it_and_buckets_are_epoch_aligned() -> None:
    # Half past the hour: the first bucket holds 3 versions, a later commit never displaces 1.
    start = T0 + timedelta(minutes=30)
    records = every(10, 12, start)  # 00:30 .. 02:20
    rung = Rung(HOUR, 1.5 * HOUR)
    now = start + timedelta(hours=2)  # 02:30: horizon reaches back to 01:00
    plan = plan_retention(records, {}, now, RetentionPolicy(keep_last=1, ladder=(rung,)))
    # 00:30..00:50 (1-3) are older than the horizon and 01:00 (4) is exactly horizon_s old (in
    # a rung means age < horizon_s): 01:10 (5) stands for its hour, 02:00 (10) for the next
    assert sorted(plan.kept) == [5, 10, 12]
    later = plan_retention(records, {}, now - timedelta(seconds=1), RetentionPolicy(1, (rung,)))
    assert sorted(later.kept) == [4, 10, 12]


def test_hourly_then_daily_ladder_over_three_days() -> None:
    records = every(60, 72)  # one an hour for three days: version 1 at day 0 00:00
    now = T0 + timedelta(days=3)
    plan = plan_retention(records, {}, now, RetentionPolicy(keep_last=2, ladder=HOURLY_DAILY))
    hourly = {c for c, why in plan.kept.items() if "rung:3600/86400" in why}
    daily = {c for c, why in plan.kept.items() if "rung:86400/2.592e+06" in why}
    assert hourly == set(range(50, 73))  # younger than a day (49 is exactly a day old)
    assert daily == {1, 25, 49}  # the first of each day
    assert sorted(plan.kept) == sorted(hourly | daily)
    assert len(plan.kept) <= RetentionPolicy(keep_last=2, ladder=HOURLY_DAILY).max_versions()


def test_plan_is_deterministic_and_order_independent() -> None:
    records = every(7, 300)
    refs = {"a": 17, "b": 200}
    now = T0 + timedelta(hours=40)
    policy = RetentionPolicy(keep_last=4, ladder=(Rung(1800, 6 * HOUR), Rung(HOUR, DAY)))
    plan = plan_retention(records, refs, now, policy)
    shuffled = list(records)
    random.Random(3).shuffle(shuffled)
    assert plan_retention(shuffled, dict(reversed(refs.items())), now, policy) == plan
    assert set(plan.kept) >= {17, 200, 297, 298, 299, 300}
    assert set(plan.kept).isdisjoint(plan.collect)
    assert sorted([*plan.kept, *plan.collect]) == list(range(1, 301))


def test_representatives_are_stable_as_time_passes() -> None:
    """Simulate plan -> collect -> later plan: a version a rung keeps stays kept while it is
    inside that rung's horizon, and nothing collected is ever wanted again."""
    policy = RetentionPolicy(keep_last=3, ladder=HOURLY_DAILY)
    all_records = every(15, 4 * 24 * 5)  # five days, one per 15 minutes
    live: set[int] = set()
    collected: set[int] = set()
    kept_by: dict[int, set[Rung]] = {}
    labels = {r.label: r for r in policy.ladder}
    for step in range(len(all_records)):
        now = T0 + timedelta(minutes=15 * step)
        live.add(step + 1)
        plan = plan_retention(all_records[: step + 1], {}, now, policy, live=live)
        assert set(plan.kept).isdisjoint(collected)
        for c, why in plan.kept.items():
            kept_by.setdefault(c, set()).update(labels[w] for w in why if w in labels)
        for c, rungs in kept_by.items():
            born = parse_created_at(all_records[c - 1].created_at)
            assert born is not None
            age = (now - born).total_seconds()
            if any(age < r.horizon_s for r in rungs):
                assert c in plan.kept, (c, rungs, age)
        live -= set(plan.collect)
        collected |= set(plan.collect)
        assert len(live) <= policy.max_versions()
    assert len(live) < 60 and len(collected) > 400


def test_representative_among_live_versions_only() -> None:
    records = every(10, 6)  # one hour bucket: 1..6
    now = T0 + timedelta(hours=2)
    policy = RetentionPolicy(keep_last=1, ladder=(Rung(HOUR, DAY),))
    # version 1 was collected earlier (e.g. by `gc --keep`): the bucket keeps its oldest live one
    plan = plan_retention(records, {}, now, policy, live=[2, 3, 4, 5, 6])
    assert sorted(plan.kept) == [2, 6]
    assert plan.collect == [3, 4, 5]


def test_future_and_unparsable_timestamps() -> None:
    now = T0
    records = [
        rec(1, T0 + timedelta(minutes=5)),  # a replica's clock ahead: age 0, hour bucket 00:00
        rec(2, T0 + timedelta(minutes=6)),
        rec(3, "not a time"),
        rec(4, "2026-03-01T00:07:00"),  # naive: read as UTC
        rec(5, T0 + timedelta(minutes=8)),
    ]
    plan = plan_retention(records, {}, now, RetentionPolicy(keep_last=1, ladder=(Rung(HOUR, DAY),)))
    assert plan.kept[3] == ("unparsable_created_at",)
    assert sorted(plan.kept) == [1, 3, 5]
    assert plan.collect == [2, 4]


def test_shared_blobs_are_not_deleted_while_a_kept_version_names_them() -> None:
    same = "ab" * 32
    records = [rec(1, T0, blob=same), rec(2, T0 + timedelta(minutes=1)), rec(3, T0, blob=same)]
    plan = plan_retention(records, {}, T0 + timedelta(days=90), RetentionPolicy(keep_last=1))
    assert sorted(plan.kept) == [3]
    assert plan.collect == [2]  # 1 shares its blob with kept 3
    assert plan.delete_blobs == [records[1].blob_sha256]


def test_byte_budget_drops_oldest_ladder_versions_first() -> None:
    records = every(60, 48)  # 48 hours, 100 bytes each
    now = T0 + timedelta(hours=48)
    ladder = (Rung(HOUR, DAY), Rung(DAY, 30 * DAY))
    free = plan_retention(records, {"t": 2}, now, RetentionPolicy(keep_last=2, ladder=ladder))
    assert free.kept_blob_bytes == 100 * len(free.kept) and not free.budget_dropped
    policy = RetentionPolicy(keep_last=2, ladder=ladder, max_blob_bytes=1000)
    plan = plan_retention(records, {"t": 2}, now, policy)
    assert plan.kept_blob_bytes <= 1000 and not plan.over_budget
    assert {2, 47, 48} <= set(plan.kept)  # the ref and the last N stay
    dropped = plan.budget_dropped
    assert dropped and max(dropped) < min(c for c in plan.kept if c not in (2,))  # oldest first
    tiny = plan_retention(records, {"t": 2}, now, RetentionPolicy(keep_last=5, max_blob_bytes=100))
    assert tiny.over_budget and set(tiny.kept) == {2, 44, 45, 46, 47, 48}


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="bucket_s"):
        Rung(7200, 3600)
    with pytest.raises(ValueError, match="horizon_s"):
        Rung(1, 0)
    with pytest.raises(ValueError, match="finite"):
        Rung(1, float("inf"))
    with pytest.raises(ValueError, match="keep_last"):
        RetentionPolicy(keep_last=0)
    with pytest.raises(ValueError, match="max_blob_bytes"):
        RetentionPolicy(max_blob_bytes=0)
    with pytest.raises(ValueError, match="aware"):
        plan_retention([], {}, datetime(2026, 1, 1), RetentionPolicy())
    p = RetentionPolicy.from_pairs(3, [(60, 3600), (3600, 86400)])
    assert p.ladder == (Rung(60.0, 3600.0), Rung(3600.0, 86400.0))
    assert p.max_versions(protected=2) == 3 + 61 + 25 + 2


def test_retention_settings() -> None:
    s = load_settings(env={}).retention
    assert s == RetentionSettings()
    assert s.enabled and s.interval_s == 600.0 and s.keep_last == 10
    assert s.ladder == ((3600.0, 86400.0), (86400.0, 2592000.0))
    env = {
        "SPECTRALMC_RETENTION__LADDER": "[[60, 3600]]",
        "SPECTRALMC_RETENTION__JOB_LIMITS": '{"book": {"max_count": 3}}',
    }
    s = load_settings(env=env).retention
    assert s.ladder == ((60.0, 3600.0),) and s.job_limits["book"].max_count == 3
    with pytest.raises(SettingsError, match=r"ladder\[0\]"):
        load_settings(env={"SPECTRALMC_RETENTION__LADDER": "[[7200, 3600]]"})
    with pytest.raises(SettingsError, match="interval_s"):
        load_settings(env={"SPECTRALMC_RETENTION__INTERVAL_S": "0"})


# -- job results ------------------------------------------------------------------------------


def job_key(name: str, at: datetime) -> str:
    return f"jobs/{name}/{datetime_token(at)}.json"


def test_plan_job_pruning_by_age_count_and_override() -> None:
    now = T0 + timedelta(days=10)
    keys = [job_key("a", T0 + timedelta(days=d)) for d in range(10)]
    keys += [job_key("b", T0 + timedelta(days=d)) for d in range(10)]
    keys += ["jobs/a/not-a-token.json", "jobs/stray.json", "other/a/x.json"]
    plan = plan_job_pruning(keys, now, JobLimits(max_age_s=3.5 * DAY))
    assert plan.kept == {"a": 3, "b": 3} and plan.deleted == {"a": 7, "b": 7}
    assert job_key("a", T0 + timedelta(days=6)) in plan.delete
    assert job_key("a", T0 + timedelta(days=7)) not in plan.delete
    assert "jobs/a/not-a-token.json" not in plan.delete
    plan = plan_job_pruning(
        keys, now, JobLimits(max_age_s=3.5 * DAY), per_job={"b": JobLimits(max_count=2)}
    )
    assert plan.kept == {"a": 3, "b": 2}
    assert job_key("b", T0 + timedelta(days=8)) not in plan.delete
    assert job_key("b", T0 + timedelta(days=7)) in plan.delete
    both = plan_job_pruning(keys, now, JobLimits(max_age_s=5.5 * DAY, max_count=2))
    assert both.kept == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="max_count"):
        JobLimits(max_count=0)


async def test_prune_job_results_deletes_from_the_store() -> None:
    store = MemoryStore()
    for d in range(5):
        await store.put_if_absent(job_key("a", T0 + timedelta(days=d)), b"{}")
    await store.put_if_absent("versions/0000000001.json", b"{}")
    now = T0 + timedelta(days=5)
    preview = await prune_job_results(store, now=now, limits=JobLimits(max_count=2), execute=False)
    assert len(preview.delete) == 3 and not preview.executed
    assert len(await store.list("jobs/")) == 5
    done = await prune_job_results(store, now=now, limits=JobLimits(max_count=2))
    assert done.executed and await store.list("jobs/") == sorted(
        job_key("a", T0 + timedelta(days=d)) for d in (3, 4)
    )
    assert await store.list("versions/")  # nothing else is touched
    nothing = await prune_job_results(store, now=now, limits=JobLimits())
    assert nothing.delete == []


# -- store sizes --------------------------------------------------------------------------------


class PlainStore(MemoryStore):
    """A backend without its own list_sizes: the ObjectStore fallback (a get per key)."""

    list_sizes = ObjectStore.list_sizes


async def test_list_sizes_on_every_backend(any_store: ObjectStore) -> None:
    await any_store.put_if_absent("objects/aa", b"x" * 10)
    await any_store.put_if_absent("objects/bb", b"")
    await any_store.put_if_absent("versions/0000000001.json", b"y" * 7)
    await any_store.put_if_absent("HEAD", b"z" * 3)
    await any_store.put_if_absent("jobs/a/1.json", b"j" * 100)
    assert await any_store.list_sizes("objects/") == {"objects/aa": 10, "objects/bb": 0}
    assert await any_store.list_sizes("nothing/") == {}
    assert await prefix_bytes(any_store) == 20
    assert await prefix_bytes(RetryingStore(any_store, policy=NO_RETRY)) == 20
    assert sum((await any_store.list_sizes()).values()) == 120


async def test_list_sizes_fallback_and_retry() -> None:
    plain = PlainStore()
    await plain.put_if_absent("objects/a", b"abc")
    assert await plain.list_sizes("objects/") == {"objects/a": 3}

    class Flaky(MemoryStore):
        calls = 0

        async def list_sizes(self, prefix: str = "") -> dict[str, int]:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise Unavailable("blip")
            return await super().list_sizes(prefix)

    flaky = Flaky()
    await flaky.put_if_absent("objects/a", b"abcd")
    retrying = RetryingStore(flaky, policy=RetryPolicy(attempts=2, base_delay_s=0.0))
    assert await retrying.list_sizes("objects/") == {"objects/a": 4}


# -- through the version chain ------------------------------------------------------------------


async def commit_at(chain: VersionChain, clock: SimClock, i: int) -> VersionRecord:
    return await chain.commit(
        make_snapshot(i, size=2, step=i), message="v{step}", metrics={"step": i}
    )


async def test_apply_retention_preview_execute_audit_verify() -> None:
    store = MemoryStore()
    clock = SimClock()
    chain = VersionChain(store, clock=clock)
    for i in range(30):  # 30 versions, one every 20 minutes: 10 hours
        await commit_at(chain, clock, i)
        clock.advance(1200)
    await chain.set_ref("production", 4, actor="ops")
    await chain.pin(5, actor="ops")
    policy = RetentionPolicy(keep_last=3, ladder=(Rung(2 * HOUR, DAY),))
    preview = await apply_retention(chain, policy, protect=[6])
    assert not preview.executed and preview.policy == "ladder"
    assert len(await store.list("objects/")) == 30
    # buckets of two hours (epoch aligned): versions 1, 7, 13, 19, 25 are the first of each
    assert preview.kept == [1, 4, 5, 6, 7, 13, 19, 25, 28, 29, 30]
    assert preview.reasons[4] == ("ref:production",) and preview.reasons[5] == ("ref:pin",)
    assert preview.reasons[6] == ("protected",)
    plan = await apply_retention(chain, policy, execute=True, actor="retention", protect=[6])
    assert plan.executed and plan.collect == preview.collect and len(plan.collect) == 19
    assert len(await store.list("objects/")) == 11
    report = await chain.verify()
    assert report.ok, report.summary()
    assert report.collected == plan.collect
    entry = (await chain.log())[-1]
    assert entry.action == "gc" and entry.actor == "retention"
    assert entry.detail["policy"] == "ladder" and entry.detail["collected"] == plan.collect
    assert entry.detail["ladder"] == [[7200.0, 86400.0]] and entry.detail["keep"] == 3
    # idempotent, and the keep-N GC still works on top of it
    assert (await apply_retention(chain, policy, execute=True, protect=[6])).collect == []
    keep_n = await chain.gc(keep=2, execute=True)
    assert keep_n.collect == [1, 6, 7, 13, 19, 25, 28] and keep_n.policy == "keep_last"
    assert (await chain.log())[-1].detail == {"keep": 2, "collected": keep_n.collect, "blobs": 7}
    assert (await chain.verify()).ok


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.gets: list[str] = []
        self.fail_delete: set[str] = set()

    async def get(self, key: str) -> StoredObject:
        self.gets.append(key)
        return await super().get(key)

    async def delete(self, key: str) -> None:
        if key in self.fail_delete:
            self.fail_delete.discard(key)
            raise Unavailable(f"cannot delete {key} now")
        await super().delete(key)


async def test_gc_reads_only_live_versions_and_finishes_an_interrupted_run() -> None:
    store = CountingStore()
    clock = SimClock()
    chain = VersionChain(store, clock=clock, retry=NO_RETRY)
    for i in range(40):
        await commit_at(chain, clock, i)
    await chain.gc(keep=5, execute=True)
    # An orphan blob (a commit that wrote its blob and then failed) is never deleted and does
    # not make later runs read the whole history again.
    await store.put_if_absent(blob_key("ee" * 32), b"orphan")
    store.gets.clear()
    await chain.gc(keep=5, execute=True)
    first = [k for k in store.gets if k.startswith("versions/")]
    assert len(first) == 40  # the orphan forces one full scan
    store.gets.clear()
    await chain.gc(keep=5, execute=True)
    reads = [k for k in store.gets if k.startswith("versions/")]
    assert len(reads) == 5, reads  # only the live ones
    assert (await store.get(blob_key("ee" * 32))).data == b"orphan"
    # A GC interrupted after its tombstones: the next run deletes the blob it left behind.
    for i in range(40, 43):
        await commit_at(chain, clock, i)
    doomed = (await chain.get(36)).blob_sha256
    store.fail_delete.add(blob_key(doomed))
    with pytest.raises(Unavailable):
        await chain.gc(keep=5, execute=True)
    assert (await store.get(tombstone_key(36))).data  # the tombstone is there, the blob too
    assert blob_key(doomed) in await store.list("objects/")
    plan = await apply_retention(chain, RetentionPolicy(keep_last=5, ladder=()), execute=True)
    assert 36 in plan.collect
    assert blob_key(doomed) not in await store.list("objects/")
    report = await chain.verify()
    assert report.ok and report.collected == list(range(1, 39))


async def test_retention_on_s3(moto_server: MotoServer) -> None:
    from tests.storage_fixtures import new_bucket, s3_store

    store = s3_store(moto_server, new_bucket(moto_server))
    clock = SimClock()
    chain = VersionChain(store, clock=clock)
    try:
        for i in range(8):
            await commit_at(chain, clock, i)
            clock.advance(HOUR / 2)
        await chain.set_ref("keepme", 2, actor="ops")
        policy = RetentionPolicy(keep_last=1, ladder=(Rung(2 * HOUR, DAY),))
        plan = await apply_retention(chain, policy, execute=True)
        assert plan.kept == [1, 2, 5, 8]
        assert (await chain.verify()).ok
        sizes = await store.list_sizes("objects/")
        assert len(sizes) == 4 and all(v > 0 for v in sizes.values())
        assert await prefix_bytes(store) == sum((await store.list_sizes()).values())
    finally:
        await store.aclose()


# -- a simulated month --------------------------------------------------------------------------


async def test_simulated_month_stays_within_the_policy_bound(tmp_path: Path) -> None:
    """One small commit every 20 simulated minutes for 30 days (2160 commits), two job results
    an hour, retention every 6 hours: live versions and store bytes stay within what the policy
    implies, refs stay, `verify` passes, every collecting run is audited."""
    store = LocalStore(tmp_path / "store", fsync=False)
    clock = SimClock()
    chain = VersionChain(store, clock=clock, retry=NO_RETRY)
    settings = RetentionSettings(
        keep_last=6,
        ladder=((HOUR, DAY), (DAY, 7 * DAY)),
        job_max_age_s=2 * DAY,
        job_limits={"fast": {"max_count": 5}},  # type: ignore[dict-item]
    )
    metrics = Metrics(CollectorRegistry())
    service = RetentionService(settings, chain=chain, store=store, clock=clock, metrics=metrics)
    policy = service.policy
    refs = 2
    bound = policy.max_versions(protected=refs)
    commits_per_run = 18  # 6 hours of commits every 20 minutes
    max_blob = 0
    runs = collecting_runs = 0
    tagged = pinned = 0
    for i in range(30 * 72):
        r = await commit_at(chain, clock, i)
        max_blob = max(max_blob, r.blob_size)
        if i == 100:
            tagged = await chain.set_ref("production", r.counter, actor="ops")
        if i == 700:
            pinned = await chain.pin(r.counter, actor="ops")
        if i % 3 == 0:
            for job in ("slow", "fast"):
                await store.put_if_absent(f"jobs/{job}/{datetime_token(clock.now)}.json", b"{}")
        clock.advance(1200)
        if (i + 1) % commits_per_run == 0:
            run = await service.run_once()
            assert not run.errors, run.errors
            runs += 1
            collecting_runs += bool(run.collected)
            assert run.live_versions is not None and run.live_versions <= bound
            blobs = await store.list_sizes("objects/")
            assert len(blobs) <= bound
            assert sum(blobs.values()) <= bound * max_blob
    assert runs == 120
    counters = await chain.counters()
    assert len(counters) == 2160
    live = len(await store.list("objects/"))
    # the steady state of this ladder: the last 6, ~24 hourly, ~7 daily and the two refs
    assert 30 <= live <= bound, (live, bound)
    assert await chain.ref("production") == tagged and await chain.ref("pin") == pinned
    assert blob_key((await chain.get(tagged)).blob_sha256) in await store.list("objects/")
    assert blob_key((await chain.get(pinned)).blob_sha256) in await store.list("objects/")
    report = await chain.verify()
    assert report.ok, report.summary()
    assert len(report.collected) == 2160 - live
    gc_entries = [e for e in await chain.log() if e.action == "gc"]
    assert len(gc_entries) == collecting_runs >= 100
    assert all(e.actor == "retention" and e.detail["policy"] == "ladder" for e in gc_entries)
    collected_total = sum(len(e.detail["collected"]) for e in gc_entries)
    assert collected_total == len(report.collected)
    # job results: the slow job keeps two days (one every hour), the fast one its last five
    assert len(await store.list("jobs/slow/")) <= 2 * 24 + 1
    assert len(await store.list("jobs/fast/")) == 5
    # metrics
    reg = metrics.registry
    assert reg.get_sample_value("spectralmc_gc_runs_total", {"model": "bs"}) == 120
    assert reg.get_sample_value("spectralmc_gc_versions_collected_total", {"model": "bs"}) == len(
        report.collected
    )
    assert reg.get_sample_value("spectralmc_store_bytes", {"model": "bs"}) == await prefix_bytes(
        store, CHAIN_PREFIXES
    )
    assert (reg.get_sample_value("spectralmc_job_results_deleted_total") or 0) > 0


async def test_byte_budget_holds_over_a_simulated_week() -> None:
    store = MemoryStore()
    clock = SimClock()
    chain = VersionChain(store, clock=clock)
    budget = 0
    policy: RetentionPolicy | None = None
    for i in range(7 * 24):
        r = await commit_at(chain, clock, i)
        if policy is None:
            budget = 12 * r.blob_size
            policy = RetentionPolicy(keep_last=3, ladder=HOURLY_DAILY, max_blob_bytes=budget)
        clock.advance(HOUR)
        if i % 4 == 3:
            await apply_retention(chain, policy, execute=True)
            assert sum((await store.list_sizes("objects/")).values()) <= budget
    assert (await chain.verify()).ok


# -- the server task ----------------------------------------------------------------------------


async def wait_for(pred: Callable[[], Any], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never became true")


def with_retention(**kw: Any) -> Any:
    base = make_settings()
    return base.model_copy(update={"retention": RetentionSettings(**kw)})


async def test_server_exports_store_bytes_and_runs_retention(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store", fsync=False)
    await commit_model(store, which=0)
    await commit_model(store, which=1)
    settings = with_retention(interval_s=0.2, keep_last=1, ladder=())
    client = await start_client(aiohttp_client, store=store, settings=settings)
    service = client.app[RETENTION_KEY]

    async def ran() -> bool:
        return service.runs >= 1

    await wait_for(ran)
    text = await (await client.get("/metrics")).text()
    line = next(x for x in text.splitlines() if x.startswith('spectralmc_store_bytes{model="bs"}'))
    assert float(line.split()[-1]) == await prefix_bytes(store)
    assert 'spectralmc_gc_runs_total{model="bs"}' in text
    assert "spectralmc_gc_versions_collected_total" in text
    # version 1 is neither last nor served (the tracker serves 2): collected, audited, verified
    chain = VersionChain(store)
    assert [e.action for e in await chain.log()] == ["gc"]
    assert (await chain.verify()).collected == [1]
    assert (await client.get("/readyz")).status == 200


async def test_server_measures_at_start_but_collects_only_after_an_interval(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store", fsync=False)
    for which in (0, 1, 0):
        await commit_model(store, which=which)
    client = await start_client(aiohttp_client, store=store)  # default settings: 600 s interval

    async def measured() -> bool:
        text = await (await client.get("/metrics")).text()
        return 'spectralmc_store_bytes{model="bs"}' in text

    await wait_for(measured)
    assert client.app[RETENTION_KEY].runs == 0
    assert await VersionChain(store).log() == []


class BrokenSizesStore(MemoryStore):
    async def list_sizes(self, prefix: str = "") -> dict[str, int]:
        raise Unavailable("listing is down")

    async def list(self, prefix: str = "") -> list[str]:
        if prefix in ("tombstones/", "jobs/"):
            raise Unavailable("listing is down")
        return await super().list(prefix)


async def test_server_survives_failing_retention(aiohttp_client: Any) -> None:
    store = BrokenSizesStore()
    await commit_model(store)
    settings = with_retention(interval_s=0.1)
    client = await start_client(aiohttp_client, store=store, settings=settings)
    service = client.app[RETENTION_KEY]

    async def failed_twice() -> bool:
        return service.runs >= 2

    await wait_for(failed_twice)
    assert set(service.last.errors) == {"gc", "jobs", "bytes"}  # type: ignore[union-attr]
    text = await (await client.get("/metrics")).text()
    for step in ("gc", "jobs", "bytes"):
        assert f'spectralmc_retention_failures_total{{step="{step}"}}' in text
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_retention_disabled_starts_no_task(aiohttp_client: Any) -> None:
    store = MemoryStore()
    await commit_model(store)
    client = await start_client(
        aiohttp_client, store=store, settings=with_retention(enabled=False, interval_s=0.05)
    )
    await asyncio.sleep(0.3)
    service = client.app[RETENTION_KEY]
    assert service.runs == 0 and service.status()["enabled"] is False
    assert "spectralmc_store_bytes{" not in await (await client.get("/metrics")).text()
