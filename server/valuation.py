"""Valuation of instrument books and direct contract pricing: requests, answers, canonical bytes.

A valuation resolves its market-data key to exactly one snapshot, looks up every instrument's
inputs in one call (`MarketView.book_quotes`: S0, T ACT/365, r, d, sigma, each with its source,
and the same values as columns), prices the options on the model (`ModelService`, float64 on
CPU, batch-invariant) and the forwards in closed form, and answers per instrument and in total.
The numbers are array functions of spectral_core.valuation, one call per book: forwards, the
strike bumps and slopes of digital greeks, scenario shifts (all scenarios in one batch),
positions and totals; this module turns requests into columns and columns into answers.
Answers are serialised canonically (`storage.documents`: sorted keys, no whitespace, shortest
round-trip float64, non-finite numbers as null), so the same request against the same dataset
and model version gives the same bytes.

Digital greeks come from the identity digital_call = -dC/dK, digital_put = +dP/dK (exact for
the COS coefficients too): the autograd greeks of the vanilla are differenced in the strike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from server.errors import FieldError, RequestInvalid
from server.model import ModelInfo, ModelService, PricedBatch
from spectral_core.implied_vol import Kind, implied_vol
from spectral_core.pricer import (
    CONTRACT_FIELDS,
    GREEKS,
    Contracts,
    DomainError,
    contract_fields,
    greek_names,
)
from spectral_core.processes import get_process
from spectral_core.valuation import (
    DIGITAL_GREEK_BUMP,
    exact_total,
    forwards,
    positions,
    shift_columns,
    strike_bumps,
    strike_slopes,
)
from storage.marketdata import (
    BookQuotes,
    Finite,
    InstrumentQuoteError,
    MarketDataInvalid,
    MarketDataNotFound,
    MarketDataStore,
    MarketView,
    Name,
    PositiveFinite,
    Quote,
    UtcDatetime,
    format_utc,
    year_fraction_act365,
)
from storage.prefixed import MODEL_NAME_PATTERN, ROOT_MODEL

# A hard ceiling on free-form strings; settings.server.max_string_len narrows it per deployment.
MAX_STRING_LEN = 1024
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
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]


@dataclass(frozen=True)
class BookModel:
    """What a valuation needs to know of its model: its name (for model_params lookups and
    the answer), the contract fields it prices and its greeks."""

    name: str = ROOT_MODEL
    process: str = "gbm"

    @property
    def fields(self) -> tuple[str, ...]:
        return contract_fields(get_process(self.process))

    @property
    def greeks(self) -> tuple[str, ...]:
        return greek_names(get_process(self.process))

    @property
    def params(self) -> tuple[str, ...]:
        """The parameters read off model_params (none for a GBM, whose vol is the surface's)."""
        if self.process == "gbm":
            return ()
        return tuple(f for f in get_process(self.process).request_fields
                     if f not in ("T", "r", "d"))


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Instrument(_Body):
    id: Text
    type: InstrumentType
    underlying: Name
    strike: PositiveFinite
    expiry: UtcDatetime
    quantity: Finite = 1.0


class Scenario(_Body):
    """A named shift of the market inputs: spot relative (S0 x (1 + spot_rel)), the rate
    absolute, and the model's vol absolute (gbm: sigma + vol_abs; heston, bates: v0 + v0_abs)."""

    name: Name
    spot_rel: Annotated[float, Field(gt=-1.0, le=10.0, allow_inf_nan=False)] = 0.0
    rate_abs: Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)] = 0.0
    vol_abs: Annotated[float, Field(ge=-5.0, le=5.0, allow_inf_nan=False)] = 0.0
    v0_abs: Annotated[float, Field(ge=-5.0, le=5.0, allow_inf_nan=False)] = 0.0


class ValuationRequest(_Body):
    valuation_namespace: Name
    val_datetime: UtcDatetime
    data_asof: UtcDatetime
    instruments: list[Instrument] = Field(min_length=1)
    model: ModelName | None = None  # default: [server] default_model
    model_version: Version | None = None
    greeks: bool = False
    metrics: bool = False
    # at most server.max_scenarios; revalued in one batched pass, prices only
    scenarios: list[Scenario] = Field(default_factory=list)


