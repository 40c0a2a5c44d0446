"""End to end: a real app trains, commits and serves; a book is valued against Black-Scholes.

The flow the service exists for: training (CPU, tiny config) commits versions to a fresh store;
the tracking model serves the promoted version (the `serving` ref); market data goes in through
the API; a book of calls, puts and digitals is valued and every price agrees with Black-Scholes
on the echoed inputs within the tolerance the served version's quality report gives; pinning
version 1 changes the answer's model block and prices, unpinning goes back to tracking; the same
request gives the same bytes. Once on a LocalStore and once on S3 (moto's server); plus a
diverging run whose NaN loss must neither break commits nor the admin API's JSON, and is never
promoted.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from config.settings import (
    AdminSettings,
    CommitPlan,
    ModelSettings,
    Settings,
    StoreSettings,
    TrainingSettings,
)
from server.app import create_app
from server.keys import CHAIN_KEY
from spectral_core import analytic
from spectral_core.config import CoreConfig
from storage.chain import VersionChain
from storage.localstore import LocalStore
from storage.s3store import S3Store
from tests.core_fixtures import tiny_config
from tests.server_fixtures import VDT, market_body
from tests.server_fixtures import until as wait_until
from tests.storage_fixtures import CREDS, REGION, MotoServer, moto_server, new_bucket, s3_store

__all__ = ["moto_server"]  # the session fixture, imported for pytest

TOKEN = "e2e-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Actor": "e2e"}
# Commit at every validation: each version then carries the validation of its own weights.
COMMIT_EVERY = tiny_config().train.validation_every
BOOK: list[dict[str, Any]] = [
    {"id": "c-atm", "type": "european_call", "underlying": "SPX", "strike": 100.0,
     "expiry": "2025-06-27T16:00:00Z", "quantity": 10.0},
    {"id": "c-otm", "type": "european_call", "underlying": "SPX", "strike": 115.0,
     "expiry": "2024-12-20T16:00:00Z", "quantity": -4.0},
    {"id": "p-atm", "type": "european_put", "underlying": "SPX", "strike": 100.0,
     "expiry": "2025-03-21T16:00:00Z", "quantity": 7.0},
    {"id": "p-otm", "type": "european_put", "underlying": "SPX", "strike": 90.0,
     "expiry": "2025-06-27T16:00:00Z", "quantity": -5.0},
    {"id": "dc", "type": "digital_call", "underlying": "SPX", "strike": 105.0,
     "expiry": "2025-06-27T16:00:00Z", "quantity": 100.0},
    {"id": "dp", "type": "digital_put", "underlying": "SPX", "strike": 92.0,
     "expiry": "2025-03-21T16:00:00Z", "quantity": 50.0},
]  # fmt: skip
BS = {
    "european_call": analytic.bs_call,
    "european_put": analytic.bs_put,
    "digital_call": analytic.bs_digital_call,
    "digital_put": analytic.bs_digital_put,
}

Client = TestClient[web.Request, web.Application]


def e2e_settings(*, core: CoreConfig | None = None, store: StoreSettings | None = None) -> Settings:
    return Settings(
        store=store or StoreSettings(),
        training=TrainingSettings(
            enabled=True,
            device="cpu",
            commit=CommitPlan(kind="every_steps", every_steps=COMMIT_EVERY),
        ),
        admin=AdminSettings(token=SecretStr(TOKEN)),
        model=ModelSettings(poll_interval_s=0.1),
        core=core or tiny_config(),
    )


def strict_json(raw: bytes) -> Any:
    """Parse as strict JSON: NaN/Infinity tokens (which json.loads accepts) are an error."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"invalid JSON token {token} in {raw[:300]!r}")

    return json.loads(raw, parse_constant=refuse)


# this module's waits give up after 30 s
until = functools.partial(wait_until, timeout=30.0)


async def get_json(client: Client, path: str, *, headers: dict[str, str] | None = None) -> Any:
    resp = await client.get(path, headers=headers)
    raw = await resp.read()
    assert resp.status == 200, raw.decode()
    return strict_json(raw)


