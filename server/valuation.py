"""Valuation of instrument books and direct contract pricing: requests, numbers, canonical bytes.

A valuation resolves its market-data key to exactly one snapshot, derives each instrument's
inputs (S0, T ACT/365, r, d, sigma, each with its source), prices the options on the model
(`ModelService`, float64 on CPU, batch-invariant) and the forwards in closed form, and answers
per instrument and in total. Answers are serialised canonically (`storage.documents`: sorted
keys, no whitespace, shortest round-trip float64, non-finite numbers as null), so the same
request against the same dataset and model version gives the same bytes.

Digital greeks come from the identity digital_call = -dC/dK, digital_put = +dP/dK (exact for
the COS coefficients too): the autograd greeks of the vanilla are differenced in the strike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from server.errors import FieldError, RequestInvalid
from server.model import ModelInfo, ModelService, PricedBatch
from spectral_core.pricer import CONTRACT_FIELDS, GREEKS, Contracts, DomainError
from storage.marketdata import (
    Finite,
    MarketDataInvalid,
    MarketDataStore,
    Name,
    PositiveFinite,
    Quote,
    UtcDatetime,
    format_utc,
    year_fraction_act365,
)

# A hard ceiling on free-form strings; settings.server.max_string_len narrows it per deployment.
MAX_STRING_LEN = 1024
# Relative strike bump for digital greeks by central difference of the vanilla greeks in K.
DIGITAL_GREEK_BUMP = 1e-4

InstrumentType = Literal["european_call", "european_put", "digital_call", "digital_put", "forward"]
MODEL_TYPES: frozenset[str] = frozenset(
    {"european_call", "european_put", "digital_call", "digital_put"}
)
# Price outputs of Pricer.price that are neither greeks nor distribution metrics.
PRICE_KEYS: tuple[str, ...] = (
    "put",
    "call",
    "put_intrinsic",
    "call_intrinsic",
    "put_convexity",
    "call_convexity",
    "digital_call",
    "digital_put",
    "forward",
)
GREEK_KEYS: frozenset[str] = frozenset(f"{k}_{g}" for k in ("put", "call") for g in GREEKS)
_UNIT_PRICE_KEY: Mapping[str, str] = {
    "european_call": "call",
    "european_put": "put",
    "digital_call": "digital_call",
    "digital_put": "digital_put",
}
# Pricer contract field -> the name a valuation reports it under.
_INPUT_NAME: Mapping[str, str] = {
    "X0": "S0",
    "K": "strike",
    "T": "T",
    "r": "r",
    "d": "d",
    "v": "sigma",
}

Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STRING_LEN)]
# The chain's counter range: a larger number can name no version (422, not a store error).
MAX_VERSION = 9_999_999_999
Version = Annotated[int, Field(ge=1, le=MAX_VERSION)]


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Instrument(_Body):
    id: Text
    type: InstrumentType
    underlying: Name
    strike: PositiveFinite
    expiry: UtcDatetime
    quantity: Finite = 1.0


class ValuationRequest(_Body):
    valuation_namespace: Name
    val_datetime: UtcDatetime
    data_asof: UtcDatetime
    instruments: list[Instrument] = Field(min_length=1)
    model_version: Version | None = None
    greeks: bool = False
    metrics: bool = False


class ContractIn(_Body):
    X0: PositiveFinite
    K: PositiveFinite
    T: Finite
    r: Finite
    d: Finite
    v: Finite


class PriceRequest(_Body):
    contracts: list[ContractIn] = Field(min_length=1)
    model_version: Version | None = None
    greeks: bool = False
    metrics: bool = False


@dataclass(frozen=True)
class Limits:
    max_items: int
    max_string_len: int


# --- canonical output ---------------------------------------------------------------------------


def number(x: float | np.floating[Any]) -> float | None:
    """A finite float64 as a Python float (repr round-trips), anything else as null."""
    f = float(x)
    return f if math.isfinite(f) else None


def exp(x: float) -> float:
    """math.exp that overflows to inf instead of raising (client-chosen curves and expiries)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def total(xs: Sequence[float]) -> float:
    """Exactly rounded sum (independent of order); NaN where it is not a finite number.

    math.fsum raises on an intermediate overflow and on inf + -inf; the answer reports such a
    total as null, like any other non-finite number.
    """
    try:
        return math.fsum(xs)
    except (OverflowError, ValueError):
        return math.nan


# --- request checks that need settings ----------------------------------------------------------


