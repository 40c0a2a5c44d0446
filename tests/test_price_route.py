"""POST /v1/price: contracts given directly, priced on a real trained model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spectral_core.pricer import GREEKS, Contracts, Pricer
from storage.localstore import LocalStore
from tests.server_fixtures import (
    Client,
    check_schema,
    commit_model,
    loads,
    make_settings,
    start_client,
    trained_snapshots,
)

CONTRACTS = [
    {"X0": 100.0, "K": 90.0, "T": 1.0, "r": 0.02, "d": 0.01, "v": 0.2},
    {"X0": 100.0, "K": 110.0, "T": 0.5, "r": 0.03, "d": 0.0, "v": 0.3},
    {"X0": 55.0, "K": 50.0, "T": 2.5, "r": -0.01, "d": 0.05, "v": 0.6},
]


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Client:
    store = LocalStore(tmp_path / "store")
    await commit_model(store)
    return await start_client(
        aiohttp_client, store=store, settings=make_settings(max_instruments=8)
    )


async def price(client: Client, body: dict[str, Any], status: int = 200) -> Any:
    resp = await client.post("/v1/price", json=body)
    raw = await resp.read()
    assert resp.status == status, raw.decode()
    return loads(raw)


def library_prices(*, greeks: bool, metrics: bool) -> dict[str, np.ndarray]:
    """The same snapshot priced by the library directly (float64, batch-invariant)."""
    snapshot, _ = trained_snapshots()[0]
    pricer = Pricer.from_snapshot(snapshot, reproducible=True)
    cols = {k: [c[k] for c in CONTRACTS] for k in CONTRACTS[0]}
    return pricer.price(Contracts.from_columns(cols), greeks=greeks, metrics=metrics)


async def test_answers_equal_the_library_pricer(client: Client) -> None:
    body = await price(client, {"contracts": CONTRACTS, "greeks": True, "metrics": True})
    check_schema(body, "PriceResult")
    assert body["model"]["counter"] == 1 and body["model"]["mode"] == "tracking"
    want = library_prices(greeks=True, metrics=True)
    for i, row in enumerate(body["contracts"]):
        assert row["inputs"] == CONTRACTS[i]
        for key in (
            "put",
            "call",
            "put_intrinsic",
            "call_intrinsic",
            "put_convexity",
            "call_convexity",
            "digital_call",
            "digital_put",
            "forward",
        ):
            assert row[key] == pytest.approx(float(want[key][i]), rel=1e-12, abs=1e-12), key
        for kind in ("put", "call"):
            for g in GREEKS:
                got = row["greeks"][kind][g]
                assert got == pytest.approx(float(want[f"{kind}_{g}"][i]), rel=1e-12, abs=1e-12)
        assert set(row["metrics"]) >= {"x_mean", "ST_mean", "ST_q50", "var95", "es99"}
        for name, got in row["metrics"].items():
            ref = float(want[name][i])
            # Non-finite values (an untrained model's negative variance) are null in JSON.
            assert got == (pytest.approx(ref, rel=1e-12) if math.isfinite(ref) else None), name


async def test_closed_form_parts_are_exact(client: Client) -> None:
    body = await price(client, {"contracts": CONTRACTS})
    for c, row in zip(CONTRACTS, body["contracts"], strict=True):
        assert "greeks" not in row and "metrics" not in row
        fwd = c["X0"] * math.exp((c["r"] - c["d"]) * c["T"])
        disc = math.exp(-c["r"] * c["T"])
        assert row["forward"] == pytest.approx(fwd, rel=1e-15)
        assert row["call_intrinsic"] == pytest.approx(disc * max(fwd - c["K"], 0.0), rel=1e-14)
        assert row["put_intrinsic"] == pytest.approx(disc * max(c["K"] - fwd, 0.0), rel=1e-14)
        assert row["put_convexity"] == pytest.approx(row["put"] - row["put_intrinsic"], abs=1e-12)
        assert row["call_convexity"] == pytest.approx(
            row["call"] - row["call_intrinsic"], abs=1e-12
        )


def black_scholes(kind: str, *, X0: float, K: float, T: float, r: float, d: float,
                  vol: float) -> float:
    """The closed form (math.erf), independent of the inversion under test."""
    n = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
    sd = vol * math.sqrt(T)
    d1 = (math.log(X0 / K) + (r - d) * T) / sd + 0.5 * sd
    d2 = d1 - sd
    if kind == "call":
        return X0 * math.exp(-d * T) * n(d1) - K * math.exp(-r * T) * n(d2)
    return K * math.exp(-r * T) * n(-d2) - X0 * math.exp(-d * T) * n(-d1)


async def test_implied_vols_reprice_the_model_prices_by_black_scholes(client: Client) -> None:
    body = await price(client, {"contracts": CONTRACTS})
    check_schema(body, "PriceResult")
    for c, row in zip(CONTRACTS, body["contracts"], strict=True):
        assert "implied_vol_reason" not in row
        market = {k: c[k] for k in ("X0", "K", "T", "r", "d")}
        for kind in ("put", "call"):
            vol = row["implied_vol"][kind]
            assert 0.0 < vol < 3.0
            assert black_scholes(kind, **market, vol=vol) == pytest.approx(
                row[kind], rel=1e-10, abs=1e-12), kind
        # the learned GBM's vol is the vol asked for, to its pricing error (a few vol-%)
        assert row["implied_vol"]["put"] == pytest.approx(c["v"], abs=0.05)


async def test_no_implied_vol_is_null_with_a_reason_never_zero(client: Client) -> None:
    # a put this far out of the money prices at the COS series' rounding (<= 1e-13 of spot):
    # no vol reproduces a price at or below intrinsic value
    far = {"X0": 100.0, "K": 40.0, "T": 0.1, "r": 0.0, "d": 0.0, "v": 0.05}
    body = await price(client, {"contracts": [far]})
    check_schema(body, "PriceResult")
    row = body["contracts"][0]
    assert row["put"] <= row["put_intrinsic"] + 1e-13
    # the call is the put plus the forward by parity: at its intrinsic value too
    assert row["implied_vol"] == {"put": None, "call": None}
    assert row["implied_vol_reason"] == {"put": "price below intrinsic value",
                                         "call": "price below intrinsic value"}


async def test_same_request_same_bytes_and_version_pinning(client: Client) -> None:
    raws = []
    for body in ({"contracts": CONTRACTS}, {"contracts": CONTRACTS}):
        resp = await client.post("/v1/price", json=body)
        raws.append(await resp.read())
    assert raws[0] == raws[1]
    pinned = await price(client, {"contracts": CONTRACTS, "model_version": 1})
    tracking = loads(raws[0])
    assert pinned["contracts"] == tracking["contracts"]
    assert pinned["model"] == {**tracking["model"], "mode": "version"}
    missing = await price(client, {"contracts": CONTRACTS, "model_version": 7}, status=404)
    assert missing["error"] == "not_found"


@pytest.mark.parametrize(
    ("field", "value", "bounds"),
    [("v", 1.5, "[0.05, 1.0]"), ("T", 0.001, "[0.02, 5.0]"), ("r", 0.5, "[-0.02, 0.1]")],
)
async def test_out_of_domain_is_422_naming_field_and_bounds(
    client: Client, field: str, value: float, bounds: str
) -> None:
    contracts = [CONTRACTS[0], {**CONTRACTS[1], field: value}]
    body = await price(client, {"contracts": contracts}, status=422)
    (err,) = body["fields"]
    assert err["path"] == f"contracts.1.{field}"
    assert bounds in err["reason"] and repr(value) in err["reason"]


@pytest.mark.parametrize(
    ("contracts", "path"),
    [
        ([{**CONTRACTS[0], "X0": 0.0}], "contracts.0.X0"),
        ([{**CONTRACTS[0], "K": -1.0}], "contracts.0.K"),
        ([{k: v for k, v in CONTRACTS[0].items() if k != "v"}], "contracts.0.v"),
        ([{**CONTRACTS[0], "S": 1.0}], "contracts.0.S"),
        ([{**CONTRACTS[0], "T": "soon"}], "contracts.0.T"),
        ([], "contracts"),
        ([CONTRACTS[0]] * 9, "contracts"),
    ],
)
async def test_invalid_contracts_are_422_with_the_path(
    client: Client, contracts: list[dict[str, Any]], path: str
) -> None:
    body = await price(client, {"contracts": contracts}, status=422)
    assert path in [f["path"] for f in body["fields"]]
    check_schema(body, "Error")


async def test_overflow_to_infinity_is_422_and_malformed_is_400(client: Client) -> None:
    headers = {"Content-Type": "application/json"}
    raw = json.dumps({"contracts": [CONTRACTS[0]]}).replace('"r": 0.02', '"r": -1e999')
    resp = await client.post("/v1/price", data=raw, headers=headers)
    assert resp.status == 422
    assert [f["path"] for f in (await resp.json())["fields"]] == ["contracts.0.r"]
    resp = await client.post("/v1/price", data=b'{"contracts": [', headers=headers)
    assert resp.status == 400


async def test_overload_is_refused_at_once_with_retry_after_and_counted(client: Client) -> None:
    """A full pricing queue answers 503 at once (reason, Retry-After), and /metrics counts it."""
    import asyncio

    from server.keys import MODEL_KEY
    from tests.test_model_service import drain, hold_pricing_thread

    app = client.server.app
    assert app is not None
    service = app[MODEL_KEY]
    service.max_inflight_bytes = 64 * 1024  # a few dozen rows
    release = hold_pricing_thread(service)
    big = {"contracts": CONTRACTS * 2}
    first = asyncio.ensure_future(client.post("/v1/price", json=big))
    for _ in range(100):
        if service.inflight_rows:
            break
        await asyncio.sleep(0.01)
    service.max_inflight_bytes = service._inflight_bytes  # the queue is now exactly full
    resp = await client.post("/v1/price", json=big)
    body = loads(await resp.read())
    assert resp.status == 503, body
    assert body["error"] == "overloaded" and "queue is full" in body["detail"]
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["X-Overload-Reason"] == "queue_full"
    await drain(service, release)
    assert (await first).status == 200
    text = await (await client.get("/metrics")).text()
    assert 'spectralmc_pricing_rejections_total{model="bs",reason="queue_full"} 1.0' in text
    assert "spectralmc_pricing_queue_delay_seconds_count" in text
    assert "spectralmc_pricing_batch_rows_bucket" in text
    assert "spectralmc_pricing_inflight_rows_count" in text


@pytest.mark.parametrize("header", ["0", "-5", "abc", "nan", "1e12"])
async def test_a_bad_deadline_header_names_the_header(client: Client, header: str) -> None:
    resp = await client.post(
        "/v1/price", json={"contracts": CONTRACTS}, headers={"X-Deadline-Ms": header}
    )
    body = loads(await resp.read())
    assert resp.status == 422, body
    assert body["fields"][0]["path"] == "header.X-Deadline-Ms"


async def test_a_deadline_header_within_range_is_honoured(client: Client) -> None:
    resp = await client.post(
        "/v1/price", json={"contracts": CONTRACTS}, headers={"X-Deadline-Ms": "2500"}
    )
    assert resp.status == 200, await resp.text()


async def test_the_edge_refuses_before_reading_the_body_when_bodies_in_progress_pass_the_bound(
    client: Client,
) -> None:
    """With a request in progress, one whose body would pass [server] max_inflight_body_bytes
    is refused at once: 503, Retry-After, reason inflight_body, counted; its body is never
    read (a malformed one gets the 503, not a 400). The bytes are released when answered."""
    import asyncio

    from server.http import EDGE_KEY
    from server.keys import MODEL_KEY
    from tests.test_model_service import drain, hold_pricing_thread

    app = client.server.app
    assert app is not None
    edge, service = app[EDGE_KEY], app[MODEL_KEY]
    release = hold_pricing_thread(service)
    first_body = json.dumps({"contracts": CONTRACTS}).encode()
    first = asyncio.ensure_future(client.post("/v1/price", data=first_body,
                                              headers={"Content-Type": "application/json"}))
    for _ in range(100):
        if service.inflight_rows:
            break
        await asyncio.sleep(0.01)
    assert edge.inflight_requests == 1 and edge.inflight_bytes == len(first_body)
    edge.max_bytes = len(first_body) + 10  # room for 10 more bytes only
    resp = await client.post("/v1/valuations", data=b"{not json, and not read" + b" " * 20,
                             headers={"Content-Type": "application/json"})
    body = loads(await resp.read())
    assert resp.status == 503, body
    assert resp.headers["X-Overload-Reason"] == "inflight_body"
    assert int(resp.headers["Retry-After"]) >= 1
    assert "max_inflight_body_bytes" in body["detail"]
    await drain(service, release)
    assert (await first).status == 200
    assert edge.inflight_requests == 0 and edge.inflight_bytes == 0
    text = await (await client.get("/metrics")).text()
    assert 'spectralmc_http_rejections_total{reason="inflight_body"} 1.0' in text
    # alone, a body larger than the bound is admitted (the largest accepted body can be priced)
    edge.max_bytes = 64
    assert (await client.post("/v1/price", json={"contracts": CONTRACTS})).status == 200


def test_edge_admission_releases_on_errors() -> None:
    from server.http import EdgeAdmission
    from server.model import Overloaded

    edge = EdgeAdmission(100)
    with pytest.raises(ZeroDivisionError), edge.hold(80):
        assert edge.inflight_bytes == 80
        with pytest.raises(Overloaded), edge.hold(30):
            pass  # pragma: no cover - refused before the body runs
        1 / 0  # noqa: B018
    assert edge.inflight_bytes == 0 and edge.inflight_requests == 0