async def training(client: Client) -> dict[str, Any]:
    body: dict[str, Any] = await get_json(client, "/v1/admin/training", headers=AUTH)
    return body


async def value(client: Client, body: dict[str, Any]) -> tuple[bytes, Any]:
    resp = await client.post("/v1/valuations", json=body)
    raw = await resp.read()
    assert resp.status == 200, raw.decode()
    return raw, strict_json(raw)


async def price(client: Client, contracts: list[dict[str, float]]) -> list[dict[str, Any]]:
    resp = await client.post("/v1/price", json={"contracts": contracts})
    raw = await resp.read()
    assert resp.status == 200, raw.decode()
    rows: list[dict[str, Any]] = strict_json(raw)["contracts"]
    return rows


def inputs_of(row: dict[str, Any]) -> dict[str, float]:
    """The echoed valuation inputs as Black-Scholes keyword arguments."""
    inp = row["inputs"]
    return {
        "S0": inp["S0"]["value"],
        "K": row["strike"],
        "T": inp["T"]["value"],
        "r": inp["r"]["value"],
        "d": inp["d"]["value"],
        "sigma": inp["sigma"]["value"],
    }


def contract(bs: dict[str, float], K: float) -> dict[str, float]:
    """Black-Scholes inputs as a /v1/price contract at strike K."""
    return {"X0": bs["S0"], "K": K, "T": bs["T"], "r": bs["r"], "d": bs["d"], "v": bs["sigma"]}


def digital_bracket(bs: dict[str, float], *, call: bool, eps: float) -> tuple[float, float, float]:
    """(low, high, h): where any model digital must lie if its vanillas are within eps of BS.

    A no-arbitrage digital call is -dC/dK and non-increasing in K, so it is squeezed between its
    one-sided difference quotients: (C(K) - C(K+h))/h <= D(K) <= (C(K-h) - C(K))/h (digital put:
    +dP/dK, non-decreasing, the mirror image). Each model price lies within eps of Black-Scholes,
    so each model quotient lies within 2 eps / h of the Black-Scholes quotient. h is chosen to make
    the bracket narrowest, with K +- h kept inside the validated moneyness range (where eps holds).
    Nothing here reads the model's digital: the bracket is a real test of it.
    """
    K = bs["K"]
    fwd = bs["S0"] * math.exp((bs["r"] - bs["d"]) * bs["T"])
    moneyness = tiny_config().train.validation_moneyness
    lo_k, hi_k = min(moneyness) * fwd, max(moneyness) * fwd
    h_max = min(K - lo_k, hi_k - K)
    assert h_max > 0, f"strike {K} is outside the validated moneyness range"
    hs = np.geomspace(h_max * 1e-3, h_max, 200)
    kwargs = {k: v for k, v in bs.items() if k != "K"}
    vanilla = analytic.bs_call if call else analytic.bs_put
    mid = float(vanilla(K=K, **kwargs))
    up = np.asarray(vanilla(K=K + hs, **{k: np.full_like(hs, v) for k, v in kwargs.items()}))
    down = np.asarray(vanilla(K=K - hs, **{k: np.full_like(hs, v) for k, v in kwargs.items()}))
    if call:
        low, high = (mid - up) / hs - 2 * eps / hs, (down - mid) / hs + 2 * eps / hs
    else:
        low, high = (mid - down) / hs - 2 * eps / hs, (up - mid) / hs + 2 * eps / hs
    best = int(np.argmin(high - low))
    return float(low[best]), float(high[best]), float(hs[best])


async def wait_trained(client: Client, app: web.Application, *, min_versions: int) -> None:
    chain = app[CHAIN_KEY]

    async def enough_versions() -> bool:
        head = await chain.head()
        return head is not None and head.counter >= min_versions

    await until(enough_versions, what=f"{min_versions} interval commits")

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await until(ready, what="a model to be served")


