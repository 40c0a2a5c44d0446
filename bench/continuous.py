"""Continuous learning: the served model keeps getting better, and only better models are served.

python -m bench.continuous --model bs|heston|bates --minutes MIN [--interval-s S]
    [--commit-every-s S] [--ready-timeout-s S] [--averaging none|ema] [--workdir DIR]
-> {"bench":"continuous","model":..,"minutes":MIN,"ready_s":..,"served_mean_bp":{"5":..,..},
    "served_p99_bp":{..},"promotions":..,"refused":..,"monotone":true|false,"store_mb":..,
    "per_minute":[{"minute":..,"version":..,"mean_bp":..,"p99_bp":..},..],"machine":..}

Set-up. `spectralmc serve` runs as a subprocess on a fresh local store (in a temp dir, or
`--workdir` to keep the store and the server log) with training on and the production default
[core] config (the real model: only [server], [store], [training], [training.commit], [model] and
[logging] are set, plus `[core] process` for heston and bates), committing every
`--commit-every-s` (60) seconds (after the server's default ramp: first_after_s, then doubling)
and polling for new versions every second. `--model bs` is the gbm process. `--averaging ema` sets
`[core.optim] averaging = "ema"` (iterate averaging from the end of the first anneal, served and
assessed on the average; default none, the production default).

Method. `ready_s`: seconds from the process start until `POST /v1/price` first answers 200 (polled
every 0.25 s; a 503, no model yet, or a refused connection is "not ready"). From then on, at
0, S, 2S, ... seconds (S = `--interval-s`, 60) and at the end (MIN minutes after ready), the 2,000
held-out contracts of bench.accuracy (`held_out_contracts(2000, domain)`, the default CoreConfig's
domain) are priced through `POST /v1/price` from outside, in requests within the server's limits
(rows per request <= min(max_instruments, max_batch_rows), body <= max_body_bytes), and each put
is compared with the process's oracle `reference_put` (Black-Scholes for gbm): the absolute error
in bp of spot. One measurement is on one served version (a measurement that straddles a swap is
repeated); `per_minute` records its minute after ready, that version and the mean and p99 error.
`served_*_bp["M"]`: the measurement at minute M (the last one at or before it), for M in 5, 10, 30
up to MIN, and MIN.

`monotone`: true when, between every two consecutive measurements, the served mean error never
rises by more than 2 standard errors of the paired difference: with d = err_now - err_before over
the same 2,000 contracts, mean(d) <= 2 * std(d) / sqrt(2000) (std with ddof 1; two measurements of
one version have d = 0). A non-finite served price fails it.

`promotions` / `refused`: the server's counter `spectralmc_promotions_total{result="promoted"}` /
`{result="refused"}` (summed over its other labels) read just before the stop, so the decision on
the final commit is not in it (null when the server does not export the counter). `store_mb`:
bytes under the store directory after the server has stopped (SIGTERM: drain, final commit) / 1e6.

`--model heston|bates` serves that process as a named model next to bs (as `make run` serves
heston; bs trains alongside) and prices the held-out set with `"model"` in each request; its
first priced answer waits for a version to pass the promotion gate. Exit status 1 with a
one-line message when the server exits before it is ready. Progress goes to stderr, the result
line alone to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.common import emit, held_out_contracts, machine
from bench.soak import SERVICE_TOML, ServerProcess
from config.settings import ModelSettings, ServerSettings
from spectral_core.config import CoreConfig, ProcessName
from spectral_core.processes import get_process

MODELS: dict[str, ProcessName] = {"bs": "gbm", "heston": "heston", "bates": "bates"}
HELD_OUT_CONTRACTS = 2000
SUMMARY_MINUTES = (5.0, 10.0, 30.0)
READY_POLL_S = 0.25
MONOTONE_Z = 2.0
PROMOTIONS = "spectralmc_promotions_total"
# Tries of one measurement when its requests were answered by different versions (a swap).
MEASURE_TRIES = 3
# Tries of one request answered 503 (admission: queue full or deadline) before giving up.
REQUEST_TRIES = 5
# `{"contracts":[` ... `]}` around the rows of a request body (bs, the default model; a named
# model's requests name it: `{"model":"heston","contracts":[` ...).
BODY_HEAD, BODY_TAIL = b'{"contracts":[', b"]}"


def body_head(model: str) -> bytes:
    return BODY_HEAD if model == "bs" else b'{"model":"%s","contracts":[' % model.encode()


class ServerExited(RuntimeError):
    """The server exited before it priced anything; `reason` is the last line of its log."""

    def __init__(self, returncode: int, reason: str) -> None:
        super().__init__(f"server exited with status {returncode} before it was ready: {reason}")
        self.returncode = returncode
        self.reason = reason


@dataclass(frozen=True)
class ContinuousOptions:
    model: str = "bs"
    minutes: float = 30.0
    interval_s: float = 60.0
    commit_every_s: float = 60.0
    ready_timeout_s: float = 900.0
    stop_timeout_s: float = 120.0
    progress: bool = True
    averaging: str = "none"  # [core.optim] averaging


@dataclass(frozen=True)
class Measurement:
    minute: float  # scheduled, minutes after ready
    version: int
    err_bp: np.ndarray  # (2000,) float64, |served put - oracle put| / X0 * 1e4

    def row(self) -> dict[str, Any]:
        mean, p99 = error_summary(self.err_bp)
        return {"minute": round(self.minute, 4), "version": self.version,
                "mean_bp": mean, "p99_bp": p99}


def log(msg: str) -> None:
    print(f"[continuous] {msg}", file=sys.stderr, flush=True)


# --- pure parts -------------------------------------------------------------------------------


def summary_minutes(minutes: float) -> list[float]:
    """The minutes reported in served_*_bp: 5, 10 and 30 where <= `minutes`, and `minutes`."""
    keys = [m for m in SUMMARY_MINUTES if m <= minutes]
    if minutes not in keys:
        keys.append(minutes)
    return keys


def minute_key(minute: float) -> str:
    return f"{minute:g}"


def schedule_s(minutes: float, interval_s: float) -> list[float]:
    """Measurement times in seconds after ready: 0, interval, 2 interval, ... and the end."""
    if minutes <= 0 or interval_s <= 0:
        raise ValueError(f"minutes and interval_s must be > 0, got {minutes}, {interval_s}")
    total = minutes * 60.0
    n = math.floor(total / interval_s + 1e-9)
    times = [k * interval_s for k in range(n + 1)]
    if total - times[-1] > 1e-9:
        times.append(total)
    return times


def chunk_bounds(
    row_bytes: Sequence[int], *, max_rows: int, max_body_bytes: int, overhead: int
) -> list[tuple[int, int]]:
    """Consecutive [start, stop) row ranges covering every row, each of at most `max_rows` rows
    whose body (`overhead` + the rows + a comma between two) is at most `max_body_bytes`."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    bounds: list[tuple[int, int]] = []
    start, size = 0, overhead
    for i, n in enumerate(row_bytes):
        if overhead + n > max_body_bytes:
            raise ValueError(f"row {i} alone ({n} bytes) exceeds the body limit {max_body_bytes}")
        comma = 1 if i > start else 0
        if i - start == max_rows or size + comma + n > max_body_bytes:
            bounds.append((start, i))
            start, size, comma = i, overhead, 0
        size += comma + n
    if start < len(row_bytes):
        bounds.append((start, len(row_bytes)))
    return bounds


