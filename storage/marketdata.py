"""Market data: immutable, bitemporal snapshots keyed by (namespace, val_datetime, data_asof).

Layout on the object store (every segment comes from a validated name or a fixed-width UTC token,
so no key can escape its prefix):

    marketdata/<namespace>/<val_datetime token>/<data_asof token>.json   snapshot documents
    marketdata/<namespace>/<val_datetime token>/index.json               committed data_asofs

A snapshot document is the canonical JSON of a `MarketSnapshot`; its content hash is the sha256 of
those bytes. Writing a snapshot is: put the document with put_if_absent, then append it to the
index with a compare-and-swap (put_if_absent for the first, put_if_match after). The index update
is the commit point, so two writers can never both append, and a back-dated write (a data_asof not
later than every committed one) is refused: it would change what an earlier request resolved to.
Readers only see documents named by the index and check each one's hash.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from spectral_core import valuation as core
from storage.objectstore import Conflict, Corrupt, NotFound, ObjectStore, Unavailable
from storage.prefixed import MODEL_NAME_PATTERN

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)
_TOKEN_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})\.(\d{6})Z$")
_SHA256_PATTERN = r"^[0-9a-f]{64}$"
_YEAR = timedelta(days=365)


# --- errors -------------------------------------------------------------------------------------


class MarketDataInvalid(ValueError):
    """A request is wrong in a way a schema cannot see; `field` names the offending input."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class MarketDataNotFound(NotFound):
    """A snapshot, curve, surface or underlying is missing; the message names it."""


class BackdatedWrite(Conflict):
    """A data_asof not later than every committed one for its (namespace, val_datetime)."""


class DerivedFromMismatch(Conflict):
    """A derived snapshot's `derived_from` hash differs from the stored source's hash."""


# --- field types ----------------------------------------------------------------------------------


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
        raise ValueError(f"{value.isoformat()} is outside the datetime range in UTC") from None


