"""bench.calibration: Heston fitted to implied-vol surfaces through the learned pricer, and by
QuantLib beside it.

    python -m bench.calibration --checkpoint FILE [--surfaces 20] [--seed 0] [--threads 1]

-> {"bench":"calibration","surfaces":21,"p50_ms":..,"p99_ms":..,"fit_rmse_volbp_mean":..,
    "oracle_price_err_bp":..,"quantlib_p50_ms":..,"quantlib_rmse_volbp_mean":..,
    "speedup_vs_quantlib":..,"checkpoint":..,"machine":..,...}

Surfaces. `--surfaces` synthetic Heston surfaces, parameters (v0, kappa, theta_v, xi, rho, r)
drawn uniformly (seeded) in the Liu-Oosterlee-Bohte sub-box (bench.accuracy.LOB_BOX; d = 0),
plus one market-like skewed surface (MARKET_LIKE: v0 0.04, kappa 1.5, theta_v 0.06, xi 0.6,
rho -0.75, r 0.03, d 0.01; its xi lies above the LOB box, inside the trained domain). Each has
8 expiries x 11 strikes: expiries of whole days on Actual/360 from 36 to 504 days (T = 0.1 to
1.4, inside the LOB box and the trained T domain), strikes at ln(K / F) = m sigma_atm(T) sqrt(T)
for m in -STD_RANGE..STD_RANGE, sigma_atm(T) the surface's own at-the-money-forward vol: the same
number of standard deviations at every expiry, so every quote keeps time value. Prices come
from the exact oracle (COS on the analytic CF, spectral_core.analytic_heston, held to QuantLib
to 4e-12 of spot), vols from Let's Be Rational on the OTM side.

Runs. `fit_surface` (spectral_core.calibration.calibrate, vega weights, through a Pricer loaded
from the checkpoint, default start) is timed with perf_counter per surface after one untimed
warm-up fit, with `--threads` torch intra-op threads (1 by default: at 88 points the fit is
bound by per-operation overhead, and a second thread only contends with whatever else runs).
QuantLib fits the same points from the same start: ql.HestonModel, one ql.HestonModelHelper per
point with ImpliedVolError (the vol residual, as ours), ql.AnalyticHestonEngine (its default
integration), ql.LevenbergMarquardt; timed the same way. QuantLib's model has its own
constraints, not the trained domain's bounds.

Fields. fit_rmse_volbp_mean: mean over surfaces of the fit's rmse (model implied vol at the
fitted parameters minus the quote, vol-bp; a point without a model vol is left out and counted
in `failures`). oracle_price_err_bp: mean |oracle price at our fitted parameters - the surface's
price| over all points, bp of spot: how good the parameters are, priced exactly.
quantlib_rmse_volbp_mean: the same rmse for QuantLib's fit, its own engine's prices.
speedup_vs_quantlib: quantlib_p50_ms / p50_ms.

Service path (`service_*`). The same parameter sets, as market data: each surface is written as
a snapshot (spot 100, flat zero and dividend curves at its r and d, a vol surface on a common
log-moneyness axis: the 8 expiries x 11 values ln(K/F) = m sigma_atm(T_AXIS) sqrt(T_AXIS),
m in -STD_RANGE..STD_RANGE, vols from the exact oracle), and calibrated by `POST /v1/calibrations`
on the app (the checkpoint served as named model "heston", local store, over loopback HTTP):
the request resolves the snapshot, reads the surface, fits in the service's calibrator and
writes the derived snapshot (a fit that does not converge answers 422 with its diagnostics and
is counted in service_not_converged). service_p50_ms/p99_ms are client-side times per request
after one untimed request; service_inprocess_p50_ms is `calibrate()` alone on the same points,
so their difference is what the service adds; service_rmse_volbp_mean is the fits' rmse.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import QuantLib as ql
import torch

from bench.accuracy import LOB_BOX
from bench.common import emit, machine
from spectral_core import analytic_heston
from spectral_core.calibration import CalibrationResult, calibrate
from spectral_core.implied_vol import Kind, implied_vol
from spectral_core.pricer import Pricer
from storage.checkpoint import decode_checkpoint, sha256_hex

MODEL = "heston"
# The service path's common log-moneyness axis spans +-STD_RANGE sd at this expiry (years):
# +-2.4 sd at the first expiry, +-0.6 sd at the last.
T_AXIS = 0.25

NAMES = ("v0", "kappa", "theta_v", "xi", "rho")
EXPIRY_DAYS = (36, 72, 126, 180, 252, 324, 432, 504)  # Actual/360: T = 0.1 .. 1.4
STRIKES = 11
STD_RANGE = 1.5  # strikes span +-1.5 at-the-money standard deviations
S0 = 100.0
MARKET_LIKE = {"v0": 0.04, "kappa": 1.5, "theta_v": 0.06, "xi": 0.6, "rho": -0.75,
               "r": 0.03, "d": 0.01}
# QuantLib's Levenberg-Marquardt and end criteria: its usual tolerances, a generous cap
QL_TOL = 1e-8
QL_MAX_ITERATIONS = 1000
QL_STATIONARY = 100


@dataclass(frozen=True)
class Surface:
    """One surface: true parameters (with r, d) and its points, each (n,) float64."""

    name: str
    true: dict[str, float]
    days: np.ndarray  # (n,) int
    T: np.ndarray
    K: np.ndarray
    vol: np.ndarray
    price: np.ndarray  # OTM price (call for K >= forward, else put)

    def points(self) -> dict[str, Any]:
        n = self.T.shape[0]
        return {"S0": S0, "T": self.T, "K": self.K, "r": np.full(n, self.true["r"]),
                "d": np.full(n, self.true["d"]), "vol": self.vol}


def _oracle_otm(true: dict[str, float], T: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Exact-oracle OTM prices (call for K >= forward, else put)."""
    n = T.shape[0]
    params = {"T": T, **{k: np.full(n, true[k]) for k in ("r", "d", *NAMES)}}
    put = analytic_heston.cos_oracle_put("heston", S0=np.full(n, S0), K=K, params=params)
    r, d = true["r"], true["d"]
    call = put + S0 * np.exp(-d * T) - K * np.exp(-r * T)
    forward = S0 * np.exp((r - d) * T)
    return np.where(forward <= K, call, put)


