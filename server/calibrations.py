"""Calibration (`POST /v1/calibrations`): fit a named model's parameters to an underlying's vol
surface and store them as a derived market-data snapshot (DESIGN.md section 9).

The surface is the one in the snapshot the request's key resolves to; every point of its grid
is a quote (T from the expiry, K from the strike or from ln(K / F(T)), r and d off the curves
at T). The fit is `spectral_core.calibration.calibrate` through the served (or named) version
of the model, one at a time off the event loop, at most `[server] max_calibration_points`
points. A fit that converges is written as a snapshot derived from its source: the same
content, `model_params[underlying][model]` = the fitted parameters and `calibration` = how
(model version, RMSE and residual per point, iterations, bounds hit), at the source's
data_asof + 1 microsecond, so valuations at that data_asof or later see the fit. A fit that
does not converge answers 422 with its diagnostics and writes nothing.

Same inputs and model version, same bytes: the source of a calibration skips snapshots that are
themselves calibrations of the same underlying and model (it follows their derived_from), so a
repeated request fits the same surface again, writes the identical snapshot (an idempotent
put) and answers the same body.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from server.errors import FieldError, RequestInvalid
from server.model import ModelService, SerialGate
from server.models import ServedModel, served_model
from server.valuation import ModelName, Version
from spectral_core.calibration import (
    DEFAULT_MAX_ITERATIONS,
    CalibrationResult,
    SurfaceError,
    calibrate,
    fitted_names,
)
from spectral_core.processes import get_process
from storage.marketdata import (
    Calibration,
    CalibrationPoint,
    CalibrationVersion,
    DerivedFrom,
    Finite,
    MarketDataStore,
    MarketView,
    Name,
    SnapshotBody,
    StoredSnapshot,
    UtcDatetime,
    format_utc,
)

_MAX_WAITING = 4
# the derived snapshot's data_asof: just after its source's (datetimes are microsecond-exact)
DERIVED_STEP = timedelta(microseconds=1)


class CalibrationRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    valuation_namespace: Name
    val_datetime: UtcDatetime
    data_asof: UtcDatetime
    underlying: Name
    model: ModelName
    model_version: Version | None = None
    weights: Literal["vega", "uniform"] = "vega"
    initial: dict[str, Finite] | None = Field(default=None, max_length=32)
    # objective evaluations (one batched pass through the model each)
    max_iterations: int = Field(default=DEFAULT_MAX_ITERATIONS, ge=1, le=1000)


class NotConverged(Exception):
    """A fit that met no tolerance within its iterations: 422 with the diagnostics."""

    def __init__(self, diagnostics: dict[str, Any]) -> None:
        super().__init__("the calibration did not converge")
        self.diagnostics = diagnostics


def surface_points(view: MarketView, underlying: str) -> dict[str, np.ndarray]:
    """Every point of `underlying`'s vol surface as (S0, T, K, r, d, vol) columns (n,), r and
    d off the snapshot's curves at each expiry; MarketDataNotFound without a surface."""
    surface = view.vol_surface(underlying)
    S0 = view.spot(underlying).value
    T, K, r, d, vol = [], [], [], [], []
    for i, t in enumerate(surface.expiries):
        rate = view.zero_rate(t).value
        div = view.dividend_yield(underlying, t).value
        forward = view.forward(underlying, t).value  # inf, not an OverflowError, when far out
        for j, x in enumerate(surface.axis_values):
            T.append(t)
            K.append(x if surface.axis == "strikes" else forward * math.exp(x))
            r.append(rate)
            d.append(div)
            vol.append(surface.vols[i][j])
    cols = {"T": T, "K": K, "r": r, "d": d, "vol": vol}
    out = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
    out["S0"] = np.full(len(T), S0)
    return out


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _record(req: CalibrationRequest, served: ServedModel, version: CalibrationVersion,
            pts: Mapping[str, np.ndarray], fit: CalibrationResult) -> Calibration:
    points = [
        CalibrationPoint(T=float(t), K=float(k), market_vol=float(mv), model_vol=_finite(v),
                         residual_volbp=_finite(res), kind="call" if kind == "call" else "put")
        for t, k, mv, v, res, kind in zip(pts["T"], pts["K"], pts["vol"], fit.model_vol,
                                          fit.residuals_volbp, fit.kind, strict=True)
    ]
    return Calibration(
        underlying=req.underlying, model=req.model, process=served.process,
        model_version=version, weights=req.weights, params=fit.params, start=fit.start,
        rmse_volbp=_finite(fit.rmse_volbp), points=points, iterations=fit.nfev,
        jacobians=fit.njev, converged=fit.converged, hit_bounds=list(fit.hit_bounds),
        message=fit.message[:1024],
    )