def error_summary(err_bp: np.ndarray) -> tuple[float | None, float | None]:
    """(mean, p99) of the errors; (None, None) when any is non-finite (a null served price)."""
    if not np.all(np.isfinite(err_bp)):
        return None, None
    return float(np.mean(err_bp)), float(np.quantile(err_bp, 0.99))


def is_monotone(errors: Sequence[np.ndarray], *, z: float = MONOTONE_Z) -> bool:
    """No consecutive pair where the mean error rises by more than z standard errors of the
    paired difference (the same contracts each time); a non-finite difference fails."""
    for before, now in pairwise(errors):
        d = np.asarray(now, dtype=np.float64) - np.asarray(before, dtype=np.float64)  # (n,)
        rise = float(np.mean(d))
        se = float(np.std(d, ddof=1)) / math.sqrt(d.size) if d.size > 1 else 0.0
        if not rise <= z * se:  # NaN fails too
            return False
    return True


def promotion_counts(metrics_text: str) -> tuple[int | None, int | None]:
    """(promoted, refused) from the Prometheus text; (None, None) when the counter is absent."""
    present, counts = False, {"promoted": 0, "refused": 0}
    for family in text_string_to_metric_families(metrics_text):
        if family.name in (PROMOTIONS, PROMOTIONS.removesuffix("_total")):
            present = True
        for sample in family.samples:
            if sample.name == PROMOTIONS and sample.labels.get("result") in counts:
                present = True
                counts[sample.labels["result"]] += round(sample.value)
    if not present:
        return None, None
    return counts["promoted"], counts["refused"]


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


# --- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """The held-out contracts as request bodies, their oracle puts and spots."""

    bodies: list[bytes]
    probe: bytes  # one contract: the readiness probe
    oracle: np.ndarray  # (n,) float64
    X0: np.ndarray  # (n,) float64


