"""API fuzzing against openapi.yaml (the fast, fixed-seed subset of `python -m bench.fuzz`),
the fuzzer's own checks against a deliberately broken app, and the bugs it found, pinned.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from bench.fuzz import (
    DEFAULT_SEED,
    Seeded,
    fuzz,
    run_fuzz,
    serving,
)
from config.settings import AdminSettings, ModelSettings, Settings, TrainingSettings
from storage.localstore import LocalStore
from tests.core_fixtures import tiny_config
from tests.server_fixtures import (
    NOW,
    VDT,
    Client,
    commit_model,
    loads,
    make_settings,
    market_body,
    openapi_spec,
    put_market_data,
    start_client,
)

SUBSET_REQUESTS = 200
METHODS = ("get", "put", "post", "delete", "patch")
ADMIN_OPERATIONS = {
    "PUT /v1/admin/model/pin",
    "DELETE /v1/admin/model/pin",
    "GET /v1/admin/training",
    "POST /v1/admin/training/pause",
    "POST /v1/admin/training/resume",
    "POST /v1/admin/training/commit",
}


def test_fuzz_subset_finds_no_server_error_contract_break_or_state_damage() -> None:
    """Every operation, positive and negative cases, admin ones with and without the token."""
    result = run_fuzz(requests_wanted=SUBSET_REQUESTS, run_seed=DEFAULT_SEED, core=tiny_config())
    tally = result.tally
    report = "\n".join(tally.failures + result.state_problems)
    assert tally.requests >= SUBSET_REQUESTS
    assert tally.server_errors == 0, report
    assert tally.spec_violations == 0, report
    assert tally.auth_violations == 0, report
    assert result.state_ok, report
    documented = sum(m in item for item in openapi_spec()["paths"].values() for m in METHODS)
    assert len(tally.per_operation) == result.operations == documented
    for label in ADMIN_OPERATIONS:
        variants = {variant for variant, _ in tally.admin_statuses[label]}
        assert "valid" in variants and variants - {"valid"}, (label, variants)
        # The valid token got past the check at least once; no other one ever did.
        statuses = {status for variant, status in tally.admin_statuses[label] if variant == "valid"}
        assert statuses - {401}, (label, statuses)
    # Success paths were reached, not only refusals.
    assert tally.status_counts[200] > 0 and tally.status_counts[201] > 0


# --- the fuzzer's checks have teeth -----------------------------------------------------------


def _broken_app() -> web.Application:
    """Breaks the contract five ways: a 5xx, a body off its schema, a wrong content type with
    no X-Request-ID, an admin route that ignores the token, 200 to an undeclared method."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "fine"}, headers={"X-Request-ID": "r"})

    async def readyz(request: web.Request) -> web.Response:
        body = {"error": "internal", "detail": "boom", "fields": [], "request_id": "r"}
        return web.json_response(body, status=500, headers={"X-Request-ID": "r"})

    async def metrics(request: web.Request) -> web.Response:
        return web.json_response({"metrics": []})

    async def training(request: web.Request) -> web.Response:
        return web.json_response({"training": {"state": "disabled"}, "model": None})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", "/metrics", metrics)  # answers PATCH, TRACE, ... too
    app.router.add_get("/v1/admin/training", training)
    return app


def test_fuzz_checks_catch_a_broken_app() -> None:
    wanted = {"GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/admin/training"}
    with serving(_broken_app) as server:
        tally, operations = fuzz(
            server.base_url,
            requests_wanted=20,
            run_seed=DEFAULT_SEED,
            seeded=Seeded(),
            core=tiny_config(),
            coverage=True,
            include=wanted.__contains__,
        )
    assert operations == 4 and set(tally.per_operation) == wanted
    assert tally.coverage_requests > 0
    assert tally.server_errors >= 1
    kinds = tally.failure_kinds
    assert kinds["Server error"] >= 1  # /readyz
    assert kinds["Response violates schema"] >= 1  # /healthz, /v1/admin/training
    assert kinds["Undocumented Content-Type"] >= 1  # /metrics
    assert kinds["Missing X-Request-ID"] >= 1  # /metrics
    assert kinds["Wrong response to undeclared method"] >= 1  # /metrics
    assert tally.auth_violations >= 1  # /v1/admin/training without a token -> 200


# --- bugs the fuzzer found, pinned (each answered 500 before its fix) ---------------------------

TOKEN = "fuzz-regression-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ASOF = NOW - timedelta(hours=1)


