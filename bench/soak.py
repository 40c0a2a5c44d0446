"""Soak: the real server under mixed open-loop traffic, with training on, for S seconds.

python -m bench.soak --seconds S [--rate R] [--warmup S]
-> {"bench":"soak","seconds":S,"rate":R,"requests":..,"errors":0,"p50_ms":..,"p99_ms":..,
    "rss_start_mb":..,"rss_end_mb":..,"rss_max_mb":..,"rss_growth_pct":..,"kinds":{..},..}

`spectralmc serve` runs as a subprocess on a local store in a temp dir, with a small core config
that commits a version every few seconds and an admin token. Requests start on a fixed schedule
(R a second, open loop: a slow answer never delays the next start) and mix single, batch and
exact-version valuations, /v1/price, market-data writes (a new data_asof each, read back and
hash-checked), reads and listings, admin pin / unpin / status, /metrics and /healthz. Every
request is designed to succeed: any other status, a failed check of the answer, a connection
failure or a timeout is an error. Latency is from the scheduled start (no coordinated omission).
Resident memory is the server's VmRSS: "start" after the warm-up (model loaded, traffic flowing),
"end" after the last answer, sampled every second in between for the maximum.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import emit

ADMIN_TOKEN = "soak-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
NAMESPACE = "soak"
# Writes rotate over these val_datetimes; every one is seeded before traffic starts.
VAL_DATETIMES = tuple(
    datetime(2025, 6, 27, 16, 0, tzinfo=UTC) + timedelta(days=k) for k in range(4)
)
UNDERLYINGS = tuple(f"U{i:02d}" for i in range(8))
INSTRUMENT_TYPES = ("european_call", "european_put", "digital_call", "digital_put", "forward")

# Relative weights of the request kinds (one draw per scheduled slot, seeded).
WEIGHTS: dict[str, int] = {
    "valuation_single": 30,
    "valuation_batch": 5,
    "valuation_version": 4,
    "price": 18,
    "marketdata_put": 10,
    "marketdata_get": 10,
    "marketdata_list": 4,
    "admin_pin": 3,
    "admin_unpin": 3,
    "admin_training": 2,
    "metrics": 4,
    "health": 4,
}

# The service on loopback, a local store, training on and committing every few seconds.
SERVICE_TOML = """\
[server]
host = "127.0.0.1"
port = {port}
shutdown_timeout_s = 30.0

[store]
url = "file://{store}"

[training]
enabled = true
device = "cpu"

[training.commit]
kind = "every_seconds"
every_seconds = {commit_every_s}

[model]
poll_interval_s = 1.0

[logging]
level = "INFO"
format = "json"
"""

# ... with a core config small enough to train and commit within seconds on two shared cores.
SERVER_TOML = SERVICE_TOML + """
[core.sim]
paths_per_contract = 1024

[core.spectrum]
n_freq = 32
grid = 256

[core.arch]
width = 16
depth = 1

[core.optim]
lr = 3e-3
warmup_steps = 5
total_steps = 400

[core.train]
batch_contracts = 32
validation_contracts = 64
validation_every = 10
"""


@dataclass(frozen=True)
class SoakOptions:
    seconds: float = 120.0
    warmup_s: float = 10.0
    rate: float = 10.0
    batch_instruments: int = 100
    price_contracts: int = 16
    commit_every_s: float = 5.0
    request_timeout_s: float = 30.0
    ready_timeout_s: float = 180.0
    seed: int = 20261127
    progress: bool = True


@dataclass
class Sample:
    kind: str
    t: float  # scheduled start, seconds after traffic start
    latency_s: float
    status: int  # 0 for a connection failure or timeout
    ok: bool
    note: str = ""


@dataclass
class Stats:
    samples: list[Sample] = field(default_factory=list)
    error_notes: list[str] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        if not sample.ok and len(self.error_notes) < 20:
            self.error_notes.append(
                f"{sample.kind} t={sample.t:.2f}s {sample.status} {sample.note}"
            )

    @property
    def errors(self) -> int:
        return sum(not s.ok for s in self.samples)


# --- the server process -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command() -> list[str]:
    """`spectralmc serve` from this interpreter's environment."""
    script = Path(sys.executable).with_name("spectralmc")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "server.cli", "serve"]


