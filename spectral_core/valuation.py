"""Valuation maths on columns: the numbers of a book valuation, one call per book.

Every function takes (n,) float64 columns (or (S, n) for scenarios) and returns columns; none
knows about snapshots, requests or sources (storage/marketdata.py keeps the snapshot schema and
the store and says where each input came from; server/ keeps the HTTP). What is here:

- the market inputs: zero and dividend curves (linear in r or in r*t, flat outside the pillars)
  and vol surfaces (bilinear in total variance sigma^2 t, flat outside), read at every
  instrument at once; the log-moneyness ln(K/F) a surface on that axis is read at;
- forwards in closed form, discounted forward minus discounted strike, with their greeks;
- the strike bumps of digital greeks (digital_call = -dC/dK, digital_put = +dP/dK) and the
  slopes taken from them;
- scenario shifts of the model's contract columns, all scenarios stacked into one batch;
- the book's positions (quantity x unit value) and exactly rounded totals.

Transcendentals (exp, log) are evaluated by numba loops over libm's exp and log, the functions
Python's math module calls, so every float equals what the scalar formula gives in Python
(numpy's vectorised exp and log differ from libm's in the last bit on 5% and 0.01% of inputs on
an AVX-512 CPU, and a valuation's answer bytes must not depend on the instruction set). Without
fastmath, numba keeps the IEEE order of operations of the Python expression.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import numba
import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Rule = Literal["linear_rate", "linear_rt"]
# Relative strike bump for digital greeks by central difference of the vanilla greeks in K.
DIGITAL_GREEK_BUMP = 1e-4


# --- market inputs ------------------------------------------------------------------------------


def interpolate_curve(*, tenors: npt.ArrayLike, rates: npt.ArrayLike, rule: Rule,
                      t: npt.ArrayLike) -> Floats:
    """Rate at each t (years, >= 0, finite: the caller checks): linear in r or in r*t between
    pillars (tenors strictly increasing), flat outside."""
    tn = np.asarray(tenors, dtype=np.float64)  # (p,)
    rn = np.asarray(rates, dtype=np.float64)  # (p,)
    tq = np.asarray(t, dtype=np.float64)  # (...)
    # Flat extrapolation: clamp to the pillar range, so outside it the end rates apply.
    tc = np.clip(tq, tn[0], tn[-1])
    if rule == "linear_rate":
        return np.interp(tc, tn, rn)
    if rule == "linear_rt":
        rt = np.interp(tc, tn, rn * tn)
        # tc == 0 only when the first pillar is at 0; its rate is the limit there.
        safe = np.where(tc > 0.0, tc, 1.0)
        return np.where(tc > 0.0, rt / safe, rn[0])
    raise ValueError(f"unknown interpolation rule {rule!r}")


def _bracket(
    grid: Floats, q: Floats
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], Floats]:
    """Indices lo, hi and weight w of q (inside the grid) so q = (1-w) g[lo] + w g[hi]."""
    n = grid.shape[0]
    if n == 1:
        zero = np.zeros(q.shape, dtype=np.intp)
        return zero, zero, np.zeros(q.shape, dtype=np.float64)
    lo = np.clip(np.searchsorted(grid, q, side="right") - 1, 0, n - 2)
    hi = lo + 1
    w = (q - grid[lo]) / (grid[hi] - grid[lo])
    return lo, hi, w


def interpolate_vol(*, expiries: npt.ArrayLike, axis: npt.ArrayLike, vols: npt.ArrayLike,
                    t: npt.ArrayLike, x: npt.ArrayLike) -> Floats:
    """Implied vol at (t, x) (t > 0 and x finite: the caller checks): bilinear in (expiry,
    axis) on total variance sigma^2 t; outside the grid flat (the query is clamped to the
    grid's edges in both axes)."""
    te = np.asarray(expiries, dtype=np.float64)  # (E,)
    xa = np.asarray(axis, dtype=np.float64)  # (A,)
    sv = np.asarray(vols, dtype=np.float64)  # (E, A)
    tq, xq = np.broadcast_arrays(np.asarray(t, dtype=np.float64),
                                 np.asarray(x, dtype=np.float64))  # (...), (...)
    tc = np.clip(tq, te[0], te[-1])
    xc = np.clip(xq, xa[0], xa[-1])
    w = sv * sv * te[:, None]  # (E, A) total variance
    i0, i1, a = _bracket(te, tc)
    j0, j1, b = _bracket(xa, xc)
    wq = (1 - a) * ((1 - b) * w[i0, j0] + b * w[i0, j1]) + a * ((1 - b) * w[i1, j0] + b * w[i1, j1])
    result: Floats = np.sqrt(wq / tc)
    return result


def _log_moneyness_py(K, S, r, q, T, out):  # pragma: no cover - compiled
    for i in range(K.shape[0]):
        out[i] = math.log(K[i]) - math.log(S[i]) - (r[i] - q[i]) * T[i]


_log_moneyness_kernel: Callable[..., None] = numba.njit(cache=True, nogil=True)(_log_moneyness_py)


def log_moneyness(*, K: npt.ArrayLike, S: npt.ArrayLike, r: npt.ArrayLike, q: npt.ArrayLike,
                  T: npt.ArrayLike) -> Floats:
    """ln(K / F), F = S exp((r - q) T), in log space (no overflow or log(0) for a far-out
    forward); -inf or NaN where K or S is not > 0. Broadcast to one shape (n,)."""
    cols = _columns(K, S, r, q, T)
    out = np.empty(cols[0].shape[0])
    _log_moneyness_kernel(*cols, out)
    return out


# --- forwards -----------------------------------------------------------------------------------


def _forward_py(S, T, r, d, K, price, delta, theta, rho):  # pragma: no cover - compiled
    for i in range(S.shape[0]):
        df = math.exp(-r[i] * T[i])
        fwd = S[i] * math.exp((r[i] - d[i]) * T[i])
        price[i] = df * fwd - df * K[i]
        carry = S[i] * math.exp(-d[i] * T[i])
        delta[i] = math.exp(-d[i] * T[i])
        # theta: -dPV/dT at fixed r and d, the pricer's convention
        theta[i] = d[i] * carry - r[i] * K[i] * df
        rho[i] = T[i] * K[i] * df


_forward_kernel: Callable[..., None] = numba.njit(cache=True, nogil=True)(_forward_py)


def forwards(*, S: npt.ArrayLike, T: npt.ArrayLike, r: npt.ArrayLike, d: npt.ArrayLike,
             K: npt.ArrayLike) -> tuple[Floats, dict[str, Floats]]:
    """Forward contracts in closed form: (price = e^{-rT} S e^{(r-d)T} - e^{-rT} K, greeks
    {delta, theta, rho}); an exp that overflows gives inf, and the IEEE arithmetic after it
    NaN or inf (written as null). Broadcast to one shape (n,)."""
    cols = _columns(S, T, r, d, K)
    n = cols[0].shape[0]
    price, delta, theta, rho = (np.empty(n) for _ in range(4))
    _forward_kernel(*cols, price, delta, theta, rho)
    return price, {"delta": delta, "theta": theta, "rho": rho}


# --- digital greeks -----------------------------------------------------------------------------


def strike_bumps(K: Floats, *, bump: float = DIGITAL_GREEK_BUMP) -> tuple[Floats, Floats,
                                                                          npt.NDArray[np.bool_]]:
    """(K (1 + bump), K (1 - bump), ok): the strikes a digital's greeks are differenced on; not
    ok where the bump vanishes (a subnormal strike) or overflows (those greeks are null)."""
    with np.errstate(over="ignore"):
        h = bump * K
        up, down = K + h, K - h
    ok = np.isfinite(up) & (down > 0.0) & (down < up)
    return up, down, ok


def strike_slopes(up: Mapping[str, Floats], down: Mapping[str, Floats], *, k_up: Floats,
                  k_down: Floats, sign: float) -> dict[str, Floats]:
    """sign x (v(K_up) - v(K_down)) / (K_up - K_down) for every column v: a digital's greeks
    from its vanilla's (sign -1 for a call, +1 for a put). inf - inf is NaN (a null greek),
    unwarned, as Python floats do it."""
    dK = k_up - k_down
    with np.errstate(invalid="ignore", over="ignore"):
        return {g: sign * (up[g] - down[g]) / dK for g in up}


# --- scenarios ----------------------------------------------------------------------------------


def shift_columns(columns: Mapping[str, Floats], *, spot_rel: Floats, rate_abs: Floats,
                  vol_abs: Floats, v0_abs: Floats) -> dict[str, Floats]:
    """Every scenario's shifted contract columns, stacked scenario-major into (S m,): spot
    relative (X0 (1 + spot_rel)), rate absolute, and the vol (v) or initial variance (v0)
    absolute where the columns have one; every other column repeats. Shifts are (S,)."""
    n_scen = spot_rel.shape[0]
    out = {name: np.tile(col, n_scen) for name, col in columns.items()}
    shifts = {"X0": (spot_rel, "rel"), "r": (rate_abs, "abs"), "v": (vol_abs, "abs"),
              "v0": (v0_abs, "abs")}
    for name, (shift, kind) in shifts.items():
        if name in columns:
            base = columns[name][None, :]
            moved = base * (1.0 + shift[:, None]) if kind == "rel" else base + shift[:, None]
            out[name] = moved.ravel()
    return out


# --- the book -----------------------------------------------------------------------------------


def exact_total(xs: Floats) -> float:
    """Exactly rounded sum (independent of order); NaN where it is not a finite number.

    math.fsum raises on an intermediate overflow and on inf + -inf; the answer reports such a
    total as null, like any other non-finite number.
    """
    try:
        return math.fsum(xs.tolist())
    except (OverflowError, ValueError):
        return math.nan


def positions(quantity: Floats, unit: Floats) -> Floats:
    """quantity x unit value, elementwise over (n,) or (S, n); inf and NaN are null answers."""
    with np.errstate(over="ignore", invalid="ignore"):
        result: Floats = quantity * unit
    return result


def _columns(*cols: npt.ArrayLike) -> list[Floats]:
    """The columns broadcast to one (n,) shape, each a contiguous float64 copy."""
    arrays = [np.asarray(c, dtype=np.float64) for c in cols]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    return [np.array(np.broadcast_to(a, shape), dtype=np.float64).ravel() for a in arrays]


__all__ = [
    "DIGITAL_GREEK_BUMP",
    "exact_total",
    "forwards",
    "interpolate_curve",
    "interpolate_vol",
    "log_moneyness",
    "positions",
    "shift_columns",
    "strike_bumps",
    "strike_slopes",
]
