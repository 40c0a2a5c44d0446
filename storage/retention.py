"""Retention: which checkpoint versions to keep (a thinning ladder) and which job results to drop.

Versions. A `RetentionPolicy` keeps

- the last `keep_last` versions (by counter),
- every ref'd version (tags, pins, a `serving` ref: the GC executor adds every ref), and any
  counter the caller protects (e.g. the version a server is serving right now),
- a thinning ladder: rungs `(bucket_s, horizon_s)`; for each rung, the versions younger than
  `horizon_s` (by `created_at`, relative to the injected clock) are grouped into buckets of
  `bucket_s` seconds aligned to the Unix epoch, and the oldest live version of each bucket is
  kept. The default ladder `(3600, 86400), (86400, 30 * 86400)` keeps one version per hour for
  the last day and one per day for the last month. Choosing the *oldest* of each bucket keeps the
  choice stable: later commits never displace it, and with nested rungs (an hour divides a day)
  the daily representative is also the hourly one, so a version the ladder dropped is never
  wanted again.
- optionally a byte budget (`max_blob_bytes`): while the kept blobs exceed it, ladder-only
  versions are dropped, oldest first (the last N, refs and protected versions always stay).

`plan_retention` is pure (records, refs, now -> plan) and deterministic; `apply_retention` runs it
through `VersionChain.collect`, the same tombstone + blob-delete executor as `gc(keep=...)`,
which audits every run that collects something.

Job results. `jobs/<name>/<slot token>.json` (storage/jobresults.py) are pruned per job name by
age of the slot and/or by count (newest kept), see `prune_job_results`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from storage.chain import (
    GcPlan,
    GcSelector,
    GcState,
    VersionChain,
    VersionRecord,
    plan_collection,
)
from storage.jobresults import JOB_RESULTS_PREFIX, parse_job_result_key
from storage.objectstore import ObjectStore

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Every key prefix the version chain writes (see storage/chain.py), for store accounting.
CHAIN_PREFIXES = ("objects/", "versions/", "refs/", "audit/", "tombstones/", "HEAD")


# -- the version policy -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rung:
    """Keep one version per `bucket_s` seconds among those younger than `horizon_s`."""

    bucket_s: float
    horizon_s: float

    def __post_init__(self) -> None:
        for name in ("bucket_s", "horizon_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if v <= 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if self.bucket_s > self.horizon_s:
            raise ValueError(f"bucket_s ({self.bucket_s}) must be <= horizon_s ({self.horizon_s})")

    @property
    def label(self) -> str:
        return f"rung:{self.bucket_s:g}/{self.horizon_s:g}"

    def max_buckets(self) -> int:
        """Epoch-aligned buckets an interval of length horizon_s can touch."""
        return math.ceil(self.horizon_s / self.bucket_s) + 1


DEFAULT_LADDER = (Rung(3600.0, 86_400.0), Rung(86_400.0, 30 * 86_400.0))


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int = 10
    ladder: tuple[Rung, ...] = DEFAULT_LADDER
    max_blob_bytes: int | None = None

    def __post_init__(self) -> None:
        k = self.keep_last
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {k!r}")
        b = self.max_blob_bytes
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"max_blob_bytes must be an int >= 1 or None, got {b!r}")
        object.__setattr__(self, "ladder", tuple(self.ladder))
        if not all(isinstance(r, Rung) for r in self.ladder):
            raise ValueError("ladder must hold Rung values")

    @staticmethod
    def from_pairs(
        keep_last: int,
        ladder: Iterable[tuple[float, float]],
        max_blob_bytes: int | None = None,
    ) -> RetentionPolicy:
        return RetentionPolicy(
            keep_last=keep_last,
            ladder=tuple(Rung(float(b), float(h)) for b, h in ladder),
            max_blob_bytes=max_blob_bytes,
        )

    def max_versions(self, *, protected: int = 0) -> int:
        """Upper bound on live versions after a run (`protected` = distinct refs + protects)."""
        return self.keep_last + sum(r.max_buckets() for r in self.ladder) + protected

    def describe(self) -> dict[str, Any]:
        return {
            "keep_last": self.keep_last,
            "ladder": [[r.bucket_s, r.horizon_s] for r in self.ladder],
            "max_blob_bytes": self.max_blob_bytes,
        }


@dataclass(frozen=True)
class RetentionPlan:
    kept: dict[int, tuple[str, ...]]  # counter -> why it stays
    collect: list[int]  # live versions whose blob goes (shared blobs excepted)
    delete_blobs: list[str]
    budget_dropped: list[int] = field(default_factory=list)
    over_budget: bool = False  # the budget could not be met (last N + refs alone exceed it)
    kept_blob_bytes: int = 0


def parse_created_at(text: str) -> datetime | None:
    """A record's created_at as an aware UTC datetime (naive = UTC); None if unparsable."""
    try:
        dt = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def plan_retention(
    records: Sequence[VersionRecord],
    refs: Mapping[str, int],
    now: datetime,
    policy: RetentionPolicy,
    *,
    live: Collection[int] | None = None,
    counters: Sequence[int] | None = None,
    protect: Iterable[int] = (),
) -> RetentionPlan:
    """What `policy` keeps and collects; pure and deterministic.

    records: the versions to decide about (at least the live ones); live: the counters whose
    blob is still present and not collected (None: all of `records`); counters: every counter of
    the chain, for "the last N" (None: those of `records`); protect: counters kept regardless.
    A version with an unparsable created_at is kept (deleting is irreversible). Versions from
    the future (clock skew) count as age 0.
    """
    if now.tzinfo is None:
        raise ValueError(f"now must be an aware datetime, got {now!r}")
    by_counter = {r.counter: r for r in records}
    all_counters = sorted(set(counters) if counters is not None else set(by_counter))
    live_set = set(by_counter) if live is None else set(live) & set(by_counter)
    existing = set(all_counters) | set(by_counter)
    reasons: dict[int, list[str]] = {}

    def keep(c: int, why: str) -> None:
        if c in existing:
            reasons.setdefault(c, []).append(why)

    for c in all_counters[-policy.keep_last :]:
        keep(c, "last")
    for name, c in sorted(refs.items()):
        keep(c, f"ref:{name}")
    for c in sorted(set(protect)):
        keep(c, "protected")

    stamps: dict[int, datetime] = {}
    for c in sorted(live_set):
        dt = parse_created_at(by_counter[c].created_at)
        if dt is None:
            keep(c, "unparsable_created_at")
        else:
            stamps[c] = dt
    for rung in policy.ladder:
        reps: dict[int, tuple[datetime, int]] = {}
        for c, dt in stamps.items():
            age = max((now - dt).total_seconds(), 0.0)
            if age >= rung.horizon_s:
                continue
            bucket = math.floor(((dt - _EPOCH).total_seconds()) / rung.bucket_s)
            cand = (dt, c)
            if bucket not in reps or cand < reps[bucket]:
                reps[bucket] = cand
        for _, c in sorted(reps.values()):
            keep(c, rung.label)

    def blob_bytes(kept: Iterable[int]) -> int:
        sizes: dict[str, int] = {}
        for c in kept:
            if c in live_set:
                r = by_counter[c]
                sizes[r.blob_sha256] = r.blob_size
        return sum(sizes.values())

    dropped: list[int] = []
    over = False
    if policy.max_blob_bytes is not None:
        ladder_only = sorted(
            (c for c, why in reasons.items() if all(w.startswith("rung:") for w in why)),
            key=lambda c: (stamps.get(c, now), c),
        )
        while blob_bytes(reasons) > policy.max_blob_bytes and ladder_only:
            c = ladder_only.pop(0)
            del reasons[c]
            dropped.append(c)
        over = blob_bytes(reasons) > policy.max_blob_bytes

    kept = {c: tuple(reasons[c]) for c in sorted(reasons)}
    live_records = {c: by_counter[c] for c in live_set}
    present = {r.blob_sha256 for r in live_records.values()}
    # Kept versions that are not live still protect a blob they share with a live one.
    named = {**live_records, **{c: by_counter[c] for c in kept if c in by_counter}}
    collect, blobs = plan_collection(named, kept, present)
    return RetentionPlan(
        kept=kept,
        collect=collect,
        delete_blobs=blobs,
        budget_dropped=sorted(dropped),
        over_budget=over,
        kept_blob_bytes=blob_bytes(kept),
    )


