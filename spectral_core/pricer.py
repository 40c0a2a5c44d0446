"""Batched inference: contracts (X0, K, T, r, d, v) -> spectra -> prices, greeks, metrics.

One forward pass of the network gives F_k(theta) for a contract's (T, r, d, sigma); every payoff,
strike, moment and quantile then comes from the COS sums in `cos.py`. Greeks are autograd
derivatives through the network and the COS sum. Contracts outside the trained domain are refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from spectral_core import cos
from spectral_core.config import PARAM_NAMES, CoreConfig
from spectral_core.cvnn import SpectralCVNN, build_model
from spectral_core.fastnet import FastSpectralNet, cos_put_digital
from spectral_core.processes import get_process
from spectral_core.processes.base import Process
from spectral_core.snapshot import Snapshot, served_weights

# The contract fields of a GBM model; other processes: ("X0", "K", *process.request_fields).
CONTRACT_FIELDS: tuple[str, ...] = ("X0", "K", "T", "r", "d", "v")
QUANTILE_LEVELS: tuple[float, ...] = (0.01, 0.05, 0.5, 0.95, 0.99)
RISK_LEVELS: tuple[float, ...] = (0.95, 0.99)
# A GBM model's greeks; other processes: Pricer.greek_names.
GREEKS: tuple[str, ...] = ("delta", "gamma", "vega", "theta", "rho")
# Greeks of every process: d/dX0, d2/dX0^2, -d/dT, d/dr; model_greeks come on top.
_COMMON_GREEKS = {"delta": "X0", "theta": "T", "rho": "r"}
# Price columns of every `price` call: put, call, their intrinsic and convexity, the forward,
# both digitals, the discount and forward intermediates.
_PRICE_COLUMNS = 11


class DomainError(ValueError):
    """A contract lies outside the model's trained domain (or is not a valid contract)."""

    def __init__(self, field: str, index: int, value: float, lower: float, upper: float | None):
        self.field, self.index, self.value, self.lower, self.upper = (
            field,
            index,
            value,
            lower,
            upper,
        )
        where = f"[{lower}, {upper}]" if upper is not None else f"> {lower}"
        super().__init__(
            f"contracts[{index}].{field} = {value!r} is outside the trained domain {where}"
        )


# Odd 64-bit multipliers of the row hash in unique_rows (any distinct odd constants will do).
_ROW_HASH = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53,
                      0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)


def unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, inverse) of the distinct rows of x (B, P) float64: x[first][inverse] == x, rows
    compared bit for bit (0.0 and -0.0 are different rows, and so are two NaNs of different
    payloads).

    The rows' 64-bit words are hashed into one word per row and those are deduplicated (a 1-D
    sort, ~3x faster than sorting whole rows); the result is then checked word for word, and a
    hash collision (two different rows, one word) falls back to the exact sort of the rows."""
    if x.ndim != 2:
        raise ValueError(f"x must be (B, P), got shape {x.shape}")
    rows = np.ascontiguousarray(x, dtype=np.float64)
    words = rows.view(np.uint64)  # (B, P)
    if rows.shape[1] <= _ROW_HASH.shape[0]:
        with np.errstate(over="ignore"):
            h = (words * _ROW_HASH[: rows.shape[1]]).sum(axis=1, dtype=np.uint64)
        _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        inverse = inverse.ravel()
        if np.array_equal(words[first][inverse], words):
            return first, inverse
    as_bytes = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    return first, inverse.ravel()


def contract_fields(process: Process) -> tuple[str, ...]:
    """The contract columns `process` prices: X0, K and its request fields."""
    return ("X0", "K", *process.request_fields)


def greek_names(process: Process) -> tuple[str, ...]:
    """The greeks a `price(greeks=True)` call returns for `process`, in their order."""
    return ("delta", "gamma", *process.model_greeks, "theta", "rho")


class Contracts:
    """A batch of contracts: spot X0, strike K and the process parameters (request names, e.g.
    GBM's (T, r, d, v)), each a float64 array of one shape (B,)."""

    def __init__(self, **columns: object) -> None:
        lengths = set()
        for name, values in columns.items():
            arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
            if arr.ndim != 1:
                raise ValueError(
                    f"contract field {name!r} must be one-dimensional, got {arr.shape}"
                )
            lengths.add(arr.shape[0])
            object.__setattr__(self, name, arr)  # vars(self) is exactly the columns
        if len(lengths) > 1:
            raise ValueError(f"contract fields have different lengths: {sorted(lengths)}")

    @classmethod
    def from_columns(
        cls, cols: Mapping[str, object], *, fields: tuple[str, ...] = CONTRACT_FIELDS
    ) -> Contracts:
        """The `fields` of `cols` (GBM's by default); a missing one raises ValueError."""
        for name in fields:
            if name not in cols:
                raise ValueError(f"missing contract field {name!r}")
        return cls(**{name: cols[name] for name in fields})

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(vars(self))

    def __getattr__(self, name: str) -> np.ndarray:
        # only called for a field the batch does not have
        raise AttributeError(f"contracts have no field {name!r}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Contracts are immutable")

    def __len__(self) -> int:
        return int(next(iter(vars(self).values())).shape[0]) if vars(self) else 0


class Pricer:
    """Prices contracts from a trained SpectralCVNN.

    Without greeks, CPU pricing runs on `FastSpectralNet` (float32 real-block copy of the
    network, numba COS pass); greeks take autograd through the torch module.
    `reproducible=True` makes every price independent of what else is in the batch (GEMM
    blocking changes the last bits with batch size), so the same request gives the same bytes
    however requests are micro-batched: the fast copy then runs its fixed-order per-row kernel,
    and greeks evaluate the module one contract at a time in complex128.
    """

    def __init__(
        self,
        model: SpectralCVNN,
        config: CoreConfig,
        *,
        device: str | torch.device = "cpu",
        reproducible: bool = False,
    ) -> None:
        self.config = config
        self.process: Process = get_process(config.process)
        self.contract_fields: tuple[str, ...] = contract_fields(self.process)
        # request field -> domain parameter it is checked against (GBM: v -> sigma)
        self._domain_field = dict(zip(self.process.request_fields, self.process.names,
                                      strict=True))
        self.greek_names: tuple[str, ...] = greek_names(self.process)
        # (request field, lower, upper) of each field checked against the trained domain
        self._bounds: tuple[tuple[str, float, float], ...] = tuple(
            (name, config.domain.bounds(param).lower, config.domain.bounds(param).upper)
            for name, param in self._domain_field.items()
        )
        self.device = torch.device(device)
        self.reproducible = reproducible
        dtype = torch.complex128 if reproducible else torch.complex64
        self.model = model.to(self.device).to(dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._feature_dtype = torch.float64 if reproducible else torch.float32
        # Pricing without greeks needs no autograd: on the CPU it runs on FastSpectralNet
        # (float32 GEMMs; the float64 fixed-order per-row kernel when reproducible).
        fast = isinstance(model, SpectralCVNN) and self.device.type == "cpu"
        self._fast = FastSpectralNet(self.model) if fast else None

    @classmethod
    def from_snapshot(
        cls,
        snapshot: Snapshot,
        *,
        device: str | torch.device = "cpu",
        reproducible: bool = False,
        process: str | None = None,
    ) -> Pricer:
        """The pricer of a trained snapshot; `process` names the process the caller expects
        (a snapshot of another one raises ProcessMismatch)."""
        config = CoreConfig.model_validate(snapshot.meta["config"])
        if process is not None:
            get_process(process).check_config(config)
        model = build_model(
            config.arch,
            n_freq=config.spectrum.n_freq,
            dtype=torch.complex64,
            truncation_L=config.spectrum.truncation_L,
            n_features=get_process(config.process).n_features,
        )
        # the averaged weights when the trainer averages (OptimConfig.averaging), else the raw
        model.load_state_dict(served_weights(snapshot), strict=True)
        return cls(model, config, device=device, reproducible=reproducible)

    def warm_up(self) -> None:
        """Price one contract at the centre of the domain, so numba compiles (or loads from its
        cache) the kernels here rather than inside the first request."""
        dom = self.config.domain
        mid = {
            n: 0.5 * (dom.bounds(p).lower + dom.bounds(p).upper)
            for n, p in self._domain_field.items()
        }
        self.price(Contracts.from_columns({"X0": 100.0, "K": 100.0, **mid},
                                          fields=self.contract_fields))

    def row_bytes(self, *, greeks: bool = False, metrics: bool = False) -> int:
        """Bytes one contract row occupies in a `price` call: its float64 inputs, features and
        spectrum, the output columns, and (on request) the complex spectrum of the metrics and
        the greek columns. A serving queue sizes its in-flight bound with it."""
        n_freq = self.config.spectrum.n_freq
        floats = len(self.contract_fields) + self.process.n_features + n_freq + _PRICE_COLUMNS
        if metrics:
            floats += 2 * n_freq + 8
        if greeks:
            floats += 2 * len(self.greek_names) + 2 * n_freq
        return 8 * floats

    # ------------------------------------------------------------------ checks
    def check_domain(self, c: Contracts) -> None:
        """Raise DomainError naming the first contract field outside the trained domain."""
        for name in ("X0", "K"):
            arr = getattr(c, name)
            ok = np.isfinite(arr) & (arr > 0)
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise DomainError(name, i, float(arr[i]), 0.0, None)
        for name, lower, upper in self._bounds:
            arr = getattr(c, name)
            ok = (arr >= lower) & (arr <= upper)  # NaN fails both
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise DomainError(name, i, float(arr[i]), lower, upper)

    # ------------------------------------------------------------------ network
    def spectrum(self, theta: torch.Tensor) -> torch.Tensor:
        """F_k for theta (B, P) (the domain's order) -> (B, N) complex128, differentiable in
        theta."""
        features = self.process.features(theta.to(self._feature_dtype), self.config.domain)
        if self.reproducible:
            rows = [self.model(features[i : i + 1]) for i in range(features.shape[0])]
            F = torch.cat(rows) if rows else self.model(features)
        else:
            F = self.model(features)
        return F.to(torch.complex128)

    def _fast_put_digital(
        self, theta_u: torch.Tensor, inverse: np.ndarray, a: torch.Tensor, b: torch.Tensor,
        c: Contracts, *, spectrum: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(F if `spectrum`, put, digital call) through FastSpectralNet for the distinct rows
        theta_u of the batch (row i is theta_u[inverse[i]]); F has a zero imaginary part, which
        no COS sum reads."""
        assert self._fast is not None
        features = self.process.features(theta_u, self.config.domain)
        re_f = self._fast.re_spectrum(features, reproducible=self.reproducible)[inverse]
        put, digital = cos_put_digital(re_f, a=a.numpy(), b=b.numpy(), S0=c.X0, K=c.K, r=c.r, T=c.T)
        re = torch.from_numpy(re_f)
        return (
            torch.complex(re, torch.zeros_like(re)) if spectrum else None,
            torch.from_numpy(put),
            torch.from_numpy(digital),
        )

    # ------------------------------------------------------------------ pricing
    def price(
        self,
        contracts: Contracts,
        *,
        greeks: bool = False,
        metrics: bool = False,
        digitals: bool = True,
        checked: bool = False,
    ) -> dict[str, np.ndarray]:
        """Put/call prices, intrinsic and convexity; greeks and distribution metrics on request.

        intrinsic = e^{-rT} max(K - F, 0) (put) and e^{-rT} max(F - K, 0) (call) with F the forward;
        convexity = price - intrinsic (>= 0 for an arbitrage-free model).

        Contracts outside the trained domain raise DomainError (`check_domain`); `checked=True`
        says the caller has run `check_domain` on them already (a serving queue checks each
        request before it batches them), and it is not run twice.
        """
        missing = [n for n in self.contract_fields if n not in contracts.fields]
        if missing:
            raise ValueError(f"missing contract field {missing[0]!r} for a {self.process.name} "
                             f"model (fields {list(self.contract_fields)})")
        if not checked:
            self.check_domain(contracts)
        dev = self.device
        col = {
            n: torch.as_tensor(getattr(contracts, n), dtype=torch.float64, device=dev)
            for n in self.contract_fields
        }
        wrt = {**_COMMON_GREEKS, **self.process.model_greeks}
        if greeks:
            for n in set(wrt.values()):
                col[n].requires_grad_(True)
        X0, K, T, r, d = (col[n] for n in ("X0", "K", "T", "r", "d"))
        with torch.set_grad_enabled(greeks):
            theta = torch.stack([col[n] for n in self.process.request_fields], dim=-1)
            fast = not greeks and self._fast is not None
            if fast:
                # The network and the interval see theta only (not S0 or K): a book's options
                # on one expiry, or a scenario that moves only the spot, share a row, and both
                # run once per distinct row. Rows are matched bit for bit and every step is per
                # row, so each price is the one the undeduplicated batch gives (tested).
                first, inverse = unique_rows(theta.numpy())
                theta_u = theta[torch.from_numpy(first)]
                a_u, b_u = self.process.truncation_interval(
                    theta_u, L=self.config.spectrum.truncation_L, xp=torch)
                index = torch.from_numpy(inverse)
                a, b = a_u[index], b_u[index]
            else:
                a, b = self.process.truncation_interval(
                    theta, L=self.config.spectrum.truncation_L, xp=torch
                )
            disc = torch.exp(-r * T)
            fwd = X0 * torch.exp((r - d) * T)
            F: torch.Tensor | None
            if not fast:
                F = self.spectrum(theta)
                put = cos.put(F, a, b, S0=X0, K=K, r=r, T=T)
                digital_call = cos.digital_call(F, a, b, S0=X0, K=K, r=r, T=T) if digitals else None
            else:
                # no autograd needed: Re F from the fused network, put and digital in one pass
                F, put, digital_call = self._fast_put_digital(
                    theta_u, inverse, a, b, contracts, spectrum=metrics
                )
                digital_call = digital_call if digitals else None
            call = cos.call_from_put(put, S0=X0, K=K, r=r, T=T, d=d)  # the put is priced once
            out: dict[str, torch.Tensor] = {
                "put": put,
                "call": call,
                "put_intrinsic": disc * torch.clamp(K - fwd, min=0.0),
                "call_intrinsic": disc * torch.clamp(fwd - K, min=0.0),
                "forward": fwd,
            }
            if digital_call is not None:
                out["digital_call"] = digital_call
                # psi_k(a, x*) + psi_k(x*, b) = psi_k(a, b) = 0 for k >= 1 and F_0 = 1, so the
                # COS digital put is exactly disc - digital call.
                out["digital_put"] = disc - digital_call
            out["put_convexity"] = out["put"] - out["put_intrinsic"]
            out["call_convexity"] = out["call"] - out["call_intrinsic"]
            result: dict[str, np.ndarray] = {}
            if greeks:
                for kind in ("put", "call"):
                    result.update(_greeks(kind, out[kind], col, wrt))
        if metrics:
            assert F is not None
            with torch.no_grad():
                result.update(_metrics(F.detach(), a.detach(), b.detach(), X0.detach(), T.detach()))
        for k, t in out.items():
            result[k] = t.detach().cpu().numpy()
        return result


def _greeks(
    kind: str, price: torch.Tensor, col: dict[str, torch.Tensor], wrt: dict[str, str]
) -> dict[str, np.ndarray]:
    """Autograd greeks; rows are independent so the gradient of the sum is the per-row gradient.

    `wrt` maps each first-order greek to its contract field; gamma is d2/dX0^2 and theta the
    calendar decay, minus the derivative w.r.t. time to expiry (per year).
    """
    names = list(wrt)
    grads = torch.autograd.grad(price.sum(), [col[wrt[n]] for n in names], create_graph=True)
    first = dict(zip(names, grads, strict=True))
    (gamma,) = torch.autograd.grad(first["delta"].sum(), (col["X0"],), retain_graph=True)
    first["theta"] = -first["theta"]
    first["gamma"] = gamma
    order = ("delta", "gamma", *(n for n in names if n not in _COMMON_GREEKS), "theta", "rho")
    return {f"{kind}_{n}": first[n].detach().cpu().numpy() for n in order}


def _metrics(
    F: torch.Tensor, a: torch.Tensor, b: torch.Tensor, X0: torch.Tensor, T: torch.Tensor
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    mx = cos.moments_log_return(F, a, b)
    ms = cos.moments_terminal(F, a, b, S0=X0)
    for name, t in mx.items():
        out[f"x_{name}"] = t.cpu().numpy()
    for name, t in ms.items():
        out[f"ST_{name}"] = t.cpu().numpy()
    for p in QUANTILE_LEVELS:
        q = cos.quantile(F, a, b, S0=X0, p=p)
        out[f"ST_q{round(p * 100):02d}"] = q.cpu().numpy()
    for alpha in RISK_LEVELS:
        out[f"var{round(alpha * 100)}"] = (
            cos.value_at_risk(F, a, b, S0=X0, alpha=alpha).cpu().numpy()
        )
        out[f"es{round(alpha * 100)}"] = (
            cos.expected_shortfall(F, a, b, S0=X0, alpha=alpha).cpu().numpy()
        )
    return out


__all__ = ["CONTRACT_FIELDS", "GREEKS", "PARAM_NAMES", "Contracts", "DomainError", "Pricer"]
