"""Shared storage fixtures: a real S3-protocol server (moto, server mode), stores, snapshots.

Import the fixtures you use into a test module (`from tests.storage_fixtures import ...`).
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from spectral_core.snapshot import Snapshot
from storage.chain import blob_key
from storage.localstore import LocalStore
from storage.objectstore import MemoryStore, ObjectStore, StoredObject
from storage.s3store import S3Store


class DelegatingStore(ObjectStore):
    """A real store underneath for tests that need a store with a twist (gated, failing,
    yielding, counting): every call awaits `_enter(op, key)` first, a no-op here, then goes
    to `inner`. A test store overrides the hook, or the one call it changes. `list_sizes` and
    `aclose` keep ObjectStore's defaults (sizes read through this wrapper; inner not closed)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner

    async def _enter(self, op: str, key: str) -> None:
        return None

    async def get(self, key: str) -> StoredObject:
        await self._enter("get", key)
        return await self.inner.get(key)

    async def put_if_absent(self, key: str, data: bytes) -> str:
        await self._enter("put_if_absent", key)
        return await self.inner.put_if_absent(key, data)

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        await self._enter("put_if_match", key)
        return await self.inner.put_if_match(key, data, etag)

    async def list(self, prefix: str = "") -> list[str]:
        await self._enter("list", prefix)
        return await self.inner.list(prefix)

    async def delete(self, key: str) -> None:
        await self._enter("delete", key)
        await self.inner.delete(key)


CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's threaded S3 server on a fixed port, so it can be stopped and restarted in place."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def create_bucket(self, name: str) -> None:
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, **CREDS)
        client.create_bucket(Bucket=name)
        client.close()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer(free_port())
    server.start()
    yield server
    server.stop()


def new_bucket(moto: MotoServer) -> str:
    name = f"t-{uuid.uuid4().hex[:20]}"
    moto.create_bucket(name)
    return name


def s3_store(moto: MotoServer, bucket: str, prefix: str = "chain") -> S3Store:
    return S3Store(
        bucket=bucket, prefix=prefix, endpoint_url=moto.endpoint, region_name=REGION, **CREDS
    )


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> str:
    return new_bucket(moto_server)


@pytest.fixture(params=["memory", "local", "s3"])
async def any_store(
    request: pytest.FixtureRequest, tmp_path: Path, moto_server: MotoServer
) -> AsyncIterator[ObjectStore]:
    """Each backend in turn, so one test checks that all three keep the same contract."""
    store: ObjectStore
    if request.param == "memory":
        store = MemoryStore()
    elif request.param == "local":
        store = LocalStore(tmp_path / "store")
    else:
        store = s3_store(moto_server, new_bucket(moto_server))
    yield store
    await store.aclose()


def make_snapshot(seed: int, *, size: int = 8, step: int = 0) -> Snapshot:
    """A small synthetic Snapshot from real tensors of every dtype the checkpoint supports."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "layer.weight": torch.randn(size, size, generator=g, dtype=torch.float32),
        "layer.bias64": torch.randn(size, generator=g, dtype=torch.float64),
        "cw": torch.randn(size, 3, generator=g, dtype=torch.complex64),
        "cw128": torch.randn(2, size, generator=g, dtype=torch.complex128),
        "counts": torch.randint(-(2**40), 2**40, (size,), generator=g, dtype=torch.int64),
        "rng_state": torch.randint(0, 256, (16,), generator=g, dtype=torch.uint8),
    }
    meta = {"step": step, "seed": seed, "config_fingerprint": f"fp-{seed % 3}", "note": "synthetic"}
    return Snapshot(tensors=tensors, meta=meta)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    # reshape(-1) first: a 0-dim tensor cannot be viewed as bytes.
    ab = a.contiguous().reshape(-1).view(torch.uint8)
    bb = b.contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(ab, bb))


async def rot_blob(store: ObjectStore, blob_sha256: str) -> None:
    """Bit rot in a stored checkpoint blob: its last byte flipped in place (never a no-op)."""
    key = blob_key(blob_sha256)
    blob = await store.get(key)
    await store.put_if_match(key, blob.data[:-1] + bytes([blob.data[-1] ^ 0xFF]), blob.etag)
