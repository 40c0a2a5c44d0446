"""Version-chain speed: commit latency and a full verify, on a LocalStore and on S3 (moto).

`python -m bench.storage [--commits N] [--versions N] [--backends local,s3] [--s3-endpoint URL]`

Commits: a default-config `Trainer` (`CoreConfig()`) is trained one step between snapshots, so
every checkpoint is a real one of the default model size (parameters, Adam moments, RNG state)
and every blob differs, as in a training run; the snapshots are taken before any timing. Each
backend gets a fresh store (LocalStore in a temporary directory, fsync on, as served; a new
bucket on S3) and one long-lived `VersionChain`, as the training worker holds one. One untimed
warm-up commit opens the client and the directories; then each of `--commits` calls of
`VersionChain.commit` (encode, SHA-256, blob put-if-absent, HEAD read, version create, HEAD CAS)
is timed on its own with a monotonic clock. p50 is the median, p99 numpy's linear percentile.

Verify: a chain of `--versions` versions (1,000 by default; the `verify_1000_s_*` keys hold the
time for whatever `--versions` says) is written straight to the store: genuine version records
(hash-linked, canonical bytes), distinct blobs, HEAD, written concurrently, since building it
through commit would take minutes and is not what is measured. `--verify-blob small` (default)
uses a small synthetic checkpoint per version (see `verify_blob_bytes`), `real` the default
model's checkpoint with its meta varied per version (1,000 x ~0.56 MB). The local chain is
written without fsync (writing is not timed). Then a fresh store and `VersionChain` run
`verify(check_blobs=True)` once, timed: list, every record read and hash-checked, every parent
link, every blob read and SHA-256'd, HEAD, refs, audit log.

S3 is moto's server started as a child process on loopback (its own interpreter, so that the
server does not share this process's GIL), unless `--s3-endpoint` names a running one. Local
disk and a local moto say nothing about a real S3's latency; they show the client-side cost and
the number of round trips. Everything is bounded: argument ranges, `--timeout-s` per backend.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import emit
from spectral_core.config import CoreConfig
from spectral_core.snapshot import Snapshot
from spectral_core.trainer import Trainer
from storage.chain import HEAD_KEY, VersionChain, VersionRecord, blob_key, version_key
from storage.checkpoint import canonical_json, encode_checkpoint, sha256_hex
from storage.localstore import LocalStore
from storage.objectstore import ObjectStore
from storage.s3store import S3Store

BACKENDS = ("local", "s3")
REGION = "us-east-1"
CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
MESSAGE = "step {step} loss {loss} batch {batch}"  # the default commit message template
_WRITE_CONCURRENCY = 16
_MAX_COMMITS = 10_000
_MAX_VERSIONS = 100_000


# -- snapshots ------------------------------------------------------------------------------------


def training_snapshots(n: int) -> tuple[list[tuple[Snapshot, dict[str, Any]]], int]:
    """n + 1 (snapshot, metrics) of the default model, one training step apart; the checkpoint
    size in bytes."""
    from server.worker import committable_snapshot  # what the worker commits (strict-JSON meta)

    out: list[tuple[Snapshot, dict[str, Any]]] = []
    with Trainer(CoreConfig()) as trainer:
        for _ in range(n + 1):
            last = trainer.train(steps=1)
            metrics = {
                "step": trainer.global_step,
                "loss": None if last is None else float(last.loss),
                "batch": trainer.global_step,
            }
            out.append((committable_snapshot(trainer), metrics))
    return out, len(encode_checkpoint(out[0][0]))


def _small_snapshot(i: int) -> Snapshot:
    g = torch.Generator().manual_seed(i)
    return Snapshot(
        tensors={"w": torch.randn(16, 16, generator=g), "b": torch.randn(16, generator=g)},
        meta={"global_step": i, "bench": "storage"},
    )


def _blob_maker(kind: str, real: Snapshot | None) -> Callable[[int], bytes]:
    if kind == "small":
        return lambda i: encode_checkpoint(_small_snapshot(i))
    assert real is not None
    return lambda i: encode_checkpoint(
        Snapshot(tensors=real.tensors, meta={**real.meta, "bench_version": i})
    )


# -- stores ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_subprocess(timeout_s: float = 60.0) -> Iterator[str]:
    """moto's S3 server in a child process on loopback; yields its endpoint."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    msg = f"moto server not up on {endpoint} after {timeout_s}s"
                    raise TimeoutError(msg) from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _new_bucket(endpoint: str) -> str:
    import boto3

    name = f"bench-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, **CREDS)
    try:
        client.create_bucket(Bucket=name)
    finally:
        client.close()
    return name