class ProcessParams(_Body):
    """The parameters of every process a contract may carry: GBM's v; Heston's v0, kappa,
    theta_v, xi, rho; Bates's those and lam, mu_j, sigma_j. Which of them a contract must and
    may carry depends on its model (param_errors)."""

    v: Finite | None = None
    v0: Finite | None = None
    kappa: Finite | None = None
    theta_v: Finite | None = None
    xi: Finite | None = None
    rho: Finite | None = None
    lam: Finite | None = None
    mu_j: Finite | None = None
    sigma_j: Finite | None = None


PROCESS_PARAMS: tuple[str, ...] = tuple(ProcessParams.model_fields)


def param_errors(c: ProcessParams, fields: Sequence[str], *, path: str, model: str,
                 process: str) -> list[FieldError]:
    """A 422 field per parameter of `model` missing from `c`, and per one it does not have."""
    wanted = [f for f in PROCESS_PARAMS if f in fields]
    errors = []
    for name in PROCESS_PARAMS:
        given = getattr(c, name) is not None
        if name in wanted and not given:
            errors.append(FieldError(f"{path}.{name}", f"required by model {model!r} ({process})"))
        elif given and name not in wanted:
            errors.append(FieldError(
                f"{path}.{name}",
                f"not a parameter of model {model!r} ({process}: {', '.join(wanted)})",
            ))
    return errors


class ContractIn(ProcessParams):
    """Spot, strike, T, r, d and the model's process parameters (ProcessParams)."""

    X0: PositiveFinite
    K: PositiveFinite
    T: Finite
    r: Finite
    d: Finite


class PriceRequest(_Body):
    contracts: list[ContractIn] = Field(min_length=1)
    model: ModelName | None = None  # default: [server] default_model
    model_version: Version | None = None
    greeks: bool = False
    metrics: bool = False


@dataclass(frozen=True)
class Limits:
    max_items: int
    max_string_len: int
    max_scenarios: int = 64


# --- canonical output ---------------------------------------------------------------------------


def number(x: float | np.floating[Any]) -> float | None:
    """A finite float64 as a Python float (repr round-trips), anything else as null."""
    f = float(x)
    return f if math.isfinite(f) else None


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
    if len(req.scenarios) > limits.max_scenarios:
        fields.append(FieldError("scenarios", f"at most {limits.max_scenarios} scenarios "
                                              f"(server.max_scenarios), got {len(req.scenarios)}"))
    seen: set[str] = set()
    for i, sc in enumerate(req.scenarios):
        if sc.name in seen:
            fields.append(FieldError(f"scenarios.{i}.name", f"duplicate scenario {sc.name!r}"))
        seen.add(sc.name)
    if fields:
        raise RequestInvalid(fields, f"{len(fields)} invalid instrument field(s)")


def check_scenarios(req: ValuationRequest, *, model: str, process: str) -> None:
    """A shift of a parameter the model does not have is a 422 naming it."""
    wrong = "v0_abs" if process == "gbm" else "vol_abs"
    right = "vol_abs" if process == "gbm" else "v0_abs"
    fields = [
        FieldError(f"scenarios.{i}.{wrong}",
                   f"model {model!r} ({process}) has no {wrong[:-4]}; shift {right} instead")
        for i, sc in enumerate(req.scenarios) if getattr(sc, wrong) != 0.0
    ]
    if fields:
        raise RequestInvalid(fields, "scenario shifts do not fit the model")


def check_price_request(
    req: PriceRequest, *, limits: Limits, fields: Sequence[str], model: str, process: str
) -> None:
    """At most max_items contracts, each carrying exactly the parameters of `model`'s
    process (`fields`): a missing one or one of another process is a 422 naming it."""
    n = len(req.contracts)
    if n > limits.max_items:
        raise RequestInvalid(
            [FieldError("contracts", f"at most {limits.max_items} contracts, got {n}")],
            "too many contracts",
        )
    errors: list[FieldError] = []
    for i, c in enumerate(req.contracts):
        errors += param_errors(c, fields, path=f"contracts.{i}", model=model, process=process)
        if len(errors) >= 20:  # enough to name the mistake; a 1,000-row book stays readable
            break
    if errors:
        raise RequestInvalid(errors, f"contracts do not fit model {model!r}")