def held_out(process_name: ProcessName, n: int = HELD_OUT_CONTRACTS, *,
             model: str = "bs") -> HeldOut:
    process = get_process(process_name)
    cols = held_out_contracts(n, CoreConfig(process=process_name).domain)
    theta = np.column_stack([cols[f] for f in process.request_fields])  # (n, P)
    oracle = np.asarray(process.reference_put(theta, S0=cols["X0"], K=cols["K"]), np.float64)
    fields = ("X0", "K", *process.request_fields)
    rows = [json.dumps({f: float(cols[f][i]) for f in fields}).encode() for i in range(n)]
    server, model_settings = ServerSettings(), ModelSettings()
    head = body_head(model)
    bounds = chunk_bounds(
        [len(r) for r in rows],
        max_rows=min(server.max_instruments, model_settings.max_batch_rows),
        max_body_bytes=server.max_body_bytes,
        overhead=len(head) + len(BODY_TAIL),
    )
    bodies = [head + b",".join(rows[a:b]) + BODY_TAIL for a, b in bounds]
    return HeldOut(bodies, head + rows[0] + BODY_TAIL, oracle, cols["X0"])


# Wait as long as the server lets a request wait: a loaded 2-core machine prices slowly.
HEADERS = {"Content-Type": "application/json",
           "X-Deadline-Ms": f"{ServerSettings().request_timeout_s * 1e3:g}"}


async def post_price(session: aiohttp.ClientSession, base: str, body: bytes) -> dict[str, Any]:
    """One /v1/price answer; a 503 (admission) is retried after its Retry-After."""
    for _ in range(REQUEST_TRIES):
        async with session.post(f"{base}/v1/price", data=body, headers=HEADERS) as resp:
            if resp.status == 200:
                answer: dict[str, Any] = await resp.json()
                return answer
            text = (await resp.text())[:300]
            if resp.status != 503:
                raise RuntimeError(f"/v1/price answered {resp.status}: {text}")
            wait_s = float(resp.headers.get("Retry-After", "1"))
        log(f"/v1/price refused (503), retrying in {wait_s:g} s: {text}")
        await asyncio.sleep(wait_s)
    raise RuntimeError(f"/v1/price refused {REQUEST_TRIES} times in a row")


async def measure(
    session: aiohttp.ClientSession, base: str, data: HeldOut, *, minute: float
) -> Measurement:
    """The served error on every held-out contract, all answered by one version."""
    versions: set[int] = set()
    for _ in range(MEASURE_TRIES):
        answers = [await post_price(session, base, body) for body in data.bodies]
        versions = {int(a["model"]["counter"]) for a in answers}
        if len(versions) == 1:
            break
        log(f"minute {minute:g}: answered by versions {sorted(versions)} (a swap); again")
    else:
        log(f"minute {minute:g}: still mixed versions {sorted(versions)}; keeping the newest")
    put = np.array([c["put"] for a in answers for c in a["contracts"]], dtype=np.float64)
    err = np.abs(put - data.oracle) / data.X0 * 1e4  # (n,) bp of spot
    return Measurement(minute=minute, version=max(versions), err_bp=err)


# --- the run ----------------------------------------------------------------------------------


def service_toml(model: str, averaging: str = "none") -> str:
    """SERVICE_TOML for `model`: bs is the top-level [core]; heston and bates are named models
    of their process next to it, as `make run` serves heston (bs trains alongside: the
    training switch is per server, with a per-model opt-out only). The averaging is set when
    not "none"; the rest of [core] stays default."""
    out = SERVICE_TOML
    core = "core"
    if model != "bs":
        core = f"models.{model}.core"
        out += f'\n[models.{model}]\ntraining = true\n\n[{core}]\nprocess = "{MODELS[model]}"\n'
    if averaging != "none":
        out += f'\n[{core}.optim]\naveraging = "{averaging}"\n'
    return out


async def first_price_s(
    session: aiohttp.ClientSession, server: ServerProcess, probe: bytes, *,
    started: float, timeout_s: float,
) -> float:
    """Seconds from `started` until /v1/price first answers 200 (503 or no connection: not yet)."""
    assert server.proc is not None
    while time.monotonic() - started < timeout_s:
        if server.proc.poll() is not None:
            tail = server.log_tail(5).strip().splitlines()
            raise ServerExited(server.proc.returncode, tail[-1] if tail else "(empty log)")
        with contextlib.suppress(aiohttp.ClientConnectionError, TimeoutError):
            async with session.post(f"{server.base}/v1/price", data=probe,
                                    headers=HEADERS) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
                if resp.status != 503:
                    text = (await resp.text())[:300]
                    raise RuntimeError(f"/v1/price answered {resp.status} at start-up: {text}")
        await asyncio.sleep(READY_POLL_S)
    raise RuntimeError(f"nothing priced within {timeout_s:g} s:\n{server.log_tail()}")