@dataclass
class Backend:
    """Opens fresh stores on one location (a directory or a bucket)."""

    name: str
    root: Path | None = None
    endpoint: str | None = None
    bucket: str | None = None

    def open(self, *, fsync: bool = True) -> ObjectStore:
        if self.name == "local":
            assert self.root is not None
            return LocalStore(self.root, fsync=fsync)
        assert self.endpoint is not None and self.bucket is not None
        return S3Store(
            bucket=self.bucket,
            prefix="chain",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=CREDS["aws_access_key_id"],
            aws_secret_access_key=CREDS["aws_secret_access_key"],
        )


# -- the measurements -----------------------------------------------------------------------------


async def time_commits(
    store: ObjectStore, snapshots: list[tuple[Snapshot, dict[str, Any]]]
) -> list[float]:
    """Seconds of each commit after the first (untimed warm-up) one."""
    chain = VersionChain(store)
    times: list[float] = []
    for i, (snap, metrics) in enumerate(snapshots):
        start = time.perf_counter()
        await chain.commit(snap, message=MESSAGE, metrics=metrics)
        elapsed = time.perf_counter() - start
        if i > 0:
            times.append(elapsed)
    report = await chain.verify(check_blobs=False)
    if not report.ok or report.checked != len(snapshots):
        raise RuntimeError(f"commit run left a bad chain: {report.summary()}")
    return times


async def build_chain(store: ObjectStore, n: int, make_blob: Callable[[int], bytes]) -> int:
    """Write an n-version chain (records, blobs, HEAD) straight to the store; the blob size."""
    sem = asyncio.Semaphore(_WRITE_CONCURRENCY)

    async def put(key: str, data: bytes) -> None:
        async with sem:
            await store.put_if_absent(key, data)

    parent: str | None = None
    size = 0
    batch = 4 * _WRITE_CONCURRENCY  # bounds the blobs held in memory at once
    for lo in range(1, n + 1, batch):
        writes: list[Awaitable[None]] = []
        for c in range(lo, min(lo + batch, n + 1)):
            blob = make_blob(c)
            size = len(blob)
            sha = sha256_hex(blob)
            rec = VersionRecord.build(
                counter=c,
                parent_hash=parent,
                blob_sha256=sha,
                blob_size=len(blob),
                created_at=f"2026-01-01T00:00:00.{c % 1_000_000:06d}+00:00",
                message=f"bench version {c}",
                training_metrics={"step": c},
                quality_metrics={},
                config_fingerprint="bench",
            )
            parent = rec.version_hash
            writes += [put(blob_key(sha), blob), put(version_key(c), rec.to_bytes())]
        await asyncio.gather(*writes)
    assert parent is not None
    await store.put_if_absent(HEAD_KEY, canonical_json({"counter": n, "version_hash": parent}))
    return size


async def time_verify(store: ObjectStore, n: int) -> float:
    chain = VersionChain(store)
    await store.list("refs/")  # opens an S3 client (connection, service model): not timed
    start = time.perf_counter()
    report = await chain.verify(check_blobs=True)
    elapsed = time.perf_counter() - start
    if not report.ok or report.checked != n:
        raise RuntimeError(f"verify of the built chain failed: {report.summary()}")
    return elapsed