def domain_invalid(exc: DomainError, *, path: str, source: str | None = None) -> RequestInvalid:
    """The 422 for a contract outside the model's domain: the field at `path`, its value (and
    where it came from) and the trained bounds."""
    name = _INPUT_NAME.get(exc.field, exc.field)
    where = f"[{exc.lower}, {exc.upper}]" if exc.upper is not None else f"> {exc.lower}"
    origin = f" ({source})" if source else ""
    reason = f"{name} = {exc.value!r}{origin} is outside the model's trained domain {where}"
    return RequestInvalid([FieldError(path, reason)], "contract outside the model's domain")


# --- direct pricing -----------------------------------------------------------------------------


def _metric_keys(values: Mapping[str, np.ndarray], greeks: Sequence[str] = GREEKS) -> list[str]:
    """The distribution metrics among a price call's outputs: not a price, not a greek."""
    greek_keys = {f"{k}_{g}" for k in ("put", "call") for g in greeks}
    return sorted(set(values) - set(PRICE_KEYS) - greek_keys)


def _records(
    keys: Sequence[str], columns: Mapping[str, np.ndarray], n: int
) -> list[dict[str, Any]]:
    """`n` row dicts {key: float} from float64 columns, built in C (tolist, zip, dict): no
    per-number Python code. Non-finite values stay floats; the canonical bytes write null."""
    if not keys:
        return [{} for _ in range(n)]
    lists = [columns[k].tolist() for k in keys]
    return [dict(zip(keys, row, strict=True)) for row in zip(*lists, strict=True)]


def implied_vols(
    price: Floats, *, S0: Floats, K: Floats, T: Floats, r: Floats, d: Floats, kind: Kind
) -> tuple[list[float], list[str | None]]:
    """Black-Scholes implied vols of model prices (Let's Be Rational, spectral_core.implied_vol):
    NaN (written as null) with a reason where none exists, e.g. a price below intrinsic."""
    if not price.size:
        return [], []
    with np.errstate(invalid="ignore"):
        vol, reasons = implied_vol(price, S0=S0, K=K, T=T, r=r, d=d, kind=kind)
    return vol.tolist(), reasons


def _iv_fields(vols: Mapping[str, float], reasons: Mapping[str, str | None]) -> dict[str, Any]:
    """`implied_vol` {put, call} and, where one is null, `implied_vol_reason` for it."""
    out: dict[str, Any] = {"implied_vol": dict(vols)}
    why = {k: r for k, r in reasons.items() if r is not None}
    if why:
        out["implied_vol_reason"] = why
    return out


