"""Scenario sampling (`POST /v1/scenarios`): n draws of S_T for one contract from the served
model's learned distribution, by inverse CDF through COS (spectral_core/scenarios.py).

The same contract, n, seed and model version give the same bytes. n is capped by
`[server] max_scenario_samples`; one sampling runs at a time off the event loop, and a request
that finds more than `_MAX_WAITING` others waiting is refused with 503 + Retry-After.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.errors import FieldError, RequestInvalid
from server.model import ModelService, SerialGate
from server.valuation import (
    BookModel,
    ModelName,
    ProcessParams,
    Version,
    domain_invalid,
    param_errors,
)
from spectral_core.pricer import Contracts, DomainError
from spectral_core.scenarios import sample_terminal
from storage.marketdata import Finite, PositiveFinite

_MAX_WAITING = 4
MAX_SEED = 2**63 - 1


class ScenarioContract(ProcessParams):
    """X0, T, r, d and exactly the model's process parameters (as a /v1/price contract, no K)."""

    X0: PositiveFinite
    T: Finite
    r: Finite
    d: Finite


class ScenarioRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    contract: ScenarioContract
    n: int = Field(ge=1)
    seed: int = Field(ge=0, le=MAX_SEED)
    model: ModelName | None = None  # default: [server] default_model
    model_version: Version | None = None


class ScenarioSampler:
    """Bounded, one-at-a-time sampling on a worker thread."""

    def __init__(self, model: ModelService, *, max_samples: int,
                 spec: BookModel | None = None) -> None:
        self.model = model
        self.max_samples = max_samples
        self.spec = spec or BookModel()  # the model's name, process and contract fields
        self._gate = SerialGate("scenario samplings", max_waiting=_MAX_WAITING)

    def check(self, req: ScenarioRequest) -> None:
        if req.n > self.max_samples:
            raise RequestInvalid(
                [FieldError("n", f"n = {req.n} is above the limit of {self.max_samples} samples "
                                 "(server.max_scenario_samples)")],
                "too many samples",
            )
        spec = self.spec
        errors = param_errors(req.contract, spec.fields, path="contract", model=spec.name,
                              process=spec.process)
        if errors:
            raise RequestInvalid(errors, f"the contract does not fit model {spec.name!r}")

    async def sample(self, req: ScenarioRequest) -> dict[str, Any]:
        self.check(req)
        c = req.contract
        # K is not used by S_T's law; the contract's own spot stands in for the domain check
        fields = self.spec.fields
        contract = Contracts(**{f: [c.X0 if f == "K" else getattr(c, f)] for f in fields})
        loaded, info = await self.model.resolve(req.model_version)
        try:
            samples = await self._gate.run(sample_terminal, loaded.value, contract, n=req.n,
                                           seed=req.seed)
        except DomainError as exc:
            raise domain_invalid(exc, path=f"contract.{exc.field}") from None
        inputs = {name: getattr(c, name) for name in fields if name != "K"}
        return {
            "model": {"name": self.spec.name, **info.as_json()},
            "contract": inputs,
            "n": req.n,
            "seed": req.seed,
            "samples": samples,
        }