async def run_backend(
    backend: Backend,
    commits: list[tuple[Snapshot, dict[str, Any]]],
    versions: int,
    make_blob: Callable[[int], bytes],
) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    commit_backend = backend
    verify_backend = backend
    if backend.name == "local":
        assert backend.root is not None
        commit_backend = Backend("local", root=backend.root / "commits")
        verify_backend = Backend("local", root=backend.root / "verify")
    else:
        assert backend.endpoint is not None
        bucket = _new_bucket(backend.endpoint)
        verify_backend = Backend("s3", endpoint=backend.endpoint, bucket=bucket)

    if commits:
        _log(f"{backend.name}: {len(commits)} commits")
        store = commit_backend.open()
        try:
            secs = await time_commits(store, commits)
        finally:
            await store.aclose()
        ms = np.asarray(secs) * 1e3
        out.update(
            p50=float(statistics.median(ms)),
            p99=float(np.percentile(ms, 99)),
            max=float(ms.max()),
            mean=float(ms.mean()),
        )
    if versions:
        _log(f"{backend.name}: building a {versions}-version chain, then verify")
        store = verify_backend.open(fsync=False)
        try:
            out["blob_bytes"] = await build_chain(store, versions, make_blob)
        finally:
            await store.aclose()
        store = verify_backend.open()
        try:
            out["verify_s"] = await time_verify(store, versions)
        finally:
            await store.aclose()
    return out


def _machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )


def _log(msg: str) -> None:
    print(f"bench.storage: {msg}", file=sys.stderr, flush=True)


def _range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}, got {value}")
        return value

    return parse


def _backends(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"backends are a comma list of {BACKENDS}, got {text!r}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.storage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--commits", type=_range(1, _MAX_COMMITS), default=30,
                    help="timed commits per backend (default 30, after one warm-up)")
    ap.add_argument("--versions", type=_range(1, _MAX_VERSIONS), default=1000,
                    help="length of the chain that verify walks (default 1000)")
    ap.add_argument("--backends", type=_backends, default=list(BACKENDS),
                    help="comma list of local,s3 (default both)")
    ap.add_argument("--verify-blob", choices=("small", "real"), default="small",
                    help="blob per version of the verify chain (default small)")
    ap.add_argument("--s3-endpoint", default=None,
                    help="a running S3-protocol server (default: start moto in a child process)")
    ap.add_argument("--timeout-s", type=float, default=600.0,
                    help="limit per backend, seconds (default 600)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    snapshots, checkpoint_bytes = training_snapshots(args.commits)
    make_blob = _blob_maker(args.verify_blob, snapshots[0][0])
    results: dict[str, dict[str, float | int]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-storage-")))
        for name in args.backends:
            if name == "local":
                backend = Backend("local", root=tmp / "local")
            else:
                endpoint = args.s3_endpoint or stack.enter_context(moto_subprocess())
                backend = Backend("s3", endpoint=endpoint, bucket=_new_bucket(endpoint))
            results[name] = asyncio.run(
                asyncio.wait_for(
                    run_backend(backend, snapshots, args.versions, make_blob), args.timeout_s
                )
            )

    def field(backend: str, key: str, digits: int) -> float | None:
        value = results.get(backend, {}).get(key)
        return None if value is None else round(float(value), digits)

    line: dict[str, Any] = {"bench": "storage"}
    for b in BACKENDS:
        line[f"commit_ms_p50_{b}"] = field(b, "p50", 3)
    for b in BACKENDS:
        line[f"verify_1000_s_{b}"] = field(b, "verify_s", 4)
    for b in BACKENDS:
        line[f"commit_ms_p99_{b}"] = field(b, "p99", 3)
        line[f"commit_ms_max_{b}"] = field(b, "max", 3)
    line.update(
        commits=args.commits,
        checkpoint_bytes=checkpoint_bytes,
        versions=args.versions,
        verify_blob=args.verify_blob,
        verify_blob_bytes=next(
            (int(r["blob_bytes"]) for r in results.values() if "blob_bytes" in r), None
        ),
        s3="moto (child process, loopback)" if args.s3_endpoint is None else args.s3_endpoint,
        cpus=os.cpu_count(),
        machine=_machine(),
    )
    emit(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