async def pause_and_settle(client: Client, app: web.Application) -> dict[str, Any]:
    """Pause training; wait until HEAD, the step and the served version stop moving."""
    resp = await client.post("/v1/admin/training/pause", headers=AUTH)
    assert resp.status == 200, await resp.text()
    chain = app[CHAIN_KEY]
    seen: list[tuple[Any, ...]] = []

    async def settled() -> bool:
        status = await training(client)
        head = await chain.head()
        assert head is not None
        t, loaded = status["training"], status["model"]["loaded"]
        last = t["last_commit"]
        decided = {e.new for e in await chain.log() if e.ref == "serving"}
        serving = await chain.ref("serving")
        seen.append((t["step"], head.counter, last and last["counter"],
                     loaded and loaded["counter"], serving))
        # Two reads 0.3 s apart agree, the committer reached HEAD, the promoter decided on it,
        # and the model serves what the serving ref names.
        stable = len(seen) >= 2 and seen[-1] == seen[-2]
        if (stable and seen[-1][1] == seen[-1][2] and head.counter in decided
                and seen[-1][3] == serving and t["state"] == "paused"):
            return True
        await asyncio.sleep(0.3)
        return False

    await until(settled, what="paused training to settle")
    return await training(client)


def valuation_request(data_asof: datetime) -> dict[str, Any]:
    return {
        "valuation_namespace": "eod",
        "val_datetime": VDT.isoformat(),
        "data_asof": data_asof.isoformat(),
        "instruments": BOOK,
    }


