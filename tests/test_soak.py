"""The soak driver (bench/soak.py): a short run against the real server, and its error counting.

The full soak (`python -m bench.soak --seconds 120`) reports latency and memory; here only
correctness is asserted: every kind of request succeeds while training commits in the background.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.soak import WEIGHTS, Driver, SoakOptions, Stats, soak


async def test_a_short_soak_of_the_real_server_has_no_errors(tmp_path: Path) -> None:
    options = SoakOptions(
        seconds=8.0,
        warmup_s=2.0,
        rate=10.0,
        batch_instruments=20,
        commit_every_s=2.0,
        progress=False,
    )
    result = await soak(options, workdir=tmp_path)
    assert result["errors"] == 0, result
    kinds = result["kinds"]
    assert set(WEIGHTS) <= set(kinds), kinds  # every kind of traffic ran
    assert kinds["marketdata_readback"]["n"] == kinds["marketdata_put"]["n"]
    slots = int(options.rate * (options.seconds + options.warmup_s))
    extra = kinds["marketdata_readback"]["n"] + kinds["priming"]["n"]
    assert result["requests"] == slots + extra
    assert result["rss_start_mb"] > 0 and result["rss_end_mb"] > 0
    # Training committed while serving, shut down cleanly, and left a sound chain.
    assert result["versions"] >= 2
    assert result["chain_verified"] is True
    assert result["server_exit"] == 0
    assert result["server_log_errors"] == 0


async def test_the_driver_counts_bad_answers_as_errors(aiohttp_client: Any) -> None:
    """Unexpected statuses, failed answer checks and dead connections are errors; 200s are not."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"fine": True})

    async def conflict(request: web.Request) -> web.Response:
        return web.json_response({"error": "conflict"}, status=409)

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/conflict", conflict)
    client = await aiohttp_client(app)
    base = str(client.make_url("")).rstrip("/")
    stats = Stats()
    async with aiohttp.ClientSession() as session:
        driver = Driver(session, base, SoakOptions(), stats)
        assert await driver.call("a", "GET", "/ok", t_sched=0.0, expect=200) == {"fine": True}
        assert await driver.call("b", "GET", "/conflict", t_sched=0.0, expect=200) is None
        await driver.call(
            "c", "GET", "/ok", t_sched=0.0, expect=200, check=lambda body: "wrong answer"
        )
        await driver.call("d", "GET", "/missing", t_sched=0.0, expect=200)
        dead = Driver(session, "http://127.0.0.1:9", SoakOptions(), stats)  # nothing listens
        await dead.call("e", "GET", "/ok", t_sched=0.0, expect=200)
    assert [(s.kind, s.ok, s.status) for s in stats.samples] == [
        ("a", True, 200),
        ("b", False, 409),
        ("c", False, 200),
        ("d", False, 404),
        ("e", False, 0),
    ]
    assert stats.errors == 4
