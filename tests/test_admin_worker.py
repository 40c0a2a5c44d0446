"""Training worker and admin API on a real app.

Train, commit, pin/unpin, pause/resume, shutdown, and resume from HEAD on restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from config.settings import (
    AdminSettings,
    CommitPlan,
    ModelSettings,
    Settings,
    TrainingSettings,
)
from server.app import create_app
from server.keys import CHAIN_KEY, WORKER_KEY
from storage.chain import VersionChain
from storage.localstore import LocalStore
from tests.core_fixtures import tiny_config
from tests.server_fixtures import until

TOKEN = "test-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Actor": "alice"}
ADMIN_ROUTES = [
    ("PUT", "/v1/admin/model/pin"),
    ("DELETE", "/v1/admin/model/pin"),
    ("GET", "/v1/admin/training"),
    ("POST", "/v1/admin/training/pause"),
    ("POST", "/v1/admin/training/resume"),
    ("POST", "/v1/admin/training/commit"),
]


def settings(
    *, training: bool = True, every_steps: int = 15, token: str | None = TOKEN
) -> Settings:
    return Settings(
        training=TrainingSettings(
            enabled=training,
            device="cpu",
            commit=CommitPlan(kind="every_steps", every_steps=every_steps),
        ),
        admin=AdminSettings(token=None if token is None else SecretStr(token)),
        model=ModelSettings(poll_interval_s=0.1),
        core=tiny_config(),
    )


async def training_status(client: TestClient) -> dict[str, Any]:
    resp = await client.get("/v1/admin/training", headers=AUTH)
    assert resp.status == 200, await resp.text()
    return await resp.json()


@pytest.fixture
async def running(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[TestClient]]
) -> AsyncIterator[tuple[TestClient, web.Application, LocalStore]]:
    store = LocalStore(tmp_path / "store")
    app = create_app(settings(), store=store)
    client = await aiohttp_client(app)
    chain = app[CHAIN_KEY]

    async def has_two_versions() -> bool:
        head = await chain.head()
        return head is not None and head.counter >= 2

    await until(has_two_versions, what="two interval commits")

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await until(ready, what="a model to be served")
    yield client, app, store


async def test_trains_commits_and_serves_the_promoted_version(running: Any) -> None:
    client, app, _ = running
    chain = app[CHAIN_KEY]

    async def two_commits_counted() -> bool:
        # HEAD moves on the loop before the committer thread counts the commit: wait for both.
        return (await training_status(client))["training"]["commits_ok"] >= 2

    await until(two_commits_counted, what="the worker to count two commits")
    t = (await training_status(client))["training"]
    assert t["state"] == "running"
    assert t["step"] >= 30 and t["loss"] > 0 and t["samples_per_s"] > 0
    assert t["last_commit_error"] is None
    head = await chain.head()
    # every commit carries the report of exactly its weights (spectral_core/quality.py)
    assert head.quality_metrics["step"] == head.training_metrics["step"]
    assert head.quality_metrics["finite"] is True

    async def decided() -> bool:
        # each committed version up to HEAD was promoted or refused (audited)
        entries = [e for e in await chain.log() if e.ref == "serving"]
        return {e.new for e in entries} >= set(range(1, head.counter + 1))

    await until(decided, what="the promoter to decide on every commit")
    serving = await chain.ref("serving")
    assert serving is not None

    async def serves_promoted() -> bool:
        loaded = (await training_status(client))["model"]["loaded"]
        return loaded is not None and loaded["counter"] >= serving

    await until(serves_promoted, what="the tracking client to serve the serving ref")
    metrics = await (await client.get("/metrics")).text()
    assert 'spectralmc_commits_total{model="bs",result="ok"}' in metrics
    assert "spectralmc_training_step" in metrics
    assert "spectralmc_model_version_info{" in metrics
    assert 'spectralmc_promotions_total{model="bs",reason="first",result="promoted"} 1.0' in metrics
    assert 'spectralmc_serving_version{model="bs"} ' in metrics


async def test_pause_resume_and_manual_commit(running: Any) -> None:
    client, app, _ = running
    assert (await client.post("/v1/admin/training/pause", headers=AUTH)).status == 200
    await asyncio.sleep(0.5)  # let the step in flight finish
    s1 = (await training_status(client))["training"]
    await asyncio.sleep(0.5)
    s2 = (await training_status(client))["training"]
    assert s1["state"] == "paused" and s1["step"] == s2["step"]

    resp = await client.post("/v1/admin/training/commit", headers=AUTH)
    assert resp.status == 201, await resp.text()
    committed = (await resp.json())["committed"]
    assert (await app[CHAIN_KEY].head()).counter == committed["counter"]
    assert committed["message"].startswith("manual commit by admin:alice")

    assert (await client.post("/v1/admin/training/resume", headers=AUTH)).status == 200

    async def advanced() -> bool:
        return (await training_status(client))["training"]["step"] > s2["step"]

    await until(advanced, what="training to resume")
    # the admin's entries; the promoter's decisions on the commits interleave with them
    admin = [e for e in await app[CHAIN_KEY].log() if e.action.startswith("training.")]
    assert [e.action for e in admin[-3:]] == ["training.pause", "training.commit",
                                              "training.resume"]
    assert all(e.actor == "admin:alice" for e in admin[-3:])


async def test_pin_older_version_then_unpin(running: Any) -> None:
    client, app, _ = running
    resp = await client.put("/v1/admin/model/pin", json={"version": 1}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["pinned"] == 1
    assert body["model"]["counter"] == 1 and body["model"]["mode"] == "pinned"
    await asyncio.sleep(0.4)  # several polls: the pin holds while training commits more
    assert (await training_status(client))["model"]["loaded"]["counter"] == 1

    # The serving ref read before the unpin: tracking serves it (or a later promotion)
    serving = await app[CHAIN_KEY].ref("serving")
    assert serving is not None
    resp = await client.delete("/v1/admin/model/pin", headers=AUTH)
    assert resp.status == 200
    assert (await resp.json())["unpinned"] == 1
    loaded = (await training_status(client))["model"]["loaded"]
    assert loaded["mode"] == "tracking" and loaded["counter"] >= serving
    log = [(e.action, e.ref, e.old, e.new) for e in await app[CHAIN_KEY].log()]
    assert ("pin", "pin", None, 1) in log and ("unpin", "pin", 1, None) in log


async def test_pin_by_ref_and_bad_pin_bodies(running: Any) -> None:
    client, app, _ = running
    await app[CHAIN_KEY].set_ref("production", 2, actor="test")
    resp = await client.put("/v1/admin/model/pin", json={"ref": "production"}, headers=AUTH)
    assert resp.status == 200 and (await resp.json())["pinned"] == 2
    bad_bodies = (
        {},
        {"version": 1, "ref": "x"},
        {"version": 0},
        {"ref": "../etc"},
        {"version": "one"},
    )
    for bad in bad_bodies:
        resp = await client.put("/v1/admin/model/pin", json=bad, headers=AUTH)
        assert resp.status == 422, bad
    resp = await client.put("/v1/admin/model/pin", json={"version": 999999}, headers=AUTH)
    assert resp.status == 404
    resp = await client.put("/v1/admin/model/pin", json={"ref": "nope"}, headers=AUTH)
    assert resp.status == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token-wrong"},
        {"Authorization": TOKEN},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer "},
    ],
    ids=["missing", "wrong", "no-scheme", "basic", "empty"],
)
async def test_every_admin_route_needs_the_token(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[TestClient]], headers: dict[str, str]
) -> None:
    app = create_app(settings(training=False), store=LocalStore(tmp_path / "s"))
    client = await aiohttp_client(app)
    for method, path in ADMIN_ROUTES:
        resp = await client.request(method, path, headers=headers, json={"version": 1})
        assert resp.status == 401, (method, path)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"] == "unauthorized"
    assert await app[CHAIN_KEY].log() == []


async def test_admin_disabled_without_a_configured_token(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[TestClient]]
) -> None:
    app = create_app(settings(training=False, token=None), store=LocalStore(tmp_path / "s"))
    client = await aiohttp_client(app)
    resp = await client.get("/v1/admin/training", headers=AUTH)
    assert resp.status == 401
    assert "disabled" in (await resp.json())["detail"]


async def test_training_control_when_training_is_disabled(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[TestClient]]
) -> None:
    app = create_app(settings(training=False), store=LocalStore(tmp_path / "s"))
    client = await aiohttp_client(app)
    assert app[WORKER_KEY] is None
    assert (await training_status(client))["training"] == {"state": "disabled"}
    for path in ("/v1/admin/training/pause", "/v1/admin/training/commit"):
        assert (await client.post(path, headers=AUTH)).status == 409
    resp = await client.get("/readyz")
    assert resp.status == 503  # empty store: nothing to serve


async def test_shutdown_commits_and_restart_resumes_from_head(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[TestClient]]
) -> None:
    store_dir = tmp_path / "store"
    app = create_app(settings(every_steps=10_000), store=LocalStore(store_dir))
    client = await aiohttp_client(app)

    async def stepped() -> bool:
        return ((await training_status(client))["training"]["step"] or 0) >= 12

    await until(stepped, what="a dozen steps")
    await client.close()  # runs the cleanup contexts: stop the worker, final commit

    chain = VersionChain(LocalStore(store_dir))
    head = await chain.head()
    assert head is not None and head.message.startswith("final")
    step_at_stop = head.training_metrics["step"]
    assert (await chain.verify()).ok

    app2 = create_app(settings(every_steps=10_000), store=LocalStore(store_dir))
    client2 = await aiohttp_client(app2)

    async def resumed() -> bool:
        t = (await training_status(client2))["training"]
        return t["resumed_from"] == head.counter and (t["step"] or 0) > step_at_stop

    await until(resumed, what="the restarted worker to resume from HEAD")