def _safe_exp(x: float) -> float:
    """exp that returns inf instead of raising OverflowError (a far-out forward is not a 500)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
PositiveFinite = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
NonNegativeFinite = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Sha256 = Annotated[str, StringConstraints(pattern=_SHA256_PATTERN)]


def _strictly_increasing(values: Sequence[float], what: str) -> None:
    for i in range(1, len(values)):
        if not values[i] > values[i - 1]:
            raise ValueError(
                f"{what} must be strictly increasing, got {values[i - 1]!r} then {values[i]!r} "
                f"at index {i}"
            )


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Curve(_Doc):
    """Zero rates (continuously compounded) or dividend yields by tenor in years."""

    tenors: list[NonNegativeFinite] = Field(min_length=1, max_length=1000)
    rates: list[Finite] = Field(min_length=1, max_length=1000)
    interpolation: Literal["linear_rate", "linear_rt"] = "linear_rate"

    @model_validator(mode="after")
    def _check(self) -> Curve:
        if len(self.tenors) != len(self.rates):
            raise ValueError(
                f"tenors ({len(self.tenors)}) and rates ({len(self.rates)}) differ in length"
            )
        _strictly_increasing(self.tenors, "tenors")
        return self


class VolSurface(_Doc):
    """Implied vols on expiries x (absolute strikes | log-moneyness ln(K / F(T)))."""

    expiries: list[PositiveFinite] = Field(min_length=1, max_length=500)
    strikes: list[PositiveFinite] | None = Field(default=None, min_length=1, max_length=500)
    log_moneyness: list[Finite] | None = Field(default=None, min_length=1, max_length=500)
    vols: list[list[PositiveFinite]] = Field(min_length=1, max_length=500)

    @model_validator(mode="after")
    def _check(self) -> VolSurface:
        if (self.strikes is None) == (self.log_moneyness is None):
            raise ValueError("give exactly one of strikes or log_moneyness")
        axis = self.axis_values
        _strictly_increasing(self.expiries, "expiries")
        _strictly_increasing(axis, self.axis)
        if len(self.vols) != len(self.expiries):
            raise ValueError(
                f"vols has {len(self.vols)} rows, expected one per expiry ({len(self.expiries)})"
            )
        for i, row in enumerate(self.vols):
            if len(row) != len(axis):
                raise ValueError(f"vols[{i}] has {len(row)} values, expected {len(axis)}")
        return self

    @property
    def axis(self) -> Literal["strikes", "log_moneyness"]:
        return "strikes" if self.strikes is not None else "log_moneyness"

    @property
    def axis_values(self) -> list[float]:
        values = self.strikes if self.strikes is not None else self.log_moneyness
        assert values is not None
        return values


class Fixing(_Doc):
    at: UtcDatetime
    value: Finite


class DerivedFrom(_Doc):
    """The source snapshot a derived snapshot was built from, pinned by its content hash."""

    namespace: Name
    val_datetime: UtcDatetime
    data_asof: UtcDatetime
    hash: Sha256


# model_params[underlying][model][parameter]: a model's parameters per underlying, e.g.
# {"SPX": {"heston": {"v0": 0.04, "kappa": 1.5, ...}}}, written by hand or by a calibration.
ModelKey = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
ParamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$")]
ModelParams = Annotated[dict[ParamName, Finite], Field(max_length=32)]


class MarketData(_Doc):
    """The market content of a snapshot."""

    spots: dict[Name, PositiveFinite] = Field(default_factory=dict)
    fixings: dict[Name, Annotated[list[Fixing], Field(max_length=1000)]] = Field(
        default_factory=dict
    )
    zero_curves: dict[Name, Curve] = Field(default_factory=dict)
    discount_curve: Name | None = None
    dividend_curves: dict[Name, Curve] = Field(default_factory=dict)
    vol_surfaces: dict[Name, VolSurface] = Field(default_factory=dict)
    model_params: dict[Name, Annotated[dict[ModelKey, ModelParams], Field(max_length=32)]] = (
        Field(default_factory=dict)
    )

    @model_validator(mode="after")
    def _check(self) -> MarketData:
        if not (
            self.spots
            or self.fixings
            or self.zero_curves
            or self.vol_surfaces
            or self.dividend_curves
            or self.model_params
        ):
            raise ValueError("a snapshot must carry some market data")
        if self.discount_curve is not None and self.discount_curve not in self.zero_curves:
            raise ValueError(f"discount_curve {self.discount_curve!r} is not in zero_curves")
        if self.discount_curve is None and len(self.zero_curves) > 1:
            raise ValueError("discount_curve is required when there is more than one zero curve")
        for name, series in self.fixings.items():
            _strictly_increasing([f.at.timestamp() for f in series], f"fixings.{name} dates")
        for u, surface in self.vol_surfaces.items():
            if surface.log_moneyness is None:
                continue
            # ln(K / F(T)) needs the forward: spot, discount curve and dividend curve.
            missing = [
                what
                for what, ok in (
                    (f"spots.{u}", u in self.spots),
                    ("a zero curve", bool(self.zero_curves)),
                    (f"dividend_curves.{u}", u in self.dividend_curves),
                )
                if not ok
            ]
            if missing:
                raise ValueError(
                    f"vol_surfaces.{u} is on log-moneyness and needs {', '.join(missing)}"
                )
        return self


class CalibrationPoint(_Doc):
    """One surface point of a calibration: where it is, the market and model vols and the
    residual (vol-bp); the model vol and residual are null where no model vol exists."""

    T: PositiveFinite
    K: PositiveFinite
    market_vol: PositiveFinite
    model_vol: Finite | None
    residual_volbp: Finite | None
    kind: Literal["put", "call"]


class CalibrationVersion(_Doc):
    counter: Annotated[int, Field(ge=1)]
    version_hash: Sha256


class Calibration(_Doc):
    """How a derived snapshot's model_params[underlying][model] were fitted (POST
    /v1/calibrations): the model version, the fit's quality and the optimiser's trace."""

    underlying: Name
    model: ModelKey
    process: Annotated[str, StringConstraints(pattern=r"^[a-z]{1,16}$")]
    model_version: CalibrationVersion
    weights: Literal["vega", "uniform"]
    params: ModelParams
    start: ModelParams
    rmse_volbp: Finite | None
    points: Annotated[list[CalibrationPoint], Field(max_length=250_000)]
    iterations: Annotated[int, Field(ge=0)]  # objective evaluations (one batched pass each)
    jacobians: Annotated[int, Field(ge=0)]
    converged: bool
    hit_bounds: Annotated[list[ParamName], Field(max_length=32)]
    message: Annotated[str, StringConstraints(max_length=1024)]


class SnapshotBody(MarketData):
    """What a client writes: the market content, when it was known, and its source if derived
    (with how it was derived, for a calibration's snapshot)."""

    data_asof: UtcDatetime
    derived_from: DerivedFrom | None = None
    calibration: Calibration | None = None


class MarketSnapshot(SnapshotBody):
    """The stored document: the body plus its key."""

    format_version: Literal[1] = 1
    namespace: Name
    val_datetime: UtcDatetime


class _IndexEntry(_Doc):
    data_asof: UtcDatetime
    hash: Sha256


class _Index(_Doc):
    format_version: Literal[1] = 1
    namespace: Name
    val_datetime: UtcDatetime
    entries: list[_IndexEntry]


# --- canonical form, keys -----------------------------------------------------------------------


def canonical_json(model: BaseModel) -> bytes:
    """Sorted keys, no whitespace, UTC datetimes, shortest round-trip floats, no NaN.

    An empty `model_params` and a null `calibration` are left out, so a snapshot written
    before those fields existed has the same bytes (and content hash) when it is written again."""
    data = model.model_dump(mode="json")
    if isinstance(model, MarketData) and not model.model_params:
        del data["model_params"]
    if isinstance(model, SnapshotBody) and model.calibration is None:
        del data["calibration"]
    return json.dumps(
        data,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode()


def content_hash(snapshot: MarketSnapshot) -> str:
    """sha256 of the snapshot's canonical JSON (exactly the stored bytes)."""
    return hashlib.sha256(canonical_json(snapshot)).hexdigest()


def check_name(value: str, *, field: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise MarketDataInvalid(
            field, f"{value!r} is not a valid name (letters, digits, '.', '_', '-'; at most 128)"
        )
    return value


def parse_aware_datetime(text: str, *, field: str) -> datetime:
    """ISO-8601 with a timezone (or 'Z'), normalised to UTC."""
    try:
        value = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise MarketDataInvalid(field, f"{text!r} is not an ISO-8601 datetime") from None
    return require_aware(value, field=field)


def require_aware(value: datetime, *, field: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise MarketDataInvalid(field, f"{value.isoformat()} has no timezone")
    try:
        return _to_utc(value)
    except ValueError as exc:
        raise MarketDataInvalid(field, str(exc)) from None


def datetime_token(value: datetime) -> str:
    """Fixed-width UTC token (`20240628T160000.000000Z`): lexical order is time order."""
    d = require_aware(value, field="datetime")
    return (
        f"{d.year:04d}{d.month:02d}{d.day:02d}T{d.hour:02d}{d.minute:02d}{d.second:02d}"
        f".{d.microsecond:06d}Z"
    )


def format_utc(value: datetime) -> str:
    """ISO-8601 in UTC with a 'Z', the form stored documents use."""
    return require_aware(value, field="datetime").isoformat().replace("+00:00", "Z")


def parse_datetime_token(token: str) -> datetime:
    m = _TOKEN_RE.match(token)
    if m is None:
        raise ValueError(f"{token!r} is not a datetime token")
    year, month, day, hour, minute, second, micro = (int(g) for g in m.groups())
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def year_fraction_act365(*, start: datetime, end: datetime) -> float:
    """ACT/365 fixed: elapsed time in days (with the time of day) over 365; signed."""
    a = require_aware(start, field="start")
    b = require_aware(end, field="end")
    return (b - a) / _YEAR


# --- interpolation (pure, batch-shaped) ---------------------------------------------------------


def _as_query(values: npt.ArrayLike, *, field: str, positive: bool) -> npt.NDArray[np.float64]:
    q = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(q)):
        raise MarketDataInvalid(field, f"must be finite, got {values!r}")
    if positive and np.any(q <= 0.0):
        raise MarketDataInvalid(field, f"must be > 0, got {values!r}")
    if not positive and np.any(q < 0.0):
        raise MarketDataInvalid(field, f"must be >= 0, got {values!r}")
    return q


def interpolate_curve(
    *,
    tenors: npt.ArrayLike,
    rates: npt.ArrayLike,
    rule: Literal["linear_rate", "linear_rt"],
    t: npt.ArrayLike,
) -> npt.NDArray[np.float64]:
    """Rate at each t (years, >= 0): linear in r or in r*t between pillars, flat outside
    (spectral_core.valuation.interpolate_curve on a checked query)."""
    if rule not in ("linear_rate", "linear_rt"):
        raise MarketDataInvalid("interpolation", f"unknown rule {rule!r}")
    return core.interpolate_curve(tenors=tenors, rates=rates, rule=rule,
                                  t=_as_query(t, field="T", positive=False))


def interpolate_vol(
    *,
    expiries: npt.ArrayLike,
    axis: npt.ArrayLike,
    vols: npt.ArrayLike,
    t: npt.ArrayLike,
    x: npt.ArrayLike,
) -> npt.NDArray[np.float64]:
    """Implied vol at (t, x): bilinear in (expiry, axis) on total variance sigma^2 t, flat
    outside the grid (spectral_core.valuation.interpolate_vol on a checked query)."""
    tq = _as_query(t, field="T", positive=True)
    xq = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(xq)):
        raise MarketDataInvalid("strike", f"must be finite, got {x!r}")
    return core.interpolate_vol(expiries=expiries, axis=axis, vols=vols, t=tq, x=xq)


# --- lookups for valuation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Quote:
    """A market value and where it came from, for reproducible valuation reports."""

    value: float
    source: str


@dataclass(frozen=True)
class BookQuotes:
    """The market inputs of a book, one entry per instrument in book order.

    Entry i equals what the scalar lookups answer for instrument i: `MarketView.spot(u)`,
    `zero_rate(T)`, `dividend_yield(u, T)` and, where the instrument needs one, `vol(u, T, K)`.
    """

    spot: tuple[Quote, ...]
    zero_rate: tuple[Quote, ...]
    dividend_yield: tuple[Quote, ...]
    vol: tuple[Quote | None, ...]  # None where the instrument needs no vol
    # the same values as (n,) float64 columns "spot", "zero_rate", "dividend_yield" and "vol"
    # (NaN where an instrument needs no vol), for the valuation maths
    values: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict, compare=False)


class InstrumentQuoteError(Exception):
    """The lookups of instrument `index` raised `error`, exactly as the scalar methods raise it.

    `error` (also the `__cause__`) is the scalar path's own exception, type and message:
    MarketDataNotFound for a missing spot, curve or surface, MarketDataInvalid for a bad T or K,
    ArithmeticError or ValueError where ln(K/F) cannot be computed.
    """

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"instrument {index}: {error}")
        self.index = index
        self.error = error


