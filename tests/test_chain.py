"""Version chain: commit by exclusive create, concurrent writers, verify, refs, audit, GC."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from storage.chain import (
    HEAD_KEY,
    PIN_REF,
    VersionChain,
    VersionRecord,
    blob_key,
    canonical_json,
    render_message,
    version_key,
)
from storage.localstore import LocalStore
from storage.objectstore import (
    Conflict,
    Corrupt,
    MemoryStore,
    NotFound,
    ObjectStore,
    StoredObject,
    Unavailable,
)
from storage.retry import RetryPolicy
from tests.storage_fixtures import (
    MotoServer,
    make_snapshot,
    moto_server,
    new_bucket,
    s3_store,
    same_bits,
)

__all__ = ["moto_server"]
FAST = RetryPolicy(attempts=6, base_delay_s=0.01, max_delay_s=0.1)


def fixed_clock(start: datetime | None = None) -> tuple[list[datetime], Callable[[], datetime]]:
    ticks = itertools.count()
    base = start or datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    seen: list[datetime] = []

    def clock() -> datetime:
        seen.append(base + timedelta(seconds=next(ticks)))
        return seen[-1]

    return seen, clock


async def test_commit_get_head_list_load() -> None:
    _, clock = fixed_clock()
    chain = VersionChain(MemoryStore(), clock=clock)
    assert await chain.head() is None and await chain.list() == []
    recs = []
    for i in range(3):
        recs.append(
            await chain.commit(
                make_snapshot(i, step=10 * i),
                message="step {step} loss {loss:.3f} batch {batch}",
                metrics={"step": 10 * i, "loss": 1.0 / (i + 1), "batch": 32},
                quality={"price_rmse": 0.01 * i},
            )
        )
    assert [r.counter for r in recs] == [1, 2, 3]
    assert recs[0].parent_hash is None
    assert (
        recs[1].parent_hash == recs[0].version_hash and recs[2].parent_hash == recs[1].version_hash
    )
    assert recs[1].message == "step 10 loss 0.500 batch 32"
    assert recs[2].quality_metrics == {"price_rmse": 0.02}
    assert recs[0].config_fingerprint == "fp-0" and recs[1].config_fingerprint == "fp-1"
    assert recs[0].created_at == "2026-01-02T03:04:05+00:00"
    assert (await chain.head()) == recs[2]
    assert await chain.list() == recs
    assert await chain.get(2) == recs[1]
    snap = await chain.load(2)
    for name, t in make_snapshot(1, step=10).tensors.items():
        assert same_bits(snap.tensors[name], t)
    with pytest.raises(NotFound):
        await chain.get(4)
    with pytest.raises(ValueError, match="counter"):
        await chain.get(0)
    assert (await chain.verify()).ok


def test_record_hash_is_over_canonical_json_without_it() -> None:
    rec = VersionRecord.build(
        counter=1,
        parent_hash=None,
        blob_sha256="a" * 64,
        blob_size=3,
        created_at="t",
        message="m",
        training_metrics={"loss": 0.5},
        quality_metrics={},
        config_fingerprint=None,
    )
    body = rec.to_dict()
    body.pop("version_hash")
    import hashlib

    assert rec.version_hash == hashlib.sha256(canonical_json(body)).hexdigest()
    assert VersionRecord.from_bytes(rec.to_bytes(), counter=1) == rec
    with pytest.raises(Corrupt, match="counter"):
        VersionRecord.from_bytes(rec.to_bytes(), counter=2)


def test_render_message() -> None:
    assert render_message("step {step} loss {loss:.2e}", {"step": 3, "loss": 0.00123}) == (
        "step 3 loss 1.23e-03"
    )
    assert render_message("b={batch} x={loss:.3f}", {"loss": "n"}) == "b=n/a x=n"
    with pytest.raises(ValueError, match="not a format string"):
        render_message("oops {", {})


async def test_identical_snapshots_share_one_blob_and_bad_input_is_refused() -> None:
    store = MemoryStore()
    chain = VersionChain(store)
    a = await chain.commit(make_snapshot(5), message="a")
    b = await chain.commit(make_snapshot(5), message="b")
    assert a.blob_sha256 == b.blob_sha256 and b.counter == 2
    assert len(await store.list("objects/")) == 1
    with pytest.raises(ValueError, match=r"metrics\['loss'\] must be finite"):
        await chain.commit(make_snapshot(1), metrics={"loss": float("inf")})
    assert (await chain.head()) == b


async def test_head_is_only_a_hint() -> None:
    store = MemoryStore()
    chain = VersionChain(store)
    for i in range(4):
        await chain.commit(make_snapshot(i))
    head = await store.get(HEAD_KEY)
    # A stale hint (writer died before advancing it): readers probe forward.
    await store.put_if_match(
        HEAD_KEY, canonical_json({"counter": 1, "version_hash": "x"}), head.etag
    )
    assert (await chain.head()).counter == 4  # type: ignore[union-attr]
    rec = await chain.commit(make_snapshot(9))
    assert rec.counter == 5 and rec.parent_hash == (await chain.get(4)).version_hash
    await store.delete(HEAD_KEY)  # no hint at all: fall back to the listing
    assert (await chain.head()).counter == 5  # type: ignore[union-attr]


class AmbiguousStore(MemoryStore):
    """A real store whose first write to versions/ lands but then reports a transient error,
    like a timeout after the server applied the request."""

    def __init__(self) -> None:
        super().__init__()
        self.tripped = False

    async def put_if_absent(self, key: str, data: bytes) -> str:
        etag = await super().put_if_absent(key, data)
        if key.startswith("versions/") and not self.tripped:
            self.tripped = True
            raise Unavailable("timeout after write")
        return etag


async def test_ambiguous_write_is_recognised_as_our_commit() -> None:
    store = AmbiguousStore()
    chain = VersionChain(store, retry=FAST)
    rec = await chain.commit(make_snapshot(1))
    assert store.tripped and rec.counter == 1
    assert [r.counter for r in await chain.list()] == [1]
    assert (await chain.verify()).ok


async def _concurrent_commits(
    make_store: Callable[[], ObjectStore], writers: int, each: int
) -> None:
    async def writer(w: int) -> list[VersionRecord]:
        store: ObjectStore = make_store()
        chain = VersionChain(store, retry=FAST, seed=w)
        out = []
        for i in range(each):
            out.append(await chain.commit(make_snapshot(1000 * w + i, size=2), message=f"w{w} {i}"))
        await store.aclose()
        return out

    results = await asyncio.gather(*(writer(w) for w in range(writers)))
    store = make_store()
    chain = VersionChain(store)
    records = await chain.list()
    assert [r.counter for r in records] == list(range(1, writers * each + 1))
    by_hash = {r.version_hash: r for r in records}
    for out in results:  # every acknowledged commit is in the chain, exactly as acknowledged
        for r in out:
            assert by_hash[r.version_hash] == r
    assert sorted(r.message for r in records) == sorted(
        f"w{w} {i}" for w in range(writers) for i in range(each)
    )
    report = await chain.verify()
    assert report.ok, report.summary()
    assert report.checked == writers * each
    assert (await chain.head()).counter == writers * each  # type: ignore[union-attr]
    await store.aclose()


async def test_concurrent_committers_local(tmp_path: Path) -> None:
    await _concurrent_commits(lambda: LocalStore(tmp_path / "s"), writers=8, each=25)


async def test_concurrent_committers_s3(moto_server: MotoServer) -> None:
    bucket = new_bucket(moto_server)
    await _concurrent_commits(lambda: s3_store(moto_server, bucket), writers=8, each=25)


def test_concurrent_committers_local_threads(tmp_path: Path) -> None:
    """OS threads, each with its own event loop and store, on one directory."""
    root = tmp_path / "t"
    errors: list[BaseException] = []
    acked: list[str] = []

    def run(w: int) -> None:
        async def go() -> None:
            chain = VersionChain(LocalStore(root), retry=FAST, seed=w)
            for i in range(8):
                acked.append((await chain.commit(make_snapshot(50 * w + i, size=2))).version_hash)

        try:
            asyncio.run(go())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    chain = VersionChain(LocalStore(root))
    report = asyncio.run(chain.verify())
    assert report.ok and report.checked == 32
    assert sorted(r.version_hash for r in asyncio.run(chain.list())) == sorted(acked)


async def _build(store: ObjectStore, n: int) -> VersionChain:
    chain = VersionChain(store, retry=FAST)
    for i in range(n):
        await chain.commit(
            make_snapshot(i, size=3), message="v{step}", metrics={"step": i, "loss": 0.1}
        )
    return chain


async def test_every_single_byte_flip_is_found_named_and_refused() -> None:
    """A few hundred seeded random flips in records and blobs: verify names the version, and
    loading that version is refused."""
    store = MemoryStore()
    chain = await _build(store, 4)
    records = {r.counter: r for r in await chain.list()}
    owner = {version_key(c): c for c in records} | {
        blob_key(r.blob_sha256): c for c, r in records.items()
    }
    rng = random.Random(20260101)
    keys = sorted(owner)
    for _ in range(300):
        key = rng.choice(keys)
        obj = await store.get(key)
        pos = rng.randrange(len(obj.data))
        bad = bytearray(obj.data)
        bad[pos] ^= rng.randrange(1, 256)
        etag = await store.put_if_match(key, bytes(bad), obj.etag)
        report = await chain.verify()
        assert not report.ok, (key, pos)
        assert report.first_bad == owner[key], (key, pos, report.problems)
        with pytest.raises(Corrupt):
            await chain.load(owner[key])
        await store.put_if_match(key, obj.data, etag)
    assert (await chain.verify()).ok


async def test_on_disk_tampering_truncation_and_missing_pieces(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    chain = await _build(store, 5)
    rec3 = await chain.get(3)
    path = tmp_path / version_key(3)
    original = path.read_bytes()
    path.write_bytes(original.replace(b'"message":"v2"', b'"message":"v9"'))
    report = await chain.verify()
    assert report.first_bad == 3 and report.problems[0].kind == "record"
    path.write_bytes(original)
    (tmp_path / blob_key(rec3.blob_sha256)).unlink()  # blob gone, no tombstone: not GC
    report = await chain.verify()
    assert report.first_bad == 3 and report.problems[0].kind == "missing_blob"
    with pytest.raises(NotFound, match="missing"):
        await chain.load(3)
    (tmp_path / version_key(2)).unlink()  # a hole in the middle
    assert (await chain.verify()).first_bad == 2
    (tmp_path / version_key(5)).unlink()  # truncation: HEAD still names 5
    report = await chain.verify()
    assert any(p.kind == "truncated" for p in report.problems)


async def test_refs_pins_rollback_and_audit() -> None:
    _, clock = fixed_clock()
    chain = await _build(MemoryStore(), 4)
    chain.clock = clock
    assert await chain.set_ref("production", 3, actor="alice") == 3
    assert await chain.pin(4, actor="bob") == 4
    assert await chain.pin("production", actor="bob") == 3  # rollback: pin an older version
    assert await chain.refs() == {"production": 3, PIN_REF: 3}
    assert await chain.unpin(actor="carol") == 3
    assert await chain.refs() == {"production": 3}
    assert await chain.unpin(actor="carol") is None
    for bad in ("", "../x", "a/b", "-lead", "x" * 65, "sp ace"):
        with pytest.raises(ValueError, match="invalid ref name"):
            await chain.set_ref(bad, 1, actor="eve")
    with pytest.raises(NotFound):
        await chain.set_ref("ghost", 99, actor="eve")
    log = await chain.log()
    assert [(e.n, e.actor, e.action, e.ref, e.old, e.new) for e in log] == [
        (1, "alice", "tag", "production", None, 3),
        (2, "bob", "pin", "pin", None, 4),
        (3, "bob", "pin", "pin", 4, 3),
        (4, "carol", "unpin", "pin", 3, None),
    ]
    assert log[0].at == "2026-01-02T03:04:05+00:00"
    assert [r.counter for r in await chain.list()] == [1, 2, 3, 4]  # history never rewritten
    assert (await chain.verify()).ok


async def test_concurrent_ref_moves_are_all_audited() -> None:
    """Six writers move their own tags and race on one shared pin; the audit log, appended by
    put_if_absent under contention, holds every change exactly once with a contiguous number."""
    store = MemoryStore()
    await _build(store, 3)

    async def mover(w: int) -> None:
        chain = VersionChain(store, retry=FAST, seed=w)
        for target in (1, 2, 3, 1, 2):
            await chain.set_ref(f"t{w}", target, actor=f"w{w}")
        await chain.pin(1 + w % 3, actor=f"w{w}")

    await asyncio.gather(*(mover(w) for w in range(6)))
    chain = VersionChain(store)
    log = await chain.log()
    assert [e.n for e in log] == list(range(1, len(log) + 1))
    for w in range(6):
        moves = [(e.old, e.new) for e in log if e.ref == f"t{w}"]
        assert moves == [(None, 1), (1, 2), (2, 3), (3, 1), (1, 2)]
    pins = [e for e in log if e.action == "pin"]
    assert 1 <= len(pins) <= 6 and all(e.old != e.new for e in pins)
    assert await chain.ref(PIN_REF) in {e.new for e in pins}
    assert (await chain.verify()).ok


async def test_gc_keeps_last_n_tags_pins_and_shared_blobs() -> None:
    store = MemoryStore()
    chain = VersionChain(store)
    for i in range(8):
        # versions 2 and 7 carry identical state: one blob, shared by a collected and a kept version
        await chain.commit(make_snapshot(100 if i in (1, 6) else i, size=3))
    await chain.set_ref("production", 3, actor="ops")
    await chain.pin(4, actor="ops")
    preview = await chain.gc(keep=2)
    assert not preview.executed
    assert preview.kept == [3, 4, 7, 8] and preview.collect == [1, 5, 6]
    assert len(await store.list("objects/")) == 7  # preview deletes nothing
    plan = await chain.gc(keep=2, execute=True, actor="ops")
    assert plan.executed and plan.collect == [1, 5, 6]
    assert len(await store.list("objects/")) == 4
    assert (await chain.load(2)).tensors.keys()  # shared with kept version 7: still loadable
    with pytest.raises(NotFound, match="collected by GC"):
        await chain.load(5)
    report = await chain.verify()
    assert report.ok and report.collected == [1, 5, 6]
    assert (await chain.log())[-1].action == "gc"
    assert (await chain.gc(keep=2, execute=True)).collect == []  # idempotent
    with pytest.raises(ValueError, match="keep"):
        await chain.gc(keep=0)
    # a tombstone does not excuse a blob that is missing for a kept version
    await store.delete(blob_key((await chain.get(8)).blob_sha256))
    assert (await chain.verify()).first_bad == 8


class StaleReadStore(MemoryStore):
    """A real store that answers one read of a chosen key with NotFound, like a stale replica:
    the writer then believes the chain is shorter and only the exclusive create stops it."""

    def __init__(self) -> None:
        super().__init__()
        self.stale_key: str | None = None

    async def get(self, key: str) -> StoredObject:
        if key == self.stale_key:
            self.stale_key = None
            raise NotFound(key)
        return await super().get(key)


async def test_stale_reads_cannot_fork_and_the_race_budget_is_bounded() -> None:
    store = StaleReadStore()
    await VersionChain(store).commit(make_snapshot(1))
    await VersionChain(store).commit(make_snapshot(2))

    async def stale_hint() -> None:  # HEAD lags at 1 and the probe of 2 reads stale
        head = await store.get(HEAD_KEY)
        await store.put_if_match(HEAD_KEY, canonical_json({"counter": 1}), head.etag)
        store.stale_key = version_key(2)

    await stale_hint()
    with pytest.raises(Conflict, match="lost the race 1 times"):
        await VersionChain(store, max_commit_attempts=1).commit(make_snapshot(3))
    await stale_hint()
    rec = await VersionChain(store, max_commit_attempts=3).commit(make_snapshot(3))
    assert rec.counter == 3 and rec.parent_hash == (await VersionChain(store).get(2)).version_hash
    assert (await VersionChain(store).verify()).ok
