"""Fault injection and crash recovery with real processes: `python -m bench.faults`.

Every scenario starts `spectralmc serve` as subprocesses on a tiny [core] config against an S3
store on a moto server (in this process), often through `bench.faultproxy.FaultProxy`, and
observes only the public surface (/metrics, /readyz, /v1/price, /v1/admin/training) and the
chain itself. A scenario is a function `(Lab) -> ScenarioResult`; tests/test_faults.py runs the
cheap ones by default and the rest as `slow`. Prints one JSON line:

    {"bench": "faults", "scenarios": 7, "passed": 7, "failed": [], "versions_lost": 0,
     "training_crashes": 0, "seconds": {...}, ...}

`--only NAME` (repeatable) runs a subset; `--keep DIR` keeps configs and server logs there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.common import emit
from bench.faultproxy import FaultProxy
from spectral_core.config import CoreConfig
from spectral_core.snapshot import Snapshot
from spectral_core.trainer import Trainer
from storage.chain import HEAD_KEY, VersionChain, VersionRecord, blob_key, version_key
from storage.checkpoint import canonical_json, encode_checkpoint, sha256_hex
from storage.s3store import S3Store

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "faults-admin-token-0123456789"
CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REGION = "us-east-1"
PREFIX = "chain"
# The tests' tiny model (tests/core_fixtures.py): a training step takes a few milliseconds.
TINY_CORE: dict[str, Any] = {
    "device": "cpu",
    "sim": {"paths_per_contract": 1024},
    "spectrum": {"n_freq": 32, "grid": 256},
    "arch": {"width": 16, "depth": 1},
    "optim": {"lr": 3e-3, "warmup_steps": 5, "total_steps": 400},
    "train": {"batch_contracts": 32, "validation_contracts": 64, "validation_every": 10},
}
PRICE_BODY = {"contracts": [{"X0": 100.0, "K": 100.0, "T": 1.0, "r": 0.03, "d": 0.01, "v": 0.2}]}


def log(msg: str) -> None:
    sys.stderr.write(f"[faults {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


class ScenarioFailed(AssertionError):
    """A scenario's expectation did not hold."""