@pytest.fixture
async def client(aiohttp_client: Callable[..., Any], tmp_path: Path) -> Client:
    """Model version 1, market data for eod/VDT, an admin token, training disabled."""
    store = LocalStore(tmp_path / "store")
    await commit_model(store)
    base = make_settings()
    settings = Settings(
        server=base.server,
        training=TrainingSettings(enabled=False),
        model=ModelSettings(poll_interval_s=5.0),
        admin=AdminSettings(token=SecretStr(TOKEN)),
        core=tiny_config(),
    )
    client = await start_client(aiohttp_client, store=store, settings=settings)
    await put_market_data(client, body=market_body(ASOF))
    return client


def _valuation(*instruments: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "valuation_namespace": "eod",
        "val_datetime": VDT.isoformat(),
        "data_asof": NOW.isoformat(),
        "instruments": list(instruments),
        **extra,
    }


def _instrument(i: int, type_: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"i{i}",
        "type": type_,
        "underlying": "SPX",
        "strike": 100.0,
        "expiry": "2025-06-27T16:00:00Z",
        **fields,
    }


async def _post(client: Client, path: str, body: Any, status: int, **kw: Any) -> Any:
    method = "PUT" if path == "/v1/admin/model/pin" else "POST"
    resp = await client.request(method, path, json=body, **kw)
    raw = await resp.read()
    assert resp.status == status, raw.decode()
    return loads(raw)


@pytest.mark.parametrize("ref", ["0", "00", "10000000000"])
async def test_pin_to_a_numeric_ref_outside_the_counter_range_is_422(
    client: Client, ref: str
) -> None:
    body = await _post(client, "/v1/admin/model/pin", {"ref": ref}, 422, headers=AUTH)
    assert body["fields"][0]["path"] == "ref"


async def test_model_version_beyond_the_counter_range_is_422(client: Client) -> None:
    contract = {"X0": 100.0, "K": 100.0, "T": 1.0, "r": 0.03, "d": 0.01, "v": 0.2}
    huge = 10**28
    body = await _post(client, "/v1/price", {"contracts": [contract], "model_version": huge}, 422)
    assert body["fields"][0]["path"] == "model_version"
    request = _valuation(_instrument(0, "european_call"), model_version=huge)
    body = await _post(client, "/v1/valuations", request, 422)
    assert body["fields"][0]["path"] == "model_version"


async def test_an_invalid_actor_header_is_422_after_the_token_check(client: Client) -> None:
    for path in ("/v1/admin/training/pause", "/v1/admin/training/commit"):
        resp = await client.post(path, headers={**AUTH, "X-Actor": "not an actor!"})
        body = await resp.json()
        assert resp.status == 422 and body["fields"][0]["path"] == "header.X-Actor", body
        resp = await client.post(path, headers={"X-Actor": "not an actor!"})
        assert resp.status == 401
    resp = await client.delete("/v1/admin/model/pin", headers={**AUTH, "X-Actor": "{"})
    assert resp.status == 422
    assert (await client.delete("/v1/admin/model/pin", headers={**AUTH, "X-Actor": "ok"})).ok


async def test_digital_greeks_at_a_subnormal_strike_are_null(client: Client) -> None:
    """The strike bump for digital greeks underflows to zero: null greeks, not a division."""
    kinds = ("digital_call", "digital_put")
    instruments = [_instrument(i, t, strike=5e-324) for i, t in enumerate(kinds)]
    body = await _post(client, "/v1/valuations", _valuation(*instruments, greeks=True), 200)
    for row in body["instruments"]:
        assert set(row["unit_greeks"].values()) == {None}, row
        assert row["unit_price"] is not None


@pytest.mark.parametrize("strike", [1e-300, 1e300, 1e307, 1.7976931348623157e308])
async def test_extreme_strikes_value_with_greeks(client: Client, strike: float) -> None:
    """Non-finite vanilla greeks differenced for digitals (inf - inf) stay null, and no numpy
    warning escapes (warnings are errors under pytest, so one would have been a 500 here)."""
    kinds = ("european_call", "european_put", "digital_call", "digital_put")
    instruments = [_instrument(i, t, strike=strike) for i, t in enumerate(kinds)]
    request = _valuation(*instruments, greeks=True, metrics=True)
    body = await _post(client, "/v1/valuations", request, 200)
    assert [row["id"] for row in body["instruments"]] == ["i0", "i1", "i2", "i3"]


