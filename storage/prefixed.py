"""One store seen under a key prefix: each named model's chain lives under `models/<name>/`.

A `VersionChain`, its lease and its retention run on a `PrefixedStore` exactly as on the root of
the store; they never see (or list) a key outside their prefix.
"""

from __future__ import annotations

import re

from storage.objectstore import Invalid, ObjectStore, StoredObject


class PrefixedStore(ObjectStore):
    """`inner` with every key under `prefix` (which ends in '/'); closing it leaves `inner`
    open (the store belongs to whoever opened it)."""

    def __init__(self, inner: ObjectStore, prefix: str) -> None:
        if not prefix.endswith("/") or prefix.startswith("/") or "//" in prefix:
            raise Invalid(f"a store prefix is 'a/b/', got {prefix!r}")
        self.inner = inner
        self.prefix = prefix

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _strip(self, key: str) -> str:
        return key[len(self.prefix) :]

    async def get(self, key: str) -> StoredObject:
        obj = await self.inner.get(self._key(key))
        return StoredObject(key, obj.data, obj.etag)

    async def put_if_absent(self, key: str, data: bytes) -> str:
        return await self.inner.put_if_absent(self._key(key), data)

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        return await self.inner.put_if_match(self._key(key), data, etag)

    async def list(self, prefix: str = "") -> list[str]:
        return [self._strip(k) for k in await self.inner.list(self._key(prefix))]

    async def list_sizes(self, prefix: str = "") -> dict[str, int]:
        sizes = await self.inner.list_sizes(self._key(prefix))
        return {self._strip(k): n for k, n in sizes.items()}

    async def delete(self, key: str) -> None:
        await self.inner.delete(self._key(key))


# A model's name: its chain lives under models/<name>/ and it labels every per-model metric.
MODEL_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
# The model whose chain is the store's root, so a store written before named models is served
# as `bs` unchanged.
ROOT_MODEL = "bs"


def model_prefix(name: str) -> str:
    """Where named model `name` keeps its chain."""
    return f"models/{name}/"


def is_model_name(name: str) -> bool:
    """Whether `name` is a model name: MODEL_NAME_PATTERN, the whole string."""
    return re.fullmatch(MODEL_NAME_PATTERN, name) is not None


def model_store(store: ObjectStore, name: str) -> ObjectStore:
    """The part of `store` that holds model `name`'s chain: the store itself for ROOT_MODEL,
    models/<name>/ for any other. A name not matching MODEL_NAME_PATTERN raises Invalid."""
    if not is_model_name(name):
        raise Invalid(f"a model name must match {MODEL_NAME_PATTERN}, got {name!r}")
    return store if name == ROOT_MODEL else PrefixedStore(store, model_prefix(name))