def _where(q: float, lo: float, hi: float, *, what: str) -> str:
    if q < lo:
        return f" (flat extrapolation below {what} {lo:g})"
    if q > hi:
        return f" (flat extrapolation above {what} {hi:g})"
    return ""


def _curve_source(kind: str, name: str, c: Curve, T: float) -> str:
    where = _where(T, c.tenors[0], c.tenors[-1], what="tenor")
    return f"{kind} {name} {c.interpolation} at T={T:g}{where}"


def _forward_source(s: Quote, r: Quote, q: Quote) -> str:
    return f"{s.source} * exp((r - q) T); r: {r.source}; q: {q.source}"


def _log_moneyness(*, K: float, S: float, r: float, q: float, T: float) -> float:
    """ln(K / F), F = S exp((r - q) T), in log space: no overflow or log(0) for far-out forwards.

    math.log on purpose: numpy's vectorised log may differ from libm's in the last ulp.
    """
    return math.log(K) - math.log(S) - (r - q) * T


def _vol_source(
    underlying: str, surface: VolSurface, *, T: float, x: float, forward_source: str | None
) -> str:
    """Source of a vol read at (T, x); `forward_source` is given exactly on log-moneyness."""
    axis = surface.axis_values
    if forward_source is None:
        label, extra = f"K={x:g}", ""
    else:
        label, extra = f"ln(K/F)={x:.6g}", f"; F: {forward_source}"
    where = _where(T, surface.expiries[0], surface.expiries[-1], what="expiry") + _where(
        x, axis[0], axis[-1], what=surface.axis
    )
    return (
        f"vol_surface {underlying} {surface.axis} bilinear total variance at T={T:g} "
        f"{label}{where}{extra}"
    )