def check_book(
    instruments: Sequence[Instrument], *, limits: Limits, path: str = "instruments"
) -> list[FieldError]:
    """Size limits and duplicate ids of a book: the field errors (a count over the limit raises)."""
    n = len(instruments)
    if n > limits.max_items:
        raise RequestInvalid(
            [FieldError(path, f"at most {limits.max_items} instruments, got {n}")],
            "too many instruments",
        )
    fields: list[FieldError] = []
    seen: dict[str, int] = {}
    for i, inst in enumerate(instruments):
        if len(inst.id) > limits.max_string_len:
            fields.append(
                FieldError(
                    f"{path}.{i}.id",
                    f"at most {limits.max_string_len} characters, got {len(inst.id)}",
                )
            )
        elif inst.id in seen:
            fields.append(
                FieldError(
                    f"{path}.{i}.id", f"duplicate id {inst.id!r} (first at {path}.{seen[inst.id]})"
                )
            )
        else:
            seen[inst.id] = i
    return fields


def check_valuation_request(req: ValuationRequest, *, limits: Limits) -> None:
    """Size limits, duplicate ids and expiries (422 with the field path); no I/O."""
    fields = check_book(req.instruments, limits=limits)
    for i, inst in enumerate(req.instruments):
        if inst.expiry <= req.val_datetime:
            fields.append(
                FieldError(
                    f"instruments.{i}.expiry",
                    f"{format_utc(inst.expiry)} is at or before val_datetime "
                    f"{format_utc(req.val_datetime)}",
                )
            )
    if fields:
        raise RequestInvalid(fields, f"{len(fields)} invalid instrument field(s)")


def check_price_request(req: PriceRequest, *, limits: Limits) -> None:
    n = len(req.contracts)
    if n > limits.max_items:
        raise RequestInvalid(
            [FieldError("contracts", f"at most {limits.max_items} contracts, got {n}")],
            "too many contracts",
        )


def _domain_invalid(exc: DomainError, *, path: str, source: str | None = None) -> RequestInvalid:
    name = _INPUT_NAME.get(exc.field, exc.field)
    where = f"[{exc.lower}, {exc.upper}]" if exc.upper is not None else f"> {exc.lower}"
    origin = f" ({source})" if source else ""
    reason = f"{name} = {exc.value!r}{origin} is outside the model's trained domain {where}"
    return RequestInvalid([FieldError(path, reason)], "contract outside the model's domain")


# --- direct pricing -----------------------------------------------------------------------------


