"""A hash-linked, append-only version chain of checkpoints on any ObjectStore.

Keys:
    objects/<sha256>               checkpoint blobs (content addressed, put-if-absent)
    versions/<counter:010d>.json   version records; their exclusive create is the commit point
    HEAD                           hint: {"counter", "version_hash"}, moved by compare-and-swap
    refs/<name>                    tags and pins: {"name", "counter"} (counter null = unset)
    audit/<n:010d>.json            immutable audit entries (who, when, action, ref, old, new)
    tombstones/<counter:010d>.json written by GC before a blob is deleted

Every record carries `version_hash = sha256(canonical JSON of the record without it)` and the
parent's version_hash, so rewriting or truncating history is detected by `verify`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import random
import re
import string
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from spectral_core.snapshot import Snapshot
from storage.checkpoint import (
    _check_json_able,
    canonical_json,
    decode_checkpoint,
    encode_checkpoint,
    sha256_hex,
)
from storage.objectstore import Conflict, Corrupt, NotFound, ObjectStore, StoredObject
from storage.retry import RetryPolicy, retry_call

log = logging.getLogger(__name__)
T = TypeVar("T")

RECORD_FORMAT = "spectralmc.version/1"
PIN_REF = "pin"
HEAD_KEY = "HEAD"
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_KEY_RE = re.compile(r"^versions/(\d{10})\.json$")
_AUDIT_KEY_RE = re.compile(r"^audit/(\d{10})\.json$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_COUNTER = 9_999_999_999

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def version_key(counter: int) -> str:
    return f"versions/{counter:010d}.json"


def blob_key(sha256: str) -> str:
    return f"objects/{sha256}"


def tombstone_key(counter: int) -> str:
    return f"tombstones/{counter:010d}.json"


def audit_key(n: int) -> str:
    return f"audit/{n:010d}.json"


def ref_key(name: str) -> str:
    return f"refs/{validate_ref_name(name)}"


def validate_ref_name(name: str) -> str:
    if not isinstance(name, str) or not _REF_RE.match(name):
        raise ValueError(f"invalid ref name {name!r}: 1-64 chars of [A-Za-z0-9._-], alnum first")
    return name


def _check_counter(counter: int, what: str = "counter") -> int:
    if (
        isinstance(counter, bool)
        or not isinstance(counter, int)
        or not 1 <= counter <= _MAX_COUNTER
    ):
        raise ValueError(f"{what} must be an int in 1..{_MAX_COUNTER}, got {counter!r}")
    return counter


def _timestamp(clock: Clock) -> str:
    now = clock()
    if now.tzinfo is None:
        raise ValueError(f"clock must return an aware datetime, got {now!r}")
    return now.astimezone(UTC).isoformat()


def render_message(template: str, values: Mapping[str, Any]) -> str:
    """Fill `{step} {loss} {batch}`-style fields from `values`; a missing field renders as 'n/a'."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"message template {template!r} is not a format string: {exc}") from None
    out: list[str] = []
    for literal, name, spec, conv in fields:
        out.append(literal)
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"message template field {{{name}}} must be a plain name")
        if name not in values:
            out.append("n/a")
            continue
        value = values[name]
        if conv == "r":
            value = repr(value)
        elif conv == "s":
            value = str(value)
        try:
            out.append(format(value, spec or ""))
        except (ValueError, TypeError):
            out.append(str(value))  # a numeric spec on a non-number: show the value as is
    return "".join(out)


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionRecord:
    counter: int
    parent_hash: str | None
    blob_sha256: str
    blob_size: int
    created_at: str
    message: str
    training_metrics: dict[str, Any]
    quality_metrics: dict[str, Any]
    config_fingerprint: str | None
    version_hash: str

    def body(self) -> dict[str, Any]:
        """The hashed content: every field but version_hash."""
        return {
            "format": RECORD_FORMAT,
            "counter": self.counter,
            "parent_hash": self.parent_hash,
            "blob_sha256": self.blob_sha256,
            "blob_size": self.blob_size,
            "created_at": self.created_at,
            "message": self.message,
            "training_metrics": self.training_metrics,
            "quality_metrics": self.quality_metrics,
            "config_fingerprint": self.config_fingerprint,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "version_hash": self.version_hash}

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @staticmethod
    def build(
        *,
        counter: int,
        parent_hash: str | None,
        blob_sha256: str,
        blob_size: int,
        created_at: str,
        message: str,
        training_metrics: Mapping[str, Any],
        quality_metrics: Mapping[str, Any],
        config_fingerprint: str | None,
    ) -> VersionRecord:
        draft = VersionRecord(
            counter,
            parent_hash,
            blob_sha256,
            blob_size,
            created_at,
            message,
            dict(training_metrics),
            dict(quality_metrics),
            config_fingerprint,
            "",
        )
        return VersionRecord(
            **{**draft.__dict__, "version_hash": sha256_hex(canonical_json(draft.body()))}
        )

    @staticmethod
    def from_bytes(data: bytes, *, counter: int | None = None) -> VersionRecord:
        """Parse and check a stored record; Corrupt names what is wrong."""
        where = f"version {counter}" if counter is not None else "version record"
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Corrupt(f"{where}: not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise Corrupt(f"{where}: not a JSON object")
        try:
            if canonical_json(doc) != bytes(data):
                raise Corrupt(f"{where}: bytes are not the canonical encoding")
        except ValueError as exc:
            raise Corrupt(f"{where}: {exc}") from None
        expected = {*VersionRecord.__dataclass_fields__, "format"}
        if set(doc) != expected:
            raise Corrupt(f"{where}: fields {sorted(doc)} != {sorted(expected)}")
        if doc["format"] != RECORD_FORMAT:
            raise Corrupt(f"{where}: unknown format {doc['format']!r}")
        doc.pop("format")
        try:
            rec = VersionRecord(**doc)
            _check_counter(rec.counter)
            if not (isinstance(rec.blob_sha256, str) and _SHA_RE.match(rec.blob_sha256)):
                raise ValueError(f"bad blob_sha256 {rec.blob_sha256!r}")
            if rec.parent_hash is not None and not _SHA_RE.match(str(rec.parent_hash)):
                raise ValueError(f"bad parent_hash {rec.parent_hash!r}")
            if not isinstance(rec.blob_size, int) or rec.blob_size < 0:
                raise ValueError(f"bad blob_size {rec.blob_size!r}")
        except (TypeError, ValueError) as exc:
            raise Corrupt(f"{where}: {exc}") from None
        actual = sha256_hex(canonical_json(rec.body()))
        if actual != rec.version_hash:
            raise Corrupt(f"{where}: version_hash {rec.version_hash} != computed {actual}")
        if counter is not None and rec.counter != counter:
            raise Corrupt(f"{where}: record says counter {rec.counter}")
        return rec


@dataclass(frozen=True)
class AuditEntry:
    n: int
    at: str
    actor: str
    action: str
    ref: str | None
    old: int | None
    new: int | None
    detail: dict[str, Any]
    entry_hash: str

    def body(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("entry_hash")
        return d


@dataclass(frozen=True)
class Problem:
    counter: int | None
    kind: str  # record | missing_record | parent_link | blob_hash | missing_blob | head | ref | ...
    detail: str

    def __str__(self) -> str:
        where = f"version {self.counter}" if self.counter is not None else "chain"
        return f"{where}: {self.kind}: {self.detail}"


@dataclass
class VerifyReport:
    checked: int = 0
    tip: int | None = None
    collected: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad(self) -> int | None:
        counters = [p.counter for p in self.problems if p.counter is not None]
        return min(counters) if counters else None

    def summary(self) -> str:
        if self.ok:
            return (
                f"ok: {self.checked} versions verified, tip {self.tip}, "
                f"{len(self.collected)} collected by GC"
            )
        first = self.first_bad
        head = f"first bad version {first}" if first is not None else "chain metadata damaged"
        return f"FAILED: {head}; {len(self.problems)} problem(s): {self.problems[0]}"


@dataclass(frozen=True)
class GcPlan:
    keep: int
    kept: list[int]
    collect: list[int]  # versions whose blob goes away now
    delete_blobs: list[str]
    executed: bool = False
    policy: str = "keep_last"  # which selector decided `kept` (keep_last | ladder | ...)
    # why each kept version stays: "last", "ref:<name>", "rung:<bucket_s>/<horizon_s>", ...
    reasons: dict[int, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class GcState:
    """One consistent read of the chain that a GC selector decides from.

    `records` holds every version not yet collected (no tombstone), plus any tombstoned one whose
    blob is still present (an interrupted GC) and every kept tombstoned one; reading only those
    keeps a GC run proportional to the live versions, not to the whole history.
    """

    counters: tuple[int, ...]  # every version counter, ascending
    records: Mapping[int, VersionRecord]
    tombstoned: frozenset[int]
    present_blobs: frozenset[str]  # sha256 of every blob under objects/
    refs: Mapping[str, int]
    now: datetime

    def is_live(self, counter: int) -> bool:
        """Not collected: a record without a tombstone whose blob is present."""
        rec = self.records.get(counter)
        return (
            rec is not None
            and counter not in self.tombstoned
            and rec.blob_sha256 in self.present_blobs
        )


# A GC policy: the versions to keep (counter -> reasons). Refs are added by the executor.
GcSelector = Callable[[GcState], Mapping[int, tuple[str, ...]]]


def plan_collection(
    records: Mapping[int, VersionRecord], kept: Iterable[int], present_blobs: Iterable[str]
) -> tuple[list[int], list[str]]:
    """(versions to collect, blobs to delete): every version not kept whose blob is present,
    except where a kept version names the same blob (content addressing shares blobs)."""
    kept_set = set(kept)
    present = set(present_blobs)
    kept_blobs = {r.blob_sha256 for c, r in records.items() if c in kept_set}
    collect: builtins.list[int] = []
    blobs: set[str] = set()
    for c in sorted(records):
        r = records[c]
        if c in kept_set or r.blob_sha256 in kept_blobs or r.blob_sha256 not in present:
            continue
        collect.append(c)
        blobs.add(r.blob_sha256)
    return collect, sorted(blobs)


# -- the chain ----------------------------------------------------------------------------------


class VersionChain:
    """Commit, read, verify, tag/pin and collect versions. Safe with many concurrent writers."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        retry: RetryPolicy | None = None,
        clock: Clock = utc_now,
        max_commit_attempts: int = 200,
        race_backoff: RetryPolicy | None = None,
        seed: int | None = None,
        concurrency: int = 8,
    ) -> None:
        if max_commit_attempts < 1:
            raise ValueError(f"max_commit_attempts must be >= 1, got {max_commit_attempts}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.store = store
        self.retry = retry or RetryPolicy()
        self.clock = clock
        self.max_commit_attempts = max_commit_attempts
        # Lost races back off briefly (jittered) so that contenders spread out.
        self.race_backoff = race_backoff or RetryPolicy(
            attempts=100, base_delay_s=0.002, max_delay_s=0.1
        )
        self._rng = random.Random(seed)
        self._concurrency = concurrency
        # The newest record this object has seen: records are immutable, so probing forward from
        # it is always valid and usually cheaper than following the (lagging) HEAD hint.
        self._known_tip: VersionRecord | None = None

    # -- store calls with transient retry ---------------------------------------------------------

    async def _r(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        return await retry_call(fn, policy=self.retry, what=what, rng=self._rng)

    async def _get(self, key: str) -> StoredObject:
        return await self._r(f"get {key}", lambda: self.store.get(key))

    async def _get_or_none(self, key: str) -> StoredObject | None:
        try:
            return await self._get(key)
        except NotFound:
            return None

    async def _put_if_absent(self, key: str, data: bytes) -> str:
        return await self._r(f"put_if_absent {key}", lambda: self.store.put_if_absent(key, data))

    async def _put_if_match(self, key: str, data: bytes, etag: str) -> str:
        return await self._r(
            f"put_if_match {key}", lambda: self.store.put_if_match(key, data, etag)
        )

    async def _delete(self, key: str) -> None:
        await self._r(f"delete {key}", lambda: self.store.delete(key))

    async def _list(self, prefix: str) -> list[str]:
        return await self._r(f"list {prefix}", lambda: self.store.list(prefix))

    async def _gather(self, items: Iterable[Any], fn: Callable[[Any], Awaitable[T]]) -> list[T]:
        sem = asyncio.Semaphore(self._concurrency)

        async def one(item: Any) -> T:
            async with sem:
                return await fn(item)

        return list(await asyncio.gather(*(one(i) for i in items)))

    # -- reading ----------------------------------------------------------------------------------

    async def get(self, counter: int) -> VersionRecord:
        """The record of version `counter`, hash-checked; NotFound if it does not exist."""
        _check_counter(counter)
        obj = await self._get(version_key(counter))
        return VersionRecord.from_bytes(obj.data, counter=counter)

    async def _head_hint(self) -> tuple[int, str | None]:
        """(counter, etag) from the HEAD hint; (0, None) if absent, (0, etag) if unreadable."""
        obj = await self._get_or_none(HEAD_KEY)
        if obj is None:
            return 0, None
        try:
            doc = json.loads(obj.data)
            counter = int(doc["counter"])
            if counter < 0:
                raise ValueError(counter)
        except (ValueError, KeyError, TypeError):
            log.warning("HEAD hint unreadable; probing from the listing")
            return 0, obj.etag
        return counter, obj.etag

    async def _tip_from(self, rec: VersionRecord | None) -> VersionRecord | None:
        """Probe forward from a known record (None = empty chain) to the last one."""
        counter = rec.counter if rec is not None else 0
        while True:
            try:
                nxt = await self.get(counter + 1)
            except NotFound:
                return rec
            counter, rec = counter + 1, nxt

    async def head(self) -> VersionRecord | None:
        """The newest version: the HEAD hint, then probe n+1, n+2... (HEAD may lag)."""
        hint, _ = await self._head_hint()
        start: VersionRecord | None = None
        if hint > 0:
            # A hint ahead of the records (truncation?) falls back to the listing.
            with contextlib.suppress(NotFound):
                start = await self.get(hint)
        if start is None:
            counters = await self.counters()
            start = await self.get(counters[-1]) if counters else None
        return await self._tip_from(start)

    async def counters(self) -> list[int]:
        keys = await self._list("versions/")
        return sorted(int(m.group(1)) for k in keys if (m := _VERSION_KEY_RE.match(k)))

    async def list(self) -> list[VersionRecord]:
        """Every version record, oldest first (hash-checked)."""
        return await self._gather(await self.counters(), self.get)

    async def load_record(self, record: VersionRecord) -> Snapshot:
        """Download and decode the blob of `record`, checking size and SHA-256 first."""
        try:
            obj = await self._get(blob_key(record.blob_sha256))
        except NotFound:
            if await self._get_or_none(tombstone_key(record.counter)) is not None:
                raise NotFound(f"version {record.counter} was collected by GC") from None
            raise NotFound(f"version {record.counter}: blob {record.blob_sha256} missing") from None
        if len(obj.data) != record.blob_size:
            raise Corrupt(
                f"version {record.counter}: blob size {len(obj.data)} != {record.blob_size}"
            )
        return await asyncio.to_thread(
            decode_checkpoint, obj.data, expected_sha256=record.blob_sha256
        )

    async def load(self, counter: int) -> Snapshot:
        return await self.load_record(await self.get(counter))

    # -- committing -------------------------------------------------------------------------------

    async def _put_blob(self, data: bytes, sha: str) -> None:
        key = blob_key(sha)
        try:
            await self._put_if_absent(key, data)
            return
        except Conflict:
            pass
        # Content addressed: an equal blob is usually there already. A damaged one (bit rot) is
        # replaced by these bytes, which provably belong under this name: that heals every
        # version naming it (deterministic training re-creates exactly such bytes on resume).
        for _ in range(self.max_commit_attempts):
            existing = await self._get(key)
            if sha256_hex(existing.data) == sha:
                return
            try:
                await self._put_if_match(key, data, existing.etag)
            except (Conflict, NotFound):
                continue  # it changed meanwhile: look again
            log.warning("repaired damaged blob %s", key)
            try:
                await self.append_audit("blob.repair", actor="chain", detail={"blob": sha})
            except Exception as exc:  # the repair stands; the audit entry is a courtesy
                log.warning("audit entry for the repair of %s failed: %s", key, exc)
            return
        raise Corrupt(f"stored blob {key} does not match its name and could not be repaired")

    async def commit(
        self,
        snapshot: Snapshot,
        *,
        message: str = "",
        metrics: Mapping[str, Any] | None = None,
        quality: Mapping[str, Any] | None = None,
    ) -> VersionRecord:
        """Append `snapshot` as a new version; `message` is a template filled from `metrics`."""
        metrics = dict(metrics or {})
        quality = dict(quality or {})
        _check_json_able(metrics, "metrics")
        _check_json_able(quality, "quality")
        text = render_message(message, metrics)
        fingerprint = snapshot.meta.get("config_fingerprint") if snapshot.meta else None
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise ValueError(
                f"snapshot.meta['config_fingerprint'] must be a str, got {fingerprint!r}"
            )
        data = await asyncio.to_thread(encode_checkpoint, snapshot)
        sha = sha256_hex(data)
        await self._put_blob(data, sha)

        hint, head_etag = await self._head_hint()
        known = self._known_tip
        start: VersionRecord | None = None
        if known is not None and known.counter >= hint:
            start = known
        elif hint > 0:
            with contextlib.suppress(NotFound):  # a hint past the records: use the listing
                start = await self.get(hint)
        tip = await self._tip_from(start) if start is not None else await self.head()
        for attempt in range(self.max_commit_attempts):
            counter = (tip.counter if tip else 0) + 1
            record = VersionRecord.build(
                counter=counter,
                parent_hash=tip.version_hash if tip else None,
                blob_sha256=sha,
                blob_size=len(data),
                created_at=_timestamp(self.clock),
                message=text,
                training_metrics=metrics,
                quality_metrics=quality,
                config_fingerprint=fingerprint,
            )
            raw = record.to_bytes()
            try:
                await self._put_if_absent(version_key(counter), raw)
            except Conflict:
                # Either another writer won `counter`, or our own earlier try landed before an
                # ambiguous transient error: the stored bytes tell which.
                existing = await self._get(version_key(counter))
                if existing.data == raw:
                    break
                winner = VersionRecord.from_bytes(existing.data, counter=counter)
                await asyncio.sleep(self.race_backoff.delay(min(attempt, 6), self._rng))
                tip = await self._tip_from(winner)
                continue
            break
        else:
            raise Conflict(f"commit lost the race {self.max_commit_attempts} times; giving up")
        self._known_tip = record
        try:
            await self._advance_head(record, hint, head_etag)
        except Exception as exc:  # the commit stands; HEAD is only a hint that readers probe past
            log.warning("HEAD hint not advanced to %d: %s", record.counter, exc)
        return record

    async def _advance_head(self, record: VersionRecord, current: int, etag: str | None) -> None:
        """Move the HEAD hint forward to `record` by CAS, starting from a known (current, etag)."""
        doc = canonical_json({"counter": record.counter, "version_hash": record.version_hash})
        for _ in range(self.max_commit_attempts):
            if etag is not None and current >= record.counter:
                return
            try:
                if etag is None:
                    await self._put_if_absent(HEAD_KEY, doc)
                else:
                    await self._put_if_match(HEAD_KEY, doc, etag)
                return
            except (Conflict, NotFound):
                current, etag = await self._head_hint()

    # -- refs (tags and pins) and audit -----------------------------------------------------------

    async def refs(self) -> dict[str, int]:
        """Every set ref name -> counter."""
        out: dict[str, int] = {}
        for key in await self._list("refs/"):
            name = key[len("refs/") :]
            counter = await self.ref(name)
            if counter is not None:
                out[name] = counter
        return out

    async def _ref_doc(self, name: str) -> tuple[int | None, str | None]:
        obj = await self._get_or_none(ref_key(name))
        if obj is None:
            return None, None
        try:
            doc = json.loads(obj.data)
            counter = doc["counter"]
            if doc["name"] != name or (counter is not None and _check_counter(counter) != counter):
                raise ValueError(doc)
        except (ValueError, KeyError, TypeError):
            raise Corrupt(f"ref {name!r} is unreadable") from None
        return counter, obj.etag

    async def ref(self, name: str) -> int | None:
        counter, _ = await self._ref_doc(name)
        return counter

    async def resolve(self, target: int | str) -> int:
        """A counter, or a ref name (or its decimal string) -> the counter it names now."""
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if isinstance(target, bool) or not isinstance(target, int | str):
            raise ValueError(f"target must be a counter or a ref name, got {target!r}")
        if isinstance(target, int):
            await self.get(target)
            return target
        counter = await self.ref(validate_ref_name(target))
        if counter is None:
            raise NotFound(f"ref {target!r} is not set")
        return counter

    async def _move_ref(
        self, name: str, counter: int | None, *, actor: str, action: str,
        detail: Mapping[str, Any] | None = None,
    ) -> tuple[int | None, int | None]:
        key = ref_key(name)
        doc = canonical_json({"name": name, "counter": counter})
        for _ in range(self.max_commit_attempts):
            old, etag = await self._ref_doc(name)
            if old == counter:
                return old, counter  # no change (e.g. unpin when nothing is pinned): no audit entry
            try:
                if etag is None:
                    await self._put_if_absent(key, doc)
                else:
                    await self._put_if_match(key, doc, etag)
            except (Conflict, NotFound):
                continue  # someone moved it meanwhile: re-read and apply on top
            await self.append_audit(action, actor=actor, ref=name, old=old, new=counter,
                                    detail=detail)
            return old, counter
        raise Conflict(f"ref {name!r} kept moving; gave up after {self.max_commit_attempts} tries")

    async def set_ref(
        self, name: str, target: int | str, *, actor: str, action: str = "tag",
        detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Point ref `name` at a version (counter or another ref); returns the counter.
        `detail` goes into the audit entry (e.g. why a promotion happened)."""
        validate_ref_name(name)
        counter = await self.resolve(target)
        await self._move_ref(name, counter, actor=actor, action=action, detail=detail)
        return counter

    async def unset_ref(self, name: str, *, actor: str, action: str = "untag") -> int | None:
        old, _ = await self._move_ref(validate_ref_name(name), None, actor=actor, action=action)
        return old

    async def pin(self, target: int | str, *, actor: str) -> int:
        """Pin the serving version (rollback = pin an older one; history is never rewritten)."""
        return await self.set_ref(PIN_REF, target, actor=actor, action="pin")

    async def unpin(self, *, actor: str) -> int | None:
        return await self.unset_ref(PIN_REF, actor=actor, action="unpin")

    async def append_audit(
        self,
        action: str,
        *,
        actor: str,
        ref: str | None = None,
        old: int | None = None,
        new: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditEntry:
        if not actor or not isinstance(actor, str):
            raise ValueError(f"actor must be a non-empty str, got {actor!r}")
        detail = dict(detail or {})
        _check_json_able(detail, "detail")
        existing = [
            int(m.group(1)) for k in await self._list("audit/") if (m := _AUDIT_KEY_RE.match(k))
        ]
        n = max(existing, default=0) + 1
        for attempt in range(self.max_commit_attempts):
            body = {
                "n": n,
                "at": _timestamp(self.clock),
                "actor": actor,
                "action": action,
                "ref": ref,
                "old": old,
                "new": new,
                "detail": detail,
            }
            entry = AuditEntry(**body, entry_hash=sha256_hex(canonical_json(body)))  # type: ignore[arg-type]
            try:
                await self._put_if_absent(audit_key(n), canonical_json(entry.__dict__))
                return entry
            except Conflict:
                existing_obj = await self._get(audit_key(n))
                if existing_obj.data == canonical_json(entry.__dict__):
                    return entry
                n += 1
                await asyncio.sleep(self.race_backoff.delay(min(attempt, 6), self._rng))
        raise Conflict(f"audit append lost the race {self.max_commit_attempts} times")

    @staticmethod
    def _parse_audit(data: bytes, n: int) -> AuditEntry:
        try:
            doc = json.loads(data)
            if canonical_json(doc) != data:
                raise ValueError("not canonical")
            entry = AuditEntry(**doc)
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise Corrupt(f"audit entry {n}: {exc}") from None
        if entry.n != n or sha256_hex(canonical_json(entry.body())) != entry.entry_hash:
            raise Corrupt(f"audit entry {n}: hash or number mismatch")
        return entry

    async def log(self) -> builtins.list[AuditEntry]:
        """The audit log, oldest first (each entry hash-checked)."""
        ns = sorted(
            int(m.group(1)) for k in await self._list("audit/") if (m := _AUDIT_KEY_RE.match(k))
        )

        async def one(n: int) -> AuditEntry:
            return self._parse_audit((await self._get(audit_key(n))).data, n)

        return await self._gather(ns, one)

    # -- verification -----------------------------------------------------------------------------

    async def verify(self, *, check_blobs: bool = True) -> VerifyReport:
        """Walk the whole chain; every problem is listed, `first_bad` names the earliest version."""
        report = VerifyReport()
        keys = await self._list("versions/")
        counters: builtins.list[int] = []
        for k in keys:
            m = _VERSION_KEY_RE.match(k)
            if m is None or int(m.group(1)) == 0:
                report.problems.append(Problem(None, "stray_key", f"unexpected key {k!r}"))
            else:
                counters.append(int(m.group(1)))
        tip = max(counters, default=0)
        report.tip = tip or None
        present = set(counters)
        for c in range(1, tip + 1):
            if c not in present:
                report.problems.append(Problem(c, "missing_record", f"{version_key(c)} missing"))

        async def read(c: int) -> tuple[int, VersionRecord | Problem]:
            try:
                return c, VersionRecord.from_bytes(
                    (await self._get(version_key(c))).data, counter=c
                )
            except Corrupt as exc:
                return c, Problem(c, "record", str(exc))
            except NotFound:
                return c, Problem(c, "missing_record", f"{version_key(c)} vanished")

        results = dict(await self._gather(sorted(present), read))
        records: dict[int, VersionRecord] = {}
        for c in sorted(results):
            r = results[c]
            if isinstance(r, Problem):
                report.problems.append(r)
            else:
                records[c] = r
        for c, rec in sorted(records.items()):
            if c == 1 and rec.parent_hash is not None:
                report.problems.append(Problem(1, "parent_link", "first version has a parent"))
            elif c > 1 and (c - 1) in records and rec.parent_hash != records[c - 1].version_hash:
                report.problems.append(
                    Problem(c, "parent_link", f"parent_hash does not match version {c - 1}")
                )
        if check_blobs:
            blob_results = await self._gather(
                sorted(records.values(), key=lambda r: r.counter), self._check_blob
            )
            for rec, outcome in zip(
                sorted(records.values(), key=lambda r: r.counter), blob_results, strict=True
            ):
                if outcome == "collected":
                    report.collected.append(rec.counter)
                elif isinstance(outcome, Problem):
                    report.problems.append(outcome)
        report.checked = len(records)
        hint, _ = await self._head_hint()
        head_obj = await self._get_or_none(HEAD_KEY)
        if head_obj is not None:
            try:
                doc = json.loads(head_obj.data)
                if canonical_json(doc) != head_obj.data:
                    raise ValueError("not canonical")
                hc, hh = int(doc["counter"]), doc["version_hash"]
                if hc > tip:
                    report.problems.append(
                        Problem(
                            tip + 1, "truncated", f"HEAD names version {hc}, chain ends at {tip}"
                        )
                    )
                elif hc in records and records[hc].version_hash != hh:
                    report.problems.append(Problem(hc, "head", "HEAD hash does not match version"))
            except (ValueError, KeyError, TypeError):
                report.problems.append(Problem(None, "head", "HEAD hint is unreadable"))
        del hint
        for key in await self._list("refs/"):
            name = key[len("refs/") :]
            try:
                counter = await self.ref(name)
            except (Corrupt, ValueError) as exc:
                report.problems.append(Problem(None, "ref", f"{key}: {exc}"))
                continue
            if counter is not None and counter not in records:
                report.problems.append(Problem(None, "ref", f"ref {name!r} -> missing {counter}"))
        try:
            await self.log()
        except Corrupt as exc:
            report.problems.append(Problem(None, "audit", str(exc)))
        report.problems.sort(key=lambda p: (p.counter is None, p.counter or 0, p.kind))
        return report

    async def _check_blob(self, rec: VersionRecord) -> str | Problem:
        obj = await self._get_or_none(blob_key(rec.blob_sha256))
        if obj is None:
            tomb = await self._get_or_none(tombstone_key(rec.counter))
            if tomb is None:
                return Problem(rec.counter, "missing_blob", f"blob {rec.blob_sha256} missing")
            try:
                doc = json.loads(tomb.data)
                if canonical_json(doc) != tomb.data:
                    raise ValueError("not canonical")
                ok = (doc["counter"], doc["blob_sha256"], doc["version_hash"]) == (
                    rec.counter,
                    rec.blob_sha256,
                    rec.version_hash,
                )
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                return Problem(rec.counter, "missing_blob", "blob missing and tombstone invalid")
            return "collected"
        if len(obj.data) != rec.blob_size:
            return Problem(rec.counter, "blob_hash", f"size {len(obj.data)} != {rec.blob_size}")
        actual = await asyncio.to_thread(sha256_hex, obj.data)
        if actual != rec.blob_sha256:
            return Problem(rec.counter, "blob_hash", f"sha256 {actual} != {rec.blob_sha256}")
        return "ok"

    # -- garbage collection -----------------------------------------------------------------------

    # Blobs under objects/ that no record named at the last full scan (e.g. a commit that wrote
    # its blob and then failed): remembered so they do not force a full scan on every run.
    _gc_orphans: frozenset[str] = frozenset()

    async def gc(self, *, keep: int, execute: bool = False, actor: str = "gc") -> GcPlan:
        """Keep the last `keep` versions and every ref'd one; preview unless execute=True."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")

        def last_n(state: GcState) -> dict[int, tuple[str, ...]]:
            return {c: ("last",) for c in state.counters[-keep:]}

        return await self.collect(
            last_n, keep=keep, execute=execute, actor=actor, policy="keep_last", detail={}
        )

    async def collect(
        self,
        select: GcSelector,
        *,
        keep: int,
        execute: bool = False,
        actor: str = "gc",
        policy: str = "custom",
        detail: Mapping[str, Any] | None = None,
    ) -> GcPlan:
        """The one GC executor: keep what `select` names plus every ref'd version, collect the
        rest. Preview unless execute=True; executing writes a tombstone per collected version
        before its blob is deleted (so `verify` tells collected from lost), then one audit entry
        (`gc`, with `detail`, the policy, the collected versions and the blob count)."""
        plan = await self._gc_plan(select, keep, policy)
        if not execute or not plan.collect:
            return plan
        # Re-plan just before deleting so a ref set meanwhile still protects its version.
        plan = await self._gc_plan(select, keep, policy)
        if not plan.collect:
            return plan
        records = {r.counter: r for r in await self._gather(plan.collect, self.get)}
        doomed = set(plan.delete_blobs)
        for c in plan.collect:
            rec = records[c]
            tomb = canonical_json(
                {
                    "counter": c,
                    "blob_sha256": rec.blob_sha256,
                    "version_hash": rec.version_hash,
                    "collected_at": _timestamp(self.clock),
                    "actor": actor,
                }
            )
            with contextlib.suppress(Conflict):  # an earlier, interrupted GC already wrote it
                await self._put_if_absent(tombstone_key(c), tomb)
        for sha in sorted(doomed):
            await self._delete(blob_key(sha))
        audit = {**dict(detail or {}), "keep": keep}
        if policy != "keep_last":
            audit["policy"] = policy
        audit.update(collected=plan.collect, blobs=len(plan.delete_blobs))
        await self.append_audit("gc", actor=actor, detail=audit)
        return GcPlan(
            keep,
            plan.kept,
            plan.collect,
            plan.delete_blobs,
            executed=True,
            policy=policy,
            reasons=plan.reasons,
        )

    async def gc_state(self) -> GcState:
        """Read what a GC decides from; versions already collected are not read again."""
        counters = await self.counters()
        tomb_keys = await self._list("tombstones/")
        tombstoned = frozenset(
            int(k[len("tombstones/") : -len(".json")])
            for k in tomb_keys
            if re.fullmatch(r"tombstones/\d{10}\.json", k)
        )
        refs = await self.refs()
        present = frozenset(
            k[len("objects/") :] for k in await self._list("objects/") if k.startswith("objects/")
        )
        existing = set(counters)
        records = {
            r.counter: r
            for r in await self._gather([c for c in counters if c not in tombstoned], self.get)
        }
        # A present blob that no record read so far names: a tombstoned version whose blob an
        # interrupted GC left behind, or an orphan. Only then read the tombstoned records.
        named = {r.blob_sha256 for r in records.values()}
        unknown = present - named - self._gc_orphans
        if unknown:
            rest = [c for c in counters if c in tombstoned and c not in records]
            for r in await self._gather(rest, self.get):
                if r.blob_sha256 in present:
                    records[r.counter] = r
                named.add(r.blob_sha256)
            self._gc_orphans = frozenset((self._gc_orphans | unknown) - named)
        return GcState(
            counters=tuple(counters),
            records=records,
            tombstoned=tombstoned & existing,
            present_blobs=present,
            refs=refs,
            now=self.clock(),
        )

    async def _gc_plan(self, select: GcSelector, keep: int, policy: str) -> GcPlan:
        state = await self.gc_state()
        if not state.counters:
            return GcPlan(keep, [], [], [], policy=policy)
        existing = set(state.counters)
        reasons: dict[int, builtins.list[str]] = {}
        for c, why in select(state).items():
            if c in existing:
                reasons.setdefault(c, []).extend(why)
        for name, c in sorted(state.refs.items()):
            ref_reason = f"ref:{name}"
            if c in existing and ref_reason not in reasons.get(c, ()):
                reasons.setdefault(c, []).append(ref_reason)
        kept = sorted(reasons)
        # A kept version that was collected earlier may still share a blob with a live one.
        records = dict(state.records)
        missing = [c for c in kept if c not in records]
        for r in await self._gather(missing, self.get):
            records[r.counter] = r
        collect, blobs = plan_collection(records, kept, state.present_blobs)
        return GcPlan(
            keep,
            kept,
            collect,
            blobs,
            policy=policy,
            reasons={c: tuple(reasons[c]) for c in kept},
        )