def rss_kb(pid: int) -> int:
    """VmRSS of a process in kB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class ServerProcess:
    """`spectralmc serve` on a fresh local store in `workdir`; logs go to `workdir/server.log`."""

    def __init__(
        self, workdir: Path, *, commit_every_s: float, template: str = SERVER_TOML,
        store: Path | None = None,
    ) -> None:
        """`template`: the settings TOML, formatted with port, store and commit_every_s.
        `store`: the local store directory (default `workdir/store`; several servers may share
        one)."""
        self.workdir = workdir
        self.store = store if store is not None else workdir / "store"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "settings.toml"
        self.config.write_text(
            template.format(port=self.port, store=self.store, commit_every_s=commit_every_s)
        )
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, new_session: bool = False) -> None:
        """`new_session`: the server in its own session, so a Ctrl-C at the terminal reaches only
        the bench, which then stops the server with exactly one signal."""
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SPECTRALMC_")}
        env["SPECTRALMC_ADMIN__TOKEN"] = ADMIN_TOKEN
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*server_command(), "--config", str(self.config)],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float) -> float:
        """Seconds until /readyz answers 200 (a model version is loaded)."""
        assert self.proc is not None
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{self.base}/readyz") as resp:
                    if resp.status == 200:
                        return time.monotonic() - start
            await asyncio.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout_s:g} s:\n{self.log_tail()}")

    async def stop(self, timeout_s: float = 60.0, *, signum: int = signal.SIGINT) -> int:
        """`signum` (SIGINT or SIGTERM, both graceful: drain, final commit), then wait; SIGKILL
        past the timeout."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signum)
        try:
            return await asyncio.to_thread(proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
            return -9

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def log_errors(self) -> list[str]:
        """Log lines at error level or above (the server logs JSON; stdlib lines as `ERROR ...`)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith(("ERROR", "CRITICAL")):
                out.append(line)
                continue
            if line.startswith("{"):
                try:
                    level = json.loads(line).get("level")
                except json.JSONDecodeError:
                    continue
                if level in ("error", "critical"):
                    out.append(line)
        return out


def verify_chain(store: Path) -> tuple[bool, int]:
    """`spectralmc store verify` on the store after shutdown, and the number of versions."""
    cmd = server_command()[:-1]
    done = subprocess.run(
        [*cmd, "store", "--url", f"file://{store}", "verify"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    versions = len(list((store / "versions").glob("*.json"))) if store.exists() else 0
    return done.returncode == 0, versions


# --- request bodies ---------------------------------------------------------------------------


def utc_text(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def market_document(rng: random.Random, data_asof: datetime) -> dict[str, Any]:
    """A snapshot inside the model's trained domain; spots jitter so each write differs."""
    spots = {
        u: round(50.0 + 20.0 * i + rng.uniform(-1.0, 1.0), 6) for i, u in enumerate(UNDERLYINGS)
    }
    expiries = [0.1, 0.5, 1.0, 2.0, 5.0]
    moneyness = [0.5, 0.8, 1.0, 1.2, 1.5]
    surfaces = {}
    for i, u in enumerate(UNDERLYINGS):
        base = 0.15 + 0.03 * i
        surfaces[u] = {
            "expiries": expiries,
            "strikes": [round(spots[u] * m, 6) for m in moneyness],
            "vols": [
                [round(base + 0.05 * abs(1.0 - m) + 0.01 * j, 6) for m in moneyness]
                for j in range(len(expiries))
            ],
        }
    return {
        "data_asof": utc_text(data_asof),
        "spots": spots,
        "zero_curves": {
            "USD-OIS": {"tenors": [0.25, 1.0, 2.0, 5.0], "rates": [0.03, 0.032, 0.035, 0.04]}
        },
        "dividend_curves": {
            u: {"tenors": [0.5, 5.0], "rates": [0.005 * (i % 4), 0.005 * (i % 4) + 0.002]}
            for i, u in enumerate(UNDERLYINGS)
        },
        "vol_surfaces": surfaces,
    }


def instruments(rng: random.Random, n: int, val_datetime: datetime) -> list[dict[str, Any]]:
    """`n` instruments of every type, T in about [0.1, 4] years, strikes 0.7x..1.3x spot."""
    out = []
    for i in range(n):
        k = rng.randrange(len(UNDERLYINGS))
        spot = 50.0 + 20.0 * k
        expiry = val_datetime + timedelta(days=rng.randint(40, 1460), hours=rng.randint(0, 23))
        out.append(
            {
                "id": f"i{i}",
                "type": INSTRUMENT_TYPES[i % len(INSTRUMENT_TYPES)],
                "underlying": UNDERLYINGS[k],
                "strike": round(spot * rng.uniform(0.7, 1.3), 4),
                "expiry": utc_text(expiry),
                "quantity": float(rng.choice((-5, -1, 1, 2, 10))),
            }
        )
    return out


def contracts(rng: random.Random, n: int) -> list[dict[str, float]]:
    out = []
    for _ in range(n):
        x0 = rng.uniform(50.0, 200.0)
        out.append(
            {
                "X0": x0,
                "K": x0 * rng.uniform(0.7, 1.3),
                "T": rng.uniform(0.05, 4.5),
                "r": rng.uniform(-0.01, 0.09),
                "d": rng.uniform(0.0, 0.07),
                "v": rng.uniform(0.08, 0.9),
            }
        )
    return out


# --- the traffic ------------------------------------------------------------------------------


class Driver:
    """Issues one request of a kind and checks its answer; state shared between kinds."""

    def __init__(
        self, session: aiohttp.ClientSession, base: str, options: SoakOptions, stats: Stats
    ) -> None:
        self.session = session
        self.base = base
        self.options = options
        self.stats = stats
        self.rng = random.Random(options.seed + 1)
        self.start = 0.0
        # One feed per (namespace, val_datetime): its writes are sequential, as a real feed's are.
        self.write_locks = {v: asyncio.Lock() for v in VAL_DATETIMES}
        self.last_asof: dict[datetime, datetime] = {}
        self.write_turn = 0
        # Admin changes come from one operator, one at a time.
        self.admin_lock = asyncio.Lock()
        self.max_version = 1
        self.max_in_flight = 0
        self.metrics_series: list[int] = []

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.start

    async def call(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        t_sched: float,
        expect: int,
        check: Callable[[Any], str | None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One request; latency from `t_sched`; the parsed JSON body when it succeeded."""
        status = 0
        note = ""
        body: Any = None
        try:
            async with self.session.request(method, self.base + path, **kwargs) as resp:
                status = resp.status
                raw = await resp.read()
            if status != expect:
                note = raw[:300].decode(errors="replace")
            elif resp.content_type == "application/json":
                body = json.loads(raw)
                if check is not None:
                    note = check(body) or ""
            else:
                body = raw
        except (aiohttp.ClientError, TimeoutError) as exc:
            note = f"{type(exc).__name__}: {exc}"
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a malformed answer
            note = f"bad answer: {type(exc).__name__}: {exc}"
        ok = status == expect and not note
        self.stats.add(Sample(kind, t_sched, self.now() - t_sched, status, ok, note))
        return body if ok else None

    def _valuation(self, n: int, **extra: Any) -> dict[str, Any]:
        vdt = self.rng.choice(VAL_DATETIMES)
        return {
            "valuation_namespace": NAMESPACE,
            "val_datetime": utc_text(vdt),
            "data_asof": utc_text(datetime.now(UTC)),
            "instruments": instruments(self.rng, n, vdt),
            **extra,
        }

    def _check_valuation(self, n: int) -> Callable[[Any], str | None]:
        def check(body: Any) -> str | None:
            if body.get("totals", {}).get("instruments") != n:
                return f"expected {n} instruments in the answer"
            model = body.get("model")
            if model is None:
                return "no model named in the answer"
            self.max_version = max(self.max_version, int(model["counter"]))
            if body["totals"]["price"] is None:
                return "non-finite total price"
            return None

        return check

    async def valuation(self, t: float, kind: str, n: int, **extra: Any) -> None:
        await self.call(
            kind,
            "POST",
            "/v1/valuations",
            t_sched=t,
            expect=200,
            json=self._valuation(n, **extra),
            check=self._check_valuation(n),
        )

    async def price(self, t: float) -> None:
        n = self.options.price_contracts

        def check(body: Any) -> str | None:
            rows = body.get("contracts", [])
            if len(rows) != n or any(r["call"] is None for r in rows):
                return "wrong or non-finite contract rows"
            return None

        await self.call(
            "price",
            "POST",
            "/v1/price",
            t_sched=t,
            expect=200,
            json={"contracts": contracts(self.rng, n)},
            check=check,
        )

    async def put_marketdata(self, t: float, vdt: datetime | None = None) -> bool:
        """A new snapshot (data_asof later than every earlier one), then read it back."""
        if vdt is None:
            vdt = VAL_DATETIMES[self.write_turn % len(VAL_DATETIMES)]
            self.write_turn += 1
        path = f"/v1/marketdata/{NAMESPACE}/{utc_text(vdt)}"
        async with self.write_locks[vdt]:
            asof = datetime.now(UTC)
            last = self.last_asof.get(vdt)
            if last is not None and asof <= last:
                asof = last + timedelta(microseconds=1)
            self.last_asof[vdt] = asof
            put = await self.call(
                "marketdata_put",
                "PUT",
                path,
                t_sched=t,
                expect=201,
                json=market_document(self.rng, asof),
            )
        if put is None:
            return False

        def same(body: Any) -> str | None:
            if body.get("hash") != put["hash"]:
                return f"read back hash {body.get('hash')} != written {put['hash']}"
            return None

        got = await self.call(
            "marketdata_readback",
            "GET",
            path,
            t_sched=self.now(),
            expect=200,
            params={"data_asof": utc_text(asof)},
            check=same,
        )
        return got is not None

    async def get_marketdata(self, t: float) -> None:
        vdt = self.rng.choice(VAL_DATETIMES)
        await self.call(
            "marketdata_get",
            "GET",
            f"/v1/marketdata/{NAMESPACE}/{utc_text(vdt)}",
            t_sched=t,
            expect=200,
            params={"data_asof": utc_text(datetime.now(UTC))},
        )

    async def list_marketdata(self, t: float) -> None:
        def check(body: Any) -> str | None:
            want = [utc_text(v) for v in VAL_DATETIMES]
            return None if body.get("val_datetimes") == want else f"listed {body}"

        await self.call(
            "marketdata_list",
            "GET",
            f"/v1/marketdata/{NAMESPACE}",
            t_sched=t,
            expect=200,
            check=check,
        )

    async def pin(self, t: float) -> None:
        async with self.admin_lock:
            version = self.rng.randint(1, self.max_version)
            await self.call(
                "admin_pin",
                "PUT",
                "/v1/admin/model/pin",
                t_sched=t,
                expect=200,
                headers={**AUTH, "X-Actor": "soak"},
                json={"version": version},
                check=lambda b: None if b.get("pinned") == version else f"pinned {b}",
            )

    async def unpin(self, t: float) -> None:
        async with self.admin_lock:
            await self.call(
                "admin_unpin",
                "DELETE",
                "/v1/admin/model/pin",
                t_sched=t,
                expect=200,
                headers={**AUTH, "X-Actor": "soak"},
            )

    async def training(self, t: float) -> None:
        def check(body: Any) -> str | None:
            state = body.get("training", {}).get("state")
            return None if state == "running" else f"training state {state!r}"

        await self.call(
            "admin_training",
            "GET",
            "/v1/admin/training",
            t_sched=t,
            expect=200,
            headers=AUTH,
            check=check,
        )

    async def metrics(self, t: float) -> None:
        body = await self.call("metrics", "GET", "/metrics", t_sched=t, expect=200)
        if isinstance(body, bytes):  # series count: label cardinality must not grow with traffic
            lines = body.decode().splitlines()
            self.metrics_series.append(sum(1 for x in lines if x and not x.startswith("#")))

    async def health(self, t: float) -> None:
        await self.call("health", "GET", "/healthz", t_sched=t, expect=200)

    async def prime(self, timeout_s: float) -> float:
        """Seconds until a valuation and a price both answer 200 after ready (first-use costs:
        loading, compiling); every failed try counts as an error, as a client would see it."""
        start = asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - start < timeout_s:
            priced = await asyncio.gather(
                self.call(
                    "priming",
                    "POST",
                    "/v1/valuations",
                    t_sched=self.now(),
                    expect=200,
                    json=self._valuation(len(INSTRUMENT_TYPES)),
                ),
                self.call(
                    "priming",
                    "POST",
                    "/v1/price",
                    t_sched=self.now(),
                    expect=200,
                    json={"contracts": contracts(self.rng, 1)},
                ),
            )
            if all(p is not None for p in priced):
                return asyncio.get_running_loop().time() - start
            await asyncio.sleep(1.0)
        raise RuntimeError(f"nothing priced within {timeout_s:g} s: {self.stats.error_notes}")

    def request(self, kind: str, t: float) -> Coroutine[Any, Any, Any]:
        batch = self.options.batch_instruments
        if kind == "valuation_single":
            return self.valuation(t, kind, 1)
        if kind == "valuation_batch":
            return self.valuation(t, kind, batch)
        if kind == "valuation_version":
            return self.valuation(t, kind, 5, model_version=self.rng.randint(1, self.max_version))
        handlers: dict[str, Callable[[float], Coroutine[Any, Any, Any]]] = {
            "price": self.price,
            "marketdata_put": self.put_marketdata,
            "marketdata_get": self.get_marketdata,
            "marketdata_list": self.list_marketdata,
            "admin_pin": self.pin,
            "admin_unpin": self.unpin,
            "admin_training": self.training,
            "metrics": self.metrics,
            "health": self.health,
        }
        return handlers[kind](t)


async def sample_rss(pid: int, out: list[tuple[float, int]], start: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        out.append((loop.time() - start, rss_kb(pid)))
        await asyncio.sleep(1.0)


def percentile_ms(latencies: list[float], q: float) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    i = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return round(ordered[i] * 1e3, 3)


def log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


async def run_traffic(
    driver: Driver, server: ServerProcess, options: SoakOptions
) -> tuple[int, int, list[tuple[float, int]]]:
    """Open-loop traffic for warm-up + seconds; (rss at the end of warm-up, at the end, samples)."""
    loop = asyncio.get_running_loop()
    kinds = list(WEIGHTS)
    weights = [WEIGHTS[k] for k in kinds]
    pick = random.Random(options.seed)
    total = options.warmup_s + options.seconds
    n_slots = int(total * options.rate)
    rss_samples: list[tuple[float, int]] = []
    driver.start = loop.time()
    sampler = asyncio.create_task(sample_rss(server.pid, rss_samples, driver.start))
    tasks: set[asyncio.Task[Any]] = set()
    rss_start = 0
    max_in_flight = 0

    def finished(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug here is an error too
            note = f"driver raised {task.exception()!r}"
            driver.stats.add(Sample("driver_error", driver.now(), 0.0, 0, False, note))

    next_report = 10.0
    try:
        for i in range(n_slots):
            t = i / options.rate
            delay = t - driver.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if not rss_start and t >= options.warmup_s:
                rss_start = server.rss_kb()
                answers = len(driver.stats.samples)
                log(f"warm-up done: rss {rss_start / 1024:.1f} MB, {answers} answers")
            if options.progress and t >= next_report:
                next_report += 10.0
                log(
                    f"t={t:.0f}s answers={len(driver.stats.samples)} errors={driver.stats.errors} "
                    f"in_flight={len(tasks)} rss={server.rss_kb() / 1024:.1f} MB"
                )
            # Every kind once first (a short run sees them all), then seeded weighted draws.
            kind = kinds[i] if i < len(kinds) else pick.choices(kinds, weights)[0]
            task = asyncio.create_task(driver.request(kind, t))
            tasks.add(task)
            task.add_done_callback(finished)
            max_in_flight = max(max_in_flight, len(tasks))
        if tasks:
            await asyncio.wait(tasks, timeout=options.request_timeout_s + 5.0)
        rss_end = server.rss_kb()
        for _ in tasks:  # still unanswered past every timeout: errors too
            driver.stats.add(Sample("unanswered", total, 0.0, 0, False, "no answer"))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        pending = list(tasks)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    if not rss_start:
        rss_start = rss_samples[0][1] if rss_samples else 0
    driver.max_in_flight = max_in_flight
    return rss_start, rss_end, rss_samples


def summarise(
    stats: Stats, options: SoakOptions, rss: tuple[int, int, list[tuple[float, int]]]
) -> dict[str, Any]:
    rss_start, rss_end, samples = rss
    measured = [s for s in stats.samples if s.t >= options.warmup_s]
    kinds: dict[str, dict[str, Any]] = {}
    for kind in sorted({s.kind for s in stats.samples}):
        mine = [s for s in stats.samples if s.kind == kind]
        timed = [s.latency_s for s in measured if s.kind == kind and s.ok]
        kinds[kind] = {
            "n": len(mine),
            "errors": sum(not s.ok for s in mine),
            "p50_ms": percentile_ms(timed, 0.50),
            "p99_ms": percentile_ms(timed, 0.99),
        }
    latencies = [s.latency_s for s in measured if s.ok]
    # Drift: the median of the first and of the last fifth of the measured window.
    fifth = options.seconds / 5.0
    end = options.warmup_s + options.seconds
    early = [s.latency_s for s in measured if s.ok and s.t < options.warmup_s + fifth]
    late = [s.latency_s for s in measured if s.ok and s.t >= end - fifth]
    rss_max = max((kb for _, kb in samples), default=0)
    growth = 100.0 * (rss_end - rss_start) / rss_start if rss_start else None
    return {
        "bench": "soak",
        "seconds": options.seconds,
        "warmup_s": options.warmup_s,
        "rate": options.rate,
        "requests": len(stats.samples),
        "errors": stats.errors,
        "answers_per_s": round(len(measured) / options.seconds, 3) if options.seconds else None,
        "p50_ms": percentile_ms(latencies, 0.50),
        "p99_ms": percentile_ms(latencies, 0.99),
        "max_ms": percentile_ms(latencies, 1.0),
        "p50_ms_first_fifth": percentile_ms(early, 0.50),
        "p50_ms_last_fifth": percentile_ms(late, 0.50),
        "rss_start_mb": round(rss_start / 1024, 1),
        "rss_end_mb": round(rss_end / 1024, 1),
        "rss_max_mb": round(rss_max / 1024, 1),
        "rss_growth_pct": None if growth is None else round(growth, 2),
        "kinds": kinds,
    }


async def soak(options: SoakOptions, workdir: Path | None = None) -> dict[str, Any]:
    """Start the server, seed market data, drive the traffic, stop; the result line's dict."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        server = ServerProcess(workdir, commit_every_s=options.commit_every_s)
        stats = Stats()
        timeout = aiohttp.ClientTimeout(total=options.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=128)
        server.start()
        exit_code: int | None = None
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                ready_s = await server.wait_ready(session, options.ready_timeout_s)
                log(f"server pid {server.pid} ready after {ready_s:.1f} s on {server.base}")
                driver = Driver(session, server.base, options, stats)
                driver.start = asyncio.get_running_loop().time()
                for vdt in VAL_DATETIMES:
                    if not await driver.put_marketdata(0.0, vdt):
                        raise RuntimeError(f"seeding market data failed: {stats.error_notes}")
                stats.samples.clear()
                first_price_s = await driver.prime(options.ready_timeout_s)
                log(f"first priced answer {first_price_s:.1f} s after ready")
                rss = await run_traffic(driver, server, options)
        finally:
            exit_code = await server.stop()
        chain_ok, versions = verify_chain(server.store)
        log_errors = server.log_errors()
        for note in stats.error_notes:
            log(f"error: {note}")
        for line in log_errors[:10]:
            log(f"server log: {line[:400]}")
        result = summarise(stats, options, rss)
        result.update(
            {
                "ready_s": round(ready_s, 2),
                "first_price_s": round(first_price_s, 2),
                "max_in_flight": driver.max_in_flight,
                "metrics_series_first": driver.metrics_series[0] if driver.metrics_series else None,
                "metrics_series_last": driver.metrics_series[-1] if driver.metrics_series else None,
                "versions": versions,
                "chain_verified": chain_ok,
                "server_exit": exit_code,
                "server_log_errors": len(log_errors),
            }
        )
        return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.soak")
    p.add_argument("--seconds", type=float, default=120.0, help="measured traffic after warm-up")
    p.add_argument("--warmup", type=float, default=10.0, help="traffic before RSS 'start'")
    p.add_argument("--rate", type=float, default=10.0, help="requests started per second")
    p.add_argument("--batch", type=int, default=100, help="instruments in a batch valuation")
    p.add_argument("--commit-every", type=float, default=5.0, help="training commit period, s")
    p.add_argument("--seed", type=int, default=20261127)
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.rate <= 0 or args.batch < 1:
        p.error("--seconds and --rate must be > 0, --warmup >= 0, --batch >= 1")
    options = SoakOptions(
        seconds=args.seconds,
        warmup_s=args.warmup,
        rate=args.rate,
        batch_instruments=args.batch,
        commit_every_s=args.commit_every,
        seed=args.seed,
    )
    emit(asyncio.run(soak(options)))


if __name__ == "__main__":
    main()