async def price_contracts(
    req: PriceRequest,
    *,
    model: ModelService,
    fields: Sequence[str] = CONTRACT_FIELDS,
    greeks: Sequence[str] = GREEKS,
    name: str | None = None,
    deadline_s: float | None = None,
) -> dict[str, Any]:
    """Price contracts as given (their `fields`, checked by check_price_request): every output
    per contract, plus the model (named `name` in the answer when given)."""
    n = len(req.contracts)
    columns = {
        f: np.fromiter((getattr(c, f) for c in req.contracts), np.float64, n) for f in fields
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
        raise domain_invalid(exc, path=f"contracts.{exc.index}.{exc.field}") from None
    v = batch.values
    rows = _records(PRICE_KEYS, v, n)
    for row, inputs in zip(rows, _records(fields, columns, n), strict=True):
        row["inputs"] = inputs
    market = {k: columns[c] for k, c in (("S0", "X0"), ("K", "K"), ("T", "T"), ("r", "r"),
                                          ("d", "d"))}
    ivs = {kind: implied_vols(v[kind], **market, kind=kind) for kind in ("put", "call")}
    for i, row in enumerate(rows):
        row.update(_iv_fields({k: ivs[k][0][i] for k in ivs}, {k: ivs[k][1][i] for k in ivs}))
    if req.greeks:
        per_kind = {
            kind: _records(greeks, {g: v[f"{kind}_{g}"] for g in greeks}, n)
            for kind in ("put", "call")
        }
        for row, put, call in zip(rows, per_kind["put"], per_kind["call"], strict=True):
            row["greeks"] = {"put": put, "call": call}
    if req.metrics:
        metric_keys = _metric_keys(v, greeks)
        for row, m in zip(rows, _records(metric_keys, v, n), strict=True):
            row["metrics"] = m
    info = batch.model.as_json()
    return {"model": info if name is None else {"name": name, **info}, "contracts": rows}


# --- valuation ----------------------------------------------------------------------------------

Ints = npt.NDArray[np.intp]
Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class _Inputs:
    """Every instrument's market inputs in book order, each with its source, and the same
    values as pricer columns (`column`)."""

    T: list[float]
    T_source: list[str]
    quotes: BookQuotes
    K: Floats  # (n,) strikes
    quantity: Floats  # (n,)
    # a non-GBM model's parameters (v0, kappa, ...) per instrument; None where it needs none
    params: Mapping[str, Sequence[Quote | None]] = field(default_factory=dict)
    # the parameters as (n,) columns, NaN where an instrument needs none
    param_columns: Mapping[str, Floats] = field(default_factory=dict)

    def column(self, name: str) -> Floats:
        """One pricer input (X0, K, T, r, d, v or a model parameter) of every instrument (n,);
        NaN where the instrument has none (v without a vol, a forward's model parameters)."""
        if name == "T":
            return np.asarray(self.T, dtype=np.float64)
        if name == "K":
            return self.K
        if name in self.param_columns:
            return self.param_columns[name]
        key = {"X0": "spot", "r": "zero_rate", "d": "dividend_yield", "v": "vol"}[name]
        return self.quotes.values[key]

    def source(self, i: int, name: str) -> str | None:
        """Where instrument i's input `name` (a reported name: S0, T, r, d, sigma) came from."""
        if name == "T":
            return self.T_source[i]
        if name in self.params:
            param = self.params[name][i]
            return None if param is None else param.source
        q = self.quotes
        columns: dict[str, Sequence[Quote | None]] = {
            "S0": q.spot, "r": q.zero_rate, "d": q.dividend_yield, "sigma": q.vol
        }
        quote = columns[name][i] if name in columns else None
        return None if quote is None else quote.source

    def as_json(self) -> list[dict[str, Any]]:
        """Each instrument's echoed inputs. Non-finite values stay floats; the canonical bytes
        write null."""
        q = self.quotes
        rows = [
            {
                "S0": {"value": s.value, "source": s.source},
                "T": {"value": t, "source": ts},
                "r": {"value": r.value, "source": r.source},
                "d": {"value": d.value, "source": d.source},
            }
            for s, t, ts, r, d in zip(
                q.spot, self.T, self.T_source, q.zero_rate, q.dividend_yield, strict=True
            )
        ]
        for row, v in zip(rows, q.vol, strict=True):
            if v is not None:
                row["sigma"] = {"value": v.value, "source": v.source}
        for name, column in self.params.items():
            for row, p in zip(rows, column, strict=True):
                if p is not None:
                    row[name] = {"value": p.value, "source": p.source}
        return rows


def _market_inputs(
    req: ValuationRequest, view: MarketView, expiries: Sequence[str], model: BookModel
) -> _Inputs:
    """T (ACT/365), the book's quotes in one `book_quotes` call and a non-GBM model's
    parameters (model_params, once per underlying); errors as the API answers them (404 or 422
    from market data, 422 naming an instrument whose vol cannot be read)."""
    vdt = req.val_datetime
    insts = req.instruments
    T = [year_fraction_act365(start=vdt, end=inst.expiry) for inst in insts]
    strikes = [inst.strike for inst in insts]
    priced = [inst.type in MODEL_TYPES for inst in insts]
    gbm = not model.params
    try:
        quotes = view.book_quotes(
            underlyings=[inst.underlying for inst in insts],
            T=T,
            K=strikes,
            need_vol=priced if gbm else [False] * len(insts),
        )
    except InstrumentQuoteError as e:
        if isinstance(e.error, (MarketDataNotFound, MarketDataInvalid)):
            raise e.error from None
        # A log-moneyness surface is read at ln(K / F), F = S exp((r - d) T): for a far
        # expiry on a steep curve, or an extreme strike, F or K / F leaves the float range.
        inst = insts[e.index]
        raise RequestInvalid(
            [
                FieldError(
                    f"instruments.{e.index}",
                    f"no vol can be read off the {inst.underlying} log-moneyness surface at "
                    f"strike {inst.strike!r}, T = {T[e.index]!r}: ln(K/F) is outside the float "
                    f"range ({e.error})",
                )
            ],
            "instrument inputs out of range",
        ) from None
    vdt_text = format_utc(vdt)
    T_source = [f"ACT/365 from val_datetime {vdt_text} to expiry {x}" for x in expiries]
    n = len(insts)
    K = np.asarray(strikes, dtype=np.float64)
    quantity = np.fromiter((inst.quantity for inst in insts), np.float64, n)
    if gbm:
        return _Inputs(T, T_source, quotes, K, quantity)
    underlyings = sorted({inst.underlying for inst, p in zip(insts, priced, strict=True) if p})
    by_underlying = {u: view.model_params(u, model.name, model.params) for u in underlyings}
    # each priced instrument's underlying as an index into `underlyings` (-1: a forward)
    where = {u: j for j, u in enumerate(underlyings)}
    owner = np.fromiter((where[inst.underlying] if p else -1
                         for inst, p in zip(insts, priced, strict=True)), np.intp, n)
    params: dict[str, list[Quote | None]] = {}
    columns: dict[str, Floats] = {}
    for name in model.params:
        quotes_u = [by_underlying[u][name] for u in underlyings]
        values_u = np.array([q.value for q in quotes_u] + [math.nan])  # [-1]: none
        columns[name] = values_u[owner]
        params[name] = [None if j < 0 else quotes_u[j] for j in owner.tolist()]
    return _Inputs(T, T_source, quotes, K, quantity, params, columns)


@dataclass(frozen=True)
class _Rows:
    """Model rows of one valuation: row j prices instrument owner[j]; main[i] is instrument i's
    row, up[i] and down[i] its strike-bumped rows for digital greeks (-1: none)."""

    contracts: Contracts
    owner: Ints  # (m,)
    main: Ints  # (n,)
    up: Ints  # (n,)
    down: Ints  # (n,)


def _model_rows(
    types: npt.NDArray[np.str_], K: Floats, inputs: _Inputs, *, greeks: bool,
    fields: Sequence[str] = CONTRACT_FIELDS,
) -> _Rows:
    """The contracts to price: one row per option in book order, then (with greeks) an up and a
    down strike bump per digital."""
    n = types.shape[0]
    main_of = np.flatnonzero(np.isin(types, sorted(MODEL_TYPES)))  # (m0,)
    m0 = main_of.size
    main, up, down = (np.full(n, -1, dtype=np.intp) for _ in range(3))
    main[main_of] = np.arange(m0)
    owner, strikes = main_of, K[main_of]
    if greeks:
        digital = np.flatnonzero((types == "digital_call") | (types == "digital_put"))
        # No slope where the bump vanishes (subnormal strike) or overflows: null greeks.
        k_up, k_down, ok = strike_bumps(K[digital], bump=DIGITAL_GREEK_BUMP)
        bumped = digital[ok]
        first = m0 + 2 * np.arange(bumped.size)
        up[bumped], down[bumped] = first, first + 1
        owner = np.concatenate([main_of, np.repeat(bumped, 2)])
        strikes = np.concatenate([strikes, np.column_stack([k_up[ok], k_down[ok]]).ravel()])
    cols = {name: inputs.column(name)[owner] for name in fields if name != "K"}
    contracts = Contracts.from_columns({**cols, "K": strikes}, fields=tuple(fields))
    return _Rows(contracts, owner, main, up, down)


def _unit_columns(
    types: npt.NDArray[np.str_], rows: _Rows, values: Mapping[str, Floats], *, greeks: bool,
    names: Sequence[str] = GREEKS,
) -> tuple[Floats, dict[str, Floats]]:
    """Each option's unit price and unit greeks off the model rows, (n,) columns; NaN for the
    forwards (closed form, filled in by the caller) and for digitals without a strike bump."""
    n = types.shape[0]
    unit = np.full(n, math.nan)
    unit_greeks = {g: np.full(n, math.nan) for g in names} if greeks else {}
    if not rows.owner.size:
        return unit, unit_greeks
    for t, key in _UNIT_PRICE_KEY.items():
        sel = np.flatnonzero(types == t)
        unit[sel] = values[key][rows.main[sel]]
    if not greeks:
        return unit, unit_greeks
    for t, kind in (("european_call", "call"), ("european_put", "put")):
        sel = np.flatnonzero(types == t)
        for g in names:
            unit_greeks[g][sel] = values[f"{kind}_{g}"][rows.main[sel]]
    K = rows.contracts.K
    # digital_call = -dC/dK, digital_put = +dP/dK, so each greek is the K-slope of the vanilla's.
    for t, kind, sign in (("digital_call", "call", -1.0), ("digital_put", "put", 1.0)):
        sel = np.flatnonzero((types == t) & (rows.up >= 0))
        up, down = rows.up[sel], rows.down[sel]
        slopes = strike_slopes({g: values[f"{kind}_{g}"][up] for g in names},
                               {g: values[f"{kind}_{g}"][down] for g in names},
                               k_up=K[up], k_down=K[down], sign=sign)
        for g in names:
            unit_greeks[g][sel] = slopes[g]
    return unit, unit_greeks


async def value_book(
    req: ValuationRequest,
    *,
    marketdata: MarketDataStore,
    model: ModelService,
    book_model: BookModel | None = None,
    deadline_s: float | None = None,
) -> dict[str, Any]:
    """Value a book against the snapshot its key resolves to, on `model` (the service of
    `book_model`, default bs); raises on any bad input.

    Errors: MarketDataNotFound (404) for a missing snapshot, spot, curve or surface;
    RequestInvalid (422) for a contract outside the model's domain; NoModel (503); NotFound
    (404) for an unknown model version. Call `check_valuation_request` first.
    """
    spec = book_model or BookModel()
    check_scenarios(req, model=spec.name, process=spec.process)
    stored = await marketdata.resolve(
        namespace=req.valuation_namespace, val_datetime=req.val_datetime, data_asof=req.data_asof
    )
    insts = req.instruments
    expiries = [format_utc(inst.expiry) for inst in insts]
    inputs = _market_inputs(req, stored.view(), expiries, spec)
    types = np.asarray([inst.type for inst in insts])  # (n,) str
    K = inputs.K
    rows = _model_rows(types, K, inputs, greeks=req.greeks, fields=spec.fields)
    values, info = await _price_rows(req, rows, inputs, model=model, deadline_s=deadline_s)
    unit, unit_greeks = _unit_columns(types, rows, values, greeks=req.greeks, names=spec.greeks)
    _price_forwards(inputs, rows, unit, unit_greeks)
    out_rows, totals = _answers(req, expiries, inputs, rows, unit, unit_greeks, values,
                                names=spec.greeks)
    _attach_implied_vols(out_rows, types, K, inputs, unit)
    snap = stored.snapshot
    extra: dict[str, Any] = {}
    if req.scenarios:
        extra["scenarios"] = await _revalue(req, types, inputs, rows, unit, spec,
                                            model=model, deadline_s=deadline_s)
    return {
        "valuation_namespace": req.valuation_namespace,
        "val_datetime": format_utc(req.val_datetime),
        "data_asof": format_utc(req.data_asof),
        "dataset": {
            "key": stored.key,
            "hash": stored.content_hash,
            "namespace": snap.namespace,
            "val_datetime": format_utc(snap.val_datetime),
            "data_asof": format_utc(snap.data_asof),
        },
        "model": None if info is None else {"name": spec.name, **info.as_json()},
        "instruments": out_rows,
        "totals": totals,
        **extra,
    }


def _scenario_shifts(scenarios: Sequence[Scenario]) -> dict[str, Floats]:
    """The scenarios' shifts as (S,) columns."""
    return {f: np.fromiter((getattr(sc, f) for sc in scenarios), np.float64, len(scenarios))
            for f in ("spot_rel", "rate_abs", "vol_abs", "v0_abs")}


async def _revalue(
    req: ValuationRequest, types: npt.NDArray[np.str_], inputs: _Inputs,
    rows: _Rows, base_unit: Floats, spec: BookModel, *, model: ModelService,
    deadline_s: float | None,
) -> list[dict[str, Any]]:
    """Every scenario's unit and position prices, total and P&L against the base, with all
    scenarios' model rows priced in one batched pass (forwards in closed form, in one call)."""
    n, S = types.shape[0], len(req.scenarios)
    main_of = np.flatnonzero(rows.main >= 0)  # instruments the model prices, in row order
    m0 = main_of.size
    shifts = _scenario_shifts(req.scenarios)
    unit = np.full((S, n), math.nan)
    if m0:
        base_cols = {f: getattr(rows.contracts, f)[:m0] for f in spec.fields}
        batch_cols = shift_columns(base_cols, **shifts)  # (S m0,) each, scenario-major
        try:
            priced = await model.price(
                Contracts.from_columns(batch_cols, fields=tuple(spec.fields)),
                version=req.model_version, deadline_s=deadline_s)
        except DomainError as exc:
            s_i, row = divmod(exc.index, m0)
            i = int(main_of[row])
            name = _INPUT_NAME.get(exc.field, exc.field)
            raise domain_invalid(exc, path=f"scenarios.{s_i}.instruments.{i}.{name}",
                                 source=f"scenario {req.scenarios[s_i].name!r}") from None
        kinds = types[main_of]
        for t, key in _UNIT_PRICE_KEY.items():
            sel = np.flatnonzero(kinds == t)
            unit[:, main_of[sel]] = priced.values[key].reshape(S, m0)[:, sel]
    fwd = np.flatnonzero(rows.main < 0)
    if fwd.size:
        cols = {name: inputs.column(name)[fwd] for name in ("X0", "T", "r", "d")}
        moved = shift_columns(cols, **shifts)
        price, _ = forwards(S=moved["X0"], T=moved["T"], r=moved["r"], d=moved["d"],
                            K=np.tile(inputs.K[fwd], S))
        unit[:, fwd] = price.reshape(S, fwd.size)
    base_total = exact_total(positions(inputs.quantity, base_unit))
    price = positions(inputs.quantity[None, :], unit)  # (S, n)
    ids = [inst.id for inst in req.instruments]
    out = []
    for s_i, sc in enumerate(req.scenarios):
        scenario_total = exact_total(price[s_i])
        out.append({
            "name": sc.name,
            "shifts": {"spot_rel": sc.spot_rel, "rate_abs": sc.rate_abs,
                       "vol_abs": sc.vol_abs, "v0_abs": sc.v0_abs},
            "total": number(scenario_total),
            "pnl": number(scenario_total - base_total),
            "instruments": [{"id": i, "unit_price": u, "price": p}
                            for i, u, p in zip(ids, unit[s_i].tolist(), price[s_i].tolist(),
                                               strict=True)],
        })
    return out


async def _price_rows(
    req: ValuationRequest,
    rows: _Rows,
    inputs: _Inputs,
    *,
    model: ModelService,
    deadline_s: float | None,
) -> tuple[Mapping[str, Floats], ModelInfo | None]:
    """The model's outputs for the rows (none without options); a row outside the domain is a
    422 naming its instrument's input and where it came from."""
    if not rows.owner.size:
        return {}, None
    try:
        batch: PricedBatch = await model.price(
            rows.contracts,
            version=req.model_version,
            greeks=req.greeks,
            metrics=req.metrics,
            deadline_s=deadline_s,
        )
    except DomainError as exc:
        i = int(rows.owner[exc.index])
        name = _INPUT_NAME.get(exc.field, exc.field)
        path = f"instruments.{i}.{name}"
        raise domain_invalid(exc, path=path, source=inputs.source(i, name)) from None
    return batch.values, batch.model


def _price_forwards(
    inputs: _Inputs,
    rows: _Rows,
    unit: Floats,
    unit_greeks: dict[str, Floats],
) -> None:
    """Fill in the forwards' unit prices (and greeks: delta, theta, rho; every other one 0),
    in closed form, all in one call."""
    fwd = np.flatnonzero(rows.main < 0)
    if not fwd.size:
        return
    c = {name: inputs.column(name)[fwd] for name in ("X0", "T", "r", "d", "K")}
    unit[fwd], greeks = forwards(S=c["X0"], T=c["T"], r=c["r"], d=c["d"], K=c["K"])
    for g, column in unit_greeks.items():  # empty without greeks
        column[fwd] = greeks.get(g, 0.0)


def _answers(
    req: ValuationRequest,
    expiries: Sequence[str],
    inputs: _Inputs,
    rows: _Rows,
    unit: Floats,
    unit_greeks: dict[str, Floats],
    values: Mapping[str, Floats],
    *,
    names: Sequence[str] = GREEKS,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each instrument's answer and the book's totals, from the (n,) columns."""
    insts = req.instruments
    n = len(insts)
    price = positions(inputs.quantity, unit)
    scaled = {g: positions(inputs.quantity, unit_greeks[g]) for g in unit_greeks}
    # Values stay floats (tolist): the canonical bytes write a non-finite one as null.
    out_rows: list[dict[str, Any]] = [
        {
            "id": inst.id,
            "type": inst.type,
            "underlying": inst.underlying,
            "strike": inst.strike,
            "expiry": expiry,
            "quantity": inst.quantity,
            "unit_price": u,
            "price": p,
            "inputs": echoed,
            "priced_by": "model" if j >= 0 else "closed_form",
        }
        for inst, expiry, u, p, echoed, j in zip(
            insts, expiries, unit.tolist(), price.tolist(), inputs.as_json(),
            rows.main.tolist(), strict=True,
        )
    ]
    # fsum is exactly rounded, so the totals do not depend on summation order.
    totals: dict[str, Any] = {"price": number(exact_total(price)), "instruments": n}
    if req.greeks:
        per_unit, per_position = _records(names, unit_greeks, n), _records(names, scaled, n)
        for row, ug, pg in zip(out_rows, per_unit, per_position, strict=True):
            row["unit_greeks"], row["greeks"] = ug, pg
        totals["greeks"] = {g: number(exact_total(scaled[g])) for g in names}
    if req.metrics:
        _attach_metrics(out_rows, rows, values, names)
    return out_rows, totals


def _attach_implied_vols(
    out_rows: list[dict[str, Any]], types: npt.NDArray[np.str_], K: Floats, inputs: _Inputs,
    unit: Floats,
) -> None:
    """Each European option's `implied_vol` (of its unit price; null with
    `implied_vol_reason` where none exists). Digitals and forwards have none."""
    options: tuple[tuple[str, Kind], ...] = (("european_call", "call"), ("european_put", "put"))
    if not np.isin(types, [t for t, _ in options]).any():
        return
    S0, T, r, d = (inputs.column(name) for name in ("X0", "T", "r", "d"))
    for t, kind in options:
        sel = np.flatnonzero(types == t)
        vols, reasons = implied_vols(unit[sel], S0=S0[sel], K=K[sel], T=T[sel], r=r[sel],
                                     d=d[sel], kind=kind)
        for i, vol, why in zip(sel.tolist(), vols, reasons, strict=True):
            out_rows[i]["implied_vol"] = vol
            if why is not None:
                out_rows[i]["implied_vol_reason"] = why


def _attach_metrics(
    out_rows: list[dict[str, Any]], rows: _Rows, values: Mapping[str, Floats],
    names: Sequence[str] = GREEKS,
) -> None:
    """Each option's distribution metrics off its model row; null for a forward."""
    keys = _metric_keys(values, names) if values else []
    n = len(out_rows)
    at = np.maximum(rows.main, 0)  # a forward reads row 0, then gets null
    metrics = _records(keys, {k: values[k][at] for k in keys}, n)
    for row, m, j in zip(out_rows, metrics, rows.main.tolist(), strict=True):
        row["metrics"] = m if j >= 0 else None


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
    "domain_invalid",
    "price_contracts",
    "request_json",
    "value_book",
]
