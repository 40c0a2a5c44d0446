"""Frozen configuration objects shared by every numerical component.

One `CoreConfig` is built once (from settings, a CLI or a checkpoint) and handed to every module.
It is JSON-round-trippable so a checkpoint can carry it, and its `fingerprint()` names it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spectral_core.processes.domains import (
    DOMAINS,
    BatesDomain,
    Bounds,
    Domain,
    GbmDomain,
    HestonDomain,
)

ProcessName = Literal["gbm", "heston", "bates"]
PROCESS_NAMES: tuple[str, ...] = ("gbm", "heston", "bates")
# theta columns of GBM, the process every config had before the process library
PARAM_NAMES: tuple[str, ...] = GbmDomain.names
# The GBM domain keeps its historical name.
DomainConfig = GbmDomain


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SimConfig(_Frozen):
    """Monte-Carlo settings for one training batch."""

    # QMC with a fresh scramble per draw: 256 paths a contract give CF noise well under what the
    # network resolves, and more optimiser steps per second beat more paths (bench/accuracy.py).
    paths_per_contract: int = Field(default=256, ge=2)
    # GBM's log_euler step is exact in law, so one step; the Heston and Bates default
    # (HESTON_TIMESTEPS) is set by CoreConfig when the table leaves it out.
    timesteps: int = Field(default=1, ge=1, le=4096)
    # gbm: log_euler | euler; heston and bates: qe (Andersen's quadratic-exponential variance)
    scheme: Literal["log_euler", "euler", "qe"] = "log_euler"
    moment_matching: bool = False
    # qe only: Andersen's martingale correction of the log-price drift
    martingale_correction: bool = True
    # heston and bates: "conditional" (Rao-Blackwellised: the CF of x given each variance path,
    # averaged) or "binned" (x sampled from that conditional law, binned and FFT'd like GBM)
    label: Literal["conditional", "binned"] = "conditional"
    normals: Literal["qmc", "philox"] = "qmc"
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SimConfig:
        m = self.paths_per_contract
        if self.normals == "qmc" and m & (m - 1):
            raise ValueError(f"paths_per_contract must be a power of two for QMC, got {m}")
        return self


class SpectrumConfig(_Frozen):
    """Spectral representation: N frequencies, FFT grid G, truncation half-width L std devs."""

    n_freq: int = Field(default=64, ge=4, le=4096)
    grid: int = Field(default=1024, ge=8)
    truncation_L: float = Field(default=10.0, gt=0.0, le=50.0)

    @model_validator(mode="after")
    def _check(self) -> SpectrumConfig:
        if self.grid < 2 * self.n_freq:
            raise ValueError(f"grid must be >= 2 * n_freq ({2 * self.n_freq}), got {self.grid}")
        return self


class ArchConfig(_Frozen):
    """CVNN architecture."""

    width: int = Field(default=64, ge=1)
    depth: int = Field(default=2, ge=0)
    activation: Literal["modrelu", "zrelu", "crelu", "cardioid"] = "modrelu"
    norm: Literal["none", "layer", "batch"] = "layer"
    residual: bool = True
    seed: int = Field(default=0, ge=0)


class OptimConfig(_Frozen):
    """Optimiser and learning-rate schedule; schedules are pure functions of the step."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=3e-2, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    schedule: Literal["constant", "warmup_cosine", "plateau"] = "warmup_cosine"
    warmup_steps: int = Field(default=200, ge=0)
    # A short, complete anneal measured best on bench.accuracy: lr 3e-2 held over ~15k steps
    # (600 s on 2 cores) diverged and needed the guard, 3k steps (~2 min) did not.
    total_steps: int = Field(default=3000, ge=1)
    min_lr: float = Field(default=1e-6, ge=0.0)
    # warmup_cosine warm restarts: after the first anneal, cycle i = 1..restart_cycles lasts
    # total_steps * restart_growth^i steps and restarts at lr * restart_decay^i; then flat at
    # min_lr. Measured (same seed, fixed steps): without restarts the steps after the first anneal
    # change almost nothing (0.402 bp at 3k, 0.390 at 10k; 1% quantile error 9.5e-4); one 5k-step
    # cycle from 3e-3 gave 0.248 bp and 7.2e-4 at 10k; a third cycle from 3e-4 made it worse
    # (1.06 bp, 2.9e-3 at 16.4k), hence one restart.
    restart_cycles: int = Field(default=1, ge=0)
    restart_decay: float = Field(default=0.1, gt=0.0, lt=1.0)
    restart_growth: float = Field(default=5.0 / 3.0, ge=1.0)
    plateau_patience: int = Field(default=5, ge=1)
    plateau_factor: float = Field(default=0.5, gt=0.0, lt=1.0)
    grad_clip: float | None = Field(default=1.0, gt=0.0)
    # Iterate averaging (torch.optim.swa_utils.AveragedModel): "ema" keeps an exponential moving
    # average of the weights from step `averaging_start` (None: the end of the first anneal,
    # total_steps) with decay `ema_decay` per step; the average is what is served and assessed,
    # the raw weights keep training. "none" leaves these keys out of the config's JSON, so older
    # fingerprints stay valid.
    averaging: Literal["none", "ema"] = "none"
    ema_decay: float = Field(default=0.999, gt=0.0, lt=1.0)
    averaging_start: int | None = Field(default=None, ge=0)

    def averaging_from(self) -> int:
        return self.total_steps if self.averaging_start is None else self.averaging_start


