"""Object store interface, its error kinds, and the in-memory backend.

The local-directory and S3 backends live beside this interface (see `LocalStore`, `S3Store`).
Errors from any backend are translated once, at the boundary, into the few kinds below, which
say whether to retry (`Unavailable`) or to fix something (`Conflict`, `NotFound`, `Corrupt`,
`Invalid`).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
from dataclasses import dataclass


class StoreError(Exception):
    """Base of every object store error."""


class Conflict(StoreError):
    """A precondition failed: the key exists (put_if_absent) or its etag moved (put_if_match)."""


class NotFound(StoreError):
    """The key does not exist."""


class Unavailable(StoreError):
    """The store could not be reached or answered with a transient error; retrying may help."""


class Corrupt(StoreError):
    """Stored bytes fail an integrity check."""


class Invalid(StoreError):
    """The request itself is wrong (bad key, bad URL, bad credentials); retrying will not help."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    data: bytes
    etag: str


class ObjectStore(abc.ABC):
    """A small async key -> bytes store with conditional writes."""

    @abc.abstractmethod
    async def get(self, key: str) -> StoredObject:
        """Return the object; raise NotFound."""

    @abc.abstractmethod
    async def put_if_absent(self, key: str, data: bytes) -> str:
        """Create `key`; raise Conflict if it exists. Returns the new etag."""

    @abc.abstractmethod
    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        """Replace `key` only if its current etag is `etag`; raise Conflict (or NotFound)."""

    @abc.abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """All keys under `prefix`, sorted (backends page internally)."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove `key`; deleting a missing key is not an error."""

    async def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """Every key under `prefix` -> its size in bytes (for accounting; a key deleted meanwhile
        is left out). Backends answer from their listing; this fallback reads each object."""
        out: dict[str, int] = {}
        for key in await self.list(prefix):
            try:
                out[key] = len((await self.get(key)).data)
            except NotFound:
                continue
        return out

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def _etag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class MemoryStore(ObjectStore):
    """In-process store for unit tests; same semantics as the real backends."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = asyncio.Lock()

    async def get(self, key: str) -> StoredObject:
        try:
            data = self._objects[key]
        except KeyError:
            raise NotFound(key) from None
        return StoredObject(key, data, _etag(data))

    async def put_if_absent(self, key: str, data: bytes) -> str:
        async with self._lock:
            if key in self._objects:
                raise Conflict(f"{key} exists")
            self._objects[key] = bytes(data)
        return _etag(data)

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        async with self._lock:
            current = self._objects.get(key)
            if current is None:
                raise NotFound(key)
            if _etag(current) != etag:
                raise Conflict(f"{key} etag moved")
            self._objects[key] = bytes(data)
        return _etag(data)

    async def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self._objects if k.startswith(prefix))

    async def list_sizes(self, prefix: str = "") -> dict[str, int]:
        return {k: len(v) for k, v in sorted(self._objects.items()) if k.startswith(prefix)}

    async def delete(self, key: str) -> None:
        self._objects.pop(key, None)
