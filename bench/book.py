"""Book valuation with scenarios, end to end through the app (`python -m bench.inference --book`).

A named model of `--process` (an untrained model of the default size: the weights do not change
the speed) serves a 1,000-instrument book (European calls and puts, digitals and forwards over
strikes 70..130 and expiries 0.1..2.9 y) against one market-data snapshot whose
model_params[SPX][<model>] hold mid-domain parameters (the vol surface for gbm). Each request
is `POST /v1/valuations` with `--scenarios` named shifts (spot, rate and the model's vol or v0),
timed from the client over loopback HTTP, one at a time after a warm-up; the same book without
scenarios is timed alongside. Target (issue: serve the model library): p99 <= 100 ms for 1,000
instruments and 16 scenarios on this CPU.

-> {"bench": "inference_book", "process", "instruments", "scenarios", "requests", "p50_ms",
    "p99_ms", "no_scenarios_p50_ms", "no_scenarios_p99_ms", "model_rows", "machine"}
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.app import serve_snapshot
from bench.common import emit, machine
from config.settings import LoggingSettings, ServerSettings
from server.logging import configure_logging
from server.valuation import BookModel
from spectral_core.config import CoreConfig
from spectral_core.trainer import Trainer

VDT = datetime(2026, 6, 30, 16, 0, tzinfo=UTC)
MODEL = "book"


def log(msg: str) -> None:
    print(f"[inference --book] {msg}", file=sys.stderr, flush=True)


def mid_params(config: CoreConfig, names: tuple[str, ...]) -> dict[str, float]:
    return {n: 0.5 * (config.domain.bounds(n).lower + config.domain.bounds(n).upper)
            for n in names}


def book(n: int, *, seed: int = 20261204) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    types = ["european_call", "european_put", "digital_call", "digital_put", "forward"]
    weights = [0.4, 0.4, 0.08, 0.08, 0.04]
    out = []
    for i in range(n):
        days = int(rng.uniform(0.1, 2.9) * 365)
        out.append({
            "id": f"i{i}",
            "type": str(rng.choice(types, p=weights)),
            "underlying": "SPX",
            "strike": round(float(rng.uniform(70.0, 130.0)), 2),
            "expiry": (VDT + timedelta(days=days)).isoformat(),
            "quantity": round(float(rng.uniform(-10.0, 10.0)), 2),
        })
    return out


def scenarios(k: int, process: str) -> list[dict[str, Any]]:
    vol = "vol_abs" if process == "gbm" else "v0_abs"
    step = 0.01 if process == "gbm" else 0.002
    out = []
    for j in range(k):
        spot = (j % 5 - 2) * 0.05  # -10% .. +10%
        out.append({"name": f"s{j}", "spot_rel": spot, vol: ((j // 5) % 3 - 1) * step,
                    "rate_abs": (j % 2) * 0.0025})
    return out


def untrained(process: str) -> tuple[Any, dict[str, Any]]:
    """An untrained model of the default size and its quality record (the weights do not change
    the speed)."""
    config = CoreConfig(process=process, device="cpu")
    with Trainer(config) as trainer:
        return trainer.snapshot(), trainer.quality().as_dict()


def market(process: str, config: CoreConfig, asof: datetime) -> dict[str, Any]:
    body: dict[str, Any] = {
        "data_asof": asof.isoformat(),
        "spots": {"SPX": 100.0},
        "zero_curves": {"USD-OIS": {"tenors": [0.25, 1.0, 3.0], "rates": [0.03, 0.032, 0.035]}},
        "dividend_curves": {"SPX": {"tenors": [1.0, 3.0], "rates": [0.012, 0.015]}},
        "vol_surfaces": {"SPX": {"expiries": [0.25, 1.0, 3.0], "strikes": [70.0, 100.0, 130.0],
                                 "vols": [[0.3, 0.22, 0.2], [0.28, 0.21, 0.19],
                                          [0.26, 0.21, 0.2]]}},
    }
    if process != "gbm":
        names = BookModel(MODEL, process).params  # what a valuation reads off model_params
        body["model_params"] = {"SPX": {MODEL: mid_params(config, names)}}
    return body


async def run(process: str, store_dir: Path, *, instruments: int, n_scenarios: int,
              requests: int, gc_freeze: bool = True) -> dict[str, Any]:
    snapshot, quality = untrained(process)
    config = CoreConfig.model_validate(snapshot.meta["config"])
    server_settings = ServerSettings(
        max_instruments=max(instruments, 1), max_scenarios=max(n_scenarios, 1),
        max_body_bytes=64 * 1024 * 1024, request_timeout_s=600.0, gc_freeze=gc_freeze)
    asof = datetime.now(UTC) - timedelta(minutes=1)
    async with serve_snapshot(store_dir, snapshot, model=MODEL, server=server_settings,
                              quality=quality, message="bench.inference --book") as (
            server, session):
        log(f"serving an untrained {process} model as {MODEL!r}")
        vdt = VDT.isoformat().replace("+00:00", "Z")
        async with session.put(server.make_url(f"/v1/marketdata/eod/{vdt}"),
                               json=market(process, config, asof)) as resp:
            assert resp.status == 201, await resp.text()
        base = {"valuation_namespace": "eod", "val_datetime": vdt,
                "data_asof": datetime.now(UTC).isoformat(), "model": MODEL,
                "instruments": book(instruments)}
        with_scenarios = {**base, "scenarios": scenarios(n_scenarios, process)}

        async def timed(body: dict[str, Any], n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                async with session.post(server.make_url("/v1/valuations"),
                                        json=body) as resp:
                    raw = await resp.read()
                    assert resp.status == 200, raw[:500]
                out.append((time.perf_counter() - t0) * 1e3)
            return out

        await timed(with_scenarios, 2)  # warm-up
        log(f"timing {requests} requests of {instruments} instruments x "
            f"{n_scenarios} scenarios")
        lat = await timed(with_scenarios, requests)
        plain = await timed(base, requests)
    options = sum(1 for i in base["instruments"] if i["type"] != "forward")
    return {
        "bench": "inference_book",
        "process": process,
        "instruments": instruments,
        "scenarios": n_scenarios,
        "requests": requests,
        "gc_freeze": gc_freeze,
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "no_scenarios_p50_ms": round(float(np.percentile(plain, 50)), 2),
        "no_scenarios_p99_ms": round(float(np.percentile(plain, 99)), 2),
        "model_rows": options * (1 + n_scenarios),
        "target_p99_ms": 100.0,
        "machine": machine(),
    }


def main(process: str, *, instruments: int, n_scenarios: int, requests: int,
         gc_freeze: bool = True) -> None:
    configure_logging(LoggingSettings(level="WARNING", format="json"))
    with tempfile.TemporaryDirectory() as tmp:
        emit(asyncio.run(run(process, Path(tmp) / "store", instruments=instruments,
                             n_scenarios=n_scenarios, requests=requests, gc_freeze=gc_freeze)))
