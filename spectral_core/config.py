"""Frozen configuration objects shared by every numerical component.

One `CoreConfig` is built once (from settings, a CLI or a checkpoint) and handed to every module.
It is JSON-round-trippable so a checkpoint can carry it, and its `fingerprint()` names it.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PARAM_NAMES: tuple[str, ...] = ("T", "r", "d", "sigma")


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


class DomainConfig(_Frozen):
    """Training domain of the GBM parameters theta = (T, r, d, sigma). Every field is bounded."""

    T: Bounds = Bounds(lower=0.02, upper=5.0)
    r: Bounds = Bounds(lower=-0.02, upper=0.10)
    d: Bounds = Bounds(lower=0.0, upper=0.08)
    sigma: Bounds = Bounds(lower=0.05, upper=1.0)

    @model_validator(mode="after")
    def _check(self) -> DomainConfig:
        if self.T.lower <= 0.0:
            raise ValueError(f"T.lower must be > 0, got {self.T.lower}")
        if self.sigma.lower <= 0.0:
            raise ValueError(f"sigma.lower must be > 0, got {self.sigma.lower}")
        return self

    def lower(self) -> tuple[float, ...]:
        return tuple(getattr(self, n).lower for n in PARAM_NAMES)

    def upper(self) -> tuple[float, ...]:
        return tuple(getattr(self, n).upper for n in PARAM_NAMES)


class SimConfig(_Frozen):
    """Monte-Carlo settings for one training batch."""

    # QMC with a fresh scramble per draw: 256 paths a contract give CF noise well under what the
    # network resolves, and more optimiser steps per second beat more paths (bench/accuracy.py).
    paths_per_contract: int = Field(default=256, ge=2)
    timesteps: int = Field(default=1, ge=1, le=4096)
    scheme: Literal["log_euler", "euler"] = "log_euler"
    moment_matching: bool = False
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


class TrainConfig(_Frozen):
    batch_contracts: int = Field(default=256, ge=1)
    validation_contracts: int = Field(default=512, ge=1)
    validation_every: int = Field(default=200, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0)


class MemoryConfig(_Frozen):
    """Hard caps, in bytes, for every component that allocates simulation buffers."""

    normals_bytes: int = Field(default=512 * 2**20, ge=1)
    paths_bytes: int = Field(default=512 * 2**20, ge=1)
    spectrum_bytes: int = Field(default=256 * 2**20, ge=1)
    batch_bytes: int = Field(default=256 * 2**20, ge=1)


class CoreConfig(_Frozen):
    domain: DomainConfig = DomainConfig()
    sim: SimConfig = SimConfig()
    spectrum: SpectrumConfig = SpectrumConfig()
    arch: ArchConfig = ArchConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    memory: MemoryConfig = MemoryConfig()
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON without the device (it does not change the model)."""
        body = self.model_dump(mode="json")
        body.pop("device")
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
