"""S3 (or any S3-protocol server) through aioboto3, with conditional PutObject.

put_if_absent sends `If-None-Match: *`, put_if_match sends `If-Match: <etag>`. botocore's own
retries are switched off so that `storage.retry` is the one retry layer; every botocore / network
error is translated here, once, into Conflict / NotFound / Unavailable / Corrupt / Invalid.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from storage.objectstore import (
    Conflict,
    Corrupt,
    Invalid,
    NotFound,
    ObjectStore,
    StoredObject,
    StoreError,
    Unavailable,
)
from storage.url import validate_key, validate_prefix

_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_TRANSIENT = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "OperationAborted",
    "500",
    "502",
    "503",
    "504",
}
_CORRUPT = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}


def map_s3_error(exc: BaseException, what: str) -> StoreError:
    """Translate a botocore / transport error into the store's error kinds."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        detail = f"{what}: {code or status} {err.get('Message', '')}".strip()
        if code in _CONFLICT or status in (409, 412):
            return Conflict(detail)
        if code in _NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
            return NotFound(detail)
        if code in _CORRUPT:
            return Corrupt(detail)
        if code in _TRANSIENT or status >= 500 or status == 429:
            return Unavailable(detail)
        return Invalid(detail)  # NoSuchBucket, AccessDenied, bad signature, other 4xx
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | ParamValidationError):
        return Invalid(f"{what}: {exc}")
    if isinstance(exc, BotoConnectionError | HTTPClientError | BotoCoreError):
        return Unavailable(f"{what}: {exc}")
    if isinstance(exc, OSError | asyncio.TimeoutError):
        return Unavailable(f"{what}: {type(exc).__name__}: {exc}")
    return Unavailable(f"{what}: unexpected {type(exc).__name__}: {exc}")


def _strip_etag(etag: str) -> str:
    return etag.strip('"')


class S3Store(ObjectStore):
    """Objects under `s3://bucket/prefix/`; the client opens on the loop that first uses it."""

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_pool_connections: int = 10,
        list_page_size: int = 1000,
    ) -> None:
        if not bucket:
            raise Invalid("bucket must be non-empty")
        if (aws_access_key_id is None) != (aws_secret_access_key is None):
            raise Invalid("aws_access_key_id and aws_secret_access_key must be given together")
        if connect_timeout_s <= 0 or read_timeout_s <= 0:
            raise Invalid(f"timeouts must be > 0, got {connect_timeout_s}, {read_timeout_s}")
        if not 1 <= list_page_size <= 1000:
            raise Invalid(f"list_page_size must be in 1..1000, got {list_page_size}")
        self.list_page_size = list_page_size
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self._session = aioboto3.Session(
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            region_name=region_name or "us-east-1",
        )
        self._config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_pool_connections,
        )
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._open_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, url={self.endpoint_url!r})"

    async def _c(self) -> Any:
        if self._client is None:
            async with self._open_lock:
                if self._client is None:
                    stack = AsyncExitStack()
                    client_cm = self._session.client(
                        "s3", endpoint_url=self.endpoint_url, config=self._config
                    )
                    try:
                        self._client = await stack.enter_async_context(client_cm)
                    except Exception as exc:
                        await stack.aclose()
                        raise map_s3_error(exc, "open S3 client") from exc
                    self._stack = stack
        return self._client

    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    async def get(self, key: str) -> StoredObject:
        full = self._full(key)
        client = await self._c()
        try:
            resp = await client.get_object(Bucket=self.bucket, Key=full)
            async with resp["Body"] as body:
                data = await body.read()
        except Exception as exc:
            raise map_s3_error(exc, f"get {full}") from exc
        expected = resp.get("ContentLength")
        if expected is not None and expected != len(data):
            raise Unavailable(f"get {full}: short read {len(data)} of {expected} bytes")
        return StoredObject(key, data, _strip_etag(resp["ETag"]))

    async def _put(self, key: str, data: bytes, **condition: str) -> str:
        full = self._full(key)
        client = await self._c()
        try:
            resp = await client.put_object(
                Bucket=self.bucket, Key=full, Body=bytes(data), **condition
            )
        except Exception as exc:
            raise map_s3_error(exc, f"put {full}") from exc
        return _strip_etag(resp["ETag"])

    async def put_if_absent(self, key: str, data: bytes) -> str:
        return await self._put(key, data, IfNoneMatch="*")

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        if not etag:
            raise Invalid(f"put_if_match {key}: empty etag")
        return await self._put(key, data, IfMatch=f'"{_strip_etag(etag)}"')

    async def list(self, prefix: str = "") -> list[str]:
        return sorted(await self._list_objects(prefix))

    async def list_sizes(self, prefix: str = "") -> dict[str, int]:
        return dict(sorted((await self._list_objects(prefix)).items()))

    async def _list_objects(self, prefix: str) -> dict[str, int]:
        """key -> size (ListObjectsV2 returns both)."""
        full = self.prefix + validate_prefix(prefix)
        client = await self._c()
        out: dict[str, int] = {}
        try:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": self.list_page_size}
            ):
                for obj in page.get("Contents", ()):
                    out[obj["Key"][len(self.prefix) :]] = int(obj.get("Size", 0))
        except Exception as exc:
            raise map_s3_error(exc, f"list {full}") from exc
        return out

    async def delete(self, key: str) -> None:
        full = self._full(key)
        client = await self._c()
        try:
            await client.delete_object(Bucket=self.bucket, Key=full)
        except Exception as exc:
            err = map_s3_error(exc, f"delete {full}")
            if not isinstance(err, NotFound):
                raise err from exc

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()