def _implied(price: np.ndarray, T: np.ndarray, K: np.ndarray, r: float, d: float) -> np.ndarray:
    """Implied vols of OTM prices (NaN where none exists)."""
    forward = S0 * np.exp((r - d) * T)
    call = forward <= K
    vol = np.full(T.shape, math.nan)
    sides: tuple[tuple[Kind, np.ndarray], ...] = (("call", call), ("put", ~call))
    for kind, mask in sides:
        vol[mask], _ = implied_vol(price[mask], S0=np.array(S0), K=K[mask], T=T[mask],
                                   r=np.array(r), d=np.array(d), kind=kind)
    return vol


def make_surface(name: str, true: dict[str, float]) -> Surface:
    """8 expiries x 11 strikes at fixed at-the-money standard deviations (see the docstring)."""
    days = np.array(EXPIRY_DAYS)
    T = days / 360.0
    fwd = S0 * np.exp((true["r"] - true["d"]) * T)
    atm = _implied(_oracle_otm(true, T, fwd), T, fwd, true["r"], true["d"])
    m = np.linspace(-STD_RANGE, STD_RANGE, STRIKES)
    K = (fwd[:, None] * np.exp(np.outer(atm * np.sqrt(T), m))).ravel()  # (8 * 11,) by expiry
    days, T = np.repeat(days, STRIKES), np.repeat(T, STRIKES)
    price = _oracle_otm(true, T, K)
    vol = _implied(price, T, K, true["r"], true["d"])
    if not np.isfinite(vol).all():
        raise ValueError(f"surface {name}: the oracle price has no implied vol at "
                         f"{np.flatnonzero(~np.isfinite(vol)).tolist()}")
    return Surface(name=name, true=true, days=days, T=T, K=K, vol=vol, price=price)


