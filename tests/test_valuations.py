"""POST /v1/valuations on a real trained model and real market data (LocalStore)."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from server.keys import CHAIN_KEY, MODEL_KEY
from spectral_core.pricer import GREEKS
from storage.localstore import LocalStore
from storage.marketdata import (
    InstrumentQuoteError,
    MarketDataInvalid,
    MarketDataNotFound,
    MarketView,
    year_fraction_act365,
)
from tests.server_fixtures import (
    NOW,
    VDT,
    Client,
    check_schema,
    commit_model,
    loads,
    make_settings,
    market_body,
    put_market_data,
    start_client,
    trained_snapshots,
)

ASOF = NOW - timedelta(hours=1)
BOOK: list[dict[str, Any]] = [
    {"id": "c1", "type": "european_call", "underlying": "SPX", "strike": 100.0,
     "expiry": "2025-06-27T16:00:00Z", "quantity": 10.0},
    {"id": "p1", "type": "european_put", "underlying": "SPX", "strike": 95.0,
     "expiry": "2024-12-20T16:00:00Z", "quantity": -5.0},
    {"id": "dc", "type": "digital_call", "underlying": "SPX", "strike": 105.0,
     "expiry": "2025-06-27T16:00:00Z", "quantity": 100.0},
    {"id": "dp", "type": "digital_put", "underlying": "SPX", "strike": 90.0,
     "expiry": "2025-03-21T16:00:00Z", "quantity": 50.0},
    {"id": "f1", "type": "forward", "underlying": "SPX", "strike": 101.0,
     "expiry": "2025-06-27T16:00:00Z", "quantity": 3.0},
]  # fmt: skip
UNIT_KEY = {
    "european_call": "call",
    "european_put": "put",
    "digital_call": "digital_call",
    "digital_put": "digital_put",
}


def request(**extra: Any) -> dict[str, Any]:
    return {
        "valuation_namespace": "eod",
        "val_datetime": "2024-06-28T16:00:00Z",
        "data_asof": NOW.isoformat(),
        "instruments": BOOK,
        **extra,
    }


@pytest.fixture
async def ready(aiohttp_client: Any, tmp_path: Path) -> tuple[Client, dict[str, Any]]:
    """An app serving model version 1 with one market-data snapshot for eod/VDT."""
    store = LocalStore(tmp_path / "store")
    await commit_model(store)
    client = await start_client(aiohttp_client, store=store)
    put = await put_market_data(client, body=market_body(ASOF))
    return client, put


async def value(client: Client, body: dict[str, Any], status: int = 200) -> Any:
    resp = await client.post("/v1/valuations", json=body)
    raw = await resp.read()
    assert resp.status == status, raw.decode()
    return loads(raw)


def contract_of(row: dict[str, Any]) -> dict[str, float]:
    inp = row["inputs"]
    return {
        "X0": inp["S0"]["value"],
        "K": row["strike"],
        "T": inp["T"]["value"],
        "r": inp["r"]["value"],
        "d": inp["d"]["value"],
        "v": inp["sigma"]["value"],
    }


async def test_book_prices_equal_direct_pricing_and_echo_inputs(
    ready: tuple[Client, dict[str, Any]],
) -> None:
    client, put = ready
    body = await value(client, request(greeks=True, metrics=True))
    check_schema(body, "ValuationResult")
    assert body["dataset"] == {
        "key": put["key"],
        "hash": put["hash"],
        "namespace": "eod",
        "val_datetime": "2024-06-28T16:00:00Z",
        "data_asof": put["data_asof"],
    }
    record = await client.app[CHAIN_KEY].head()
    assert record is not None
    assert body["model"] == {
        "name": "bs",
        "counter": 1,
        "version_hash": record.version_hash,
        "mode": "tracking",
    }

    rows = body["instruments"]
    assert [r["id"] for r in rows] == [b["id"] for b in BOOK]
    options = [r for r in rows if r["type"] != "forward"]
    direct = await client.post(
        "/v1/price",
        json={"contracts": [contract_of(r) for r in options], "greeks": True, "metrics": True},
    )
    assert direct.status == 200, await direct.text()
    priced = (await direct.json())["contracts"]
    for row, ref in zip(options, priced, strict=True):
        assert row["priced_by"] == "model"
        assert row["unit_price"] == pytest.approx(ref[UNIT_KEY[row["type"]]], rel=1e-12, abs=1e-12)
        assert row["price"] == pytest.approx(row["quantity"] * row["unit_price"], rel=1e-15)
        assert row["metrics"] == ref["metrics"]
        if row["type"].startswith("european_"):
            kind = UNIT_KEY[row["type"]]
            assert row["implied_vol"] == ref["implied_vol"][kind] and row["implied_vol"] > 0
            for g in GREEKS:
                assert row["unit_greeks"][g] == pytest.approx(ref["greeks"][kind][g], rel=1e-12)

    for row, inst in zip(rows, BOOK, strict=True):
        inp = row["inputs"]
        T = year_fraction_act365(start=VDT, end=datetime.fromisoformat(inst["expiry"]))
        assert inp["T"]["value"] == T
        assert "ACT/365" in inp["T"]["source"]
        assert inp["S0"] == {"value": 100.0, "source": "spot SPX"}
        assert inp["r"]["source"].startswith("zero_curve USD-OIS linear_rate")
        assert inp["d"]["source"].startswith("dividend_curve SPX linear_rate")
        if not row["type"].startswith("european_"):
            assert "implied_vol" not in row  # digitals and forwards have none
        if row["type"] == "forward":
            assert "sigma" not in inp and row["metrics"] is None
        else:
            assert inp["sigma"]["source"].startswith("vol_surface SPX strikes")
        assert row["greeks"] == {g: row["quantity"] * row["unit_greeks"][g] for g in GREEKS}

    # Forwards: discounted forward minus discounted strike, exactly.
    fwd = rows[4]
    S, T, r, d = (fwd["inputs"][k]["value"] for k in ("S0", "T", "r", "d"))
    df = math.exp(-r * T)
    assert fwd["priced_by"] == "closed_form"
    assert fwd["unit_price"] == df * (S * math.exp((r - d) * T)) - df * 101.0
    assert fwd["unit_greeks"]["delta"] == math.exp(-d * T)
    assert fwd["unit_greeks"]["rho"] == T * 101.0 * df

    totals = body["totals"]
    assert totals["instruments"] == 5
    assert totals["price"] == pytest.approx(
        math.fsum(r["quantity"] * r["unit_price"] for r in rows), rel=1e-14
    )
    for g in GREEKS:
        want = math.fsum(r["quantity"] * r["unit_greeks"][g] for r in rows)
        assert totals["greeks"][g] == pytest.approx(want, rel=1e-14, abs=1e-14)


async def test_digital_greeks_match_finite_differences_of_digital_prices(
    ready: tuple[Client, dict[str, Any]],
) -> None:
    client, _ = ready
    body = await value(client, request(greeks=True))
    for row in body["instruments"][2:4]:
        base = contract_of(row)
        kind = row["type"]
        bumps = {"delta": ("X0", 1e-3 * base["X0"]), "vega": ("v", 1e-4), "rho": ("r", 1e-4)}
        contracts = []
        for name, h in bumps.values():
            contracts += [{**base, name: base[name] + h}, {**base, name: base[name] - h}]
        resp = await client.post("/v1/price", json={"contracts": contracts})
        priced = (await resp.json())["contracts"]
        for i, (greek, (_, h)) in enumerate(bumps.items()):
            fd = (priced[2 * i][kind] - priced[2 * i + 1][kind]) / (2 * h)
            # Two O(h^2) approximations of one derivative of a smooth function.
            assert row["unit_greeks"][greek] == pytest.approx(fd, rel=1e-4, abs=1e-6), greek


async def test_same_request_gives_identical_bytes(ready: tuple[Client, dict[str, Any]]) -> None:
    client, _ = ready
    answers = []
    for _ in range(2):
        resp = await client.post("/v1/valuations", json=request(greeks=True, metrics=True))
        assert resp.status == 200
        answers.append(await resp.read())
    assert answers[0] == answers[1]
    # Concurrent requests are micro-batched together; the bytes do not change.
    bodies = await asyncio.gather(
        *(client.post("/v1/valuations", json=request(greeks=True, metrics=True)) for _ in range(3))
    )
    assert {await b.read() for b in bodies} == {answers[0]}
    # A later data_asof resolving to the same snapshot values identically.
    later = await value(
        client, request(greeks=True, metrics=True, data_asof="2024-07-02T00:00:00Z")
    )
    first = loads(answers[0])
    assert later["data_asof"] == "2024-07-02T00:00:00Z"
    assert {k: v for k, v in later.items() if k != "data_asof"} == {
        k: v for k, v in first.items() if k != "data_asof"
    }


async def test_model_version_reproduces_after_a_new_version(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    await commit_model(store, which=0)
    client = await start_client(
        aiohttp_client, store=store, settings=make_settings(poll_interval_s=0.05)
    )
    await put_market_data(client, body=market_body(ASOF))
    first = await value(client, request())
    assert first["model"]["counter"] == 1

    snapshot, metrics = trained_snapshots()[1]
    await client.app[CHAIN_KEY].commit(snapshot, message="more steps", metrics=metrics)
    for _ in range(200):
        cur = client.app[MODEL_KEY].current
        if cur is not None and cur.counter == 2:
            break
        await asyncio.sleep(0.05)
    second = await value(client, request())
    assert second["model"]["counter"] == 2 and second["model"]["mode"] == "tracking"
    assert second["instruments"][0]["unit_price"] != first["instruments"][0]["unit_price"]

    pinned = await value(client, request(model_version=1))
    assert pinned["model"] == {**first["model"], "mode": "version"}
    assert pinned["instruments"] == first["instruments"]
    assert pinned["totals"] == first["totals"]

    missing = await value(client, request(model_version=99), status=404)
    assert "99" in missing["detail"]


async def test_forward_only_book_needs_no_model(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start_client(aiohttp_client, store=LocalStore(tmp_path / "s"), wait_ready=False)
    await put_market_data(client, body=market_body(ASOF))
    body = await value(client, request(instruments=[BOOK[4]], greeks=True))
    assert body["model"] is None
    assert body["totals"]["price"] == 3.0 * body["instruments"][0]["unit_price"]
    check_schema(body, "ValuationResult")


async def test_no_model_yet_is_503(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start_client(
        aiohttp_client, store=LocalStore(tmp_path / "empty"), wait_ready=False
    )
    await put_market_data(client, body=market_body(ASOF))
    body = await value(client, request(), status=503)
    assert body["error"] == "unavailable"
    resp = await client.post(
        "/v1/price", json={"contracts": [{"X0": 1, "K": 1, "T": 1, "r": 0, "d": 0, "v": 0.2}]}
    )
    assert resp.status == 503


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"valuation_namespace": "nowhere"}, 404, "no market data"),
        ({"data_asof": "2020-01-01T00:00:00Z"}, 404, "no market data"),
        ({"instruments": [{**BOOK[0], "underlying": "NDX"}]}, 404, "'NDX'"),
    ],
)
async def test_missing_market_data_is_404(
    ready: tuple[Client, dict[str, Any]], change: dict[str, Any], status: int, needle: str
) -> None:
    client, _ = ready
    body = await value(client, request(**change), status=status)
    assert body["error"] == "not_found" and needle in body["detail"]


@pytest.mark.parametrize(
    ("instrument", "path", "needle"),
    [
        ({**BOOK[0], "expiry": "2024-06-28T16:00:00Z"}, "instruments.1.expiry", "at or before"),
        ({**BOOK[0], "expiry": "2024-01-01T00:00:00Z"}, "instruments.1.expiry", "at or before"),
        ({**BOOK[0], "underlying": "MEME", "strike": 20.0}, "instruments.1.sigma", "[0.05, 1.0]"),
        ({**BOOK[0], "expiry": "2031-01-01T00:00:00Z"}, "instruments.1.T", "[0.02, 5.0]"),
        ({**BOOK[0], "expiry": "2024-06-30T16:00:00Z"}, "instruments.1.T", "[0.02, 5.0]"),
        ({**BOOK[0], "id": "f1"}, "instruments.1.id", "duplicate id 'f1'"),
    ],
)
async def test_bad_instruments_are_422_with_the_path(
    ready: tuple[Client, dict[str, Any]], instrument: dict[str, Any], path: str, needle: str
) -> None:
    client, _ = ready
    body = await value(client, request(instruments=[BOOK[4], instrument]), status=422)
    assert body["error"] == "validation_error"
    assert [f["path"] for f in body["fields"]] == [path]
    assert needle in body["fields"][0]["reason"]
    check_schema(body, "Error")


@pytest.mark.parametrize(
    ("error", "status", "path"),
    [
        (MarketDataNotFound("vol_surface 'SPX' is not in snapshot eod"), 404, None),
        (MarketDataInvalid("K", "strike must be finite and > 0, got nan"), 422, "K"),
        (OverflowError("math range error"), 422, "instruments.3"),
        (ValueError("math domain error"), 422, "instruments.3"),
    ],
)
async def test_an_instruments_market_data_error_keeps_its_answer(
    ready: tuple[Client, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    status: int,
    path: str | None,
) -> None:
    """The book's quotes come from one book_quotes call; an error of instrument 3 answers as
    the per-instrument lookups did: market data's own 404 and 422, else a 422 naming it."""
    client, _ = ready

    def failing(self: MarketView, **_: Any) -> None:
        raise InstrumentQuoteError(3, error) from error

    monkeypatch.setattr(MarketView, "book_quotes", failing)
    body = await value(client, request(), status=status)
    check_schema(body, "Error")
    if path is None:
        assert body["error"] == "not_found" and body["detail"] == str(error)
    else:
        assert [f["path"] for f in body["fields"]] == [path]
    if path == "instruments.3":
        reason = body["fields"][0]["reason"]
        assert "no vol can be read off the SPX log-moneyness surface at strike 90.0" in reason
        assert reason.endswith(f"({error})")


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"instruments": [{**BOOK[0], "strike": -1.0}]}, "instruments.0.strike"),
        ({"instruments": [{**BOOK[0], "type": "american_call"}]}, "instruments.0.type"),
        ({"instruments": [{**BOOK[0], "colour": "red"}]}, "instruments.0.colour"),
        ({"instruments": [{**BOOK[0], "expiry": "2025-06-27T16:00:00"}]}, "instruments.0.expiry"),
        ({"instruments": []}, "instruments"),
        ({"valuation_namespace": "../etc"}, "valuation_namespace"),
        ({"model_version": 0}, "model_version"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_schema_errors_name_the_field(
    ready: tuple[Client, dict[str, Any]], change: dict[str, Any], path: str
) -> None:
    client, _ = ready
    body = await value(client, request(**change), status=422)
    assert path in [f["path"] for f in body["fields"]]


async def test_overflowing_number_is_422(ready: tuple[Client, dict[str, Any]]) -> None:
    client, _ = ready
    raw = json.dumps(request()).replace('"quantity": 10.0', '"quantity": 1e400')
    resp = await client.post(
        "/v1/valuations", data=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 422
    assert [f["path"] for f in (await resp.json())["fields"]] == ["instruments.0.quantity"]


async def test_malformed_json_is_400(ready: tuple[Client, dict[str, Any]]) -> None:
    client, _ = ready
    for raw in (b"{not json", b"", b'{"a": NaN}'):
        resp = await client.post(
            "/v1/valuations", data=raw, headers={"Content-Type": "application/json"}
        )
        assert resp.status == 400, raw
        assert (await resp.json())["error"] == "bad_request"


async def test_limits_from_settings(aiohttp_client: Any, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    await commit_model(store)
    settings = make_settings(max_instruments=4, max_string_len=8)
    client = await start_client(aiohttp_client, store=store, settings=settings)
    await put_market_data(client, body=market_body(ASOF))
    body = await value(client, request(), status=422)
    assert body["fields"][0]["path"] == "instruments"
    assert "at most 4" in body["fields"][0]["reason"]
    long_id = {**BOOK[0], "id": "x" * 9}
    body = await value(client, request(instruments=[long_id]), status=422)
    assert body["fields"] == [{"path": "instruments.0.id", "reason": "at most 8 characters, got 9"}]
    await value(client, request(instruments=BOOK[:4]))


async def test_metrics_count_valuations(ready: tuple[Client, dict[str, Any]]) -> None:
    client, _ = ready
    await value(client, request())
    await value(client, request(valuation_namespace="nowhere"), status=404)
    text = await (await client.get("/metrics")).text()
    assert 'spectralmc_valuations_total{result="ok"} 1.0' in text
    assert 'spectralmc_valuations_total{result="error"} 1.0' in text
    # Four model rows (the forward is closed form), counted once by the model service.
    assert 'spectralmc_contracts_priced_total{model="bs"} 4.0' in text


# --- scenario revaluation ----------------------------------------------------------------------

SCENARIOS = [
    {"name": "base"},
    {"name": "up10", "spot_rel": 0.1},
    {"name": "stress", "spot_rel": -0.2, "vol_abs": 0.05, "rate_abs": 0.01},
]


async def test_scenarios_reprice_the_book_under_each_shift(
    ready: tuple[Client, dict[str, Any]],
) -> None:
    client, _ = ready
    base = await value(client, request())
    body = await value(client, request(scenarios=SCENARIOS))
    check_schema(body, "ValuationResult")
    assert body["instruments"] == base["instruments"] and body["totals"] == base["totals"]
    got = {s["name"]: s for s in body["scenarios"]}
    assert list(got) == ["base", "up10", "stress"]
    # the zero shift is the base valuation, bit for bit
    assert [r["unit_price"] for r in got["base"]["instruments"]] == [
        r["unit_price"] for r in base["instruments"]]
    assert got["base"]["pnl"] == 0.0
    for sc in SCENARIOS[1:]:
        out = got[sc["name"]]
        rows = base["instruments"]
        # each option: the model's own price of the shifted contract (sticky strike)
        options = [r for r in rows if r["type"] != "forward"]
        shifted = []
        for r in options:
            c = contract_of(r)
            c["X0"] *= 1.0 + sc.get("spot_rel", 0.0)
            c["r"] += sc.get("rate_abs", 0.0)
            c["v"] += sc.get("vol_abs", 0.0)
            shifted.append(c)
        direct = await client.post("/v1/price", json={"contracts": shifted})
        assert direct.status == 200, await direct.text()
        by_id = {r["id"]: r for r in out["instruments"]}
        for r, ref in zip(options, (await direct.json())["contracts"], strict=True):
            assert by_id[r["id"]]["unit_price"] == pytest.approx(ref[UNIT_KEY[r["type"]]],
                                                                rel=1e-12, abs=1e-12)
        # the forward in closed form at the shifted spot and rate
        fwd = rows[4]
        S = fwd["inputs"]["S0"]["value"] * (1.0 + sc.get("spot_rel", 0.0))
        T, d = fwd["inputs"]["T"]["value"], fwd["inputs"]["d"]["value"]
        r_ = fwd["inputs"]["r"]["value"] + sc.get("rate_abs", 0.0)
        df = math.exp(-r_ * T)
        assert by_id["f1"]["unit_price"] == pytest.approx(
            df * S * math.exp((r_ - d) * T) - df * 101.0, rel=1e-14)
        positions = [by_id[b["id"]]["unit_price"] * b["quantity"] for b in BOOK]
        assert out["total"] == pytest.approx(math.fsum(positions), rel=1e-14)
        assert out["pnl"] == pytest.approx(out["total"] - base["totals"]["price"], rel=1e-12,
                                           abs=1e-12)
    assert got["up10"]["pnl"] != 0.0


@pytest.mark.parametrize(
    ("scenarios", "path", "reason"),
    [
        ([{"name": "a"}, {"name": "a"}], "scenarios.1.name", "duplicate scenario 'a'"),
        ([{"name": "x", "v0_abs": 0.01}], "scenarios.0.v0_abs", "has no v0; shift vol_abs"),
        ([{"name": f"s{i}"} for i in range(5)], "scenarios", "at most 4 scenarios"),
        ([{"name": "crash", "vol_abs": 2.0}], "scenarios.0.instruments.0.sigma",
         "outside the model's trained domain"),
        ([{"name": "x", "spot_rel": -1.0}], "scenarios.0.spot_rel", "greater than -1"),
    ],
)
async def test_bad_scenarios_are_422_naming_the_field(
    aiohttp_client: Any, tmp_path: Path, scenarios: list[dict[str, Any]], path: str, reason: str
) -> None:
    store = LocalStore(tmp_path / "store")
    await commit_model(store)
    client = await start_client(aiohttp_client, store=store, settings=make_settings(
        max_scenarios=4))
    await put_market_data(client, body=market_body(ASOF))
    resp = await client.post("/v1/valuations", json=request(scenarios=scenarios))
    text = await resp.text()
    assert resp.status == 422, text
    fields = (await resp.json())["fields"]
    assert path in [f["path"] for f in fields], fields
    assert reason in text