def retention_selector(policy: RetentionPolicy, *, protect: Iterable[int] = ()) -> GcSelector:
    """The `GcSelector` for `VersionChain.collect` that applies `policy`."""
    protected = tuple(protect)

    def select(state: GcState) -> dict[int, tuple[str, ...]]:
        live = [c for c in state.counters if state.is_live(c)]
        plan = plan_retention(
            list(state.records.values()),
            state.refs,
            state.now,
            policy,
            live=live,
            counters=state.counters,
            protect=protected,
        )
        return plan.kept

    return select


async def apply_retention(
    chain: VersionChain,
    policy: RetentionPolicy,
    *,
    execute: bool = False,
    actor: str = "retention",
    protect: Iterable[int] = (),
) -> GcPlan:
    """Preview (or, with execute=True, run) `policy` on `chain`; audited as a `gc` entry."""
    return await chain.collect(
        retention_selector(policy, protect=protect),
        keep=policy.keep_last,
        execute=execute,
        actor=actor,
        policy="ladder",
        detail={
            "ladder": [[r.bucket_s, r.horizon_s] for r in policy.ladder],
            "max_blob_bytes": policy.max_blob_bytes,
        },
    )


# -- store accounting ---------------------------------------------------------------------------


async def prefix_bytes(store: ObjectStore, prefixes: Iterable[str] = CHAIN_PREFIXES) -> int:
    """Total bytes of the objects under `prefixes` (a key counted once)."""
    sizes: dict[str, int] = {}
    for prefix in prefixes:
        sizes.update(await store.list_sizes(prefix))
    return sum(sizes.values())


