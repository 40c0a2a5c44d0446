"""POST /v1/calibrations: a Heston model fitted to a vol surface written from the exact Heston
oracle, stored as a derived snapshot that valuations then read."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import numpy as np
import pytest

from server.keys import MARKETDATA_KEY
from spectral_core.analytic_heston import cos_oracle_put
from spectral_core.implied_vol import implied_vol
from storage.localstore import LocalStore
from storage.objectstore import ObjectStore
from tests.server_fixtures import (
    HESTON,
    NOW,
    VDT,
    check_schema,
    commit_model,
    make_settings,
    put_market_data,
    start_client,
    until,
)

TRUE = {"v0": 0.04, "kappa": 1.5, "theta_v": 0.05, "xi": 0.5, "rho": -0.6}
EXPIRIES = [0.25, 0.5, 1.0, 2.0]
STRIKES = [80.0, 90.0, 100.0, 110.0, 120.0]
R, D, S0 = 0.03, 0.01, 100.0
ASOF = NOW - timedelta(hours=1)


def oracle_vols(params: dict[str, float], expiries: list[float], strikes: list[float]
                ) -> list[list[float]]:
    """Black-Scholes vols of the exact Heston puts (COS on the analytic CF, held to QuantLib)."""
    T, K = (np.asarray(a, dtype=np.float64).ravel() for a in np.meshgrid(expiries, strikes,
                                                                         indexing="ij"))
    n = T.size
    cols = {"T": T, "r": np.full(n, R), "d": np.full(n, D),
            **{k: np.full(n, v) for k, v in params.items()}}
    puts = cos_oracle_put("heston", S0=np.full(n, S0), K=K, params=cols)
    vols, reasons = implied_vol(puts, S0=S0, K=K, T=T, r=R, d=D, kind="put")
    assert all(r is None for r in reasons)
    return vols.reshape(len(expiries), len(strikes)).tolist()


def market(**extra: Any) -> dict[str, Any]:
    return {
        "data_asof": ASOF.isoformat(),
        "spots": {"SPX": S0},
        "zero_curves": {"USD-OIS": {"tenors": [0.1, 5.0], "rates": [R, R]}},
        "dividend_curves": {"SPX": {"tenors": [0.1, 5.0], "rates": [D, D]}},
        "vol_surfaces": {"SPX": {"expiries": EXPIRIES, "strikes": STRIKES,
                                 "vols": oracle_vols(TRUE, EXPIRIES, STRIKES)}},
        **extra,
    }


def request(**extra: Any) -> dict[str, Any]:
    return {"valuation_namespace": "eod", "val_datetime": "2024-06-28T16:00:00Z",
            "data_asof": NOW.isoformat(), "underlying": "SPX", "model": "heston", **extra}


@pytest.fixture
async def store(tmp_path: Any) -> ObjectStore:
    s = LocalStore(tmp_path / "store")
    await commit_model(s)
    await commit_model(s, model="heston")
    return s


async def _client(aiohttp_client: Any, store: ObjectStore, body: dict[str, Any] | None = None,
                  **server: Any) -> Any:
    settings = make_settings(models={"heston": HESTON}, poll_interval_s=0.05, **server)
    client = await start_client(aiohttp_client, store=store, settings=settings)

    async def loaded() -> bool:
        got = await (await client.get("/v1/models/heston")).json()
        return got["live"] is not None

    await until(loaded, what="the heston model to load")
    await put_market_data(client, body=body or market())
    return client


async def test_a_fit_is_stored_as_a_derived_snapshot_that_valuations_read(
    aiohttp_client: Any, store: ObjectStore
) -> None:
    client = await _client(aiohttp_client, store)
    resp = await client.post("/v1/calibrations", json=request())
    raw = await resp.read()
    assert resp.status == 201, raw.decode()
    body = await resp.json()
    check_schema(body, "CalibrationResult")
    cal = body["calibration"]
    assert cal["converged"] and cal["underlying"] == "SPX" and cal["process"] == "heston"
    assert len(cal["points"]) == len(EXPIRIES) * len(STRIKES)
    assert cal["iterations"] >= 1 and math.isfinite(cal["rmse_volbp"])
    assert body["model"]["name"] == "heston" and cal["model_version"]["counter"] == 1
    assert set(body["model_params"]) == set(TRUE)
    # each fitted parameter inside the model's trained domain
    domain = (await (await client.get("/v1/models/heston")).json())["domain"]
    for name, value in body["model_params"].items():
        lo, hi = domain[name]
        assert lo <= value <= hi, name
    # the residuals are the model's vol minus the market's, in vol-bp
    for p in cal["points"]:
        if p["model_vol"] is not None:
            assert p["residual_volbp"] == pytest.approx((p["model_vol"] - p["market_vol"]) * 1e4,
                                                        rel=1e-9, abs=1e-6)
    # derived: same key, a later data_asof, derived_from pinned by hash
    stored = await client.app[MARKETDATA_KEY].resolve(namespace="eod", val_datetime=VDT,
                                                      data_asof=NOW)
    assert stored.key == body["key"] and stored.content_hash == body["hash"]
    snap = stored.snapshot
    assert snap.derived_from is not None and snap.derived_from.hash == body["derived_from"]["hash"]
    assert snap.data_asof == ASOF + timedelta(microseconds=1)
    assert snap.model_params["SPX"]["heston"] == body["model_params"]
    assert snap.vol_surfaces == (await client.app[MARKETDATA_KEY].resolve(
        namespace="eod", val_datetime=VDT, data_asof=ASOF)).snapshot.vol_surfaces
    # the same request again: the same fit of the same source, the same bytes, nothing new
    again = await client.post("/v1/calibrations", json=request())
    assert again.status == 200 and await again.read() == raw
    # a valuation at that data_asof or later prices with the fitted parameters
    val = await client.post("/v1/valuations", json={
        "valuation_namespace": "eod", "val_datetime": "2024-06-28T16:00:00Z",
        "data_asof": NOW.isoformat(), "model": "heston", "instruments": [
            {"id": "p", "type": "european_put", "underlying": "SPX", "strike": 95.0,
             "expiry": "2025-06-27T16:00:00Z"}]})
    assert val.status == 200, await val.text()
    inputs = (await val.json())["instruments"][0]["inputs"]
    assert {k: inputs[k]["value"] for k in TRUE} == body["model_params"]
    assert inputs["v0"]["source"] == "model_params SPX heston"


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"underlying": "NDX"}, 404, "vol_surface 'NDX' is not in snapshot"),
        ({"model": "bs"}, 422, "reads sigma off the vol surface itself"),
        ({"model": "sabr"}, 404, "model 'sabr' is not served here"),
        ({"initial": {"sigma": 0.2}}, 422, "not a parameter of model 'heston'"),
        ({"initial": {"v0": 5.0}}, 422, "5.0 is outside the model's trained domain"),
        ({"weights": "equal"}, 422, "weights"),
        ({"model_version": 7}, 404, "7"),
    ],
)
async def test_bad_calibration_requests_name_the_field(
    aiohttp_client: Any, store: ObjectStore, change: dict[str, Any], status: int, needle: str
) -> None:
    client = await _client(aiohttp_client, store)
    resp = await client.post("/v1/calibrations", json=request(**change))
    text = await resp.text()
    assert resp.status == status, text
    assert needle in text


async def test_fewer_points_than_parameters_is_422(aiohttp_client: Any,
                                                   store: ObjectStore) -> None:
    small = market(vol_surfaces={"SPX": {"expiries": [0.5, 1.0], "strikes": [90.0, 110.0],
                                         "vols": oracle_vols(TRUE, [0.5, 1.0], [90.0, 110.0])}})
    client = await _client(aiohttp_client, store, body=small)
    resp = await client.post("/v1/calibrations", json=request())
    assert resp.status == 422
    assert "4 points cannot determine 5 parameters" in await resp.text()


async def test_a_surface_over_the_point_limit_is_422(aiohttp_client: Any,
                                                     store: ObjectStore) -> None:
    client = await _client(aiohttp_client, store, max_calibration_points=10)
    resp = await client.post("/v1/calibrations", json=request())
    assert resp.status == 422
    assert "20 points, above the limit of 10" in await resp.text()


async def test_a_fit_that_does_not_converge_answers_its_diagnostics_and_writes_nothing(
    aiohttp_client: Any, store: ObjectStore
) -> None:
    client = await _client(aiohttp_client, store)
    resp = await client.post("/v1/calibrations", json=request(max_iterations=1))
    assert resp.status == 422, await resp.text()
    body = await resp.json()
    assert body["error"] == "not_converged"
    assert body["calibration"]["converged"] is False and body["calibration"]["iterations"] == 1
    latest = await client.app[MARKETDATA_KEY].resolve(namespace="eod", val_datetime=VDT,
                                                      data_asof=NOW)
    assert latest.snapshot.data_asof == ASOF and latest.snapshot.calibration is None


async def test_end_to_end_oracle_surface_calibrate_then_value_against_the_oracle(
    aiohttp_client: Any, store: ObjectStore
) -> None:
    """Surface from the exact Heston oracle -> calibrate -> value a book under heston -> each
    price and implied vol against the oracle at the calibrated parameters, to the accuracy of
    this (tiny, briefly trained) model measured here on held-out contracts."""
    from bench.common import held_out_contracts
    from spectral_core.pricer import Contracts, Pricer
    from tests.server_fixtures import model_chain

    client = await _client(aiohttp_client, store)
    cal = await client.post("/v1/calibrations", json=request())
    assert cal.status == 201, await cal.text()
    fitted = (await cal.json())["model_params"]
    # the model's own error against the oracle on 200 held-out contracts: the tolerance
    record = (await model_chain(store, "heston").list())[-1]
    pricer = Pricer.from_snapshot(await model_chain(store, "heston").load_record(record),
                                  reproducible=True)
    held = held_out_contracts(200, pricer.config.domain, seed=7)
    learned = pricer.price(Contracts.from_columns(held, fields=pricer.contract_fields))["put"]
    exact = cos_oracle_put("heston", S0=held["X0"], K=held["K"],
                           params={k: v for k, v in held.items() if k not in ("X0", "K")})
    tol = 2.0 * float(np.max(np.abs(learned - exact)))  # price units, spot 100
    assert 0.0 < tol < 20.0
    expiries = ["2024-12-27T16:00:00Z", "2025-06-27T16:00:00Z", "2026-06-26T16:00:00Z"]
    insts = [{"id": f"{t[9]}{j}{k}", "type": t, "underlying": "SPX", "strike": k,
              "expiry": e}
             for j, e in enumerate(expiries) for k in (85.0, 100.0, 115.0)
             for t in ("european_put", "european_call")]
    resp = await client.post("/v1/valuations", json={
        "valuation_namespace": "eod", "val_datetime": "2024-06-28T16:00:00Z",
        "data_asof": NOW.isoformat(), "model": "heston", "instruments": insts})
    assert resp.status == 200, await resp.text()
    rows = (await resp.json())["instruments"]
    T = np.array([r["inputs"]["T"]["value"] for r in rows])
    K = np.array([r["strike"] for r in rows])
    n = len(rows)
    oracle_put = cos_oracle_put("heston", S0=np.full(n, S0), K=K, params={
        "T": T, "r": np.full(n, R), "d": np.full(n, D),
        **{k: np.full(n, v) for k, v in fitted.items()}})
    call = np.array([r["type"] == "european_call" for r in rows])
    oracle = np.where(call, oracle_put + S0 * np.exp(-D * T) - K * np.exp(-R * T), oracle_put)
    got = np.array([r["unit_price"] for r in rows])
    assert np.max(np.abs(got - oracle)) <= tol
    for kind in ("put", "call"):
        sel = call if kind == "call" else ~call
        iv_oracle, _ = implied_vol(oracle[sel], S0=S0, K=K[sel], T=T[sel], r=R, d=D, kind=kind)
        sd = iv_oracle * np.sqrt(T[sel])
        d1 = (np.log(S0 / K[sel]) + (R - D) * T[sel]) / sd + 0.5 * sd
        vega = S0 * np.exp(-D * T[sel]) * np.sqrt(T[sel]) * np.exp(-0.5 * d1**2) / np.sqrt(
            2 * np.pi)
        iv = np.array([r["implied_vol"] for r, s in zip(rows, sel, strict=True) if s])
        # to first order an implied-vol error is the price error over vega
        assert np.all(np.abs(iv - iv_oracle) <= 1.5 * tol / vega), kind


async def test_a_log_moneyness_surface_is_fitted_at_strikes_off_the_forward(
    aiohttp_client: Any, store: ObjectStore
) -> None:
    m = [-0.2, -0.1, 0.0, 0.1, 0.2]
    T = np.repeat(EXPIRIES, len(m))
    K = S0 * np.exp((R - D) * T) * np.exp(np.tile(m, len(EXPIRIES)))
    n = T.size
    params = {"T": T, "r": np.full(n, R), "d": np.full(n, D),
              **{k: np.full(n, v) for k, v in TRUE.items()}}
    puts = cos_oracle_put("heston", S0=np.full(n, S0), K=K, params=params)
    vols, _ = implied_vol(puts, S0=S0, K=K, T=T, r=R, d=D, kind="put")
    body = market(vol_surfaces={"SPX": {"expiries": EXPIRIES, "log_moneyness": m,
                                        "vols": vols.reshape(len(EXPIRIES), len(m)).tolist()}})
    client = await _client(aiohttp_client, store, body=body)
    resp = await client.post("/v1/calibrations", json=request())
    assert resp.status == 201, await resp.text()
    points = (await resp.json())["calibration"]["points"]
    assert [p["K"] for p in points] == pytest.approx(K.tolist(), rel=1e-12)
    assert [p["market_vol"] for p in points] == pytest.approx(vols.tolist(), rel=1e-12)