def expect(cond: object, msg: str) -> None:
    if not cond:
        raise ScenarioFailed(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    pred: Callable[[], T | None], *, timeout: float, what: str, every: float = 0.1
) -> T:
    """Poll `pred` until it returns something truthy; ScenarioFailed naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ScenarioFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def to_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for nested dicts of scalars (the settings files written here)."""
    scalars, tables = [], []
    for key, value in doc.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            scalars.append(f"{key} = {json.dumps(value)}")
    out = ""
    if scalars:
        out += (f"[{prefix}]\n" if prefix else "") + "\n".join(scalars) + "\n\n"
    for key, value in tables:
        out += to_toml(value, f"{prefix}.{key}" if prefix else key)
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if nested else v
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (labels exactly as exposed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


# -- a server process -----------------------------------------------------------------------------


class ServerProcess:
    """`python -m server.cli serve --config FILE` on its own port, observed over HTTP."""

    def __init__(self, name: str, workdir: Path, settings: dict[str, Any]) -> None:
        self.name = name
        self.port = free_port()
        self.settings = deep_merge(settings, {"server": {"port": self.port}})
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False

    def start(self) -> ServerProcess:
        self.config_path.write_text(to_toml(self.settings))
        env = {
            **os.environ,
            "SPECTRALMC_ADMIN__TOKEN": TOKEN,
            "SPECTRALMC_STORE__S3_ACCESS_KEY_ID": CREDS["aws_access_key_id"],
            "SPECTRALMC_STORE__S3_SECRET_ACCESS_KEY": CREDS["aws_secret_access_key"],
            # Two cores shared by several processes: one thread each for torch and numba.
            "OMP_NUM_THREADS": "1",
            "NUMBA_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        with self.log_path.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--config", str(self.config_path)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def crashed(self) -> bool:
        """Exited on its own, not by our kill or terminate."""
        return self.proc is not None and self.proc.poll() is not None and not self.killed

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        admin: bool = False,
        timeout: float = 30.0,
    ) -> tuple[int, bytes, float]:
        """(status, body, seconds); connection errors raise OSError."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if admin:
            req.add_header("Authorization", f"Bearer {TOKEN}")
            req.add_header("X-Actor", "faults")
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
            exc.close()
        return status, raw, time.perf_counter() - t0

    def json(self, method: str, path: str, body: Any = None, *, admin: bool = False) -> Any:
        status, raw, _ = self.request(method, path, body, admin=admin)
        if status >= 300:
            raise ScenarioFailed(f"{self.name}: {method} {path} -> {status}: {raw[:300]!r}")
        return json.loads(raw)

    def admin_status(self) -> dict[str, Any]:
        out: dict[str, Any] = self.json("GET", "/v1/admin/training", admin=True)
        return out

    def training(self) -> dict[str, Any]:
        out: dict[str, Any] = self.admin_status()["training"]
        return out

    def metrics(self) -> dict[str, float]:
        status, raw, _ = self.request("GET", "/metrics")
        expect(status == 200, f"{self.name}: /metrics -> {status}")
        return parse_metrics(raw.decode())

    def serving_version(self) -> int | None:
        """The counter in /metrics model_version_info, None before the first load."""
        for key in self.metrics():
            m = re.match(r'spectralmc_model_version_info\{.*version="(\d+)"', key)
            if m:
                return int(m.group(1))
        return None

    def price(self, timeout: float = 40.0) -> tuple[int, dict[str, Any] | None, float]:
        """One /v1/price call; a hung one (504 or no answer) dumps the server's stacks."""
        try:
            status, raw, seconds = self.request("POST", "/v1/price", PRICE_BODY, timeout=timeout)
        except OSError as exc:
            self.dump_stacks()
            raise ScenarioFailed(f"{self.name}: /v1/price got no answer: {exc}") from None
        if status == 504:
            self.dump_stacks()
        return status, (json.loads(raw) if status == 200 else None), seconds

    def dump_stacks(self) -> None:
        """SIGUSR1: the server writes every thread's stack to its log (server/cli.py)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            log(f"{self.name}: stacks dumped to {self.log_path}")

    def wait_healthy(self, timeout: float = 60.0) -> None:
        def ok() -> bool:
            if not self.alive():
                raise ScenarioFailed(f"{self.name} exited at start-up:\n{self.log_tail()}")
            try:
                return self.request("GET", "/healthz", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(ok, timeout=timeout, what=f"{self.name} /healthz", every=0.2)

    def wait_training(self, pred: Callable[[dict[str, Any]], bool], *, timeout: float, what: str
                      ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if not self.alive():
                raise ScenarioFailed(f"{self.name} died waiting for {what}:\n{self.log_tail()}")
            st = self.training()
            if st.get("state") == "error":
                raise ScenarioFailed(f"{self.name} training failed: {st.get('error')}")
            return st if pred(st) else None

        return wait_until(check, timeout=timeout, what=f"{self.name}: {what}")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.killed = True
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful: final commit) and wait; kill -9 if it does not stop in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.killed = True
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        return self.proc.returncode


# -- the lab: moto, buckets, servers, the chain ---------------------------------------------------


@dataclass
class ScenarioResult:
    name: str
    passed: bool
    seconds: float = 0.0
    versions_lost: int = 0
    training_crashes: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Lab:
    """What a scenario needs: the S3 server, fresh buckets, server processes, chain access."""

    def __init__(self, moto_endpoint: str, workdir: Path) -> None:
        self.moto_endpoint = moto_endpoint
        self.workdir = workdir
        self.servers: list[ServerProcess] = []
        self.proxies: list[FaultProxy] = []

    def new_bucket(self) -> str:
        import boto3

        name = f"faults-{uuid.uuid4().hex[:16]}"
        client = boto3.client("s3", endpoint_url=self.moto_endpoint, region_name=REGION, **CREDS)
        client.create_bucket(Bucket=name)
        client.close()
        return name

    def proxy(self, seed: int = 0) -> FaultProxy:
        p = FaultProxy(self.moto_endpoint, seed=seed).start()
        self.proxies.append(p)
        return p

    def settings(
        self, bucket: str, *, endpoint: str | None = None, **overrides: Any
    ) -> dict[str, Any]:
        base: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "shutdown_timeout_s": 20.0},
            "store": {
                "url": f"s3://{bucket}/{PREFIX}",
                "s3_endpoint_url": endpoint or self.moto_endpoint,
                "s3_region": REGION,
                "retry_attempts": 3,
                "retry_backoff_s": 0.02,
                "retry_backoff_max_s": 0.2,
            },
            "training": {
                "enabled": True,
                "device": "cpu",
                "commit": {"kind": "every_steps", "every_steps": 10},
                # a server restarted after kill -9 waits out its dead predecessor's lease
                "lease_ttl_s": 3.0,
            },
            "model": {"poll_interval_s": 0.3},
            "logging": {"level": "INFO", "format": "json"},
            "core": TINY_CORE,
        }
        return deep_merge(base, overrides)

    def server(self, name: str, settings: dict[str, Any]) -> ServerProcess:
        s = ServerProcess(name, self.workdir, settings)
        self.servers.append(s)
        return s.start()

    def close(self) -> None:
        for s in self.servers:
            s.kill9()
        for p in self.proxies:
            p.stop()
        self.servers.clear()
        self.proxies.clear()

    def crashes(self) -> int:
        n = sum(1 for s in self.servers if s.crashed())
        for s in self.servers:
            if s.alive():
                try:
                    if s.training().get("state") == "error":
                        n += 1
                except (OSError, ScenarioFailed):
                    pass
        return n

    def chain_do(self, bucket: str, fn: Callable[[VersionChain], Awaitable[T]]) -> T:
        """Run `fn(chain)` on a chain read straight from moto (not through any proxy)."""

        async def go() -> T:
            store = S3Store(
                bucket=bucket,
                prefix=PREFIX,
                endpoint_url=self.moto_endpoint,
                region_name=REGION,
                aws_access_key_id=CREDS["aws_access_key_id"],
                aws_secret_access_key=CREDS["aws_secret_access_key"],
            )
            try:
                return await fn(VersionChain(store))
            finally:
                await store.aclose()

        return asyncio.run(go())

    def records(self, bucket: str) -> list[VersionRecord]:
        return self.chain_do(bucket, lambda c: c.list())

    def verify(self, bucket: str) -> tuple[bool, str, int]:
        """(ok, summary, tip) of VersionChain.verify with blob checks."""

        async def go(chain: VersionChain) -> tuple[bool, str, int]:
            r = await chain.verify()
            return r.ok, r.summary(), r.tip or 0

        return self.chain_do(bucket, go)

    def cli_verify(self, bucket: str) -> tuple[int, str]:
        """`spectralmc store --url ... verify` as a process: (exit code, output)."""
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": REGION}
        out = subprocess.run(
            [sys.executable, "-m", "server.cli", "store", "--url", f"s3://{bucket}/{PREFIX}",
             "--endpoint-url", self.moto_endpoint, "verify"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        return out.returncode, (out.stdout + out.stderr).strip()

    def blobs_intact(self, bucket: str) -> list[str]:
        """Every object under objects/ must hash to its name: names of those that do not."""

        async def go(chain: VersionChain) -> list[str]:
            bad = []
            for key in await chain.store.list("objects/"):
                data = (await chain.store.get(key)).data
                if sha256_hex(data) != key.removeprefix("objects/"):
                    bad.append(key)
            return bad

        return self.chain_do(bucket, go)


def contiguous(records: list[VersionRecord]) -> bool:
    return [r.counter for r in records] == list(range(1, len(records) + 1))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(
        torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                    b.contiguous().reshape(-1).view(torch.uint8))
    )


def _finite_json(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    return value


def replay_matches(lab: Lab, bucket: str, base: int, target: int) -> dict[str, Any]:
    """Restore a Trainer from version `base` in this process, step it to the step of version
    `target`, and compare every tensor bit for bit (and the metadata) with `target`."""

    async def load(chain: VersionChain) -> tuple[Snapshot, Snapshot]:
        return await chain.load(base), await chain.load(target)

    start, want = lab.chain_do(bucket, load)
    steps = int(want.meta["global_step"]) - int(start.meta["global_step"])
    expect(steps > 0, f"version {target} is not ahead of {base} ({steps} steps)")
    rng_before = torch.get_rng_state()
    try:
        with Trainer.restore(start, device="cpu") as trainer:
            trainer.train(steps=steps)
            got = trainer.snapshot()
    finally:
        torch.set_rng_state(rng_before)  # restore() set the process-wide torch RNG
    names = sorted(set(got.tensors) | set(want.tensors))
    differ = [
        n for n in names
        if n not in got.tensors or n not in want.tensors
        or not same_bits(got.tensors[n], want.tensors[n])
    ]
    meta_equal = canonical_json(_finite_json(got.meta)) == canonical_json(_finite_json(want.meta))
    return {
        "base": base,
        "target": target,
        "steps": steps,
        "tensors": len(names),
        "tensors_differ": differ,
        "meta_equal": meta_equal,
    }


def train_snapshots(steps: list[int]) -> list[Snapshot]:
    """Real snapshots of the tiny model after each cumulative step count (in this process)."""
    out = []
    rng_before = torch.get_rng_state()
    try:
        with Trainer(CoreConfig.model_validate(TINY_CORE)) as trainer:
            for n in steps:
                trainer.train(steps=n - trainer.global_step)
                out.append(trainer.snapshot())
    finally:
        torch.set_rng_state(rng_before)
    return out


# -- scenarios ------------------------------------------------------------------------------------


def kill9_mid_commit_exact_resume(lab: Lab) -> ScenarioResult:
    """kill -9 while a version record has landed but its answer (and the HEAD move) has not;
    the restarted server resumes from that version, and its next version equals, bit for bit, an
    uninterrupted in-process run from it."""
    res = ScenarioResult("kill9_mid_commit_exact_resume", passed=False)
    bucket = lab.new_bucket()
    proxy = lab.proxy()
    settings = lab.settings(
        bucket, endpoint=proxy.endpoint, training={"commit": {"every_steps": 5}}
    )
    a = lab.server("a", settings)
    a.wait_healthy()
    a.wait_training(lambda s: s["commits_ok"] >= 2, timeout=90, what="2 commits")
    hold = proxy.hold("PUT", r"/versions/\d+\.json$", after=True)
    expect(hold.arrived.wait(60), "no version commit reached the proxy")
    a.kill9()
    hold.release()
    recs = lab.records(bucket)
    landed = recs[-1].counter
    head = lab.chain_do(bucket, lambda c: c.store.get(HEAD_KEY))
    head_counter = json.loads(head.data)["counter"]
    res.details.update(killed_at=hold.matched, landed=landed, head_hint=head_counter)
    expect(hold.matched == f"PUT /{bucket}/{PREFIX}/{version_key(landed)}",
           f"the held write {hold.matched} is not the newest record {landed}")
    expect(head_counter < landed, "HEAD moved although its write never happened")
    ok, summary, _ = lab.verify(bucket)
    expect(ok, f"chain after kill -9: {summary}")

    b = lab.server("b", settings)
    b.wait_healthy()
    st = b.wait_training(
        lambda s: s["last_commit"] is not None, timeout=90, what="a commit after restart"
    )
    expect(st["resumed_from"] == landed, f"resumed from {st['resumed_from']}, not {landed}")
    b.kill9()
    recs = lab.records(bucket)
    expect(contiguous(recs), f"counters not contiguous: {[r.counter for r in recs]}")
    nxt = recs[landed]  # counter landed + 1
    expect(nxt.parent_hash == recs[landed - 1].version_hash, "new version not on the landed one")
    replay = replay_matches(lab, bucket, landed, landed + 1)
    res.details["replay"] = replay
    expect(not replay["tensors_differ"], f"tensors differ: {replay['tensors_differ']}")
    expect(replay["meta_equal"], "snapshot metadata differs from the uninterrupted run")
    ok, summary, _ = lab.verify(bucket)
    expect(ok, f"chain after restart: {summary}")
    res.details["versions"] = len(recs)
    res.passed = True
    return res


def kill9_mid_training(lab: Lab) -> ScenarioResult:
    """kill -9 between commits, and again while a checkpoint blob is being written: each restart
    resumes from the last committed version, nothing half-written shows, the chain verifies."""
    res = ScenarioResult("kill9_mid_training", passed=False)
    bucket = lab.new_bucket()
    proxy = lab.proxy()
    settings = lab.settings(bucket, endpoint=proxy.endpoint)
    a = lab.server("a", settings)
    a.wait_healthy()
    st = a.wait_training(lambda s: s["commits_ok"] >= 2, timeout=90, what="2 commits")
    step_at_kill = a.wait_training(
        lambda s: (s["step"] or 0) % 10 > 3, timeout=30, what="a step between commits"
    )["step"]
    a.kill9()
    tip = lab.records(bucket)[-1]
    res.details["a"] = {"commits_ok": st["commits_ok"], "step_at_kill": step_at_kill,
                        "tip": tip.counter}
    b = lab.server("b", settings)
    b.wait_healthy()
    hold = proxy.hold("PUT", r"/objects/[0-9a-f]{64}$")  # before the blob reaches the store
    st = b.wait_training(lambda s: s["state"] == "running", timeout=60, what="training")
    expect(st["resumed_from"] == tip.counter, f"b resumed from {st['resumed_from']}")
    expect(hold.arrived.wait(60), "no blob write reached the proxy")
    b.kill9()
    hold.release()
    recs = lab.records(bucket)
    expect(recs[-1].counter == tip.counter, "a version appeared although its blob never did")
    expect(not lab.blobs_intact(bucket), "a half-written blob is visible")
    c = lab.server("c", settings)
    c.wait_healthy()
    st = c.wait_training(lambda s: s["commits_ok"] >= 1, timeout=90, what="a commit")
    expect(st["resumed_from"] == tip.counter, f"c resumed from {st['resumed_from']}")
    rc = c.terminate()
    recs = lab.records(bucket)
    code, out = lab.cli_verify(bucket)
    res.details.update(c_exit=rc, versions=len(recs), cli_verify=out)
    expect(rc == 0, f"graceful stop exit code {rc}")
    expect(code == 0 and contiguous(recs), f"spectralmc store verify exit {code}: {out}")
    first_c = recs[tip.counter]
    expect(first_c.training_metrics.get("step", 0) > tip.training_metrics.get("step", 0),
           "the restarted run did not continue from the committed step")
    res.passed = True
    return res


def corrupted_blob_at_head(lab: Lab, *, trainer: bool = False) -> ScenarioResult:
    """A bit flip in the blob of the newest version: the tracking server refuses it, keeps
    serving the last good version and reports it. The next good version is then served: one
    committed here, or (`trainer`) the first one of a training server started on that store,
    which must resume from the last good version."""
    name = "corrupted_blob_at_head" + ("_trainer_resumes" if trainer else "")
    res = ScenarioResult(name, passed=False)
    bucket = lab.new_bucket()
    good1, bad2, good3 = train_snapshots([10, 15, 20])

    async def commit(chain: VersionChain, snap: Snapshot) -> VersionRecord:
        return await chain.commit(snap, message="step {step}", metrics={"step": 0})

    v1 = lab.chain_do(bucket, lambda c: commit(c, good1))
    s = lab.server("a", lab.settings(bucket, training={"enabled": False}))
    s.wait_healthy()
    wait_until(lambda: s.serving_version() == 1, timeout=60, what="serving version 1")

    async def write_corrupt(chain: VersionChain) -> VersionRecord:
        data = encode_checkpoint(bad2)
        sha = sha256_hex(data)
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01  # bit rot inside the tensor payload
        await chain.store.put_if_absent(blob_key(sha), bytes(flipped))
        rec = VersionRecord.build(
            counter=2, parent_hash=v1.version_hash, blob_sha256=sha, blob_size=len(data),
            created_at="2026-01-01T00:00:00+00:00", message="rotted", training_metrics={},
            quality_metrics={}, config_fingerprint=bad2.meta["config_fingerprint"],
        )
        await chain.store.put_if_absent(version_key(2), rec.to_bytes())
        head = await chain.store.get(HEAD_KEY)
        await chain.store.put_if_match(
            HEAD_KEY, canonical_json({"counter": 2, "version_hash": rec.version_hash}), head.etag
        )
        return rec

    v2 = lab.chain_do(bucket, write_corrupt)

    def refused() -> dict[str, Any] | None:
        model = s.admin_status()["model"]
        return model if model["load_failures"] >= 1 else None

    model = wait_until(refused, timeout=30, what="the corrupt version to be refused")
    res.details["reported"] = model["last_error"]
    expect("sha256" in (model["last_error"] or ""), f"error not reported: {model}")
    time.sleep(0.5)  # more polls: it keeps refusing, never swaps
    status, body, _ = s.price()
    expect(status == 200 and body is not None and body["model"]["counter"] == 1,
           f"price after corrupt HEAD: {status} {body}")
    status, raw, _ = s.request("GET", "/readyz")
    expect(status == 200 and b"version 1" in raw, f"/readyz: {status} {raw!r}")
    expect(s.serving_version() == 1, "the serving version changed")
    res.details["load_failures"] = s.admin_status()["model"]["load_failures"]
    counted = metric(s.metrics(), "spectralmc_model_load_failures_total", kind="corrupt")
    res.details["metrics_load_failures"] = counted
    expect(counted >= 1, "the refused version is not counted in /metrics")
    if trainer:
        b = lab.server("b", lab.settings(bucket, training={"commit": {"every_steps": 5}}))
        b.wait_healthy()
        st = b.wait_training(lambda t: t["commits_ok"] >= 1, timeout=90, what="a commit")
        b.json("POST", "/v1/admin/training/pause", admin=True)
        res.details["trainer_resumed_from"] = st["resumed_from"]
        expect(st["resumed_from"] == 1, f"training resumed from {st['resumed_from']}, not 1")
    else:
        lab.chain_do(bucket, lambda c: commit(c, good3))
    ok, summary, _ = lab.verify(bucket)
    res.details["verify"] = summary
    v3 = lab.chain_do(bucket, lambda c: c.get(3))
    if trainer:
        # Resumed at version 1's step, the server re-trained version 2's step: its tensors must
        # equal the uninterrupted in-process run's bit for bit.
        snap3 = lab.chain_do(bucket, lambda c: c.load(3))
        differ = [n for n in bad2.tensors
                  if n not in snap3.tensors or not same_bits(bad2.tensors[n], snap3.tensors[n])]
        expect(not differ, f"the resumed run's tensors differ: {differ[:5]}")
        meta_differs = sorted(
            k for k in bad2.meta if _finite_json(bad2.meta[k]) != snap3.meta.get(k)
        )
        res.details["meta_differs_from_uninterrupted"] = meta_differs
        if v3.blob_sha256 == v2.blob_sha256:
            # Identical bytes: committing them repaired the rotted blob, the chain verifies.
            expect(ok, f"the chain was not healed: {summary}")
        else:
            expect(not ok and "first bad version 2" in summary, f"verify: {summary}")
    else:
        expect(not ok and "first bad version 2" in summary, f"verify: {summary}")
        expect(" 1 problem(s)" in summary, f"more damage than the flipped bit: {summary}")
    wait_until(lambda: (s.serving_version() or 0) >= 3, timeout=30,
               what="the good version 3 to load")
    status, body, _ = s.price()
    expect(status == 200 and body is not None and body["model"]["counter"] >= 3, f"{body}")
    res.passed = True
    return res


def corrupted_blob_at_head_trainer_resumes(lab: Lab) -> ScenarioResult:
    return corrupted_blob_at_head(lab, trainer=True)


corrupted_blob_at_head_trainer_resumes.__doc__ = corrupted_blob_at_head.__doc__


def two_servers_one_chain(lab: Lab) -> ScenarioResult:
    """Two servers with training on against one store: the training lease lets one train while
    the other stands by; one linear chain of one lineage, every reported commit in it."""
    res = ScenarioResult("two_servers_one_chain", passed=False)
    bucket = lab.new_bucket()
    settings = lab.settings(bucket, training={"commit": {"every_steps": 5}})
    servers = [lab.server("a", settings), lab.server("b", settings)]
    for s in servers:
        s.wait_healthy()

    def one_trains_one_stands_by() -> bool:
        states = sorted(s.training()["state"] for s in servers)
        return states == ["running", "standby"]

    wait_until(one_trains_one_stands_by, timeout=120, what="one trainer and one standby")
    trainer = next(s for s in servers if s.training()["state"] == "running")
    trainer.wait_training(lambda st: st["commits_ok"] >= 3, timeout=120, what="3 commits")
    trainer.json("POST", "/v1/admin/training/pause", admin=True)

    def settled() -> list[dict[str, Any]] | None:
        first = [s.training() for s in servers]
        time.sleep(0.5)
        again = [s.training() for s in servers]
        same = all(
            (x["commits_ok"], x["commits_failed"]) == (y["commits_ok"], y["commits_failed"])
            for x, y in zip(first, again, strict=True)
        )
        return again if same else None

    states = wait_until(settled, timeout=30, what="commits to settle after pause")
    counted = [metric(s.metrics(), "spectralmc_commits_total", result="ok") for s in servers]
    for s in servers:
        s.kill9()
    recs = lab.records(bucket)
    by_counter = {r.counter: r for r in recs}
    reported = sum(st["commits_ok"] for st in states)
    res.details.update(
        versions=len(recs),
        commits_ok=[st["commits_ok"] for st in states],
        commits_failed=[st["commits_failed"] for st in states],
        metric_commits_ok=counted,
    )
    res.versions_lost = max(0, reported - len(recs))
    ok, summary, _ = lab.verify(bucket)
    expect(ok, summary)
    expect(contiguous(recs), f"counters not contiguous: {sorted(by_counter)}")
    expect(len(recs) == reported, f"{len(recs)} versions in the chain, {reported} reported")
    for st in states:
        last = st["last_commit"]
        if last is None:  # the standby server
            continue
        rec = by_counter.get(last["counter"])
        expect(rec is not None and rec.version_hash == last["version_hash"],
               f"reported commit {last} is not in the chain")
    expect(counted == [float(st["commits_ok"]) for st in states],
           f"/metrics commits {counted} != reported {[st['commits_ok'] for st in states]}")
    epochs = {r.training_metrics.get("lease_epoch") for r in recs}
    expect(epochs == {1}, f"one lineage expected, lease epochs {sorted(map(str, epochs))}")
    expect(sorted(st["commits_ok"] for st in states)[0] == 0, "the standby server committed")
    res.passed = True
    return res


def storage_down(lab: Lab, min_down_s: float = 3.0) -> ScenarioResult:
    """The store goes away during interval commits and tracking polls, then comes back."""
    res = ScenarioResult("storage_down", passed=False)
    bucket = lab.new_bucket()
    proxy = lab.proxy()
    s = lab.server("a", lab.settings(bucket, endpoint=proxy.endpoint))
    s.wait_healthy()
    s.wait_training(lambda st: st["commits_ok"] >= 2, timeout=90, what="2 commits")
    wait_until(lambda: s.serving_version(), timeout=30, what="a served version")
    before = s.metrics()
    st0 = s.training()
    v0 = s.serving_version()
    proxy.set_down(True)
    log("storage down")
    t_down = time.monotonic()
    latencies = []

    def errors_counted() -> bool:
        status, _, sec = s.price()
        expect(status == 200, f"price while storage is down: {status}")
        latencies.append(sec)
        m = s.metrics()
        model = s.admin_status()["model"]
        return (
            time.monotonic() - t_down >= min_down_s
            and metric(m, "spectralmc_commits_total", result="error")
            >= metric(before, "spectralmc_commits_total", result="error") + 2
            and model["load_failures"] >= 1
        )

    wait_until(errors_counted, timeout=60, what="failed commits and polls to be counted")
    st1 = s.training()
    expect(st1["step"] > st0["step"], "training stopped while the store was down")
    expect(st1["state"] == "running", f"training state {st1['state']}")
    down_s = time.monotonic() - t_down
    during = s.metrics()
    proxy.set_down(False)
    log("storage up")
    t_up = time.monotonic()
    s.wait_training(lambda st: st["commits_ok"] > st1["commits_ok"], timeout=60,
                    what="commits to resume")
    wait_until(lambda: (s.serving_version() or 0) > (v0 or 0), timeout=60,
               what="a hot swap after storage came back")
    resume_s = time.monotonic() - t_up
    s.json("POST", "/v1/admin/training/pause", admin=True)
    time.sleep(0.5)
    st2 = s.training()
    s.kill9()
    recs = lab.records(bucket)
    ok, summary, _ = lab.verify(bucket)
    expect(ok and contiguous(recs), summary)
    last = st2["last_commit"]
    expect(any(r.version_hash == last["version_hash"] for r in recs), "last commit lost")
    res.details.update(
        down_s=round(down_s, 2),
        resume_s=round(resume_s, 2),
        commit_errors_counted=metric(during, "spectralmc_commits_total", result="error"),
        price_requests_while_down=len(latencies),
        price_max_ms_while_down=round(1e3 * max(latencies), 1),
        versions=len(recs),
    )
    res.passed = True
    return res


def storage_slow(lab: Lab, latency_s: float = 0.5) -> ScenarioResult:
    """Slow, then hung storage: pricing answers without waiting on it; training goes on."""
    res = ScenarioResult("storage_slow", passed=False)
    bucket = lab.new_bucket()
    proxy = lab.proxy()
    s = lab.server("a", lab.settings(bucket, endpoint=proxy.endpoint))
    s.wait_healthy()
    s.wait_training(lambda st: st["commits_ok"] >= 1, timeout=90, what="a commit")
    wait_until(lambda: s.serving_version(), timeout=30, what="a served version")

    def price_ms(n: int) -> list[float]:
        out = []
        for _ in range(n):
            status, _, sec = s.price()
            expect(status == 200, f"price -> {status}")
            out.append(1e3 * sec)
        return sorted(out)

    base = price_ms(30)
    proxy.latency_s = latency_s
    st0 = s.training()
    slow = price_ms(30)
    st1 = s.wait_training(lambda st: st["commits_ok"] > st0["commits_ok"], timeout=60,
                          what="a commit through slow storage")
    proxy.stall()
    time.sleep(2 * latency_s)
    stalled = price_ms(30)
    st2 = s.training()
    ready = s.request("GET", "/readyz")[0]
    proxy.unstall()
    proxy.latency_s = 0.0
    s.wait_training(lambda st: st["commits_ok"] > st2["commits_ok"], timeout=90,
                    what="commits after the store recovered")
    expect(st2["step"] > st1["step"], "training stopped while storage hung")
    expect(ready == 200, f"/readyz while storage hung: {ready}")
    s.json("POST", "/v1/admin/training/pause", admin=True)
    time.sleep(0.5)
    s.kill9()
    ok, summary, _ = lab.verify(bucket)
    expect(ok, summary)

    def p(xs: list[float], q: float) -> float:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1)

    res.details.update(
        storage_latency_ms=1e3 * latency_s,
        price_p50_ms={"base": p(base, 0.5), "slow": p(slow, 0.5), "hung": p(stalled, 0.5)},
        price_max_ms={"base": p(base, 1.0), "slow": p(slow, 1.0), "hung": p(stalled, 1.0)},
    )
    # Pricing never waits on storage: even the slowest request beats one storage round trip.
    expect(max(slow) < 1e3 * latency_s, f"a price took {max(slow):.0f} ms with slow storage")
    res.passed = True
    return res


def storage_flaky(lab: Lab, fraction: float = 0.3) -> ScenarioResult:
    """A fraction of store calls fail (503, dropped before/after, truncated bodies): commits go
    through on retry, nothing half-written becomes visible, the server serves only whole
    versions."""
    res = ScenarioResult("storage_flaky", passed=False)
    bucket = lab.new_bucket()
    proxy = lab.proxy(seed=7)
    settings = lab.settings(
        bucket, endpoint=proxy.endpoint, store={"retry_attempts": 6},
        training={"commit": {"every_steps": 5}},
    )
    s = lab.server("a", settings)
    s.wait_healthy()
    s.wait_training(lambda st: st["commits_ok"] >= 1, timeout=90, what="a commit")
    proxy.fail_fraction = fraction
    st0 = s.training()
    s.wait_training(lambda st: st["commits_ok"] >= st0["commits_ok"] + 8, timeout=120,
                    what="8 commits through flaky storage")
    for _ in range(20):
        status, _, _ = s.price()
        expect(status == 200, f"price with flaky storage: {status}")
    proxy.fail_fraction = 0.0
    s.json("POST", "/v1/admin/training/pause", admin=True)
    time.sleep(0.5)
    st = s.training()
    serving = s.serving_version()
    m = s.metrics()
    s.kill9()
    recs = lab.records(bucket)
    ok, summary, _ = lab.verify(bucket)
    bad = lab.blobs_intact(bucket)
    faults = {k: v for k, v in proxy.stats.items() if k not in ("requests", "forwarded")}
    res.details.update(
        proxy=dict(proxy.stats),
        commits_ok=st["commits_ok"],
        commits_failed=st["commits_failed"],
        versions=len(recs),
        serving=serving,
    )
    expect(sum(faults.values()) >= 10, f"too few faults injected: {faults}")
    expect(ok and contiguous(recs), summary)
    expect(not bad, f"half-written objects visible: {bad}")
    res.versions_lost = max(0, st["commits_ok"] - len(recs))
    expect(res.versions_lost == 0, f"{st['commits_ok']} commits reported, {len(recs)} versions")
    expect(serving is not None and serving <= len(recs), f"serving unknown version {serving}")
    swaps = metric(m, "spectralmc_model_swaps_total")
    expect(swaps >= 1, "never swapped")
    res.passed = True
    return res


SCENARIOS: dict[str, Callable[[Lab], ScenarioResult]] = {
    f.__name__: f
    for f in (
        kill9_mid_commit_exact_resume,
        corrupted_blob_at_head,
        two_servers_one_chain,
        corrupted_blob_at_head_trainer_resumes,
        kill9_mid_training,
        storage_down,
        storage_slow,
        storage_flaky,
    )
}


# -- running --------------------------------------------------------------------------------------


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in this process (threaded), its endpoint."""
    from moto.server import ThreadedMotoServer

    # moto answers some racing reads with a 500 and a logged traceback; clients retry those.
    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def run_scenario(
    fn: Callable[[Lab], ScenarioResult], moto_endpoint: str, workdir: Path
) -> ScenarioResult:
    """Run one scenario in its own directory; failures become a result, never an exception."""
    name = fn.__name__
    sub = workdir / name
    sub.mkdir(parents=True, exist_ok=True)
    lab = Lab(moto_endpoint, sub)
    t0 = time.monotonic()
    log(f"{name} ...")
    try:
        res = fn(lab)
    except Exception as exc:
        tails = {s.name: s.log_tail(8) for s in lab.servers}
        for s in lab.servers:
            log(f"{name}: last lines of {s.log_path}:\n{s.log_tail(60)}")
        res = ScenarioResult(name, passed=False, error=f"{type(exc).__name__}: {exc}",
                             details={"logs": tails})
    crashes = lab.crashes()
    lab.close()
    res.training_crashes += crashes
    if crashes:
        res.passed = False
        res.error = res.error or f"{crashes} training crash(es)"
    res.seconds = round(time.monotonic() - t0, 2)
    log(f"{name}: {'ok' if res.passed else 'FAILED ' + str(res.error)} ({res.seconds}s)")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run a subset")
    ap.add_argument("--keep", type=Path, help="keep configs and server logs in this directory")
    args = ap.parse_args(argv)
    names = args.only or list(SCENARIOS)
    results: list[ScenarioResult] = []
    with tempfile.TemporaryDirectory(prefix="spectralmc-faults-") as tmp:
        workdir = args.keep or Path(tmp)
        with moto_server() as endpoint:
            for name in names:
                results.append(run_scenario(SCENARIOS[name], endpoint, workdir))
    for r in results:
        log(f"{r.name}: {json.dumps({'passed': r.passed, 'error': r.error, **r.details})}")
    emit(
        {
            "bench": "faults",
            "scenarios": len(results),
            "passed": sum(r.passed for r in results),
            "failed": [r.name for r in results if not r.passed],
            "versions_lost": sum(r.versions_lost for r in results),
            "training_crashes": sum(r.training_crashes for r in results),
            "seconds": {r.name: r.seconds for r in results},
            "details": {r.name: r.details for r in results},
        }
    )
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
