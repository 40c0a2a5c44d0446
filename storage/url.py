"""Key validation and store URLs: `open_store("file:///srv/store")`, `open_store("s3://bucket/p")`.

Keys are checked once here, before any backend sees them, so that no key can leave the local root
(no '..', no absolute path, no backslash, no hidden segment) and every key is valid on S3 as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from storage.objectstore import Invalid, MemoryStore, ObjectStore

MAX_KEY_LEN = 512
# A segment never starts with '.', which reserves '.tmp' / '.lock' in LocalStore and rules out '..'.
_SEGMENT = r"[A-Za-z0-9_=+-][A-Za-z0-9._=+-]*"
_KEY_RE = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT})*$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._=+/-]*$")


class InvalidKey(Invalid, ValueError):
    """A key or list prefix breaks the key rules."""


class InvalidURL(Invalid, ValueError):
    """A store URL cannot be understood."""


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative key; raise InvalidKey naming it otherwise."""
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a str, got {type(key).__name__}")
    if not key or len(key) > MAX_KEY_LEN:
        raise InvalidKey(f"key length must be 1..{MAX_KEY_LEN}, got {len(key)}: {key[:80]!r}")
    if not _KEY_RE.match(key):
        raise InvalidKey(
            f"invalid key {key!r}: segments of [A-Za-z0-9._=+-] joined by '/', "
            "not starting with '.', no empty segment, no backslash"
        )
    return key


def validate_prefix(prefix: str) -> str:
    """A list prefix: any leading part of a valid key (may be empty or end with '/')."""
    if not isinstance(prefix, str):
        raise InvalidKey(f"prefix must be a str, got {type(prefix).__name__}")
    if len(prefix) > MAX_KEY_LEN or not _PREFIX_RE.match(prefix) or prefix.startswith("/"):
        raise InvalidKey(f"invalid list prefix {prefix!r}")
    if any(seg.startswith(".") for seg in prefix.split("/") if seg):
        raise InvalidKey(f"invalid list prefix {prefix!r}: a segment starts with '.'")
    return prefix


@dataclass(frozen=True)
class StoreURL:
    scheme: str  # "file" | "s3" | "memory"
    path: str = ""  # file: the root directory
    bucket: str = ""
    prefix: str = ""
    options: dict[str, str] = field(default_factory=dict)


_S3_QUERY = {"endpoint": "endpoint_url", "endpoint_url": "endpoint_url", "region": "region_name"}
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_store_url(url: str) -> StoreURL:
    """Parse file:///abs, file://./rel, s3://bucket/prefix?endpoint=...&region=..., memory://."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidURL(f"store url must look like scheme://..., got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return StoreURL(scheme="memory")
    if scheme == "file":
        if parts.query or parts.fragment:
            raise InvalidURL(f"file store url takes no query or fragment: {url!r}")
        # file:///abs and file://localhost/abs name an absolute path; file://./rel a relative one.
        if parts.netloc in ("", "localhost"):
            path = unquote(parts.path)
        else:
            path = unquote(parts.netloc + parts.path)
        if not path:
            raise InvalidURL(f"file store url has no path: {url!r}")
        return StoreURL(scheme="file", path=path)
    if scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET_RE.match(bucket):
            raise InvalidURL(f"invalid S3 bucket name {bucket!r} in {url!r}")
        prefix = unquote(parts.path).strip("/")
        if prefix:
            validate_key(prefix)
        options: dict[str, str] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name not in _S3_QUERY:
                raise InvalidURL(f"unknown s3 url option {name!r}; known: {sorted(_S3_QUERY)}")
            options[_S3_QUERY[name]] = value
        return StoreURL(scheme="s3", bucket=bucket, prefix=prefix, options=options)
    raise InvalidURL(f"unknown store scheme {parts.scheme!r} in {url!r}; use file, s3 or memory")


def open_store(url: str, **options: Any) -> ObjectStore:
    """Build the backend a URL names; `options` go to its constructor (keyword options win)."""
    parsed = parse_store_url(url)
    if parsed.scheme == "memory":
        if options:
            raise InvalidURL(f"memory store takes no options, got {sorted(options)}")
        return MemoryStore()
    if parsed.scheme == "file":
        from storage.localstore import LocalStore

        return LocalStore(Path(parsed.path), **options)
    from storage.s3store import S3Store

    merged: dict[str, Any] = {**parsed.options, **options}
    return S3Store(bucket=parsed.bucket, prefix=parsed.prefix, **merged)