async def measure_over_time(
    session: aiohttp.ClientSession, server: ServerProcess, data: HeldOut,
    options: ContinuousOptions, *, ready_at: float,
) -> list[Measurement]:
    """One measurement at each scheduled time after ready (late ones start at once)."""
    assert server.proc is not None
    out: list[Measurement] = []
    for t in schedule_s(options.minutes, options.interval_s):
        delay = ready_at + t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n"
                               + server.log_tail())
        begun = time.monotonic()
        m = await measure(session, server.base, data, minute=t / 60.0)
        out.append(m)
        if options.progress:
            row = m.row()
            log(f"minute {m.minute:g}: version {m.version}, mean {_bp(row['mean_bp'])}, "
                f"p99 {_bp(row['p99_bp'])} (priced in {time.monotonic() - begun:.2f} s)")
    return out


def _bp(x: float | None) -> str:
    return "n/a (non-finite)" if x is None else f"{x:.3f} bp"


def summarise(
    options: ContinuousOptions, measurements: list[Measurement], *, ready_s: float,
    metrics_text: str, store: Path,
) -> dict[str, Any]:
    mean_at: dict[str, float | None] = {}
    p99_at: dict[str, float | None] = {}
    for minute in summary_minutes(options.minutes):
        at = [m for m in measurements if m.minute <= minute + 1e-9][-1]
        mean_at[minute_key(minute)], p99_at[minute_key(minute)] = error_summary(at.err_bp)
    promoted, refused = promotion_counts(metrics_text)
    return {
        "bench": "continuous",
        "model": options.model,
        "averaging": options.averaging,
        "minutes": options.minutes,
        "ready_s": round(ready_s, 2),
        "served_mean_bp": mean_at,
        "served_p99_bp": p99_at,
        "promotions": promoted,
        "refused": refused,
        "monotone": is_monotone([m.err_bp for m in measurements]),
        "store_mb": round(store_bytes(store) / 1e6, 3),
        "per_minute": [m.row() for m in measurements],
        "interval_s": options.interval_s,
        "commit_every_s": options.commit_every_s,
        "machine": machine(),
    }


async def continuous(options: ContinuousOptions, workdir: Path | None = None) -> dict[str, Any]:
    """Start the server, measure the served error over time, stop; the result line's dict."""
    process_name = MODELS[options.model]
    data = held_out(process_name, model=options.model)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="continuous-")))
        workdir.mkdir(parents=True, exist_ok=True)
        server = ServerProcess(workdir, commit_every_s=options.commit_every_s,
                               template=service_toml(options.model, options.averaging))
        timeout = aiohttp.ClientTimeout(total=ServerSettings().request_timeout_s + 30.0)
        started = time.monotonic()
        server.start(new_session=True)
        log(f"server pid {server.pid} on {server.base}, log {server.log_path}")
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                ready_s = await first_price_s(session, server, data.probe, started=started,
                                              timeout_s=options.ready_timeout_s)
                log(f"first priced answer {ready_s:.1f} s after the process started")
                measurements = await measure_over_time(
                    session, server, data, options, ready_at=started + ready_s)
                async with session.get(f"{server.base}/metrics") as resp:
                    metrics_text = await resp.text()
        finally:
            code = await server.stop(options.stop_timeout_s, signum=signal.SIGTERM)
            log(f"server stopped with status {code}")
        return summarise(options, measurements, ready_s=ready_s, metrics_text=metrics_text,
                         store=server.store)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.continuous")
    p.add_argument("--model", choices=sorted(MODELS), default="bs",
                   help="bs (the gbm process), heston or bates")
    p.add_argument("--minutes", type=float, required=True, help="minutes measured after ready")
    p.add_argument("--interval-s", type=float, default=60.0, help="seconds between measurements")
    p.add_argument("--commit-every-s", type=float, default=60.0, help="training commit period")
    p.add_argument("--ready-timeout-s", type=float, default=900.0,
                   help="longest wait for the first priced answer")
    p.add_argument("--averaging", choices=["none", "ema"], default="none",
                   help="[core.optim] averaging of the served model (default none)")
    p.add_argument("--workdir", type=Path,
                   help="keep the store, settings and server log here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.interval_s <= 0 or args.commit_every_s <= 0:
        p.error("--minutes, --interval-s and --commit-every-s must be > 0")
    if args.workdir is not None and (args.workdir / "store").exists():
        p.error(f"{args.workdir} already holds a store; the bench starts from a fresh one")
    options = ContinuousOptions(model=args.model, minutes=args.minutes,
                                interval_s=args.interval_s, commit_every_s=args.commit_every_s,
                                ready_timeout_s=args.ready_timeout_s, averaging=args.averaging)
    try:
        result = asyncio.run(continuous(options, args.workdir))
    except (ServerExited, RuntimeError) as exc:  # RuntimeError: nothing priced in time
        print(f"bench.continuous: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log("interrupted; the server was stopped")
        return 130
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
