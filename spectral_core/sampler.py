"""Scrambled Sobol' sampler of contract parameters theta over the domain bounds of a process.

theta has one column per domain parameter, in the domain's order (GBM: T, r, d, sigma). The
points are those of `scipy.stats.qmc.Sobol(d=P, scramble=True, bits=64, rng=seed)`, bit-for-bit,
but produced by the random-access Gray-code kernel of `spectral_core.normals`: scipy's own
`fast_forward` is O(skip) and fails for 64-bit engines, and 30 bits would cap a run at 2**30 points.
Random access also means no draw ever trips scipy's power-of-two balance warning.

Resumable: `ContractSampler(domain, seed=s, skip=k)` continues exactly where a sampler with the same
seed that had drawn k points left off, whatever the sizes of the earlier draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spectral_core.normals import scrambled_sobol_tables, sobol_points_uint
from spectral_core.processes.domains import Domain

_STATE_FORMAT = 1
_BITS = 64  # 2**64 points: a long training run never exhausts the sequence
_SCALE = 2.0**-_BITS


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class ContractSampler:
    """Draws contract batches (n, P) float64, columns ordered as `domain.names`."""

    def __init__(self, domain: Domain, *, seed: int, skip: int = 0) -> None:
        if not isinstance(domain, Domain):
            raise ValueError(f"domain must be a process Domain, got {type(domain).__name__}")
        self.domain = domain
        self.seed = _check_int("seed", seed, 0)
        skip = _check_int("skip", skip, 0)
        self._lower = np.array(domain.lower(), dtype=np.float64)  # (P,)
        self._upper = np.array(domain.upper(), dtype=np.float64)  # (P,)
        self._width = self._upper - self._lower  # (P,)
        # default_rng(seed) seeds from SeedSequence(seed): scipy's scramble for rng=seed.
        self._sv, self._shift = scrambled_sobol_tables(dim=len(domain.names),
                                                       seed=np.random.SeedSequence(self.seed))
        self._position = skip

    @property
    def position(self) -> int:
        """Points drawn so far, the initial skip included."""
        return self._position

    def sample(self, n: int) -> np.ndarray:
        """The next n contracts, shape (n, P) float64, each column inside its domain bounds."""
        n = _check_int("n", n, 1)
        if self._position + n > 2**63 - 1:
            raise ValueError(f"n={n} would run past the end of the sequence at {self._position}")
        points = sobol_points_uint(sv=self._sv, shift=self._shift, start=self._position, n=n)
        u = points.astype(np.float64) * _SCALE  # (n, P) in [0, 1], scipy's float mapping
        self._position += n
        # The clip only absorbs a last-ulp overshoot of lower + 1.0 * width.
        return np.clip(self._lower + u * self._width, self._lower, self._upper)  # (n, P)

    def state(self) -> dict[str, Any]:
        """JSON-able state: enough, with the domain, to resume bit-exactly."""
        return {"format": _STATE_FORMAT, "kind": "sobol", "bits": _BITS, "seed": self.seed,
                "position": self.position}

    @classmethod
    def from_state(cls, domain: Domain, state: dict[str, Any]) -> ContractSampler:
        """Rebuild a sampler from `state()`; refuses states of another format or generator."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict, got {type(state).__name__}")
        expected = {"format": _STATE_FORMAT, "kind": "sobol", "bits": _BITS}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"state[{key!r}] must be {value!r}, got {state.get(key)!r}")
        missing = {"seed", "position"} - state.keys()
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        return cls(domain, seed=state["seed"], skip=state["position"])
