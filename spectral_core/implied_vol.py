"""Black-Scholes implied volatility of European prices, by Jaeckel's "Let's Be Rational".

The inversion is `pyvolr.black76.implied_vol` (a Rust implementation of Jaeckel's published
algorithm: a rational-cubic initial guess and at most two Householder steps, machine precision
over the no-arbitrage range), applied to the undiscounted price on the forward (Black-76 with
r = 0), so dividends and rates enter only through the forward and the discount factor. It is
vectorised: measured on this repo's 2-core CPU, 0.4-0.7 us per option against 16-17 us for the
pure-Python `py_lets_be_rational` it replaces, the two agreeing to 5e-14 in vol over +-2 sd of
log-moneyness (the server inverts every European answer, ~800 per 1,000-instrument book).

A price with no implied vol (below intrinsic value, at or above the upper bound, not finite)
gets NaN and a reason; never 0. Every row is solved on its own, so a row's vol does not depend
on the batch.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pyvolr import black76

Kind = Literal["call", "put"]
NOT_FINITE = "price is not finite"
BELOW_INTRINSIC = "price below intrinsic value"
ABOVE_MAXIMUM = "price at or above the no-arbitrage upper bound"
NO_SOLUTION = "no positive vol reproduces this price in float64 (it is within rounding of a bound)"
# reason by code: 0 solved, then the refusals in the order they are tested
_REASONS = np.array([None, NOT_FINITE, BELOW_INTRINSIC, ABOVE_MAXIMUM, NO_SOLUTION],
                    dtype=object)


def implied_vol(
    price: np.ndarray, *, S0: np.ndarray, K: np.ndarray, T: np.ndarray, r: np.ndarray,
    d: np.ndarray, kind: Kind,
) -> tuple[np.ndarray, list[str | None]]:
    """(vol (B,) float64 with NaN where none exists, reason per row (None where it exists)).

    All inputs broadcast to (B,); T > 0, S0 > 0, K > 0.
    """
    if kind not in ("call", "put"):
        raise ValueError(f"kind must be 'call' or 'put', got {kind!r}")
    p, s0, k, t, rr, dd = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64).ravel()
                                                 for v in (price, S0, K, T, r, d)))
    for name, v in (("S0", s0), ("K", k), ("T", t)):
        if not (np.isfinite(v) & (v > 0)).all():
            bad = v[~(np.isfinite(v) & (v > 0))][0]
            raise ValueError(f"{name} must be finite and > 0, got {bad}")
    call = kind == "call"
    with np.errstate(over="ignore", invalid="ignore"):
        forward = s0 * np.exp((rr - dd) * t)
        undiscounted = p * np.exp(rr * t)
        intrinsic = np.maximum(forward - k if call else k - forward, 0.0)
    upper = forward if call else k
    code = np.zeros(p.shape, dtype=np.intp)
    code[~np.isfinite(undiscounted)] = 1
    # the solver answers 0 at exactly intrinsic: no vol there
    code[(code == 0) & (undiscounted <= intrinsic)] = 2
    code[(code == 0) & (undiscounted >= upper)] = 3
    out = np.full(p.shape, np.nan)
    todo = np.flatnonzero(code == 0)
    if todo.size:
        out[todo] = black76.implied_vol(undiscounted[todo], "c" if call else "p", forward[todo],
                                        k[todo], t[todo], 0.0, on_error="ignore")
        # NaN, or 0 for a price that rounds to intrinsic (a subnormal far-OTM price): no vol
        vol = out[todo]
        failed = todo[~(np.isfinite(vol) & (vol > 0.0))]
        out[failed] = np.nan
        code[failed] = 4
    reasons: list[str | None] = _REASONS[code].tolist()
    return out, reasons
