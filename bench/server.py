"""The service under load: wrk against the real server, beside a bare aiohttp baseline.

python -m bench.server --seconds S [--connections C] [--batch-connections C]
-> {"bench":"server","single_rps":..,"single_p50_ms":..,"single_p99_ms":..,
    "single_rps_training":..,"single_p99_ms_training":..,"batch1000_p99_ms":..,
    "book1000_p99_ms":..,"overload_timeouts":..,"overload_admitted_p99_ms":..,
    "overload_rejected":..,"baseline_rps":..,"errors":..,...}

Set-up. `spectralmc serve` runs as a subprocess on a fresh local store with the default [core]
config (the default model size) and training on, committing every few seconds; the bench seeds
one market-data snapshot and waits for a model. A bare aiohttp app in a second subprocess reads
and validates the same single-contract `/v1/price` body (JSON parse and the pydantic request
model) and answers a constant: the baseline for what the HTTP stack alone costs here.

Runs, each S seconds of wrk (one thread; this is a 2-core machine, so the server, the trainer
and wrk share two cores) with `--connections` connections for single requests and
`--batch-connections` for 1,000-row requests:
- baseline: the bare app;
- single-contract `/v1/price` with training on (`*_training`), then with training paused
  through the admin API for everything below;
- single-contract `/v1/price` and a single-instrument `/v1/valuations`;
- 1,000-contract `/v1/price` and a 1,000-instrument `/v1/valuations` (`batch1000_*`,
  `book1000_*`);
- overload: an open-loop generator (aiohttp, requests started on a fixed schedule, latency from
  the scheduled start) offering 4x the measured 1,000-contract capacity for S seconds, with a
  10 s client timeout. `overload_admitted_p99_ms` is over the 200 answers, `overload_rejected`
  counts 503 answers that carry Retry-After, `overload_timeouts` the requests that got no answer
  in time.
Each wrk run starts after a SETTLE_S (2 s) pause, so that the requests wrk left in flight when
the previous run stopped are priced first (without it, a run of books could open on a pricing
queue still holding the last 1,000-contract requests, and count their 503 `queue_full`s).
`errors` counts every answer of the wrong status in the runs that should all succeed, socket
errors, a 503 without Retry-After, and failed correctness checks: the same request twice gives
identical bytes, and the served prices equal an in-process reproducible Pricer loaded from the
same stored version, bit for bit. wrk is a Debian package (`apt-get install wrk`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import emit, machine
from bench.soak import (
    AUTH,
    NAMESPACE,
    SERVICE_TOML,
    VAL_DATETIMES,
    ServerProcess,
    contracts,
    free_port,
    instruments,
    market_document,
    utc_text,
)

# The wrk script: POST the body, and print the run's numbers as one JSON line when done.
WRK_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,' ..
    '"max_us":%.1f,"status":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
"""

BASELINE_APP = """\
import sys
from aiohttp import web
from server.http import read_json
from server.valuation import PriceRequest
from config.settings import Settings
from server.keys import SETTINGS_KEY

async def price(request):
    req = await read_json(request, PriceRequest)
    return web.Response(body=b'{"ok":true,"n":%d}' % len(req.contracts),
                        content_type="application/json")

app = web.Application()
app[SETTINGS_KEY] = Settings()
app.router.add_post("/v1/price", price)
loop = None
if sys.argv[2] == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=loop)
"""


def log(msg: str) -> None:
    print(f"[bench.server] {msg}", file=sys.stderr, flush=True)


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        sys.stderr.write(
            "bench.server needs wrk, the HTTP load generator: "
            "`apt-get install wrk` (Debian/Ubuntu) or build it from github.com/wg/wrk\n"
        )
        raise SystemExit(2)
    return found


# Pause before each wrk run (run_wrk): longer than the slowest request of the runs before it.
SETTLE_S = 2.0