def _metric_keys(values: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(set(values) - set(PRICE_KEYS) - GREEK_KEYS)


def _records(
    keys: Sequence[str], columns: Mapping[str, np.ndarray], n: int
) -> list[dict[str, Any]]:
    """`n` row dicts {key: float} from float64 columns, built in C (tolist, zip, dict): no
    per-number Python code. Non-finite values stay floats; the canonical bytes write null."""
    if not keys:
        return [{} for _ in range(n)]
    lists = [columns[k].tolist() for k in keys]
    return [dict(zip(keys, row, strict=True)) for row in zip(*lists, strict=True)]


async def price_contracts(
    req: PriceRequest, *, model: ModelService, deadline_s: float | None = None
) -> dict[str, Any]:
    """Price (X0, K, T, r, d, v) contracts as given: every output per contract, plus the model."""
    n = len(req.contracts)
    columns = {
        name: np.fromiter((getattr(c, name) for c in req.contracts), np.float64, n)
        for name in CONTRACT_FIELDS
    }
    try:
        batch = await model.price(
            Contracts(**columns),
            version=req.model_version,
            greeks=req.greeks,
            metrics=req.metrics,
            deadline_s=deadline_s,
        )
    except DomainError as exc:
        raise _domain_invalid(exc, path=f"contracts.{exc.index}.{exc.field}") from None
    v = batch.values
    rows = _records(PRICE_KEYS, v, n)
    for row, inputs in zip(rows, _records(CONTRACT_FIELDS, columns, n), strict=True):
        row["inputs"] = inputs
    if req.greeks:
        per_kind = {
            kind: _records(GREEKS, {g: v[f"{kind}_{g}"] for g in GREEKS}, n)
            for kind in ("put", "call")
        }
        for row, put, call in zip(rows, per_kind["put"], per_kind["call"], strict=True):
            row["greeks"] = {"put": put, "call": call}
    if req.metrics:
        metric_keys = _metric_keys(v)
        for row, m in zip(rows, _records(metric_keys, v, n), strict=True):
            row["metrics"] = m
    return {"model": batch.model.as_json(), "contracts": rows}


# --- valuation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    S0: Quote
    T: Quote
    r: Quote
    d: Quote
    sigma: Quote | None

    def as_json(self) -> dict[str, Any]:
        out = {"S0": self.S0, "T": self.T, "r": self.r, "d": self.d, "sigma": self.sigma}
        return {
            k: {"value": number(q.value), "source": q.source}
            for k, q in out.items()
            if q is not None
        }


def _forward_unit(inp: _Inputs, K: float) -> tuple[float, dict[str, float]]:
    """Closed form: discounted forward minus discounted strike, and its partial greeks."""
    S, T, r, d = inp.S0.value, inp.T.value, inp.r.value, inp.d.value
    df = exp(-r * T)
    fwd = S * exp((r - d) * T)
    price = df * fwd - df * K
    carry = S * exp(-d * T)
    greeks = {
        "delta": exp(-d * T),
        "gamma": 0.0,
        "vega": 0.0,
        # theta = -dPV/dT at fixed r and d, the pricer's convention
        "theta": d * carry - r * K * df,
        "rho": T * K * df,
    }
    return price, greeks


@dataclass(frozen=True)
class _Rows:
    """Model rows of one valuation: row j prices instrument owner[j]; bumps for digital greeks."""

    contracts: Contracts
    owner: list[int]
    main: dict[int, int]  # instrument index -> its row
    bumps: dict[int, tuple[int, int]]  # digital instrument index -> (row K up, row K down)


def _model_rows(
    instruments: Sequence[Instrument], inputs: Sequence[_Inputs], *, greeks: bool
) -> _Rows:
    cols: dict[str, list[float]] = {n: [] for n in CONTRACT_FIELDS}
    owner: list[int] = []
    main: dict[int, int] = {}
    bumps: dict[int, tuple[int, int]] = {}

    def add(i: int, K: float) -> int:
        inp = inputs[i]
        assert inp.sigma is not None
        for name, value in (
            ("X0", inp.S0.value),
            ("K", K),
            ("T", inp.T.value),
            ("r", inp.r.value),
            ("d", inp.d.value),
            ("v", inp.sigma.value),
        ):
            cols[name].append(value)
        owner.append(i)
        return len(owner) - 1

    for i, inst in enumerate(instruments):
        if inst.type not in MODEL_TYPES:
            continue
        main[i] = add(i, inst.strike)
    if greeks:
        for i, inst in enumerate(instruments):
            if inst.type.startswith("digital_"):
                h = DIGITAL_GREEK_BUMP * inst.strike
                up, down = inst.strike + h, inst.strike - h
                # No slope where the bump vanishes (subnormal strike) or overflows: null greeks.
                if math.isfinite(up) and 0.0 < down < up:
                    bumps[i] = (add(i, up), add(i, down))
    return _Rows(Contracts.from_columns(cols), owner, main, bumps)


def _option_greeks(
    inst: Instrument, i: int, rows: _Rows, values: Mapping[str, np.ndarray]
) -> dict[str, float]:
    j = rows.main[i]
    if inst.type in ("european_call", "european_put"):
        kind = "call" if inst.type == "european_call" else "put"
        return {g: float(values[f"{kind}_{g}"][j]) for g in GREEKS}
    if i not in rows.bumps:
        return dict.fromkeys(GREEKS, math.nan)
    up, down = rows.bumps[i]
    dK = float(rows.contracts.K[up] - rows.contracts.K[down])
    # digital_call = -dC/dK, digital_put = +dP/dK, so each greek is the K-slope of the vanilla's.
    kind, sign = ("call", -1.0) if inst.type == "digital_call" else ("put", 1.0)
    return {
        # Python floats: inf - inf is NaN (a null greek) without a numpy RuntimeWarning.
        g: sign * (float(values[f"{kind}_{g}"][up]) - float(values[f"{kind}_{g}"][down])) / dK
        for g in GREEKS
    }


def _greeks_json(greeks: Mapping[str, float], scale: float = 1.0) -> dict[str, float | None]:
    return {g: number(scale * greeks[g]) for g in GREEKS}


async def value_book(
    req: ValuationRequest,
    *,
    marketdata: MarketDataStore,
    model: ModelService,
    deadline_s: float | None = None,
) -> dict[str, Any]:
    """Value a book against the snapshot its key resolves to; raises on any bad input.

    Errors: MarketDataNotFound (404) for a missing snapshot, spot, curve or surface;
    RequestInvalid (422) for a contract outside the model's domain; NoModel (503); NotFound
    (404) for an unknown model version. Call `check_valuation_request` first.
    """
    stored = await marketdata.resolve(
        namespace=req.valuation_namespace, val_datetime=req.val_datetime, data_asof=req.data_asof
    )
    view = stored.view()
    vdt_text = format_utc(req.val_datetime)
    inputs: list[_Inputs] = []
    for i, inst in enumerate(req.instruments):
        T = year_fraction_act365(start=req.val_datetime, end=inst.expiry)
        tq = Quote(T, f"ACT/365 from val_datetime {vdt_text} to expiry {format_utc(inst.expiry)}")
        try:
            sigma = view.vol(inst.underlying, T, inst.strike) if inst.type in MODEL_TYPES else None
        except MarketDataInvalid:
            raise
        except (ArithmeticError, ValueError) as exc:
            # A log-moneyness surface is read at ln(K / F), F = S exp((r - d) T): for a far
            # expiry on a steep curve, or an extreme strike, F or K / F leaves the float range.
            raise RequestInvalid(
                [
                    FieldError(
                        f"instruments.{i}",
                        f"no vol can be read off the {inst.underlying} log-moneyness surface at "
                        f"strike {inst.strike!r}, T = {T!r}: ln(K/F) is outside the float range "
                        f"({exc})",
                    )
                ],
                "instrument inputs out of range",
            ) from None
        inputs.append(
            _Inputs(
                S0=view.spot(inst.underlying),
                T=tq,
                r=view.zero_rate(T),
                d=view.dividend_yield(inst.underlying, T),
                sigma=sigma,
            )
        )

    rows = _model_rows(req.instruments, inputs, greeks=req.greeks)
    values: Mapping[str, np.ndarray] = {}
    info: ModelInfo | None = None
    if rows.owner:
        try:
            batch: PricedBatch = await model.price(
                rows.contracts,
                version=req.model_version,
                greeks=req.greeks,
                metrics=req.metrics,
                deadline_s=deadline_s,
            )
        except DomainError as exc:
            i = rows.owner[exc.index]
            name = _INPUT_NAME.get(exc.field, exc.field)
            quote = getattr(inputs[i], name, None)
            source = quote.source if isinstance(quote, Quote) else None
            raise _domain_invalid(exc, path=f"instruments.{i}.{name}", source=source) from None
        values, info = batch.values, batch.model
    metric_keys = _metric_keys(values) if req.metrics and values else []

    out_rows: list[dict[str, Any]] = []
    prices: list[float] = []
    total_greeks: dict[str, list[float]] = {g: [] for g in GREEKS}
    for i, inst in enumerate(req.instruments):
        q = inst.quantity
        if inst.type == "forward":
            unit, unit_greeks = _forward_unit(inputs[i], inst.strike)
            metrics_json: dict[str, Any] | None = None
        else:
            j = rows.main[i]
            unit = float(values[_UNIT_PRICE_KEY[inst.type]][j])
            unit_greeks = _option_greeks(inst, i, rows, values) if req.greeks else {}
            metrics_json = {k: number(values[k][j]) for k in metric_keys}
        row: dict[str, Any] = {
            "id": inst.id,
            "type": inst.type,
            "underlying": inst.underlying,
            "strike": inst.strike,
            "expiry": format_utc(inst.expiry),
            "quantity": q,
            "unit_price": number(unit),
            "price": number(q * unit),
            "inputs": inputs[i].as_json(),
            "priced_by": "model" if inst.type in MODEL_TYPES else "closed_form",
        }
        prices.append(q * unit)
        if req.greeks:
            row["unit_greeks"] = _greeks_json(unit_greeks)
            row["greeks"] = _greeks_json(unit_greeks, q)
            for g in GREEKS:
                total_greeks[g].append(q * unit_greeks[g])
        if req.metrics:
            row["metrics"] = metrics_json
        out_rows.append(row)

    # fsum is exactly rounded, so the totals do not depend on summation order.
    totals: dict[str, Any] = {"price": number(total(prices)), "instruments": len(out_rows)}
    if req.greeks:
        totals["greeks"] = {g: number(total(total_greeks[g])) for g in GREEKS}
    snap = stored.snapshot
    return {
        "valuation_namespace": req.valuation_namespace,
        "val_datetime": vdt_text,
        "data_asof": format_utc(req.data_asof),
        "dataset": {
            "key": stored.key,
            "hash": stored.content_hash,
            "namespace": snap.namespace,
            "val_datetime": format_utc(snap.val_datetime),
            "data_asof": format_utc(snap.data_asof),
        },
        "model": None if info is None else info.as_json(),
        "instruments": out_rows,
        "totals": totals,
    }


def request_json(req: BaseModel) -> dict[str, Any]:
    """A validated request in its JSON form (UTC datetimes with 'Z'), for provenance records."""
    data: dict[str, Any] = req.model_dump(mode="json")
    return data


__all__ = [
    "ContractIn",
    "Instrument",
    "Limits",
    "PriceRequest",
    "ValuationRequest",
    "check_book",
    "check_price_request",
    "check_valuation_request",
    "price_contracts",
    "request_json",
    "value_book",
]