async def test_totals_that_are_not_finite_are_null(client: Client) -> None:
    """+inf and -inf positions (and sums past the float range) made math.fsum raise."""
    big = [
        _instrument(0, "forward", strike=1.0, quantity=1e308),
        _instrument(1, "forward", strike=1.0, quantity=-1e308),
    ]
    body = await _post(client, "/v1/valuations", _valuation(*big, greeks=True), 200)
    assert [row["price"] for row in body["instruments"]] == [None, None]
    assert body["totals"]["price"] is None
    one = await _post(client, "/v1/valuations", _valuation(_instrument(0, "forward")), 200)
    q = 1.5e308 / abs(one["instruments"][0]["unit_price"])  # each position finite, the sum not
    overflow = [_instrument(i, "forward", quantity=q) for i in range(2)]
    body = await _post(client, "/v1/valuations", _valuation(*overflow), 200)
    assert all(row["price"] is not None for row in body["instruments"])
    assert body["totals"]["price"] is None


async def test_a_forward_whose_growth_overflows_is_null(client: Client) -> None:
    """A client's curve with a large rate and a far expiry made math.exp raise."""
    snapshot = market_body(ASOF)
    snapshot["zero_curves"] = {"USD-OIS": {"tenors": [1.0], "rates": [5.0]}}
    await put_market_data(client, namespace="steep", body=snapshot)
    request = {
        **_valuation(_instrument(0, "forward", expiry="9000-01-01T00:00:00Z"), greeks=True),
        "valuation_namespace": "steep",
    }
    body = await _post(client, "/v1/valuations", request, 200)
    assert body["instruments"][0]["unit_price"] is None
    assert json.dumps(body)  # strict JSON: no NaN or Infinity reached the bytes


async def test_a_vol_whose_forward_overflows_is_422(client: Client) -> None:
    """A log-moneyness surface needs the forward: math.exp overflowed, K / F divided by zero,
    math.log(0) raised. With ln(K/F) taken in log space the lookup succeeds and the 422 names
    the expiry outside the model's domain instead."""
    snapshot = market_body(ASOF)
    snapshot["zero_curves"] = {"USD-OIS": {"tenors": [1.0], "rates": [5.0]}}
    snapshot["vol_surfaces"] = {"SPX": {"expiries": [1.0], "log_moneyness": [0.0], "vols": [[0.2]]}}
    await put_market_data(client, namespace="steep-lm", body=snapshot)
    call = _instrument(0, "european_call", expiry="9000-01-01T00:00:00Z")
    request = {**_valuation(call), "valuation_namespace": "steep-lm"}
    body = await _post(client, "/v1/valuations", request, 422)
    assert body["fields"][0]["path"].startswith("instruments.0")
    # The forward underflows to 0 (ln(K/0)), or K/F underflows to 0 (ln 0): 422 as well.
    snapshot["zero_curves"] = {"USD-OIS": {"tenors": [1.0], "rates": [-5.0]}}
    snapshot["data_asof"] = NOW.isoformat()
    await put_market_data(client, namespace="steep-lm", body=snapshot)
    body = await _post(client, "/v1/valuations", request, 422)
    assert body["fields"][0]["path"].startswith("instruments.0")
    snapshot["zero_curves"] = {"USD-OIS": {"tenors": [1.0], "rates": [0.5]}}
    snapshot["data_asof"] = (NOW + timedelta(minutes=1)).isoformat()
    await put_market_data(client, namespace="steep-lm", body=snapshot)
    tiny = {**call, "strike": 5e-324, "expiry": "2500-01-01T00:00:00Z"}
    later = {**request, "instruments": [tiny], "data_asof": snapshot["data_asof"]}
    body = await _post(client, "/v1/valuations", later, 422)
    assert body["fields"][0]["path"].startswith("instruments.0")


EARLY = "0001-01-01T00:00:00+01:00"  # before year 1 once converted to UTC


async def test_datetimes_outside_the_utc_range_are_422(client: Client) -> None:
    """datetime.astimezone(UTC) raised OverflowError: path, query and body datetimes."""
    url = f"/v1/marketdata/eod/{EARLY}"
    resp = await client.put(url, json=market_body(ASOF))
    body = await resp.json()
    assert resp.status == 422 and body["fields"][0]["path"] == "path.val_datetime", body
    for url, field in (
        (f"/v1/marketdata/eod/{VDT.isoformat()}?data_asof={EARLY}", "query.data_asof"),
        (f"/v1/marketdata/eod?after={EARLY}", "query.after"),
    ):
        resp = await client.get(url.replace("+", "%2B"))
        body = await resp.json()
        assert resp.status == 422 and body["fields"][0]["path"] == field, body
    snapshot = {**market_body(ASOF), "data_asof": EARLY}
    body = await _post(client, f"/v1/marketdata/eod/{VDT.isoformat()}", snapshot, 422)
    assert body["error"] == "validation_error"
    request = {**_valuation(_instrument(0, "forward")), "val_datetime": EARLY}
    body = await _post(client, "/v1/valuations", request, 422)
    assert body["error"] == "validation_error"