def run_wrk(
    url: str, body: bytes, *, seconds: float, connections: int, workdir: Path, name: str
) -> dict[str, Any]:
    """One wrk run; its numbers in ms and req/s, and the errors it saw. It starts after a
    SETTLE_S pause: wrk stops with requests in flight, the server prices them anyway, and a run
    started at once would find the previous run's rows still holding the pricing queue."""
    time.sleep(SETTLE_S)
    body_path = workdir / f"{name}.json"
    body_path.write_bytes(body)
    script = workdir / f"{name}.lua"
    script.write_text(WRK_LUA.format(body=body_path))
    cmd = [
        wrk_binary(), "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "10s", "-s", str(script), url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    errors = raw["status"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    out = {
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_ms": round(raw["p50_us"] / 1e3, 3),
        "p90_ms": round(raw["p90_us"] / 1e3, 3),
        "p99_ms": round(raw["p99_us"] / 1e3, 3),
        "max_ms": round(raw["max_us"] / 1e3, 3),
        "requests": raw["requests"],
        "errors": errors,
    }
    if errors:  # which kind: a wrong status, or a socket error (wrk's own counters)
        out["error_kinds"] = {k: raw[k] for k in ("status", "connect", "read", "write",
                                                  "timeout") if raw[k]}
    log(f"{name}: {out}")
    return out


def price_body(n: int, seed: int) -> bytes:
    return json.dumps({"contracts": contracts(random.Random(seed), n)}).encode()


def valuation_body(n: int, seed: int, data_asof: datetime) -> bytes:
    vdt = VAL_DATETIMES[0]
    rng = random.Random(seed)
    book = instruments(rng, n, vdt)
    if n == 1:
        book[0]["type"] = "european_call"
    return json.dumps(
        {
            "valuation_namespace": NAMESPACE,
            "val_datetime": utc_text(vdt),
            "data_asof": utc_text(data_asof),
            "instruments": book,
        }
    ).encode()


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.read()


async def admin(session: aiohttp.ClientSession, base: str, action: str) -> None:
    async with session.post(f"{base}/v1/admin/training/{action}", headers=AUTH) as r:
        if r.status != 200:
            raise RuntimeError(f"training {action}: {r.status} {await r.text()}")


async def wait_for_model(session: aiohttp.ClientSession, base: str, body: bytes) -> None:
    """Until a price answers 200: the model is loaded and its kernels are warm."""
    for _ in range(600):
        status, _ = await post(session, f"{base}/v1/price", body)
        if status == 200:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("no priced answer within 300 s")


def check_against_pricer(store: Path, answer: bytes, body: bytes) -> int:
    """Mismatches between the served prices and an in-process reproducible Pricer of the same
    stored version (exact equality: the server's path is batch-invariant float64)."""
    import numpy as np

    from spectral_core.pricer import Contracts, Pricer
    from storage.chain import VersionChain
    from storage.localstore import LocalStore

    got = json.loads(answer)
    counter = int(got["model"]["counter"])

    async def load() -> Any:
        store_ = LocalStore(store)
        try:
            return await VersionChain(store_).load(counter)
        finally:
            await store_.aclose()

    snapshot = asyncio.run(load())
    pricer = Pricer.from_snapshot(snapshot, device="cpu", reproducible=True)
    rows = json.loads(body)["contracts"]
    cols = {k: [row[k] for row in rows] for k in rows[0]}
    values = pricer.price(Contracts.from_columns(cols))
    bad = 0
    for key in ("put", "call", "digital_call", "digital_put"):
        served = np.array([row[key] for row in got["contracts"]], dtype=np.float64)
        bad += int(np.sum(served != values[key]))
    return bad


