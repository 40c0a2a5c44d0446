"""Parameter domains of the processes: one frozen pydantic model per process, every field bounded.

A domain is the box the network is trained on and the box the pricer accepts. Its field order is
the column order of theta for that process (the MC kernels, the sampler and the network all use
it). The JSON of a domain is {name: {"lower", "upper"}}, so a GBM config written before the
process library existed reads back unchanged.
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Bounds(_Frozen):
    """A closed interval [lower, upper] with lower < upper, both finite."""

    lower: float
    upper: float

    @model_validator(mode="after")
    def _check(self) -> Bounds:
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)):
            raise ValueError(f"bounds must be finite, got [{self.lower}, {self.upper}]")
        if not self.lower < self.upper:
            raise ValueError(f"lower must be < upper, got [{self.lower}, {self.upper}]")
        return self


def _b(lower: float, upper: float) -> Bounds:
    return Bounds(lower=lower, upper=upper)


class Domain(_Frozen):
    """Base of the per-process domains: `names` is the theta column order."""

    names: ClassVar[tuple[str, ...]] = ()
    # field -> (smallest allowed lower bound, largest allowed upper bound, strict lower?)
    _limits: ClassVar[dict[str, tuple[float, float, bool]]] = {}

    @model_validator(mode="after")
    def _check_limits(self) -> Domain:
        for name, (lo, hi, strict) in self._limits.items():
            bounds: Bounds = getattr(self, name)
            if bounds.lower < lo or (strict and bounds.lower == lo):
                rule = ">" if strict else ">="
                raise ValueError(f"{name}.lower must be {rule} {lo}, got {bounds.lower}")
            if bounds.upper > hi:
                raise ValueError(f"{name}.upper must be <= {hi}, got {bounds.upper}")
        return self

    def bounds(self, name: str) -> Bounds:
        if name not in self.names:
            raise ValueError(f"unknown parameter {name!r}; this domain has {list(self.names)}")
        b: Bounds = getattr(self, name)
        return b

    def lower(self) -> tuple[float, ...]:
        return tuple(getattr(self, n).lower for n in self.names)

    def upper(self) -> tuple[float, ...]:
        return tuple(getattr(self, n).upper for n in self.names)


class GbmDomain(Domain):
    """Training domain of the GBM parameters theta = (T, r, d, sigma). Every field is bounded."""

    names: ClassVar[tuple[str, ...]] = ("T", "r", "d", "sigma")
    _limits: ClassVar[dict[str, tuple[float, float, bool]]] = {
        "T": (0.0, math.inf, True),
        "sigma": (0.0, math.inf, True),
    }

    T: Bounds = _b(0.02, 5.0)
    r: Bounds = _b(-0.02, 0.10)
    d: Bounds = _b(0.0, 0.08)
    sigma: Bounds = _b(0.05, 1.0)


class HestonDomain(Domain):
    """Heston theta = (T, r, d, v0, kappa, theta_v, xi, rho): xi is the vol of variance.

    The Feller condition 2 kappa theta_v >= xi^2 is not required: the QE scheme stays valid
    without it, and calibrated parameters often violate it.
    """

    names: ClassVar[tuple[str, ...]] = ("T", "r", "d", "v0", "kappa", "theta_v", "xi", "rho")
    _limits: ClassVar[dict[str, tuple[float, float, bool]]] = {
        "T": (0.0, math.inf, True),
        "v0": (0.0, math.inf, True),
        "kappa": (0.0, math.inf, True),
        "theta_v": (0.0, math.inf, True),
        "xi": (0.0, math.inf, True),
        "rho": (-1.0, 1.0, True),
    }

    T: Bounds = _b(0.05, 3.0)
    r: Bounds = _b(-0.02, 0.10)
    d: Bounds = _b(0.0, 0.08)
    v0: Bounds = _b(0.005, 0.5)
    kappa: Bounds = _b(0.2, 5.0)
    theta_v: Bounds = _b(0.005, 0.5)
    xi: Bounds = _b(0.1, 1.0)
    rho: Bounds = _b(-0.95, 0.2)


class BatesDomain(Domain):
    """Bates = Heston plus compound-Poisson lognormal jumps: intensity lam (per year), log-jump
    size N(mu_j, sigma_j^2), compensated in the drift."""

    names: ClassVar[tuple[str, ...]] = (*HestonDomain.names, "lam", "mu_j", "sigma_j")
    _limits: ClassVar[dict[str, tuple[float, float, bool]]] = {
        **HestonDomain._limits,
        "lam": (0.0, math.inf, False),
        "sigma_j": (0.0, math.inf, True),
    }

    T: Bounds = _b(0.05, 3.0)
    r: Bounds = _b(-0.02, 0.10)
    d: Bounds = _b(0.0, 0.08)
    v0: Bounds = _b(0.005, 0.5)
    kappa: Bounds = _b(0.2, 5.0)
    theta_v: Bounds = _b(0.005, 0.5)
    xi: Bounds = _b(0.1, 1.0)
    rho: Bounds = _b(-0.95, 0.2)
    lam: Bounds = _b(0.0, 1.0)
    mu_j: Bounds = _b(-0.3, 0.1)
    sigma_j: Bounds = _b(0.01, 0.3)


DOMAINS: dict[str, type[Domain]] = {"gbm": GbmDomain, "heston": HestonDomain, "bates": BatesDomain}
