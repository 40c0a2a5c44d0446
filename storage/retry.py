"""Bounded exponential backoff with full jitter for transient store errors.

Only `Unavailable` is retried: a precondition failure (`Conflict`), a missing key, a bad request or
corrupt bytes will not change by asking again, so those are raised at once to the caller, which
knows whether re-reading and trying again is meaningful (e.g. the version chain on a lost race).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from storage.objectstore import ObjectStore, StoredObject, Unavailable

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """attempts: total tries (1 = no retry); delay before retry k (0-based) is
    uniform(0, min(max_delay_s, base_delay_s * multiplier**k))."""

    attempts: int = 5
    base_delay_s: float = 0.1
    max_delay_s: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or not 1 <= self.attempts <= 100:
            raise ValueError(f"attempts must be an int in 1..100, got {self.attempts!r}")
        if not self.base_delay_s >= 0.0:
            raise ValueError(f"base_delay_s must be >= 0, got {self.base_delay_s!r}")
        if not self.max_delay_s >= self.base_delay_s:
            raise ValueError(
                f"max_delay_s ({self.max_delay_s!r}) must be >= "
                f"base_delay_s ({self.base_delay_s!r})"
            )
        if not self.multiplier >= 1.0:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier!r}")

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (0-based), full jitter."""
        cap = min(self.max_delay_s, self.base_delay_s * self.multiplier ** min(retry, 60))
        return rng.uniform(0.0, cap)


NO_RETRY = RetryPolicy(attempts=1, base_delay_s=0.0, max_delay_s=0.0)


async def retry_call(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    what: str = "store call",
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Await `fn()`, retrying `Unavailable` up to `policy.attempts` tries in total."""
    rng = rng or random.Random()
    for attempt in range(policy.attempts):
        try:
            return await fn()
        except Unavailable as exc:
            if attempt + 1 >= policy.attempts:
                raise
            delay = policy.delay(attempt, rng)
            log.debug("%s unavailable (%s); retry %d in %.3fs", what, exc, attempt + 1, delay)
            await sleep(delay)
    raise AssertionError("unreachable")  # the loop either returns or raises


class RetryingStore(ObjectStore):
    """Wraps a backend so that every call retries transient errors under one policy."""

    def __init__(self, inner: ObjectStore, *, policy: RetryPolicy, seed: int | None = None) -> None:
        self.inner = inner
        self.policy = policy
        self._rng = random.Random(seed)

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        return await retry_call(fn, policy=self.policy, what=what, rng=self._rng)

    async def get(self, key: str) -> StoredObject:
        return await self._call(f"get {key}", lambda: self.inner.get(key))

    async def put_if_absent(self, key: str, data: bytes) -> str:
        return await self._call(f"put_if_absent {key}", lambda: self.inner.put_if_absent(key, data))

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        return await self._call(
            f"put_if_match {key}", lambda: self.inner.put_if_match(key, data, etag)
        )

    async def list(self, prefix: str = "") -> list[str]:
        return await self._call(f"list {prefix}", lambda: self.inner.list(prefix))

    async def list_sizes(self, prefix: str = "") -> dict[str, int]:
        return await self._call(f"list_sizes {prefix}", lambda: self.inner.list_sizes(prefix))

    async def delete(self, key: str) -> None:
        await self._call(f"delete {key}", lambda: self.inner.delete(key))

    async def aclose(self) -> None:
        await self.inner.aclose()