async def overload(
    base: str, body: bytes, *, rate: float, seconds: float, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Open loop at `rate` req/s for `seconds`: admitted latency, 503s, time-outs."""
    admitted: list[float] = []
    rejected = 0
    no_retry_after = 0
    other = 0
    timeouts = 0
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = max(1, int(rate * seconds))

        async def one(t_sched: float) -> None:
            nonlocal rejected, no_retry_after, other, timeouts
            delay = t_sched - (loop.time() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                async with session.post(
                    f"{base}/v1/price", data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    await r.read()
                    status, retry_after = r.status, r.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientError):
                timeouts += 1
                return
            if status == 200:
                admitted.append(loop.time() - start - t_sched)
            elif status == 503:
                rejected += 1
                no_retry_after += retry_after is None
            else:
                other += 1

        await asyncio.gather(*(one(i / rate) for i in range(n)))
    admitted.sort()
    p99 = (
        admitted[min(len(admitted) - 1, math.ceil(0.99 * len(admitted)) - 1)] if admitted else None
    )
    out = {
        "offered": n,
        "rate": round(rate, 1),
        "admitted": len(admitted),
        "admitted_p50_ms": round(admitted[len(admitted) // 2] * 1e3, 3) if admitted else None,
        "admitted_p99_ms": round(p99 * 1e3, 3) if p99 is not None else None,
        "rejected": rejected,
        "rejected_without_retry_after": no_retry_after,
        "other_status": other,
        "timeouts": timeouts,
    }
    log(f"overload: {out}")
    return out


def start_baseline(workdir: Path, event_loop: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    script = workdir / "baseline_app.py"
    script.write_text(BASELINE_APP)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), event_loop], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}"


async def wait_http(base: str, body: bytes) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                status, _ = await post(session, f"{base}/v1/price", body)
                if status == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{base} did not answer")


async def log_rejections(base: str) -> None:
    """The server's own count of the requests it refused (admission control), by reason."""
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(("spectralmc_pricing_rejections_total{",
                            "spectralmc_http_requests_total{")) and 'status="2' not in line:
            log(f"server metrics: {line}")


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    S, C, CB = args.seconds, args.connections, args.batch_connections
    single = price_body(1, args.seed)
    batch = price_body(1000, args.seed + 1)
    result: dict[str, Any] = {"bench": "server", "seconds": S, "connections": C,
                              "batch_connections": CB, "gc_freeze": args.gc_freeze,
                              "event_loop": args.event_loop}
    errors = 0

    proc, base_url = start_baseline(workdir, args.event_loop)
    try:
        asyncio.run(wait_http(base_url, single))
        baseline = run_wrk(f"{base_url}/v1/price", single, seconds=S, connections=C,
                           workdir=workdir, name="baseline")
    finally:
        proc.terminate()
        proc.wait(30)
    errors += baseline["errors"]

    # no [core] section: the served model is the default size
    template = SERVICE_TOML.replace(
        "[server]\n", f"[server]\ngc_freeze = {str(args.gc_freeze).lower()}\n"
                       f"event_loop = \"{args.event_loop}\"\n", 1)
    server = ServerProcess(workdir, commit_every_s=args.commit_every, template=template)
    server.start()
    try:

        async def prepare() -> datetime:
            async with aiohttp.ClientSession() as session:
                ready = await server.wait_ready(session, 300.0)
                log(f"ready after {ready:.1f} s")
                asof = datetime.now(UTC)
                doc = market_document(random.Random(args.seed), asof)
                async with session.put(
                    f"{server.base}/v1/marketdata/{NAMESPACE}/{utc_text(VAL_DATETIMES[0])}",
                    json=doc,
                ) as r:
                    if r.status != 201:
                        raise RuntimeError(f"market data: {r.status} {await r.text()}")
                await wait_for_model(session, server.base, single)
                return asof

        asof = asyncio.run(prepare())
        url_price, url_val = f"{server.base}/v1/price", f"{server.base}/v1/valuations"
        single_val = valuation_body(1, args.seed + 2, asof)
        book = valuation_body(1000, args.seed + 3, asof)

        training = run_wrk(url_price, single, seconds=S, connections=C, workdir=workdir,
                           name="single_training")

        async def pause_and_check() -> tuple[int, bytes]:
            async with aiohttp.ClientSession() as session:
                await admin(session, server.base, "pause")
                await asyncio.sleep(2.0)  # the last commit lands and the model follows HEAD
                answers = [await post(session, url_price, batch) for _ in range(2)]
                vals = [await post(session, url_val, book) for _ in range(2)]
            bad = 0
            for (s1, b1), (s2, b2) in (answers, vals):
                bad += (s1 != 200) + (s2 != 200) + (b1 != b2)
            return bad, answers[0][1]

        bad, answer = asyncio.run(pause_and_check())
        mismatches = check_against_pricer(server.store, answer, batch)
        log(f"byte-identity failures {bad}, prices unequal to the in-process pricer {mismatches}")
        errors += bad + mismatches

        paused = run_wrk(url_price, single, seconds=S, connections=C, workdir=workdir,
                         name="single")
        single_v = run_wrk(url_val, single_val, seconds=S, connections=C, workdir=workdir,
                           name="single_valuation")
        batch1000 = run_wrk(url_price, batch, seconds=S, connections=CB, workdir=workdir,
                            name="batch1000")
        book1000 = run_wrk(url_val, book, seconds=S, connections=CB, workdir=workdir,
                           name="book1000")
        for run in (training, paused, single_v, batch1000, book1000):
            errors += run["errors"]
        if any(run["errors"] for run in (training, paused, single_v, batch1000, book1000)):
            asyncio.run(log_rejections(server.base))
        over = asyncio.run(
            overload(server.base, batch, rate=4.0 * batch1000["rps"], seconds=S)
        )
        errors += over["other_status"] + over["rejected_without_retry_after"]
    finally:
        asyncio.run(server.stop())
    log_errors = server.log_errors()
    for line in log_errors[:5]:
        log(f"server log: {line[:300]}")
    result.update(
        {
            "single_rps": paused["rps"],
            "single_p50_ms": paused["p50_ms"],
            "single_p99_ms": paused["p99_ms"],
            "single_rps_training": training["rps"],
            "single_p99_ms_training": training["p99_ms"],
            "single_valuation_rps": single_v["rps"],
            "single_valuation_p99_ms": single_v["p99_ms"],
            "batch1000_rps": batch1000["rps"],
            "batch1000_p50_ms": batch1000["p50_ms"],
            "batch1000_p99_ms": batch1000["p99_ms"],
            "book1000_rps": book1000["rps"],
            "book1000_p50_ms": book1000["p50_ms"],
            "book1000_p99_ms": book1000["p99_ms"],
            "overload_rate": over["rate"],
            "overload_timeouts": over["timeouts"],
            "overload_admitted": over["admitted"],
            "overload_admitted_p99_ms": over["admitted_p99_ms"],
            "overload_rejected": over["rejected"],
            "baseline_rps": baseline["rps"],
            "baseline_p99_ms": baseline["p99_ms"],
            "errors": errors,
            "server_log_errors": len(log_errors),
            "machine": machine(),
        }
    )
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.server")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    p.add_argument("--connections", type=int, default=16, help="wrk connections, single runs")
    p.add_argument("--batch-connections", type=int, default=4,
                   help="wrk connections, 1,000-row runs")
    p.add_argument("--commit-every", type=float, default=5.0, help="training commit period, s")
    p.add_argument("--seed", type=int, default=20261202)
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                   help="serve with [server] gc_freeze = false (default true, as the server)")
    p.add_argument("--event-loop", choices=["asyncio", "uvloop"], default="uvloop",
                   help="[server] event_loop of the service and the baseline (default uvloop, "
                        "as the server)")
    args = p.parse_args(argv)
    if args.seconds < 1 or args.connections < 1 or args.batch_connections < 1:
        p.error("--seconds must be >= 1, --connections and --batch-connections >= 1")
    wrk_binary()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        result = bench(args, Path(tmp))
    result["wall_s"] = round(time.monotonic() - start, 1)
    emit(result)


if __name__ == "__main__":
    main()
