"""Black-Scholes implied volatility of European prices, by Jaeckel's "Let's Be Rational".

The inversion is `py_lets_be_rational` (Jaeckel's published algorithm: machine precision in at
most two iterations for every input), applied to the undiscounted price on the forward
(Black-76), so dividends and rates enter only through the forward and the discount factor.
A price with no implied vol (below intrinsic value, at or above the upper bound) gets NaN and a
reason; never 0.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from py_lets_be_rational import implied_volatility_from_a_transformed_rational_guess as _lbr
from py_lets_be_rational.exceptions import AboveMaximumException, BelowIntrinsicException

Kind = Literal["call", "put"]
BELOW_INTRINSIC = "price below intrinsic value"
ABOVE_MAXIMUM = "price at or above the no-arbitrage upper bound"


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
    q = 1.0 if kind == "call" else -1.0
    forward = s0 * np.exp((rr - dd) * t)
    undiscounted = p * np.exp(rr * t)
    out = np.full(p.shape, math.nan)
    reasons: list[str | None] = [None] * p.shape[0]
    for i in range(p.shape[0]):
        if not math.isfinite(undiscounted[i]):
            reasons[i] = "price is not finite"
            continue
        intrinsic = max(q * (forward[i] - k[i]), 0.0)
        upper = forward[i] if q > 0 else k[i]
        if undiscounted[i] <= intrinsic:  # lbr answers 0 at exactly intrinsic: no vol there
            reasons[i] = BELOW_INTRINSIC
            continue
        if undiscounted[i] >= upper:
            reasons[i] = ABOVE_MAXIMUM
            continue
        try:
            out[i] = _lbr(float(undiscounted[i]), float(forward[i]), float(k[i]), float(t[i]), q)
        except BelowIntrinsicException:
            reasons[i] = BELOW_INTRINSIC
        except AboveMaximumException:
            reasons[i] = ABOVE_MAXIMUM
    return out, reasons
