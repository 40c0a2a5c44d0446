"""The object store contract on all three backends, key validation, URLs, retry, moto probe."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path

import aioboto3
import pytest
from botocore.exceptions import ClientError

from storage.localstore import LocalStore
from storage.objectstore import Conflict, Invalid, MemoryStore, NotFound, ObjectStore, Unavailable
from storage.retry import RetryingStore, RetryPolicy, retry_call
from storage.s3store import S3Store
from storage.url import InvalidKey, InvalidURL, open_store, parse_store_url, validate_key
from tests.storage_fixtures import (
    CREDS,
    REGION,
    MotoServer,
    any_store,
    free_port,
    moto_server,
    new_bucket,
    s3_bucket,
)

REPO = str(Path(__file__).resolve().parents[1])
__all__ = ["any_store", "moto_server", "s3_bucket"]


async def test_moto_honours_conditional_put(moto_server: MotoServer, s3_bucket: str) -> None:
    """Probe: the server itself (not our wrapper) refuses If-None-Match:* and stale If-Match."""
    session = aioboto3.Session(region_name=REGION, **CREDS)
    async with session.client("s3", endpoint_url=moto_server.endpoint) as c:
        first = await c.put_object(Bucket=s3_bucket, Key="k", Body=b"1", IfNoneMatch="*")
        with pytest.raises(ClientError) as info:
            await c.put_object(Bucket=s3_bucket, Key="k", Body=b"2", IfNoneMatch="*")
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        await c.put_object(Bucket=s3_bucket, Key="k", Body=b"3", IfMatch=first["ETag"])
        with pytest.raises(ClientError) as info:
            await c.put_object(Bucket=s3_bucket, Key="k", Body=b"4", IfMatch=first["ETag"])
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        body = await (await c.get_object(Bucket=s3_bucket, Key="k"))["Body"].read()
        assert body == b"3"


async def test_store_contract(any_store: ObjectStore) -> None:
    s = any_store
    with pytest.raises(NotFound):
        await s.get("a/b.json")
    etag = await s.put_if_absent("a/b.json", b"one")
    got = await s.get("a/b.json")
    assert (got.data, got.etag) == (b"one", etag)
    with pytest.raises(Conflict):
        await s.put_if_absent("a/b.json", b"two")
    assert (await s.get("a/b.json")).data == b"one"
    with pytest.raises(Conflict):
        await s.put_if_match("a/b.json", b"two", "0" * 32)
    etag2 = await s.put_if_match("a/b.json", b"two", etag)
    assert etag2 != etag and (await s.get("a/b.json")).data == b"two"
    with pytest.raises(Conflict):
        await s.put_if_match("a/b.json", b"three", etag)  # stale etag
    with pytest.raises(NotFound):
        await s.put_if_match("a/missing", b"x", etag)
    await s.put_if_absent("a/c", b"")
    await s.put_if_absent("b", b"bee")
    assert await s.list() == ["a/b.json", "a/c", "b"]
    assert await s.list("a/") == ["a/b.json", "a/c"]
    assert await s.list("a/b") == ["a/b.json"]
    assert await s.list("zzz/") == []
    assert (await s.get("a/c")).data == b""
    await s.delete("a/b.json")
    await s.delete("a/b.json")  # deleting a missing key is fine
    with pytest.raises(NotFound):
        await s.get("a/b.json")
    assert await s.list() == ["a/c", "b"]


async def test_s3_lists_across_pages(moto_server: MotoServer, s3_bucket: str) -> None:
    store = S3Store(
        bucket=s3_bucket,
        prefix="many",
        endpoint_url=moto_server.endpoint,
        list_page_size=7,
        **CREDS,
    )
    keys = [f"k/{i:03d}" for i in range(30)]  # five pages of 7 (page size as S3's 1000, scaled)
    await asyncio.gather(*(store.put_if_absent(k, k.encode()) for k in keys))
    await store.put_if_absent("other", b"x")
    assert await store.list("k/") == keys
    assert await store.list() == [*keys, "other"]
    await store.aclose()


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "../up",
        "a/../b",
        "a//b",
        "a/",
        "a\\b",
        ".hidden",
        "a/.tmp/x",
        "sp ace",
        "é",
        "a" * 600,
        "a/./b",
    ],
)
def test_bad_keys_refused(key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)
    assert issubclass(InvalidKey, ValueError) and issubclass(InvalidKey, Invalid)


async def test_local_store_cannot_escape_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    for key in ("../escape", "/etc/passwd", "a/../../x", "a\\..\\x"):
        with pytest.raises(InvalidKey):
            await store.put_if_absent(key, b"x")
        with pytest.raises(InvalidKey):
            await store.get(key)
    with pytest.raises(InvalidKey):
        await store.list("../")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "x").exists()


async def test_local_store_hides_its_own_files_and_leaves_no_temp(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.put_if_absent("k", b"v")
    await store.put_if_match("k", b"w", (await store.get("k")).etag)
    with pytest.raises(Conflict):
        await store.put_if_absent("k", b"z")
    assert await store.list() == ["k"]
    assert list((tmp_path / ".tmp").iterdir()) == []


_RACE_WORKER = """
import asyncio, sys
from storage.localstore import LocalStore
from storage.objectstore import Conflict