_AVERAGING_KEYS = ("averaging", "ema_decay", "averaging_start")


class TrainConfig(_Frozen):
    batch_contracts: int = Field(default=256, ge=1)
    validation_contracts: int = Field(default=512, ge=1)
    validation_every: int = Field(default=200, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0)
    # The training loop's decisions (Trainer.validate). Keys at these defaults are left out of
    # the config's JSON (older fingerprints stay valid); any other value is in the fingerprint.
    # The validation set uses its own Sobol scramble (seed + offset): no training contract in it.
    validation_seed_offset: int = Field(default=1_000_003, ge=1)
    # Strikes (as multiples of the forward) at which validation prices are checked.
    validation_moneyness: tuple[float, ...] = Field(default=(0.7, 0.85, 1.0, 1.15, 1.3),
                                                    min_length=1)
    # A validation counts as an improvement (early stopping) only if it beats the best by this.
    early_stop_min_rel_improvement: float = Field(default=1e-4, ge=0.0, lt=1.0)
    # Divergence guard: a validation loss this many times the best (or non-finite) rolls the
    # model and optimiser back to the best validation and scales the learning rate by
    # divergence_lr_factor. A large Adam step can push every |F_k| towards 0, where exp
    # underflows and no gradient is left: such a run never recovers.
    divergence_factor: float = Field(default=20.0, gt=1.0)
    divergence_lr_factor: float = Field(default=0.5, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check_moneyness(self) -> TrainConfig:
        if not all(0.0 < m < 10.0 for m in self.validation_moneyness):
            raise ValueError("validation_moneyness must lie in (0, 10)")
        return self


_LOOP_DEFAULTS = {k: TrainConfig.model_fields[k].default for k in (
    "validation_seed_offset", "validation_moneyness", "early_stop_min_rel_improvement",
    "divergence_factor", "divergence_lr_factor")}


class MemoryConfig(_Frozen):
    """Hard caps, in bytes, for every component that allocates simulation buffers."""

    normals_bytes: int = Field(default=512 * 2**20, ge=1)
    paths_bytes: int = Field(default=512 * 2**20, ge=1)
    spectrum_bytes: int = Field(default=256 * 2**20, ge=1)
    batch_bytes: int = Field(default=256 * 2**20, ge=1)


# Keys of the JSON form that a GBM config leaves out: they did not exist before the process
# library and do not apply to GBM, so a GBM config keeps the JSON and fingerprint it always had.
_GBM_OMITTED_SIM = ("martingale_correction", "label")
# Default step count of the QE variance scheme. Measured (bench.mc --process heston), the worst
# put bias over the domain is 9.3 / 3.6 / 1.1 / 0.31 bp of spot at 16 / 32 / 64 / 128 steps; 0.1
# bp would need ~256 steps, 8x the MC time a training step spends now. 32 trades the bias of the
# worst corners (large kappa T) for steps per second; it misses the 0.1 bp target.
HESTON_TIMESTEPS = 32


class CoreConfig(_Frozen):
    process: ProcessName = "gbm"
    domain: GbmDomain | HestonDomain | BatesDomain = GbmDomain()
    sim: SimConfig = SimConfig()
    spectrum: SpectrumConfig = SpectrumConfig()
    arch: ArchConfig = ArchConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    memory: MemoryConfig = MemoryConfig()
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    @model_validator(mode="before")
    @classmethod
    def _process_defaults(cls, data: Any) -> Any:
        """The domain (and, for heston and bates, the scheme and step count) default per process;
        a domain given as a mapping is read as the domain of the named process."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        process = data.get("process", "gbm")
        if process not in DOMAINS:
            return data  # the Literal reports it
        domain_cls = DOMAINS[process]
        domain = data.get("domain")
        if domain is None:
            data["domain"] = domain_cls()
        elif isinstance(domain, dict):
            try:
                data["domain"] = domain_cls.model_validate(domain)
            except ValidationError as exc:  # keep the field path: domain.<param>...
                first = exc.errors()[0]
                where = ".".join(str(p) for p in ("domain", *first["loc"]))
                msg = str(first['msg']).removeprefix('Value error, ')
                raise ValueError(f"{where}: {msg} ({process} domain)") from None
        if process != "gbm":
            sim = data.get("sim")
            defaults = {"scheme": "qe", "timesteps": HESTON_TIMESTEPS}
            if sim is None or isinstance(sim, dict):
                data["sim"] = {**defaults, **(sim or {})}
            elif isinstance(sim, SimConfig):  # only the fields the caller did not set
                data["sim"] = sim.model_copy(update={
                    k: v for k, v in defaults.items() if k not in sim.model_fields_set
                })
        return data

    @model_validator(mode="after")
    def _check_process(self) -> CoreConfig:
        if type(self.domain) is not DOMAINS[self.process]:
            raise ValueError(
                f"domain has the parameters {list(self.domain.names)}, process {self.process!r} "
                f"needs {list(DOMAINS[self.process].names)}"
            )
        if self.process == "gbm":
            if self.sim.scheme == "qe":
                raise ValueError("sim.scheme 'qe' is a Heston/Bates scheme; gbm takes "
                                 "'log_euler' or 'euler'")
            defaults = SimConfig()
            for key in _GBM_OMITTED_SIM:
                if getattr(self.sim, key) != getattr(defaults, key):
                    raise ValueError(f"sim.{key} applies to heston and bates only")
        else:
            if self.sim.scheme != "qe":
                raise ValueError(f"sim.scheme must be 'qe' for {self.process}, got "
                                 f"{self.sim.scheme!r}")
            if self.sim.moment_matching:
                raise ValueError(f"sim.moment_matching applies to gbm only (use "
                                 f"sim.martingale_correction for {self.process})")
        return self

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in checkpoints; a GBM config leaves out the keys it never had."""
        body = self.model_dump(mode="json")
        if self.optim.averaging == "none":
            for key in _AVERAGING_KEYS:
                body["optim"].pop(key)
        for key, default in _LOOP_DEFAULTS.items():
            if getattr(self.train, key) == default:
                body["train"].pop(key)
        if self.process == "gbm":
            body.pop("process")
            for key in _GBM_OMITTED_SIM:
                body["sim"].pop(key)
        return body

    def canonical_json(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON without the device (it does not change the model)."""
        body = self.to_json()
        body.pop("device")
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


__all__ = [
    "PARAM_NAMES",
    "PROCESS_NAMES",
    "ArchConfig",
    "BatesDomain",
    "Bounds",
    "CoreConfig",
    "Domain",
    "DomainConfig",
    "GbmDomain",
    "HestonDomain",
    "MemoryConfig",
    "OptimConfig",
    "SimConfig",
    "SpectrumConfig",
    "TrainConfig",
]