class MarketView:
    """Read-only lookups on one snapshot; each answer names its source."""

    def __init__(self, snapshot: MarketSnapshot, *, content_hash: str | None = None) -> None:
        self.snapshot = snapshot
        self.content_hash = content_hash

    @property
    def val_datetime(self) -> datetime:
        return self.snapshot.val_datetime

    @property
    def data_asof(self) -> datetime:
        return self.snapshot.data_asof

    def year_fraction(self, expiry: datetime) -> float:
        """ACT/365 from val_datetime to `expiry`; an expiry before val_datetime is an error."""
        tau = year_fraction_act365(start=self.snapshot.val_datetime, end=expiry)
        if tau < 0.0:
            raise MarketDataInvalid(
                "expiry",
                f"{require_aware(expiry, field='expiry').isoformat()} is before val_datetime "
                f"{self.snapshot.val_datetime.isoformat()}",
            )
        return tau

    def spot(self, underlying: str) -> Quote:
        try:
            value = self.snapshot.spots[underlying]
        except KeyError:
            raise MarketDataNotFound(
                self._missing("spot", underlying, self.snapshot.spots)
            ) from None
        return Quote(value, f"spot {underlying}")

    def zero_rate(self, T: float, *, curve: str | None = None) -> Quote:
        name = curve if curve is not None else self._discount_curve_name()
        try:
            c = self.snapshot.zero_curves[name]
        except KeyError:
            raise MarketDataNotFound(
                self._missing("zero_curve", name, self.snapshot.zero_curves)
            ) from None
        return self._curve_quote("zero_curve", name, c, T)

    def discount_factor(self, T: float, *, curve: str | None = None) -> Quote:
        r = self.zero_rate(T, curve=curve)
        return Quote(_safe_exp(-r.value * T), f"exp(-r T) from {r.source}")

    def dividend_yield(self, underlying: str, T: float) -> Quote:
        try:
            c = self.snapshot.dividend_curves[underlying]
        except KeyError:
            raise MarketDataNotFound(
                self._missing("dividend_curve", underlying, self.snapshot.dividend_curves)
            ) from None
        return self._curve_quote("dividend_curve", underlying, c, T)

    def forward(self, underlying: str, T: float) -> Quote:
        s = self.spot(underlying)
        r = self.zero_rate(T)
        q = self.dividend_yield(underlying, T)
        value = s.value * _safe_exp((r.value - q.value) * T)
        return Quote(value, _forward_source(s, r, q))

    def vol_surface(self, underlying: str) -> VolSurface:
        """`underlying`'s surface; MarketDataNotFound naming it and the ones there are."""
        try:
            return self.snapshot.vol_surfaces[underlying]
        except KeyError:
            raise MarketDataNotFound(
                self._missing("vol_surface", underlying, self.snapshot.vol_surfaces)
            ) from None

    def vol(self, underlying: str, T: float, K: float) -> Quote:
        surface = self.vol_surface(underlying)
        if not (math.isfinite(K) and K > 0.0):
            raise MarketDataInvalid("K", f"strike must be finite and > 0, got {K!r}")
        forward_source: str | None = None
        if surface.strikes is not None:
            x = K
        else:
            # The forward's own lookups, in forward()'s order; its value (maybe inf) is not needed.
            s, r, q = self.spot(underlying), self.zero_rate(T), self.dividend_yield(underlying, T)
            x = _log_moneyness(K=K, S=s.value, r=r.value, q=q.value, T=T)
            forward_source = _forward_source(s, r, q)
        value = float(
            interpolate_vol(
                expiries=surface.expiries, axis=surface.axis_values, vols=surface.vols, t=T, x=x
            )
        )
        return Quote(
            value, _vol_source(underlying, surface, T=T, x=x, forward_source=forward_source)
        )

    def book_quotes(
        self,
        *,
        underlyings: Sequence[str],
        T: Sequence[float],
        K: Sequence[float],
        need_vol: Sequence[bool],
    ) -> BookQuotes:
        """Spot, zero rate, dividend yield and (where `need_vol`) vol of every instrument at once.

        Equal, value and source, to the scalar lookups per instrument (`_instrument_quotes`), but
        the interpolation runs once per curve and surface over all the instruments that read it:
        it is elementwise, so each float is the one the scalar call computes (ln(K/F) by
        libm's log, as math.log takes it). The values come as columns too (`BookQuotes.values`).

        Errors: an instrument whose lookups might raise (a missing spot, curve or surface, a T or
        K out of range, an ln(K/F) that is not finite) is re-run on the scalar methods, in book
        order; the first that raises is reported as `InstrumentQuoteError(index, error)`, `error`
        being the scalar path's own exception. Mismatched lengths are a ValueError.
        """
        n = len(underlyings)
        if not len(T) == len(K) == len(need_vol) == n:
            raise ValueError(
                f"underlyings, T, K and need_vol differ in length: "
                f"{n}, {len(T)}, {len(K)}, {len(need_vol)}"
            )
        t = np.asarray(T, dtype=np.float64)  # (n,)
        k = np.asarray(K, dtype=np.float64)  # (n,)
        want_vol = np.asarray(need_vol, dtype=np.bool_)  # (n,)
        groups: dict[str, list[int]] = {}
        for i, u in enumerate(underlyings):
            groups.setdefault(u, []).append(i)
        suspect = self._book_suspects(groups, t, k, want_vol)  # (n,) bool
        out = _BookColumns(n)
        ok = np.flatnonzero(~suspect)  # (m,)
        if ok.size:
            name = self._discount_curve_name()
            c = self.snapshot.zero_curves[name]
            rates = core.interpolate_curve(tenors=c.tenors, rates=c.rates, rule=c.interpolation,
                                           t=t[ok])
            out.values["zero_rate"][ok] = rates
            for i, r in zip(ok.tolist(), rates.tolist(), strict=True):
                out.zero_rate[i] = Quote(r, _curve_source("zero_curve", name, c, T[i]))
        for u, members in groups.items():
            g = np.asarray(members, dtype=np.intp)
            left = self._group_quotes(u, g[~suspect[g]], T=T, t=t, k=k, want_vol=want_vol,
                                      out=out)
            suspect[left] = True
        for i in np.flatnonzero(suspect).tolist():
            try:
                quotes = self._instrument_quotes(underlyings[i], T[i], K[i], bool(need_vol[i]))
            except (MarketDataNotFound, ArithmeticError, ValueError) as exc:
                raise InstrumentQuoteError(i, exc) from exc
            out.set(i, *quotes)
        return out.freeze(want_vol)

    def _instrument_quotes(
        self, underlying: str, T: float, K: float, need_vol: bool
    ) -> tuple[Quote, Quote, Quote, Quote | None]:
        """One instrument's lookups, in the order a valuation makes them: the reference path."""
        sigma = self.vol(underlying, T, K) if need_vol else None
        return self.spot(underlying), self.zero_rate(T), self.dividend_yield(underlying, T), sigma

    def _book_suspects(
        self,
        groups: dict[str, list[int]],
        t: npt.NDArray[np.float64],
        k: npt.NDArray[np.float64],
        want_vol: npt.NDArray[np.bool_],
    ) -> npt.NDArray[np.bool_]:
        """Instruments for which some scalar lookup might raise (a superset, never fewer)."""
        snap = self.snapshot
        finite_t = np.isfinite(t)
        suspect = ~(finite_t & (t >= 0.0))
        suspect |= want_vol & ~(finite_t & (t > 0.0) & np.isfinite(k) & (k > 0.0))
        try:
            has_discount = self._discount_curve_name() in snap.zero_curves
        except MarketDataNotFound:
            has_discount = False
        if not has_discount:
            suspect[:] = True
        for u, members in groups.items():
            g = np.asarray(members, dtype=np.intp)
            if u not in snap.spots or u not in snap.dividend_curves:
                suspect[g] = True
            elif u not in snap.vol_surfaces:
                suspect[g[want_vol[g]]] = True
        return suspect

    def _group_quotes(
        self,
        underlying: str,
        g: npt.NDArray[np.intp],
        *,
        T: Sequence[float],
        t: npt.NDArray[np.float64],
        k: npt.NDArray[np.float64],
        want_vol: npt.NDArray[np.bool_],
        out: _BookColumns,
    ) -> list[int]:
        """Quotes of one underlying's instruments `g`, none suspect; their zero rates are in.

        Returns the instruments left for the scalar path: those whose ln(K/F) is not finite.
        """
        if not g.size:
            return []
        snap = self.snapshot
        s = self.spot(underlying)
        c = snap.dividend_curves[underlying]
        dividends = core.interpolate_curve(tenors=c.tenors, rates=c.rates, rule=c.interpolation,
                                           t=t[g])
        out.values["spot"][g] = s.value
        out.values["dividend_yield"][g] = dividends
        for i, d in zip(g.tolist(), dividends.tolist(), strict=True):
            out.spot[i] = s
            out.dividend_yield[i] = Quote(d, _curve_source("dividend_curve", underlying, c, T[i]))
        gv = g[want_vol[g]].tolist()
        if not gv:
            return []
        surface = snap.vol_surfaces[underlying]
        forward_sources: list[str | None] = [None] * len(gv)
        if surface.log_moneyness is None:
            xs = k[gv]
        else:
            # ln(K/F) per instrument, libm's log as the scalar path takes it (same floats)
            xs = core.log_moneyness(K=k[gv], S=s.value, r=out.values["zero_rate"][gv],
                                    q=out.values["dividend_yield"][gv], T=t[gv])
            forward_sources = [_forward_source(s, out.zero_rate[i], out.dividend_yield[i])
                               for i in gv]
        # The scalar path raises on a non-finite ln(K/F): those instruments are re-run on it.
        finite = np.isfinite(xs)
        left = [i for i, f in zip(gv, finite.tolist(), strict=True) if not f]
        if left:
            keep = np.flatnonzero(finite)
            gv, xs = [gv[j] for j in keep], xs[keep]
            forward_sources = [forward_sources[j] for j in keep]
        if not gv:
            return left
        vols = core.interpolate_vol(expiries=surface.expiries, axis=surface.axis_values,
                                    vols=surface.vols, t=t[gv], x=xs)
        out.values["vol"][gv] = vols
        for i, x, fs, v in zip(gv, xs.tolist(), forward_sources, vols.tolist(), strict=True):
            out.vol[i] = Quote(v, _vol_source(underlying, surface, T=T[i], x=x, forward_source=fs))
        return left

    def _discount_curve_name(self) -> str:
        snap = self.snapshot
        if snap.discount_curve is not None:
            return snap.discount_curve
        if len(snap.zero_curves) == 1:
            return next(iter(snap.zero_curves))
        raise MarketDataNotFound("zero_curve: the snapshot has no zero curve")

    def model_params(self, underlying: str, model: str, names: Sequence[str]) -> dict[str, Quote]:
        """The parameters `names` of `model` for `underlying` from `model_params`, each with its
        source; MarketDataNotFound naming the underlying, the model or the missing names."""
        per_model = self.snapshot.model_params.get(underlying)
        if per_model is None:
            raise MarketDataNotFound(
                self._missing("model_params for underlying", underlying,
                              self.snapshot.model_params))
        params = per_model.get(model)
        if params is None:
            raise MarketDataNotFound(
                self._missing(f"model_params.{underlying} for model", model, per_model))
        missing = [n for n in names if n not in params]
        if missing:
            raise MarketDataNotFound(
                self._missing(f"model_params.{underlying}.{model} parameter",
                              ", ".join(missing), params))
        source = f"model_params {underlying} {model}"
        return {n: Quote(float(params[n]), source) for n in names}

    def _curve_quote(self, kind: str, name: str, c: Curve, T: float) -> Quote:
        value = float(interpolate_curve(tenors=c.tenors, rates=c.rates, rule=c.interpolation, t=T))
        return Quote(value, _curve_source(kind, name, c, T))

    def _missing(self, kind: str, name: str, present: dict[str, Any]) -> str:
        known = ", ".join(sorted(present)[:20]) or "none"
        return (
            f"{kind} {name!r} is not in snapshot {self.snapshot.namespace}/"
            f"{self.snapshot.val_datetime.isoformat()} as of {self.snapshot.data_asof.isoformat()} "
            f"(has: {known})"
        )


