"""Calibration: fit a process's model parameters to an implied-vol surface through the learned
pricer (DESIGN.md section 9).

The fitted parameters are the process's names minus the contract's own (T, r, d): for Heston
(v0, kappa, theta_v, xi, rho). The bounds are the pricer's trained domain, so every trial point
is one the network was trained on; a surface point whose T, r or d lies outside it is refused
(`SurfaceError`, a ValueError naming the point and the field).

Objective. Each quote is matched on its out-of-the-money side (put for K < forward, call
otherwise: the side with only time value). Market prices are Black-Scholes prices at the quoted
vols. Residuals are
  * weights="vega": (model - market) / vega, vega the Black-Scholes vega at the market vol: to
    first order the implied-vol error, in vol units (0.0001 = 1 vol-bp);
  * weights="uniform": (model - market) / S0, the price error in units of spot.

Optimiser. scipy's `least_squares(method="trf", x_scale="jac")`: a trust-region reflective
Gauss-Newton method whose trust region is scaled by the Jacobian's column norms, i.e. a bounded
Levenberg-Marquardt (scipy's method "lm" takes no bounds). It works in the unit box
x = (p - lower) / (upper - lower), so every coordinate has the same order of magnitude.

One evaluation is one batched pass: theta (n, P) for all points -> truncation interval
[a, b] (inside the autograd graph: for Heston it depends on the fitted parameters through the
cumulants, and the network's spectrum is defined on exactly that interval, so it cannot be held
fixed) -> spectrum (n, N) -> COS puts -> OTM prices. The Jacobian comes from one backward pass
of that same graph: every row of theta holds its own copy of the parameters, and row i's price
depends on row i only (the network and the COS sum act row by row), so the gradient of the sum
of the residuals with respect to the (n, P) copies is exactly the (n, P) Jacobian. scipy asks
for the Jacobian only at the point it last evaluated, so the graph of that evaluation is kept and
the Jacobian costs one backward pass, no second forward.

Speed (88 points, 1 torch thread, this repo's 2-core CPU): an evaluation costs ~3 ms and its
Jacobian ~5 ms more, bound by the ~2,600 small torch operations of the graph (the network, the
closed-form cumulants, COS), not by arithmetic; a fit takes ~15 evaluations, ~100 ms. Measured
alternatives for the Jacobian: torch.func.jacrev 112 ms, torch.autograd.functional.jacobian
(vectorised) 109 ms, torch.func.jacfwd 75 ms, forward-mode dual numbers 68 ms, against 11 ms for
the copies' backward pass (8 ms with the cumulants shared); torch.compile of the graph took
90 s to build and ran slower. The learned module stays complex64 (its round-off, ~1e-7 of spot,
sits far below its trained error); a second intra-op thread gains nothing at this size and, on
a loaded machine, makes every operation wait for the busy core (30x slower measured).

Deterministic: no randomness anywhere, a fixed batch (all points, in the caller's order), so the
same inputs and the same pricer give the same floats, bit for bit, on one machine.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from scipy.optimize import least_squares

from spectral_core import cos
from spectral_core.analytic import bs_greeks, bs_price
from spectral_core.implied_vol import Kind, implied_vol
from spectral_core.processes.base import Process
from spectral_core.processes.domains import Domain

if TYPE_CHECKING:
    from spectral_core.pricer import Pricer

Weights = Literal["vega", "uniform"]
# theta (B, P) float64 -> F (B, N) complex128, differentiable in theta, row i from theta row i
SpectrumFn = Callable[[torch.Tensor], torch.Tensor]

# Contract parameters every process has: given by the surface, never fitted.
CONTRACT_PARAMS: tuple[str, ...] = ("T", "r", "d")
DEFAULT_MAX_ITERATIONS = 100
# least_squares stops when a step lowers the cost by less than FTOL relative (the rmse by
# FTOL / 2), moves x by less than XTOL of the unit box or the scaled gradient is below GTOL.
# Measured on 20 LOB surfaces through a trained network: ftol 1e-4 ends within 0.0004 vol-bp of
# the rmse at ftol 1e-8 with 15 instead of 26 evaluations; the last ones crawl along the
# kappa-theta_v valley without changing a price.
FTOL = 1e-4
XTOL = 1e-6
GTOL = 1e-8
# Vega floor (fraction of spot): only keeps a quote whose vega underflows from dividing by 0.
VEGA_FLOOR = 1e-8


class SurfaceError(ValueError):
    """A surface that cannot be calibrated: `field` and `index` name the offending point
    (`index` is None for the surface as a whole)."""

    def __init__(self, message: str, *, field: str | None = None,
                 index: int | None = None) -> None:
        super().__init__(message)
        self.field, self.index = field, index


@dataclass(frozen=True)
class CalibrationResult:
    """A fit. Vol errors are in vol-bp (1e-4 vol): implied vol of the model price at the fitted
    parameters minus the market vol, by Let's Be Rational (`implied_vol`)."""

    params: dict[str, float]  # fitted, by name
    start: dict[str, float]  # where the optimiser began
    rmse_volbp: float  # over the points that have a model implied vol (NaN if none has)
    residuals_volbp: np.ndarray  # (n,) model vol - market vol, NaN where no model vol
    model_vol: np.ndarray  # (n,) implied vol of the model price, NaN where none exists
    model_price: np.ndarray  # (n,) model price of each point's OTM option
    market_price: np.ndarray  # (n,) Black-Scholes price of the same option at the market vol
    kind: tuple[str, ...]  # (n,) "put" | "call": the OTM side that was fitted
    failures: tuple[tuple[int, str], ...]  # (point, reason) without a model implied vol
    cost: float  # 0.5 * sum of squared residuals in the optimiser's weighting
    nfev: int  # objective evaluations (one batched network pass each)
    njev: int  # Jacobian evaluations (one backward pass each)
    converged: bool  # a tolerance was met (False: iteration cap)
    status: int  # least_squares status
    message: str  # least_squares message
    hit_bounds: tuple[str, ...]  # parameters that end on a bound of the trained domain
    weights: Weights