async def main(root, worker, n, mode):
    store = LocalStore(root)
    if mode == "create":
        for i in range(n):
            try:
                await store.put_if_absent(f"slot/{i:04d}", str(worker).encode())
                print(i)
            except Conflict:
                pass
    else:
        done = 0
        while done < n:
            cur = await store.get("counter")
            try:
                await store.put_if_match("counter", str(int(cur.data) + 1).encode(), cur.etag)
                done += 1
            except Conflict:
                continue

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
"""


def _run_workers(root: str, n: int, mode: str, workers: int = 3) -> list[str]:
    # Plain interpreters that import only the store: real separate processes, cheap to start.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE_WORKER, root, str(w), str(n), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for w in range(workers)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out)
    return outs


def test_local_store_exclusive_create_and_cas_across_processes(tmp_path: Path) -> None:
    """Separate OS processes share one directory: one winner per key, no lost CAS increment."""
    root = str(tmp_path / "shared")
    LocalStore(root)
    outs = _run_workers(root, 60, "create")
    wins = sorted(int(line) for out in outs for line in out.split())
    assert wins == list(range(60))  # every slot has exactly one winner
    asyncio.run(LocalStore(root).put_if_absent("counter", b"0"))
    _run_workers(root, 40, "cas")
    assert asyncio.run(LocalStore(root).get("counter")).data == b"120"


def test_store_urls(tmp_path: Path) -> None:
    assert parse_store_url(f"file://{tmp_path}").path == str(tmp_path)
    assert parse_store_url("file://./var/store").path == "./var/store"
    u = parse_store_url(
        "s3://my-bucket/some/prefix?endpoint=http://127.0.0.1:9000&region=eu-west-1"
    )
    assert (u.bucket, u.prefix) == ("my-bucket", "some/prefix")
    assert u.options == {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}
    assert isinstance(open_store(f"file://{tmp_path}/s"), LocalStore)
    assert isinstance(open_store("memory://"), MemoryStore)
    s3 = open_store("s3://my-bucket/p?endpoint=http://127.0.0.1:1", **CREDS)
    assert isinstance(s3, S3Store) and s3.prefix == "p/"
    for bad in (
        "ftp://x",
        "nourl",
        "s3://B_ad/x",
        "s3://my-bucket/x?colour=red",
        "s3://my-bucket/../x",
        "file://",
    ):
        with pytest.raises(InvalidURL if "../" not in bad else Invalid):
            open_store(bad)


async def test_s3_unreachable_is_unavailable_and_retried() -> None:
    store = S3Store(
        bucket="no-such-host-bucket",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        connect_timeout_s=0.5,
        read_timeout_s=0.5,
        **CREDS,
    )
    with pytest.raises(Unavailable):
        await store.get("k")
    wrapped = RetryingStore(
        store, policy=RetryPolicy(attempts=3, base_delay_s=0.0, max_delay_s=0.0)
    )
    with pytest.raises(Unavailable):
        await wrapped.list()
    await wrapped.aclose()


async def test_s3_missing_bucket_is_invalid(moto_server: MotoServer) -> None:
    store = S3Store(bucket="never-created-bucket", endpoint_url=moto_server.endpoint, **CREDS)
    with pytest.raises(Invalid):
        await store.put_if_absent("k", b"v")
    await store.aclose()


async def test_retry_only_transient_errors() -> None:
    calls = {"n": 0}
    sleeps: list[float] = []

    async def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise Unavailable("blip")
        return "ok"

    async def fake_sleep(d: float) -> None:
        sleeps.append(d)

    policy = RetryPolicy(attempts=5, base_delay_s=0.1, max_delay_s=0.15)
    assert await retry_call(flaky, policy=policy, rng=random.Random(1), sleep=fake_sleep) == "ok"
    assert calls["n"] == 3 and len(sleeps) == 2 and all(0 <= d <= 0.15 for d in sleeps)

    async def conflict() -> str:
        calls["n"] += 1
        raise Conflict("precondition")

    calls["n"] = 0
    with pytest.raises(Conflict):
        await retry_call(conflict, policy=policy, sleep=fake_sleep)
    assert calls["n"] == 1  # a precondition failure is never retried blindly

    async def down() -> str:
        calls["n"] += 1
        raise Unavailable("down")

    calls["n"] = 0
    with pytest.raises(Unavailable):
        await retry_call(down, policy=policy, sleep=fake_sleep)
    assert calls["n"] == 5  # bounded


def test_retry_policy_validation() -> None:
    for kwargs in (
        {"attempts": 0},
        {"base_delay_s": -1.0},
        {"max_delay_s": 0.01},
        {"multiplier": 0.5},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            RetryPolicy(**kwargs)  # type: ignore[arg-type]
    rng = random.Random(0)
    delays = [RetryPolicy(base_delay_s=0.1, max_delay_s=1.0).delay(k, rng) for k in range(20)]
    assert max(delays) <= 1.0 and min(delays) >= 0.0


def test_moto_server_port_reuse() -> None:
    """The restart helper really binds the same port again (the outage test depends on it)."""
    server = MotoServer(free_port())
    server.start()
    bucket_ok = new_bucket(server)
    server.stop()
    server.start()
    new_bucket(server)
    server.stop()
    assert bucket_ok.startswith("t-")