async def run_flow(client: Client, app: web.Application, *, min_versions: int) -> None:
    chain: VersionChain = app[CHAIN_KEY]
    await wait_trained(client, app, min_versions=min_versions)
    status = await pause_and_settle(client, app)
    head = await chain.head()
    assert head is not None and head.counter >= min_versions
    serving = await chain.ref("serving")
    assert serving is not None
    served = await chain.get(serving)

    # HEAD's record carries the quality report of exactly its weights (spectral_core/quality)
    # and the latest validation, which the worker reports too: commits happen on validation
    # steps.
    validation = status["training"]["validation"]
    assert validation is not None and validation["step"] == head.training_metrics["step"]
    assert head.quality_metrics["step"] == head.training_metrics["step"]
    assert head.quality_metrics["finite"] is True
    assert {k: head.quality_metrics[k] for k in
            ("val_step", "val_loss", "val_mean_abs_bp", "val_max_abs_bp")} == {
        "val_step": validation["step"],
        "val_loss": validation["val_loss"],
        "val_mean_abs_bp": validation["mean_abs_bp"],
        "val_max_abs_bp": validation["max_abs_bp"],
    }
    assert set(head.training_metrics) == {"step", "loss", "batch", "lr", "lease_epoch"}
    assert head.training_metrics["lease_epoch"] == 1  # one server, one term
    # the served weights' own held-out maximum (the same validation contracts and strikes)
    max_abs_bp = served.quality_metrics["held_out_max_bp"]
    assert max_abs_bp is not None and 0 < max_abs_bp < 1e4

    # Market data through the API, then the book.
    asof = datetime.now(UTC) - timedelta(minutes=1)
    vdt = VDT.isoformat().replace("+00:00", "Z")
    resp = await client.put(f"/v1/marketdata/eod/{vdt}", json=market_body(asof))
    assert resp.status == 201, await resp.text()
    put = await resp.json()
    req = valuation_request(datetime.now(UTC))
    raw, body = await value(client, req)
    assert body["dataset"]["hash"] == put["hash"]
    assert body["model"] == {
        "name": "bs",
        "counter": served.counter,
        "version_hash": served.version_hash,
        "mode": "tracking",
    }
    raw_again, _ = await value(client, req)
    assert raw_again == raw  # same request, same dataset, same version: same bytes

    # Vanillas. The validation maximum is |COS put - BS| in bp of spot over held-out contracts
    # spread over the whole trained domain at forward moneyness 0.7..1.3; calls are puts plus
    # exact parity, so the same bound holds for them. The book lies inside that domain and
    # range, so the maximum bounds it: eps = max_abs_bp of the spot.
    rows = body["instruments"]
    assert [r["id"] for r in rows] == [b["id"] for b in BOOK]
    for row in rows:
        assert row["priced_by"] == "model"
        bs = inputs_of(row)
        eps = max_abs_bp * 1e-4 * bs["S0"]
        ref = float(BS[row["type"]](**bs))
        if row["type"].startswith("european_"):
            assert abs(row["unit_price"] - ref) <= eps, (row["id"], row["unit_price"], ref, eps)

    # Digitals: the validation bounds prices, not their strike derivative, so a digital gets the
    # no-arbitrage bracket its vanillas imply (see digital_bracket); the vanillas at K +- h are
    # checked against eps too, since the bracket rests on them.
    for row in rows:
        if not row["type"].startswith("digital_"):
            continue
        bs = inputs_of(row)
        eps = max_abs_bp * 1e-4 * bs["S0"]
        is_call = row["type"] == "digital_call"
        low, high, h = digital_bracket(bs, call=is_call, eps=eps)
        assert low <= float(BS[row["type"]](**bs)) <= high  # the bracket holds BS itself
        assert low <= row["unit_price"] <= high, (row["id"], row["unit_price"], low, high)
        # Model-free no-arbitrage bounds: a digital pays 0 or 1 at T.
        assert 0.0 <= row["unit_price"] <= math.exp(-bs["r"] * bs["T"]), row["id"]
        strikes = [bs["K"] - h, bs["K"], bs["K"] + h]
        direct = await price(client, [contract(bs, k) for k in strikes])
        kind = "call" if is_call else "put"
        kwargs = {k: v for k, v in bs.items() if k != "K"}
        for k, got in zip(strikes, direct, strict=True):
            ref = float(BS[f"european_{kind}"](K=k, **kwargs))
            assert abs(got[kind] - ref) <= eps, (row["id"], k, got[kind], ref, eps)
        # The valuation's digital is the model's own, as /v1/price gives it.
        assert direct[1][row["type"]] == row["unit_price"]

    # Pin version 1: the answer names it and its prices are version 1's.
    v1 = await chain.get(1)
    resp = await client.put("/v1/admin/model/pin", json={"version": 1}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    _, pinned = await value(client, req)
    assert pinned["model"] == {"name": "bs", "counter": 1, "version_hash": v1.version_hash,
                               "mode": "pinned"}
    assert pinned["dataset"] == body["dataset"]
    _, explicit = await value(client, {**req, "model_version": 1})
    assert explicit["model"]["mode"] == "version"
    price_of = {r["id"]: r["unit_price"] for r in body["instruments"]}
    for row, same in zip(pinned["instruments"], explicit["instruments"], strict=True):
        assert row["unit_price"] == same["unit_price"]  # pinned = exactly version 1
        assert row["unit_price"] != price_of[row["id"]], row["id"]  # and not the served price
    assert served.counter > 1  # so the comparison above is between different versions

    # Unpin: back to tracking the serving ref, and to the very bytes of the first answer.
    resp = await client.delete("/v1/admin/model/pin", headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["unpinned"] == 1
    raw_tracking, tracking = await value(client, req)
    assert tracking["model"]["mode"] == "tracking"
    assert raw_tracking == raw

    # Training goes on after the pin round trip.
    step = status["training"]["step"]
    assert (await client.post("/v1/admin/training/resume", headers=AUTH)).status == 200

    async def advanced() -> bool:
        return ((await training(client))["training"]["step"] or 0) > step

    await until(advanced, what="training to resume")


async def test_train_commit_value_pin_unpin_on_a_local_store(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    app = create_app(e2e_settings(), store=LocalStore(tmp_path / "store"))
    client = await aiohttp_client(app)
    # ~150 steps: the tiny model's validation error has fallen about tenfold by then, so the
    # tolerances below are sharper (they come from whatever validation reports either way).
    await run_flow(client, app, min_versions=15)
    await client.close()  # shutdown: stop training, final commit
    chain = VersionChain(LocalStore(tmp_path / "store"))
    assert (await chain.verify()).ok


@pytest.fixture
async def s3_app(
    moto_server: MotoServer, aiohttp_client: Callable[..., Awaitable[Client]]
) -> AsyncIterator[tuple[Client, web.Application, S3Store]]:
    """The app opening its own store from settings (s3:// URL + endpoint), as deployed."""
    bucket = new_bucket(moto_server)
    store_settings = StoreSettings(
        url=f"s3://{bucket}/chain",
        s3_endpoint_url=moto_server.endpoint,
        s3_region=REGION,
        s3_access_key_id=SecretStr(CREDS["aws_access_key_id"]),
        s3_secret_access_key=SecretStr(CREDS["aws_secret_access_key"]),
        retry_backoff_s=0.01,
        retry_backoff_max_s=0.1,
    )
    app = create_app(e2e_settings(store=store_settings))
    client = await aiohttp_client(app)
    check = s3_store(moto_server, bucket, prefix="chain")  # a second reader of the same bucket
    yield client, app, check
    await check.aclose()


async def test_train_commit_value_pin_unpin_on_s3(
    s3_app: tuple[Client, web.Application, S3Store],
) -> None:
    client, app, check = s3_app
    await run_flow(client, app, min_versions=2)
    await client.close()
    # The chain as another reader of the bucket sees it.
    chain = VersionChain(check)
    report = await chain.verify()
    assert report.ok, report.summary()
    head = await chain.head()
    assert head is not None and head.message.startswith("final")
    assert await chain.ref("pin") is None  # the unpin reached the bucket


async def test_a_diverging_run_still_commits_and_reports_strict_json(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    # Plain SGD at an absurd learning rate, unclipped: the loss is NaN within a few steps.
    base = tiny_config().model_dump()
    optim = {"optimizer": "sgd", "lr": 1e30, "grad_clip": None, "schedule": "constant"}
    core = CoreConfig.model_validate({**base, "optim": {**base["optim"], **optim}})
    app = create_app(e2e_settings(core=core), store=LocalStore(tmp_path / "store"))
    client = await aiohttp_client(app)

    async def committed_twice() -> bool:
        return (await training(client))["training"]["commits_ok"] >= 2

    await until(committed_twice, what="two commits of the diverged model")
    t = (await training(client))["training"]
    assert t["state"] == "running" and t["last_commit_error"] is None
    assert t["loss"] is None  # NaN, reported as null
    assert t["validation"]["val_loss"] is None and t["validation"]["max_abs_bp"] is None
    head = await app[CHAIN_KEY].head()
    assert head is not None
    assert head.training_metrics["loss"] is None
    assert head.quality_metrics["val_loss"] is None
    assert "loss None" in head.message
    resp = await client.post("/v1/admin/training/commit", headers=AUTH)
    assert resp.status == 201, await resp.text()
    manual = await app[CHAIN_KEY].get((await resp.json())["committed"]["counter"])
    assert manual.training_metrics["loss"] is None
    assert manual.quality_metrics["finite"] is False
    # The NaN model is never served: every decision on it is a refusal.
    chain = app[CHAIN_KEY]

    async def manual_decided() -> bool:
        return manual.counter in {e.new for e in await chain.log() if e.ref == "serving"}

    await until(manual_decided, what="the promoter to decide on the manual commit")
    for entry in await chain.log():
        if entry.action == "promote":
            assert (await chain.get(entry.new)).quality_metrics["finite"] is True
    refused = [e for e in await chain.log() if e.action == "promotion_refused"]
    assert manual.counter in {e.new for e in refused}
    assert all(e.detail["reason"] == "invalid" for e in refused)
    assert manual.quality_metrics["val_max_abs_bp"] is None
    assert (await app[CHAIN_KEY].verify()).ok