class Calibrator:
    """One calibration at a time on a worker thread; more than `_MAX_WAITING` waiting: 503."""

    def __init__(self, models: dict[str, ServedModel], marketdata: MarketDataStore, *,
                 max_points: int) -> None:
        self.models = models
        self.marketdata = marketdata
        self.max_points = max_points
        self._gate = SerialGate("calibrations", max_waiting=_MAX_WAITING)

    async def _source(self, req: CalibrationRequest) -> StoredSnapshot:
        """The snapshot the key resolves to, past any calibration of this underlying and model
        (so a repeated calibration fits the same data)."""
        stored = await self.marketdata.resolve(
            namespace=req.valuation_namespace, val_datetime=req.val_datetime,
            data_asof=req.data_asof)
        while True:
            snap = stored.snapshot
            cal, ref = snap.calibration, snap.derived_from
            if cal is None or ref is None or (cal.underlying, cal.model) != (req.underlying,
                                                                            req.model):
                return stored
            stored = await self.marketdata.get_exact(
                namespace=ref.namespace, val_datetime=ref.val_datetime, data_asof=ref.data_asof)

    def _check(self, req: CalibrationRequest, served: ServedModel,
               pts: Mapping[str, np.ndarray]) -> None:
        if served.process == "gbm":
            raise RequestInvalid(
                [FieldError("model", f"model {req.model!r} is a gbm, which reads sigma off the "
                                     "vol surface itself; calibrate a heston or bates model")],
                "nothing to calibrate")
        n = pts["T"].shape[0]
        if n > self.max_points:
            raise RequestInvalid(
                [FieldError("underlying", f"the {req.underlying} surface has {n} points, above "
                            f"the limit of {self.max_points} (server.max_calibration_points)")],
                "surface too large")
        names = fitted_names(get_process(served.process))
        unknown = sorted(set(req.initial or {}) - set(names))
        if unknown:
            raise RequestInvalid(
                [FieldError(f"initial.{k}", f"not a parameter of model {req.model!r} "
                                            f"({served.process}: {', '.join(names)})")
                 for k in unknown], "unknown initial parameters")
        domain = served.settings.core.domain
        outside = [
            FieldError(f"initial.{k}", f"{v!r} is outside the model's trained domain "
                                       f"[{domain.bounds(k).lower}, {domain.bounds(k).upper}]")
            for k, v in sorted((req.initial or {}).items())
            if not domain.bounds(k).lower <= v <= domain.bounds(k).upper
        ]
        if outside:
            raise RequestInvalid(outside, "initial parameters outside the domain")

    async def calibrate(self, req: CalibrationRequest) -> tuple[StoredSnapshot, dict[str, Any]]:
        """Fit, write the derived snapshot, and answer (stored snapshot, body)."""
        served = served_model(self.models, req.model)
        source = await self._source(req)
        view = source.view()
        pts = surface_points(view, req.underlying)
        self._check(req, served, pts)
        service: ModelService = served.service
        loaded, info = await service.resolve(req.model_version)
        try:
            fit = await self._gate.run(
                calibrate, loaded.value, S0=pts["S0"], T=pts["T"], K=pts["K"], r=pts["r"],
                d=pts["d"], vol=pts["vol"], weights=req.weights,
                initial=dict(req.initial or {}), max_iterations=req.max_iterations)
        except SurfaceError as exc:
            field = "underlying" if exc.index is None else (
                f"vol_surfaces.{req.underlying}.points.{exc.index}.{exc.field}")
            raise RequestInvalid([FieldError(field, str(exc))], "surface cannot be calibrated"
                                 ) from None
        version = CalibrationVersion(counter=info.counter, version_hash=info.version_hash)
        record = _record(req, served, version, pts, fit)
        if not fit.converged:
            raise NotConverged(record.model_dump(mode="json"))
        snap = source.snapshot
        params = {u: dict(per) for u, per in snap.model_params.items()}
        params.setdefault(req.underlying, {})[req.model] = dict(fit.params)
        body = SnapshotBody.model_validate({
            **snap.model_dump(exclude={"format_version", "namespace", "val_datetime"}),
            "data_asof": snap.data_asof + DERIVED_STEP,
            "derived_from": DerivedFrom(namespace=snap.namespace, val_datetime=snap.val_datetime,
                                        data_asof=snap.data_asof, hash=source.content_hash),
            "model_params": params,
            "calibration": record,
        })
        stored = await self.marketdata.put(namespace=snap.namespace,
                                           val_datetime=snap.val_datetime, body=body)
        answer = {
            "key": stored.key,
            "hash": stored.content_hash,
            "valuation_namespace": snap.namespace,
            "val_datetime": format_utc(snap.val_datetime),
            "data_asof": format_utc(stored.snapshot.data_asof),
            "derived_from": {"key": source.key, "hash": source.content_hash},
            "model": {"name": served.name, **info.as_json()},
            "model_params": dict(fit.params),
            "calibration": record.model_dump(mode="json"),
        }
        return stored, answer
