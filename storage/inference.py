"""InferenceClient: keep a loaded model for a pinned version or track the chain's newest one.

A new version is downloaded, hash-checked and built by `loader` in a worker thread into a fresh
object; `current` is then replaced by one reference assignment, so a reader sees either the old
`Loaded` or the new one, never a half-built model. Failures keep the last good version serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from spectral_core.snapshot import Snapshot
from storage.chain import Clock, VersionChain, VersionRecord, utc_now, validate_ref_name
from storage.objectstore import Corrupt
from storage.promotion import SERVING_REF, is_assessed
from storage.tasks import cancel_and_wait

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pinned:
    """Serve exactly this version: a counter, or a ref name followed as it moves."""

    target: int | str

    def __post_init__(self) -> None:
        t = self.target
        if isinstance(t, bool) or not isinstance(t, int | str):
            raise ValueError(f"pinned target must be a counter or ref name, got {t!r}")
        if isinstance(t, int) and t < 1:
            raise ValueError(f"pinned counter must be >= 1, got {t}")
        if isinstance(t, str):
            validate_ref_name(t)

    def __str__(self) -> str:
        return f"pinned:{self.target}"


@dataclass(frozen=True)
class Tracking:
    """Serve the promoted version: the `serving` ref (storage/promotion.py), which moves only to
    versions that passed the quality gate. On a chain written before promotion existed (no
    `serving` ref, and HEAD carries no quality report) serve HEAD, as then."""

    def __str__(self) -> str:
        return "tracking"


Mode = Pinned | Tracking


@dataclass(frozen=True)
class Loaded(Generic[T]):
    value: T
    record: VersionRecord
    mode: str
    since: datetime


class InferenceClient(Generic[T]):
    def __init__(
        self,
        chain: VersionChain,
        *,
        loader: Callable[[Snapshot, VersionRecord], T],
        mode: Mode | None = None,
        poll_interval: float = 5.0,
        max_backoff: float = 60.0,
        clock: Clock = utc_now,
        cache_size: int = 4,
        seed: int | None = None,
        on_failure: Callable[[str], None] | None = None,
        on_swap: Callable[[Loaded[T]], None] | None = None,
    ) -> None:
        """`on_failure(kind)` is called for each failed poll: "corrupt" (a version refused by
        its integrity check) or the exception's name ("Unavailable", ...), e.g. to count it.
        `on_swap(loaded)` is called after each swap to a new version."""
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        if not max_backoff >= poll_interval:
            raise ValueError(f"max_backoff ({max_backoff}) must be >= poll_interval")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.chain = chain
        self.loader = loader
        self.mode: Mode = mode if mode is not None else Tracking()
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self.clock = clock
        self.cache_size = cache_size
        self._current: Loaded[T] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._refresh_lock = asyncio.Lock()
        self._cache: OrderedDict[int, Loaded[T]] = OrderedDict()
        self._rng = random.Random(seed)
        self.polls = 0
        self.loads_ok = 0
        self.load_failures = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None
        # why nothing is wanted yet, for the 503 detail (None once a version is wanted)
        self.waiting: str | None = "no model version has been committed yet"
        # Versions whose blob failed its integrity check, by version_hash -> (counter, reason).
        # Bytes under a content hash never heal, so they are not downloaded again; each poll that
        # still wants one is refused at once (and counted) until a newer good version appears.
        self.rejected: dict[str, tuple[int, str]] = {}
        self.on_failure = on_failure
        self.on_swap = on_swap

    @property
    def current(self) -> Loaded[T] | None:
        return self._current

    # -- loading ----------------------------------------------------------------------------------

    async def _build(self, record: VersionRecord, mode: str) -> Loaded[T]:
        known_bad = self.rejected.get(record.version_hash)
        if known_bad is not None:
            raise Corrupt(f"version {record.counter} refused earlier: {known_bad[1]}")
        try:
            # size + SHA-256 checked before decoding
            snapshot = await self.chain.load_record(record)
        except Corrupt as exc:
            self.rejected[record.version_hash] = (record.counter, str(exc))
            log.error("version %d is corrupt; keeping the current model: %s", record.counter, exc)
            raise
        value = await asyncio.to_thread(self.loader, snapshot, record)
        return Loaded(value=value, record=record, mode=mode, since=self.clock())

    async def _wanted(self) -> VersionRecord | None:
        mode = self.mode
        if isinstance(mode, Tracking):
            counter = await self.chain.ref(SERVING_REF)
            if counter is not None:
                self.waiting = None
                return await self.chain.get(counter)
            head = await self.chain.head()
            if head is None:
                self.waiting = "no model version has been committed yet"
                return None
            if is_assessed(head):
                # assessed versions exist but none was promoted yet
                self.waiting = (f"no version has passed the promotion gate yet (HEAD is version "
                                f"{head.counter}; the refusals are in the chain's audit log)")
                return None
            self.waiting = None
            return head
        counter = await self.chain.resolve(mode.target)
        self.waiting = None
        return await self.chain.get(counter)

    async def refresh(self) -> bool:
        """One poll: load and swap in the wanted version if it differs. Raises on failure."""
        async with self._refresh_lock:
            self.polls += 1
            mode = self.mode
            record = await self._wanted()
            cur = self._current
            if record is None:
                return False
            if cur is not None and cur.record.version_hash == record.version_hash:
                if cur.mode != str(mode):
                    self._current = Loaded(cur.value, cur.record, str(mode), cur.since)
                return False
            loaded = await self._build(record, str(mode))
            if mode != self.mode:
                return False  # the mode changed while loading; the next poll loads the right one
            self._current = loaded  # the single swap readers can observe
            self.loads_ok += 1
            log.info("serving version %d (%s)", record.counter, mode)
            if self.on_swap is not None:
                try:
                    self.on_swap(loaded)
                except Exception:  # a broken callback must not undo the swap
                    log.exception("model swap callback failed")
            return True

    async def _poll_once(self) -> None:
        try:
            await self.refresh()
        except Corrupt as exc:
            # Not transient: backing off would only delay picking up the next good version.
            self.load_failures += 1
            self.consecutive_failures = 0  # the store answered
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.last_error_at = self.clock()
            self._report("corrupt")
        except Exception as exc:  # keep serving the last good version; report and back off
            self.load_failures += 1
            self.consecutive_failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.last_error_at = self.clock()
            log.warning("model refresh failed (%d in a row): %s", self.consecutive_failures, exc)
            self._report(type(exc).__name__)
        else:
            self.consecutive_failures = 0

    def _report(self, kind: str) -> None:
        if self.on_failure is not None:
            try:
                self.on_failure(kind)
            except Exception:  # a broken callback must not stop polling
                log.exception("model refresh failure callback failed")

    def _next_delay(self) -> float:
        if self.consecutive_failures == 0:
            return self.poll_interval
        cap = min(self.max_backoff, self.poll_interval * 2 ** min(self.consecutive_failures, 30))
        return self._rng.uniform(self.poll_interval, max(cap, self.poll_interval))

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._next_delay())
            self._wake.clear()
            await self._poll_once()

    # -- control ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """First load attempt (errors recorded, not raised), then poll in the background."""
        if self._task is not None:
            raise RuntimeError("InferenceClient already started")
        await self._poll_once()
        self._task = asyncio.create_task(self._loop(), name="inference-client-poll")

    def set_pin(self, target: int | str) -> None:
        self.mode = Pinned(target)
        self._wake.set()

    def poke(self) -> None:
        """Poll now (e.g. the serving ref just moved), not at the next interval."""
        self._wake.set()

    def track(self) -> None:
        self.mode = Tracking()
        self._wake.set()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def load_version(self, counter: int) -> Loaded[T]:
        """Load one exact version (to reproduce an old answer); a small LRU cache keeps a few."""
        cur = self._current
        if cur is not None and cur.record.counter == counter:
            return cur
        hit = self._cache.get(counter)
        if hit is not None:
            self._cache.move_to_end(counter)
            return hit
        loaded = await self._build(await self.chain.get(counter), f"version:{counter}")
        if self.cache_size:
            self._cache[counter] = loaded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return loaded