class _BookColumns:
    """The quote columns book_quotes fills in, index by index, before freezing them."""

    def __init__(self, n: int) -> None:
        self.spot: list[Quote | None] = [None] * n
        self.zero_rate: list[Quote | None] = [None] * n
        self.dividend_yield: list[Quote | None] = [None] * n
        self.vol: list[Quote | None] = [None] * n
        self.values = {name: np.full(n, math.nan)
                       for name in ("spot", "zero_rate", "dividend_yield", "vol")}

    def set(self, i: int, spot: Quote, zero_rate: Quote, dividend_yield: Quote,
            vol: Quote | None) -> None:
        """Instrument i's quotes from the scalar path, values included."""
        self.spot[i], self.zero_rate[i], self.dividend_yield[i], self.vol[i] = (
            spot, zero_rate, dividend_yield, vol)
        for name, q in (("spot", spot), ("zero_rate", zero_rate),
                        ("dividend_yield", dividend_yield), ("vol", vol)):
            self.values[name][i] = math.nan if q is None else q.value

    def freeze(self, want_vol: npt.NDArray[np.bool_]) -> BookQuotes:
        def full(column: list[Quote | None]) -> tuple[Quote, ...]:
            assert all(q is not None for q in column)
            return tuple(q for q in column if q is not None)

        assert all((q is not None) == bool(w) for q, w in zip(self.vol, want_vol, strict=True))
        return BookQuotes(
            spot=full(self.spot),
            zero_rate=full(self.zero_rate),
            dividend_yield=full(self.dividend_yield),
            vol=tuple(self.vol),
            values=self.values,
        )


