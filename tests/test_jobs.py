"""Declarative real-time jobs: schedule, provenance, overrun skipping, failures, config errors."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from server.app import create_app
from server.jobs import JobScheduler, JobsConfigError, load_jobs, next_slot, parse_jobs
from server.keys import JOBS_KEY
from server.valuation import Limits, ValuationRequest
from storage.localstore import LocalStore
from storage.marketdata import MarketDataStore, SnapshotBody, datetime_token, format_utc
from storage.objectstore import ObjectStore
from tests.server_fixtures import (
    Client,
    check_schema,
    commit_model,
    loads,
    make_settings,
    market_body,
    start_client,
)

EVERY = 0.2
LIMITS = Limits(max_items=100, max_string_len=64)


def utc_now() -> datetime:
    return datetime.now(UTC)


def write_jobs(path: Path, jobs: list[dict[str, Any]]) -> Path:
    """A jobs TOML file; instruments expire a year from now so the book stays valid."""
    expiry = format_utc(utc_now() + timedelta(days=365))
    lines = []
    for job in jobs:
        lines += ["[[jobs]]"] + [f"{k} = {json.dumps(v)}" for k, v in job.items()]
        for inst in (
            {"id": "c", "type": "european_call", "strike": 100.0, "quantity": 2.0},
            {"id": "dc", "type": "digital_call", "strike": 110.0, "quantity": 10.0},
            {"id": "f", "type": "forward", "strike": 99.0, "quantity": -1.0},
        ):
            lines.append("[[jobs.instruments]]")
            fields = {**inst, "underlying": "SPX", "expiry": expiry}
            lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def jobs_status(client: Client) -> dict[str, dict[str, Any]]:
    resp = await client.get("/v1/jobs")
    assert resp.status == 200
    body = await resp.json()
    check_schema(body, "JobList")
    return {j["name"]: j for j in body["jobs"]}


async def wait_for(
    client: Client, check: Callable[[dict[str, dict[str, Any]]], bool], *, timeout: float = 8.0
) -> dict[str, dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = await jobs_status(client)
        if check(status):
            return status
        assert asyncio.get_running_loop().time() < deadline, status
        await asyncio.sleep(0.05)


async def stored_runs(store: ObjectStore, name: str) -> list[dict[str, Any]]:
    keys = sorted(await store.list(f"jobs/{name}/"))
    docs = []
    for key in keys:
        doc = loads((await store.get(key)).data)
        assert key == f"jobs/{name}/{datetime_token(datetime.fromisoformat(doc['scheduled']))}.json"
        docs.append(doc)
    return docs


# --- config -------------------------------------------------------------------------------------


def test_example_config_parses() -> None:
    jobs = load_jobs(Path(__file__).parents[1] / "config" / "jobs.example.toml", limits=LIMITS)
    assert [j.name for j in jobs] == ["spx-book-1s"]
    assert jobs[0].every_s == 1.0 and len(jobs[0].instruments) == 3


def _job(**change: Any) -> dict[str, Any]:
    inst = {
        "id": "a",
        "type": "forward",
        "underlying": "SPX",
        "strike": 1.0,
        "expiry": "2030-01-01T00:00:00Z",
    }
    return {"name": "j", "every_s": 1.0, "namespace": "live", "instruments": [inst], **change}


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"jobs": [_job(), _job()]}, "duplicate job name 'j'"),
        ({"jobs": [_job(every_s=0)]}, "jobs.0.every_s"),
        ({"jobs": [_job(every_s=float("inf"))]}, "jobs.0.every_s"),
        ({"jobs": [_job(name="a/b")]}, "jobs.0.name"),
        ({"jobs": [_job(colour="red")]}, "jobs.0.colour"),
        ({"jobs": [_job(instruments=[])]}, "jobs.0.instruments"),
        ({"jobs": [_job(instruments=_job()["instruments"] * 2)]}, "jobs.0.instruments.1.id"),
        ({"jobs": [_job(instruments=_job()["instruments"] * 101)]}, "at most 100 instruments"),
        ({"job": []}, "job"),
    ],
)
def test_invalid_jobs_name_the_field(doc: dict[str, Any], needle: str) -> None:
    with pytest.raises(JobsConfigError, match="invalid") as info:
        parse_jobs(doc, limits=LIMITS)
    assert needle in str(info.value)


def test_unreadable_jobs_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(JobsConfigError, match="does not exist"):
        load_jobs(tmp_path / "missing.toml", limits=LIMITS)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[jobs]\n")
    with pytest.raises(JobsConfigError, match="not valid TOML"):
        load_jobs(bad, limits=LIMITS)
    # create_app refuses to start with a bad jobs file.
    with pytest.raises(JobsConfigError):
        create_app(make_settings(jobs_file=bad), store=LocalStore(tmp_path / "s"))


def test_slots_are_aligned_to_the_epoch() -> None:
    t = datetime(2024, 7, 1, 12, 0, 0, 100_000, tzinfo=UTC)
    assert next_slot(t, 0.2) == datetime(2024, 7, 1, 12, 0, 0, 200_000, tzinfo=UTC)
    on_slot = datetime(2024, 7, 1, 12, 0, 0, 200_000, tzinfo=UTC)
    assert next_slot(on_slot, 0.2) == datetime(2024, 7, 1, 12, 0, 0, 400_000, tzinfo=UTC)
    assert next_slot(t, 3600.0) == datetime(2024, 7, 1, 13, 0, tzinfo=UTC)


# --- running jobs -------------------------------------------------------------------------------


async def test_job_runs_on_schedule_with_provenance(aiohttp_client: Any, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", fsync=False)
    record = await commit_model(store)
    now = utc_now()
    first = next_slot(now, EVERY)
    md = MarketDataStore(store)
    hashes = {}
    body = SnapshotBody.model_validate(market_body(now - timedelta(seconds=1)))
    for k in range(40):  # snapshots on the slot grid for the next 8 s
        vdt = first + timedelta(microseconds=k * 200_000)
        stored = await md.put(namespace="live", val_datetime=vdt, body=body)
        hashes[format_utc(vdt)] = stored.content_hash

    spec = {"name": "book", "every_s": EVERY, "namespace": "live", "greeks": True}
    jobs_file = write_jobs(tmp_path / "jobs.toml", [spec])
    settings = make_settings(jobs_file=jobs_file)
    client = await start_client(aiohttp_client, store=store, settings=settings, clock=utc_now)
    status = await wait_for(client, lambda s: s["book"]["runs"] >= 4)
    job = status["book"]
    assert job["every_s"] == EVERY and job["instruments"] == 3
    assert job["last_status"] == "ok" and job["last_error"] is None, job
    assert job["last_lag_s"] >= 0.0

    docs = [d for d in await stored_runs(store, "book") if d["status"] == "ok"]
    assert len(docs) >= 4
    slots = [datetime.fromisoformat(d["scheduled"]) for d in docs]
    for a, b in itertools.pairwise(slots):
        gap = (b - a) // timedelta(microseconds=1)
        assert gap > 0 and gap % 200_000 == 0
    for doc in docs:
        scheduled = doc["scheduled"]
        assert doc["request"]["val_datetime"] == scheduled
        assert doc["request"]["data_asof"] == doc["started"]
        t = [datetime.fromisoformat(doc[k]) for k in ("scheduled", "started", "finished")]
        assert t[0] <= t[1] <= t[2]
        assert doc["dataset"]["val_datetime"] == scheduled
        assert doc["dataset"]["hash"] == hashes[scheduled]
        assert doc["model"] == {
            "name": "bs",
            "counter": 1,
            "version_hash": record.version_hash,
            "mode": "tracking",
        }
        assert doc["result"]["totals"]["instruments"] == 3
    # The stored request reproduces the stored result through the public API.
    again = await client.post("/v1/valuations", json=docs[0]["request"])
    assert loads(await again.read()) == docs[0]["result"]

    text = await (await client.get("/metrics")).text()
    assert 'spectralmc_job_runs_total{job="book",result="ok"}' in text
    assert 'spectralmc_job_lag_seconds_count{job="book"}' in text


async def test_overrunning_job_skips_and_counts_misses(aiohttp_client: Any, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", fsync=False)
    job = {"name": "slow", "every_s": EVERY, "namespace": "live"}
    jobs_file = write_jobs(tmp_path / "jobs.toml", [job])
    scheduler: list[JobScheduler] = []

    def slow_down(app: web.Application) -> None:
        sched = app[JOBS_KEY]
        real = sched.value

        async def slow(req: ValuationRequest) -> dict[str, Any]:
            await asyncio.sleep(2.5 * EVERY)  # every run overruns two slots
            return await real(req)

        sched.value = slow
        scheduler.append(sched)

    client = await start_client(
        aiohttp_client,
        store=store,
        settings=make_settings(jobs_file=jobs_file),
        clock=utc_now,
        wait_ready=False,
        prepare=slow_down,
    )
    status = await wait_for(client, lambda s: s["slow"]["runs"] >= 3)
    assert status["slow"]["misses"] >= 2 * 2
    docs = await stored_runs(store, "slow")
    assert len(docs) >= 3
    # Never piled up: each run started after the previous one finished.
    for prev, cur in itertools.pairwise(docs):
        assert datetime.fromisoformat(cur["started"]) >= datetime.fromisoformat(prev["finished"])
    text = await (await client.get("/metrics")).text()
    assert 'spectralmc_job_misses_total{job="slow"}' in text

    await client.close()  # cleanup_ctx: cancel and await the loop and the run in flight
    assert not any(j["running"] for j in scheduler[0].status())


async def test_failing_ticks_are_recorded_and_the_scheduler_goes_on(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store", fsync=False)
    now = utc_now()
    md = MarketDataStore(store)
    body = SnapshotBody.model_validate(market_body(now - timedelta(seconds=1)))
    for k in range(40):
        vdt = next_slot(now, EVERY) + timedelta(microseconds=k * 200_000)
        await md.put(namespace="live", val_datetime=vdt, body=body)
    # No model committed: "live" has data (fails on the model), "dark" has none.
    jobs = [
        {"name": "nomodel", "every_s": EVERY, "namespace": "live"},
        {"name": "nodata", "every_s": EVERY, "namespace": "dark"},
    ]
    settings = make_settings(jobs_file=write_jobs(tmp_path / "jobs.toml", jobs))
    client = await start_client(
        aiohttp_client, store=store, settings=settings, clock=utc_now, wait_ready=False
    )
    status = await wait_for(client, lambda s: all(j["runs"] >= 3 for j in s.values()))
    assert status["nodata"]["last_status"] == "error"
    assert "no market data" in status["nodata"]["last_error"]
    assert status["nomodel"]["last_status"] == "error"
    assert "NoModel" in status["nomodel"]["last_error"]
    for name in ("nodata", "nomodel"):
        assert status[name]["errors"] == status[name]["runs"]
        docs = await stored_runs(store, name)
        assert docs and all(d["status"] == "error" and d["error"] for d in docs)
        assert all(d["result"] is None and d["dataset"] is None for d in docs)
    text = await (await client.get("/metrics")).text()
    assert 'spectralmc_job_runs_total{job="nodata",result="error"}' in text
    # Still scheduling after the failures.
    runs = status["nodata"]["runs"]
    await wait_for(client, lambda s: s["nodata"]["runs"] > runs)