# -- job results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobLimits:
    """Per job name: drop results whose slot is older than max_age_s, keep at most max_count."""

    max_age_s: float | None = None
    max_count: int | None = None

    def __post_init__(self) -> None:
        a, n = self.max_age_s, self.max_count
        if a is not None and (isinstance(a, bool) or not math.isfinite(a) or a <= 0):
            raise ValueError(f"max_age_s must be > 0 or None, got {a!r}")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"max_count must be an int >= 1 or None, got {n!r}")

    @property
    def unlimited(self) -> bool:
        return self.max_age_s is None and self.max_count is None


@dataclass(frozen=True)
class JobPrunePlan:
    delete: list[str]
    kept: dict[str, int]  # job name -> results kept
    deleted: dict[str, int]  # job name -> results deleted (or to delete, in a preview)
    executed: bool = False


def plan_job_pruning(
    keys: Iterable[str],
    now: datetime,
    limits: JobLimits,
    *,
    per_job: Mapping[str, JobLimits] | None = None,
    prefix: str = JOB_RESULTS_PREFIX,
) -> JobPrunePlan:
    """Pure: which `<prefix>/<name>/<slot token>.json` keys to delete. Keys of another shape
    are left alone; the slot time in the key is what ages (no document is read)."""
    per_job = per_job or {}
    by_job: dict[str, list[tuple[datetime, str]]] = {}
    for key in keys:
        parsed = parse_job_result_key(key, prefix=prefix)
        if parsed is None:
            continue
        name, slot = parsed
        by_job.setdefault(name, []).append((slot, key))
    delete: list[str] = []
    kept: dict[str, int] = {}
    deleted: dict[str, int] = {}
    for name in sorted(by_job):
        lim = per_job.get(name, limits)
        items = sorted(by_job[name], reverse=True)  # newest first
        doomed: set[str] = set()
        if lim.max_count is not None:
            doomed.update(k for _, k in items[lim.max_count :])
        if lim.max_age_s is not None:
            doomed.update(k for t, k in items if (now - t).total_seconds() > lim.max_age_s)
        delete.extend(sorted(doomed))
        deleted[name] = len(doomed)
        kept[name] = len(items) - len(doomed)
    return JobPrunePlan(delete=delete, kept=kept, deleted=deleted)


async def prune_job_results(
    store: ObjectStore,
    *,
    now: datetime,
    limits: JobLimits,
    per_job: Mapping[str, JobLimits] | None = None,
    prefix: str = JOB_RESULTS_PREFIX,
    execute: bool = True,
    concurrency: int = 8,
) -> JobPrunePlan:
    """List `<prefix>/`, plan by `limits` (per_job overrides by name), delete unless preview."""
    if limits.unlimited and all(v.unlimited for v in (per_job or {}).values()):
        return JobPrunePlan(delete=[], kept={}, deleted={})
    keys = await store.list(f"{prefix}/")
    plan = plan_job_pruning(keys, now, limits, per_job=per_job, prefix=prefix)
    if not execute or not plan.delete:
        return plan
    sem = asyncio.Semaphore(concurrency)

    async def one(key: str) -> None:
        async with sem:
            await store.delete(key)

    await asyncio.gather(*(one(k) for k in plan.delete))
    return JobPrunePlan(plan.delete, plan.kept, plan.deleted, executed=True)