@dataclass(frozen=True)
class _Surface:
    """Validated points, each (n,) float64, plus the OTM side and its market price."""

    S0: np.ndarray
    T: np.ndarray
    K: np.ndarray
    r: np.ndarray
    d: np.ndarray
    vol: np.ndarray
    call: np.ndarray  # (n,) bool: fitted as a call (K >= forward)
    price: np.ndarray  # (n,) market price of the OTM option
    vega: np.ndarray  # (n,) Black-Scholes vega at the market vol


def fitted_names(process: Process) -> tuple[str, ...]:
    """The parameters a calibration fits: the process's names minus T, r, d."""
    return tuple(n for n in process.names if n not in CONTRACT_PARAMS)


def calibrate(
    pricer: Pricer,
    *,
    S0: Any,
    T: Any,
    K: Any,
    r: Any,
    d: Any,
    vol: Any,
    weights: Weights = "vega",
    initial: Mapping[str, float] | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> CalibrationResult:
    """Fit the pricer's process parameters to market implied vols (Black-Scholes).

    S0 scalar or (n,); T, K, r, d, vol (n,). `initial` gives the start of any fitted parameter
    (default: `default_start`); `max_iterations` caps the objective evaluations. Bounds are
    the pricer's trained domain. Raises SurfaceError (a ValueError) for a point outside the
    domain or an invalid quote, and for fewer points than parameters.
    """
    process = _sharing_cumulants(pricer.process)
    domain = pricer.config.domain
    model, device = pricer.model, pricer.device

    def spectrum(theta: torch.Tensor) -> torch.Tensor:
        # Pricer.spectrum's batched branch on the sharing process, without its input checks
        # (the surface is checked once, the optimiser stays in the box); a reproducible
        # pricer's complex128 module runs batched too: the batch is fixed, so is every bit.
        features = process.features(theta, domain, check=False).to(device)
        return model(features).to(device="cpu", dtype=torch.complex128)

    return calibrate_spectrum(
        spectrum, process=process, domain=domain,
        truncation_L=pricer.config.spectrum.truncation_L, S0=S0, T=T, K=K, r=r, d=d, vol=vol,
        weights=weights, initial=initial, max_iterations=max_iterations)


def calibrate_spectrum(
    spectrum: SpectrumFn,
    *,
    process: Process,
    domain: Domain,
    truncation_L: float,
    S0: Any,
    T: Any,
    K: Any,
    r: Any,
    d: Any,
    vol: Any,
    weights: Weights = "vega",
    initial: Mapping[str, float] | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> CalibrationResult:
    """`calibrate` for any spectrum function F(theta) on `process`'s truncation interval with
    `truncation_L` (the learned network, or an exact CF in tests), over the box `domain`."""
    if weights not in ("vega", "uniform"):
        raise ValueError(f"weights must be 'vega' or 'uniform', got {weights!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) \
            or max_iterations < 1:
        raise ValueError(f"max_iterations must be an int >= 1, got {max_iterations!r}")
    names = fitted_names(process)
    surface = _surface(domain, S0=S0, T=T, K=K, r=r, d=d, vol=vol)
    n = surface.T.shape[0]
    if n < len(names):
        raise SurfaceError(f"a surface of {n} points cannot determine {len(names)} parameters "
                           f"{list(names)}", field="points")
    lower = np.array([domain.bounds(p).lower for p in names])
    upper = np.array([domain.bounds(p).upper for p in names])
    start = _start(names, lower, upper, initial, surface)
    objective = _Objective(spectrum, process, truncation_L, surface, names, lower, upper,
                           weights)
    x0 = (np.array([start[p] for p in names]) - lower) / (upper - lower)
    fit = least_squares(objective.residuals, x0, jac=objective.jacobian, bounds=(0.0, 1.0),
                        method="trf", x_scale="jac", ftol=FTOL, xtol=XTOL, gtol=GTOL,
                        max_nfev=max_iterations)
    x = np.asarray(fit.x, dtype=np.float64)
    params = lower + x * (upper - lower)
    model = objective.prices_at(x)
    return _result(surface, names, params, start, model, fit, weights)


def default_start(names: tuple[str, ...], lower: np.ndarray, upper: np.ndarray,
                  surface_vol: float) -> dict[str, float]:
    """The centre of the box, except that the variance levels v0 and theta_v (where the process
    has them) start at the square of the surface's mean implied vol: the level of the surface
    is the one thing the quotes say directly, and the centre of a variance box is far from it."""
    start = {p: 0.5 * (lo + hi) for p, lo, hi in zip(names, lower, upper, strict=True)}
    for p, lo, hi in zip(names, lower, upper, strict=True):
        if p in ("v0", "theta_v"):
            start[p] = float(np.clip(surface_vol * surface_vol, lo, hi))
    return {p: float(v) for p, v in start.items()}


def _start(names: tuple[str, ...], lower: np.ndarray, upper: np.ndarray,
           initial: Mapping[str, float] | None, surface: _Surface) -> dict[str, float]:
    start = default_start(names, lower, upper, float(np.mean(surface.vol)))
    for p, value in (initial or {}).items():
        if p not in names:
            raise ValueError(f"initial names unknown parameter {p!r}; fitted are {list(names)}")
        v = float(value)
        k = names.index(p)
        if not (math.isfinite(v) and lower[k] <= v <= upper[k]):
            raise ValueError(f"initial {p} = {value!r} is outside the trained domain "
                             f"[{lower[k]}, {upper[k]}]")
        start[p] = v
    return start


def _column(name: str, v: Any, n: int | None) -> np.ndarray:
    arr = np.array(v, dtype=np.float64)  # a private, writable copy
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        want = "(n,)" if n is None else f"({n},)"
        raise SurfaceError(f"{name} must have shape {want}, got {arr.shape}", field=name)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SurfaceError(f"points[{i}].{name} = {float(arr[i])!r} is not finite", field=name,
                           index=i)
    return arr


def _surface(domain: Domain, *, S0: Any, T: Any, K: Any, r: Any, d: Any, vol: Any) -> _Surface:
    t = _column("T", T, None)
    n = t.shape[0]
    cols = {"T": t, **{name: _column(name, v, n) for name, v in
                       (("K", K), ("r", r), ("d", d), ("vol", vol))}}
    s0 = np.asarray(S0, dtype=np.float64)
    cols["S0"] = _column("S0", np.broadcast_to(s0, (n,)) if s0.ndim == 0 else s0, n)
    for name in ("S0", "K", "vol"):
        bad = cols[name] <= 0
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SurfaceError(f"points[{i}].{name} = {float(cols[name][i])!r} must be > 0",
                               field=name, index=i)
    for name in CONTRACT_PARAMS:
        b = domain.bounds(name)
        bad = (cols[name] < b.lower) | (cols[name] > b.upper)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SurfaceError(f"points[{i}].{name} = {float(cols[name][i])!r} is outside the "
                               f"trained domain [{b.lower}, {b.upper}]", field=name, index=i)
    s0, t, k, rr, dd, sig = (cols[c] for c in ("S0", "T", "K", "r", "d", "vol"))
    call = k >= s0 * np.exp((rr - dd) * t)
    market = np.where(call, bs_price(payoff="call", S0=s0, K=k, T=t, r=rr, d=dd, sigma=sig),
                      bs_price(payoff="put", S0=s0, K=k, T=t, r=rr, d=dd, sigma=sig))
    vega = bs_greeks(payoff="call", S0=s0, K=k, T=t, r=rr, d=dd, sigma=sig).vega
    return _Surface(S0=s0, T=t, K=k, r=rr, d=dd, vol=sig, call=call,
                    price=np.asarray(market, dtype=np.float64),
                    vega=np.maximum(np.asarray(vega, dtype=np.float64), VEGA_FLOOR * s0))


def _sharing_cumulants(process: Process) -> Process:
    """A shallow copy of `process` whose `cumulants` remember their last (theta, result).

    One evaluation needs the cumulants twice on the same float64 theta: for the truncation
    interval and inside the network features (Heston: c1 and sqrt(c2) are features). The closed
    forms are a third of the graph, so sharing them saves about a quarter of every evaluation
    (measured, 88 points: 11 -> 8 ms forward and backward). The shared instance is untouched.
    """
    shared = copy.copy(process)
    compute = process.cumulants
    last: list[tuple[Any, ModuleType, tuple[Any, Any]]] = []

    def cumulants(theta: Any, *, xp: ModuleType) -> tuple[Any, Any]:
        if last and last[0][0] is theta and last[0][1] is xp:
            return last[0][2]
        out = compute(theta, xp=xp)
        last[:] = [(theta, xp, out)]  # holds theta, so `is` cannot match a recycled id
        return out

    shared.cumulants = cumulants  # type: ignore[method-assign]
    return shared

class _Objective:
    """Residuals and their Jacobian in the unit box, one batched graph per evaluation."""

    def __init__(self, spectrum: SpectrumFn, process: Process, truncation_L: float,
                 surface: _Surface, names: tuple[str, ...], lower: np.ndarray,
                 upper: np.ndarray, weights: Weights) -> None:
        self._spectrum = spectrum
        self._process = process
        self._L = truncation_L
        self._n = surface.T.shape[0]
        self._names = names
        t = {c: torch.from_numpy(getattr(surface, c)) for c in ("S0", "T", "K", "r", "d")}
        self._S0, self._T, self._K, self._r = t["S0"], t["T"], t["K"], t["r"]
        self._fixed = {c: t[c] for c in CONTRACT_PARAMS}
        # OTM call = put + S0 e^{-dT} - K e^{-rT} (parity); 0 for the puts
        parity = t["S0"] * torch.exp(-t["d"] * t["T"]) - t["K"] * torch.exp(-t["r"] * t["T"])
        self._parity = torch.where(torch.from_numpy(surface.call), parity,
                                   torch.zeros_like(parity))
        scale = surface.vega if weights == "vega" else surface.S0
        self._inv_scale = torch.from_numpy(1.0 / scale)
        self._target = torch.from_numpy(surface.price / scale)
        self._lower = torch.from_numpy(lower)
        self._width = torch.from_numpy(upper - lower)
        self._prices: dict[bytes, np.ndarray] = {}
        self._graph: tuple[bytes, torch.Tensor, torch.Tensor] | None = None

    def evaluate(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(OTM prices (n,), residuals (n,)) for unit-box parameters rows (n, P), row i the
        parameters of point i; differentiable."""
        params = self._lower + rows * self._width  # (n, P)
        fitted = dict(zip(self._names, params.unbind(dim=1), strict=True))
        theta = torch.stack([self._fixed[p] if p in self._fixed else fitted[p]
                             for p in self._process.names], dim=1)  # (n, P_all)
        a, b = self._process.truncation_interval(theta, L=self._L, xp=torch)
        F = self._spectrum(theta)  # (n, N) complex128
        put = cos.put(F, a, b, S0=self._S0, K=self._K, r=self._r, T=self._T)
        price = put + self._parity
        return price, price * self._inv_scale - self._target

    def residuals(self, x: np.ndarray) -> np.ndarray:
        key = x.tobytes()
        copies = torch.from_numpy(np.array(x, dtype=np.float64)).expand(
            self._n, len(self._names)).clone().requires_grad_(True)  # (n, P) leaf
        with torch.enable_grad():
            price, res = self.evaluate(copies)
        self._graph = (key, copies, res)
        self._prices[key] = price.detach().numpy().copy()
        return res.detach().numpy().copy()

    def jacobian(self, x: np.ndarray) -> np.ndarray:
        if self._graph is None or self._graph[0] != x.tobytes():
            self.residuals(x)
        assert self._graph is not None
        _, copies, res = self._graph
        self._graph = None
        (grad,) = torch.autograd.grad(res.sum(), copies)  # (n, P): row i is d res_i / dx
        return grad.numpy().copy()

    def prices_at(self, x: np.ndarray) -> np.ndarray:
        key = x.tobytes()
        if key not in self._prices:
            self.residuals(x)
        return self._prices[key]


def _result(surface: _Surface, names: tuple[str, ...], params: np.ndarray,
            start: dict[str, float], model: np.ndarray, fit: Any,
            weights: Weights) -> CalibrationResult:
    vols = np.full(model.shape, math.nan)
    reasons: list[str | None] = [None] * model.shape[0]
    sides: tuple[tuple[Kind, np.ndarray], ...] = (("call", surface.call), ("put", ~surface.call))
    for kind, mask in sides:
        if mask.any():
            v, why = implied_vol(model[mask], S0=surface.S0[mask], K=surface.K[mask],
                                 T=surface.T[mask], r=surface.r[mask], d=surface.d[mask],
                                 kind=kind)
            vols[mask] = v
            for i, w in zip(np.flatnonzero(mask), why, strict=True):
                reasons[int(i)] = w
    err = (vols - surface.vol) * 1e4
    ok = np.isfinite(err)
    rmse = float(np.sqrt(np.mean(err[ok] ** 2))) if ok.any() else math.nan
    active = np.asarray(fit.active_mask)
    return CalibrationResult(
        params={p: float(v) for p, v in zip(names, params, strict=True)},
        start=start,
        rmse_volbp=rmse,
        residuals_volbp=err,
        model_vol=vols,
        model_price=model,
        market_price=surface.price,
        kind=tuple("call" if c else "put" for c in surface.call),
        failures=tuple((i, w) for i, w in enumerate(reasons) if w is not None),
        cost=float(fit.cost),
        nfev=int(fit.nfev),
        njev=int(fit.njev),
        converged=bool(fit.status > 0),
        status=int(fit.status),
        message=str(fit.message),
        hit_bounds=tuple(p for p, m in zip(names, active, strict=True) if m != 0),
        weights=weights,
    )