def draw_surfaces(count: int, seed: int) -> list[Surface]:
    """`count` surfaces drawn in the LOB sub-box (d = 0), then the market-like one."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        true = {k: float(rng.uniform(*LOB_BOX[k])) for k in (*NAMES, "r")}
        out.append(make_surface(f"lob{i}", {**true, "d": 0.0}))
    out.append(make_surface("market_like", MARKET_LIKE))
    return out


def load_pricer(path: Path) -> Pricer:
    data = path.read_bytes()
    snapshot = decode_checkpoint(data, expected_sha256=sha256_hex(data))
    return Pricer.from_snapshot(snapshot, process="heston")


def fit_surface(pricer: Pricer, points: dict[str, Any], *,
                initial: dict[str, float] | None = None) -> CalibrationResult:
    """The timed fit: what POST /v1/calibrations will run for one surface."""
    return calibrate(pricer, **points, weights="vega", initial=initial)


def quantlib_fit(surface: Surface, start: dict[str, float]) -> tuple[dict[str, float], float]:
    """(fitted parameters, rmse in vol-bp of QuantLib's own model prices)."""
    today = ql.Date(2, 1, 2024)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual360()
    rates = ql.YieldTermStructureHandle(
        ql.FlatForward(today, surface.true["r"], dc, ql.Continuous))
    divs = ql.YieldTermStructureHandle(ql.FlatForward(today, surface.true["d"], dc, ql.Continuous))
    spot = ql.QuoteHandle(ql.SimpleQuote(S0))
    model = ql.HestonModel(ql.HestonProcess(rates, divs, spot, *(start[n] for n in NAMES)))
    engine = ql.AnalyticHestonEngine(model)
    helpers = []
    for days, k, vol in zip(surface.days, surface.K, surface.vol, strict=True):
        helper = ql.HestonModelHelper(ql.Period(int(days), ql.Days), ql.NullCalendar(), S0,
                                      float(k), ql.QuoteHandle(ql.SimpleQuote(float(vol))),
                                      rates, divs, ql.BlackCalibrationHelper.ImpliedVolError)
        helper.setPricingEngine(engine)
        helpers.append(helper)
    model.calibrate(helpers, ql.LevenbergMarquardt(QL_TOL, QL_TOL, QL_TOL),
                    ql.EndCriteria(QL_MAX_ITERATIONS, QL_STATIONARY, QL_TOL, QL_TOL, QL_TOL))
    fitted = {"v0": model.v0(), "kappa": model.kappa(), "theta_v": model.theta(),
              "xi": model.sigma(), "rho": model.rho()}
    price = np.array([h.modelValue() for h in helpers])
    vol = _implied(price, surface.T, surface.K, surface.true["r"], surface.true["d"])
    err = (vol - surface.vol) * 1e4
    return fitted, float(np.sqrt(np.nanmean(err**2)))


def grid_surface(surface: Surface) -> dict[str, Any]:
    """`surface`'s parameters on a common log-moneyness axis (the service-path docstring):
    {"expiries", "log_moneyness", "vols" (8, 11)} of the exact oracle, and its points."""
    true = surface.true
    T = np.array(EXPIRY_DAYS) / 360.0
    r, d = true["r"], true["d"]
    ref = np.array([T_AXIS])
    f_ref = S0 * np.exp((r - d) * ref)
    atm = float(_implied(_oracle_otm(true, ref, f_ref), ref, f_ref, r, d)[0])
    x = np.linspace(-STD_RANGE, STD_RANGE, STRIKES) * atm * math.sqrt(T_AXIS)
    TT = np.repeat(T, STRIKES)
    K = (S0 * np.exp((r - d) * T)[:, None] * np.exp(x)[None, :]).ravel()
    vol = _implied(_oracle_otm(true, TT, K), TT, K, r, d)
    n = TT.shape[0]
    points = {"S0": S0, "T": TT, "K": K, "r": np.full(n, r), "d": np.full(n, d), "vol": vol}
    return {"expiries": T.tolist(), "log_moneyness": x.tolist(),
            "vols": vol.reshape(len(T), STRIKES).tolist(), "points": points}


async def service_path(data: bytes, surfaces: list[Surface]) -> dict[str, Any]:
    """POST /v1/calibrations per surface on the app serving the checkpoint (docstring)."""
    from datetime import UTC, datetime, timedelta

    from bench.app import serve_snapshot
    from config.settings import LoggingSettings, ServerSettings
    from server.logging import configure_logging

    configure_logging(LoggingSettings(level="WARNING", format="json"))
    snapshot = decode_checkpoint(data, expected_sha256=sha256_hex(data))
    grids = [grid_surface(s) for s in surfaces]
    vdt = "2026-06-30T16:00:00Z"
    asof = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    times, rmse, converged = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        async with serve_snapshot(Path(tmp) / "store", snapshot, model=MODEL,
                                  server=ServerSettings(request_timeout_s=600.0),
                                  message="bench.calibration") as (server, session):
            for i, (s, g) in enumerate(zip(surfaces, grids, strict=True)):
                r, d = s.true["r"], s.true["d"]
                doc = {"data_asof": asof, "spots": {"SPX": S0},
                       "zero_curves": {"OIS": {"tenors": [1.0], "rates": [r]}},
                       "dividend_curves": {"SPX": {"tenors": [1.0], "rates": [d]}},
                       "vol_surfaces": {"SPX": {k: g[k] for k in
                                                ("expiries", "log_moneyness", "vols")}}}
                async with session.put(server.make_url(f"/v1/marketdata/s{i}/{vdt}"),
                                       json=doc) as resp:
                    assert resp.status == 201, await resp.text()
            body = {"val_datetime": vdt, "data_asof": datetime.now(UTC).isoformat(),
                    "underlying": "SPX", "model": MODEL}
            for i in [0, *range(len(surfaces))]:  # the first untimed
                start = time.perf_counter()
                async with session.post(server.make_url("/v1/calibrations"),
                                        json={**body, "valuation_namespace": f"s{i}"}
                                        ) as resp:
                    answer = await resp.json()
                times.append((time.perf_counter() - start) * 1e3)
                # 201 a new fit stored (200 the same fit again); 422 a fit that did not
                # converge, with its diagnostics
                record = answer.get("calibration")
                if resp.status not in (200, 201, 422) or record is None:
                    raise RuntimeError(f"calibration of s{i}: {resp.status} "
                                       f"{str(answer)[:300]}")
                rmse.append(record["rmse_volbp"])
                converged.append(resp.status != 422)
    pricer = Pricer.from_snapshot(snapshot, process="heston")
    fit_surface(pricer, grids[0]["points"])  # untimed
    inproc = [_timed(lambda g=g: fit_surface(pricer, g["points"]))[1] * 1e3 for g in grids]
    times, rmse, converged = times[1:], rmse[1:], converged[1:]
    return {
        "service_p50_ms": float(np.median(times)),
        "service_p99_ms": float(np.quantile(times, 0.99)),
        "service_inprocess_p50_ms": float(np.median(inproc)),
        "service_rmse_volbp_mean": float(np.mean([x for x, ok in zip(rmse, converged,
                                                                     strict=True)
                                                  if ok and x is not None])),
        "service_not_converged": sum(not ok for ok in converged),
    }


def _timed(run: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.calibration")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--surfaces", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    pricer = load_pricer(args.checkpoint)
    surfaces = draw_surfaces(args.surfaces, args.seed)
    warm = fit_surface(pricer, surfaces[0].points())  # untimed: first-call costs
    quantlib_fit(surfaces[0], warm.start)
    ours, ql_ms, ours_ms, ql_rmse, oracle_err = [], [], [], [], []
    for s in surfaces:
        fit, seconds = _timed(lambda s=s: fit_surface(pricer, s.points()))
        ours.append(fit)
        ours_ms.append(seconds * 1e3)
        params = {**fit.params, "r": s.true["r"], "d": s.true["d"]}
        oracle_err.append(np.abs(_oracle_otm(params, s.T, s.K) - s.price) / S0 * 1e4)
        (_, rmse), seconds = _timed(lambda s=s, start=fit.start: quantlib_fit(s, start))
        ql_ms.append(seconds * 1e3)
        ql_rmse.append(rmse)
    p50, ql_p50 = float(np.median(ours_ms)), float(np.median(ql_ms))
    service = asyncio.run(service_path(args.checkpoint.read_bytes(), surfaces))
    emit({
        "bench": "calibration",
        "surfaces": len(surfaces),
        "p50_ms": p50,
        "p99_ms": float(np.quantile(ours_ms, 0.99)),
        "fit_rmse_volbp_mean": float(np.mean([f.rmse_volbp for f in ours])),
        "oracle_price_err_bp": float(np.mean(np.concatenate(oracle_err))),
        "quantlib_p50_ms": ql_p50,
        "quantlib_rmse_volbp_mean": float(np.mean(ql_rmse)),
        "speedup_vs_quantlib": ql_p50 / p50,
        "market_like_rmse_volbp": ours[-1].rmse_volbp,
        **service,
        "nfev_mean": float(np.mean([f.nfev for f in ours])),
        "njev_mean": float(np.mean([f.njev for f in ours])),
        "not_converged": sum(not f.converged for f in ours),
        "failures": sum(len(f.failures) for f in ours),
        "hit_bounds": sum(bool(f.hit_bounds) for f in ours),
        "quantlib_error": "ImpliedVolError",
        "threads": args.threads,
        "checkpoint": str(args.checkpoint),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
