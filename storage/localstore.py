"""A directory as an object store, safe for several processes sharing it.

A write goes to a temp file under `<root>/.tmp`, is fsynced, then put in place: `os.link` for
put_if_absent (atomic create that fails if the key exists, like O_EXCL), `os.replace` under an
exclusive `fcntl.flock` on `<root>/.lock` for compare-and-swap. The directory is fsynced before
the write is acknowledged. All file I/O runs in a worker thread (asyncio.to_thread).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.objectstore import (
    Conflict,
    Invalid,
    NotFound,
    ObjectStore,
    StoredObject,
    StoreError,
    Unavailable,
)
from storage.url import validate_key, validate_prefix

_TMP = ".tmp"
_LOCK = ".lock"
# Errors a retry may cure (disk full, I/O hiccup, too many open files, NFS stale handle).
_TRANSIENT = {
    errno.ENOSPC,
    errno.EIO,
    errno.EMFILE,
    errno.ENFILE,
    errno.EAGAIN,
    errno.ESTALE,
    errno.EINTR,
    errno.EDQUOT,
}


def _etag(data: bytes) -> str:
    # Same etag as MemoryStore and single-part S3 objects: the MD5 of the content.
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _map_os_error(exc: OSError, key: str) -> StoreError:
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return NotFound(key)
    if isinstance(exc, PermissionError):
        return Invalid(f"permission denied on {key!r}: {exc}")
    if exc.errno in _TRANSIENT:
        return Unavailable(f"local store I/O error on {key!r}: {exc}")
    return Unavailable(f"local store error on {key!r}: {exc}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(ObjectStore):
    """Keys map to files under `root`; `root` is created if missing (unless create=False)."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True, fsync: bool = True):
        self.root = Path(root).absolute()
        self._fsync = fsync
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise Invalid(f"local store root {str(self.root)!r} is not a directory")
        (self.root / _TMP).mkdir(exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # flock on a fresh open file description excludes other threads and other processes alike.
        fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _write_temp(self, data: bytes) -> Path:
        tmp = self.root / _TMP / f"{uuid.uuid4().hex}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def _sync_parent(self, path: Path) -> None:
        if self._fsync:
            _fsync_dir(path.parent)

    # -- blocking bodies, run in a worker thread -------------------------------------------------

    def _get_sync(self, key: str, path: Path) -> StoredObject:
        data = path.read_bytes()
        return StoredObject(key, data, _etag(data))

    def _put_if_absent_sync(self, key: str, path: Path, data: bytes) -> str:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise Invalid(f"key {key!r} lies under an existing object") from None
        tmp = self._write_temp(data)
        try:
            os.link(tmp, path)  # atomic create-if-absent: fails with EEXIST if the key is there
        except FileExistsError:
            raise Conflict(f"{key} exists") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._sync_parent(path)
        return _etag(data)

    def _put_if_match_sync(self, key: str, path: Path, data: bytes, etag: str) -> str:
        tmp = self._write_temp(data)
        try:
            with self._locked():
                try:
                    current = path.read_bytes()
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                    raise NotFound(key) from None
                if _etag(current) != etag:
                    raise Conflict(f"{key} etag moved")
                os.replace(tmp, path)
                self._sync_parent(path)
        finally:
            tmp.unlink(missing_ok=True)
        return _etag(data)

    def _delete_sync(self, key: str, path: Path) -> None:
        with self._locked():
            try:
                path.unlink()
            except FileNotFoundError:
                return
            self._sync_parent(path)

    def _list_sync(self, prefix: str) -> list[str]:
        return sorted(key for key, _ in self._walk_sync(prefix))

    def _walk_sync(self, prefix: str, *, sizes: bool = False) -> Iterator[tuple[str, int]]:
        """(key, size) under `prefix`; size is -1 unless `sizes` (a stat per file)."""
        # Walk only the deepest directory the prefix names.
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root / base_rel if base_rel else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not key.startswith(prefix):
                    continue
                if not sizes:
                    yield key, -1
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue  # deleted meanwhile
                yield key, size

    def _list_sizes_sync(self, prefix: str) -> dict[str, int]:
        return dict(sorted(self._walk_sync(prefix, sizes=True)))

    # -- async interface -------------------------------------------------------------------------

    async def get(self, key: str) -> StoredObject:
        path = self._path(key)
        try:
            return await asyncio.to_thread(self._get_sync, key, path)
        except OSError as exc:
            raise _map_os_error(exc, key) from exc

    async def put_if_absent(self, key: str, data: bytes) -> str:
        path = self._path(key)
        try:
            return await asyncio.to_thread(self._put_if_absent_sync, key, path, bytes(data))
        except OSError as exc:
            raise _map_os_error(exc, key) from exc

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        path = self._path(key)
        try:
            return await asyncio.to_thread(self._put_if_match_sync, key, path, bytes(data), etag)
        except OSError as exc:
            raise _map_os_error(exc, key) from exc

    async def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        try:
            return await asyncio.to_thread(self._list_sync, prefix)
        except OSError as exc:
            raise _map_os_error(exc, prefix) from exc

    async def list_sizes(self, prefix: str = "") -> dict[str, int]:
        validate_prefix(prefix)
        try:
            return await asyncio.to_thread(self._list_sizes_sync, prefix)
        except OSError as exc:
            raise _map_os_error(exc, prefix) from exc

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(self._delete_sync, key, path)
        except OSError as exc:
            raise _map_os_error(exc, key) from exc