# --- the store ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredSnapshot:
    key: str
    content_hash: str
    snapshot: MarketSnapshot
    created: bool = True

    def view(self) -> MarketView:
        return MarketView(self.snapshot, content_hash=self.content_hash)


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _IndexRead:
    """A parsed, checked index as read at `etag`, with its data_asofs ready for bisection."""

    index: _Index
    etag: str
    stamps: tuple[datetime, ...]


_K = TypeVar("_K")
_V = TypeVar("_V")


class _LRU(Generic[_K, _V]):
    """At most `size` entries, the least recently used one dropped first; size 0 keeps none."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[_K, _V] = OrderedDict()

    def get(self, key: _K) -> _V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        if self._size == 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


class MarketDataStore:
    """Append-only snapshots on an ObjectStore; resolution by greatest data_asof <= requested.

    Two bounded LRU caches (`cache_entries` each; 0 disables them) spare the per-request parse:
    the parsed index per index key, reused only while the store answers the same etag (every
    read still fetches the index, so a commit by anyone is seen at once); and loaded snapshots
    per (key, hash from the index), which are immutable and content-addressed, so a hit needs
    no read at all. A miss reads, hash-checks and validates the document as before. Cached
    snapshots are shared between callers: treat them as read-only.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        clock: Callable[[], datetime] = _utc_now,
        max_future: timedelta = timedelta(minutes=5),
        prefix: str = "marketdata",
        max_attempts: int = 16,
        cache_entries: int = 64,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if max_future < timedelta(0):
            raise ValueError(f"max_future must be >= 0, got {max_future}")
        if cache_entries < 0:
            raise ValueError(f"cache_entries must be >= 0, got {cache_entries}")
        self._store = store
        self._clock = clock
        self._max_future = max_future
        self._prefix = check_name(prefix, field="prefix")
        self._max_attempts = max_attempts
        self._indexes: _LRU[str, _IndexRead] = _LRU(cache_entries)
        self._snapshots: _LRU[tuple[str, str], StoredSnapshot] = _LRU(cache_entries)

    # keys are built only from checked names and tokens
    def _dir(self, namespace: str, val_datetime: datetime) -> str:
        ns = check_name(namespace, field="namespace")
        return f"{self._prefix}/{ns}/{datetime_token(val_datetime)}"

    def snapshot_key(self, *, namespace: str, val_datetime: datetime, data_asof: datetime) -> str:
        return f"{self._dir(namespace, val_datetime)}/{datetime_token(data_asof)}.json"

    def _index_key(self, namespace: str, val_datetime: datetime) -> str:
        return f"{self._dir(namespace, val_datetime)}/index.json"

    async def put(
        self, *, namespace: str, val_datetime: datetime, body: SnapshotBody
    ) -> StoredSnapshot:
        """Append a snapshot; BackdatedWrite unless its data_asof is later than every other.

        Re-sending a committed snapshot (same data_asof, same content) is not an error: it
        returns the stored one with `created=False`, so a client may retry safely.
        """
        check_name(namespace, field="namespace")
        vdt = require_aware(val_datetime, field="val_datetime")
        now = require_aware(self._clock(), field="clock")
        if body.data_asof > now + self._max_future:
            raise MarketDataInvalid(
                "data_asof",
                f"{body.data_asof.isoformat()} is in the future (server time {now.isoformat()})",
            )
        for name, series in body.fixings.items():
            for i, fixing in enumerate(series):
                if fixing.at > vdt:
                    raise MarketDataInvalid(
                        f"fixings.{name}.{i}.at",
                        f"{fixing.at.isoformat()} is after val_datetime {vdt.isoformat()}",
                    )
        snapshot = MarketSnapshot.model_validate(
            {**body.model_dump(), "namespace": namespace, "val_datetime": vdt}
        )
        if snapshot.derived_from is not None:
            await self._check_source(snapshot.derived_from, snapshot.data_asof)
        data = canonical_json(snapshot)
        digest = hashlib.sha256(data).hexdigest()
        key = self.snapshot_key(namespace=namespace, val_datetime=vdt, data_asof=snapshot.data_asof)
        index_key = self._index_key(namespace, vdt)
        wrote_document = False
        for _ in range(self._max_attempts):
            read = await self._read_index(namespace, vdt)
            entries = read.index.entries if read is not None else []
            if entries and snapshot.data_asof <= entries[-1].data_asof:
                same = [e for e in entries if e.data_asof == snapshot.data_asof]
                if same and same[0].hash == digest:
                    return StoredSnapshot(key, digest, snapshot, created=False)
                if wrote_document and not same:
                    # Ours is an uncommitted orphan nobody can commit any more (asof <= last).
                    await self._store.delete(key)
                raise BackdatedWrite(
                    f"data_asof {snapshot.data_asof.isoformat()} for {namespace}/"
                    f"{vdt.isoformat()} is not later than the latest committed "
                    f"{entries[-1].data_asof.isoformat()}; market data is append-only"
                )
            if not wrote_document:
                await self._put_document(key, data, digest)
                wrote_document = True
            new_index = _Index(
                namespace=namespace,
                val_datetime=vdt,
                entries=[*entries, _IndexEntry(data_asof=snapshot.data_asof, hash=digest)],
            )
            try:
                if read is None:
                    await self._store.put_if_absent(index_key, canonical_json(new_index))
                else:
                    await self._store.put_if_match(index_key, canonical_json(new_index), read.etag)
            except (Conflict, NotFound):
                continue  # another writer committed first: re-read and re-check
            return StoredSnapshot(key, digest, snapshot, created=True)
        raise Unavailable(
            f"{index_key} kept changing under {self._max_attempts} attempts to append; retry"
        )

    async def _put_document(self, key: str, data: bytes, digest: str) -> None:
        try:
            await self._store.put_if_absent(key, data)
        except Conflict:
            existing = await self._store.get(key)
            if hashlib.sha256(existing.data).hexdigest() != digest:
                raise Conflict(
                    f"{key} holds a different uncommitted snapshot (an abandoned or concurrent "
                    "write); use a later data_asof"
                ) from None

    async def _check_source(self, ref: DerivedFrom, data_asof: datetime) -> None:
        if ref.data_asof > data_asof:
            raise MarketDataInvalid(
                "derived_from.data_asof",
                f"{ref.data_asof.isoformat()} is later than the snapshot's data_asof "
                f"{data_asof.isoformat()}",
            )
        source = await self.get_exact(
            namespace=ref.namespace, val_datetime=ref.val_datetime, data_asof=ref.data_asof
        )
        if source.content_hash != ref.hash:
            raise DerivedFromMismatch(
                f"derived_from.hash {ref.hash} does not match the stored source {source.key} "
                f"(hash {source.content_hash})"
            )

    async def _read_index(self, namespace: str, val_datetime: datetime) -> _IndexRead | None:
        """The current index (None if there is none); parsed again only when its etag moved."""
        key = self._index_key(namespace, val_datetime)
        try:
            obj = await self._store.get(key)
        except NotFound:
            return None
        cached = self._indexes.get(key)
        if cached is not None and cached.etag == obj.etag:
            return cached
        try:
            index = _Index.model_validate_json(obj.data)
        except ValidationError as exc:
            raise Corrupt(
                f"{key} is not a valid market data index: {exc.error_count()} errors"
            ) from None
        if index.namespace != namespace or index.val_datetime != val_datetime:
            raise Corrupt(f"{key} names {index.namespace}/{index.val_datetime.isoformat()}")
        read = _IndexRead(index, obj.etag, tuple(e.data_asof for e in index.entries))
        self._indexes.put(key, read)
        return read

    async def _load(
        self, namespace: str, val_datetime: datetime, entry: _IndexEntry
    ) -> StoredSnapshot:
        key = self.snapshot_key(
            namespace=namespace, val_datetime=val_datetime, data_asof=entry.data_asof
        )
        cached = self._snapshots.get((key, entry.hash))
        if cached is not None:
            return cached
        try:
            obj = await self._store.get(key)
        except NotFound:
            raise Corrupt(f"{key} is committed in the index but missing") from None
        digest = hashlib.sha256(obj.data).hexdigest()
        if digest != entry.hash:
            raise Corrupt(f"{key} has hash {digest}, the index says {entry.hash}")
        try:
            snapshot = MarketSnapshot.model_validate_json(obj.data)
        except ValidationError as exc:
            raise Corrupt(f"{key} is not a valid snapshot: {exc.error_count()} errors") from None
        if (snapshot.namespace, snapshot.val_datetime, snapshot.data_asof) != (
            namespace,
            val_datetime,
            entry.data_asof,
        ):
            raise Corrupt(f"{key} holds a snapshot for another key")
        stored = StoredSnapshot(key, digest, snapshot, created=False)
        self._snapshots.put((key, entry.hash), stored)
        return stored

    def _describe(self, namespace: str, val_datetime: datetime) -> str:
        return f"namespace {namespace!r} val_datetime {val_datetime.isoformat()}"

    async def resolve(
        self, *, namespace: str, val_datetime: datetime, data_asof: datetime | None = None
    ) -> StoredSnapshot:
        """The snapshot with the greatest data_asof <= `data_asof` (default: the clock's now)."""
        vdt = require_aware(val_datetime, field="val_datetime")
        asof = require_aware(self._clock() if data_asof is None else data_asof, field="data_asof")
        read = await self._read_index(namespace, vdt)
        if read is None or not read.stamps:
            raise MarketDataNotFound(f"no market data for {self._describe(namespace, vdt)}")
        stamps = read.stamps
        pos = bisect.bisect_right(stamps, asof)
        if pos == 0:
            raise MarketDataNotFound(
                f"no market data for {self._describe(namespace, vdt)} known as of "
                f"{asof.isoformat()}; the earliest data_asof is {stamps[0].isoformat()}"
            )
        return await self._load(namespace, vdt, read.index.entries[pos - 1])

    async def get_exact(
        self, *, namespace: str, val_datetime: datetime, data_asof: datetime
    ) -> StoredSnapshot:
        vdt = require_aware(val_datetime, field="val_datetime")
        asof = require_aware(data_asof, field="data_asof")
        read = await self._read_index(namespace, vdt)
        for entry in read.index.entries if read is not None else []:
            if entry.data_asof == asof:
                return await self._load(namespace, vdt, entry)
        raise MarketDataNotFound(
            f"no snapshot for {self._describe(namespace, vdt)} with data_asof {asof.isoformat()}"
        )

    async def list_data_asofs(self, *, namespace: str, val_datetime: datetime) -> list[datetime]:
        vdt = require_aware(val_datetime, field="val_datetime")
        read = await self._read_index(namespace, vdt)
        return list(read.stamps) if read is not None else []

    async def list_val_datetimes(
        self, *, namespace: str, limit: int, after: datetime | None = None
    ) -> tuple[list[datetime], bool]:
        """Val datetimes with committed data, ascending, at most `limit`; and whether more exist."""
        if limit < 1:
            raise MarketDataInvalid("limit", f"must be >= 1, got {limit}")
        start = require_aware(after, field="after") if after is not None else None
        prefix = f"{self._prefix}/{check_name(namespace, field='namespace')}/"
        found: list[datetime] = []
        for key in await self._store.list(prefix):
            parts = key[len(prefix) :].split("/")
            if len(parts) != 2 or parts[1] != "index.json":
                continue
            try:
                vdt = parse_datetime_token(parts[0])
            except ValueError:
                continue  # not ours: foreign keys under the prefix are ignored
            if start is None or vdt > start:
                found.append(vdt)
        found.sort()
        return found[:limit], len(found) > limit
