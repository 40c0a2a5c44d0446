"""The training loop: Sobol batch -> MC -> spectrum -> loss -> backward -> optimiser.

A `Trainer` owns the model, the optimiser, the contract sampler and the normals stream. Its whole
state is captured by `snapshot()` (tensors + JSON-able metadata) and `restore()` is the inverse:
training N+M steps straight gives bit-identical parameters to N steps, snapshot, restore in a
fresh process, M steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from spectral_core.config import CoreConfig
from spectral_core.cvnn import SpectralCVNN, build_model
from spectral_core.device import array_module, resolve_device, to_torch
from spectral_core.normals import NormalsSource
from spectral_core.processes import get_process
from spectral_core.processes.base import Process
from spectral_core.quality import QualityReport, assess, validation_puts
from spectral_core.sampler import ContractSampler
from spectral_core.schedule import PlateauState, lr_at
from spectral_core.snapshot import RAW_PREFIX, Snapshot

SNAPSHOT_FORMAT = 1
TRAIN_STREAM = 0
VALIDATION_STREAM = 1


@dataclass(frozen=True)
class StepMetrics:
    step: int
    loss: float
    grad_norm: float
    lr: float
    samples_per_s: float
    steps_per_s: float
    truncated_mass: float


@dataclass(frozen=True)
class ValidationMetrics:
    step: int
    val_loss: float
    mean_abs_bp: float
    max_abs_bp: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, float | None]) -> ValidationMetrics:
        """Inverse of as_dict; None (a non-finite value as stored in JSON) reads back as NaN."""
        def value(key: str) -> float:
            v = d[key]
            return math.nan if v is None else float(v)

        return cls(
            step=int(value("step")),
            val_loss=value("val_loss"),
            mean_abs_bp=value("mean_abs_bp"),
            max_abs_bp=value("max_abs_bp"),
        )


def make_optimizer(cfg: CoreConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


class Trainer:
    """Continuous CVNN training on MC estimates of the characteristic function."""

    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.process: Process = get_process(config.process)
        self.device = resolve_device(config.device)
        # numpy on CPU, cupy on CUDA: the MC kernel, binning and FFT run where the model trains.
        self._xp = array_module(self.device)
        self.model: SpectralCVNN = build_model(
            config.arch,
            n_freq=config.spectrum.n_freq,
            dtype=torch.complex64,
            truncation_L=config.spectrum.truncation_L,
            n_features=self.process.n_features,
        ).to(self.device)
        self.optimizer = make_optimizer(config, list(self.model.parameters()))
        # Iterate averaging: an EMA of the weights from OptimConfig.averaging_from(); served and
        # assessed in place of the raw weights once it has begun (n_averaged > 0).
        self.averaged: AveragedModel | None = None
        if config.optim.averaging == "ema":
            self.averaged = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(config.optim.ema_decay)
            )
        self.global_step = 0
        self.plateau = PlateauState()
        self.best_val = math.inf
        self.evals_without_improvement = 0
        self.guard_scale = 1.0
        self.divergences = 0
        self._best: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        self.last_validation: ValidationMetrics | None = None
        self.sampler = ContractSampler(config.domain, seed=config.train.seed)
        self._normals = NormalsSource(
            config.sim.normals,
            timesteps=self.process.normal_dims(config),
            paths_per_contract=config.sim.paths_per_contract,
            contracts_per_draw=config.train.batch_contracts,
            seed=config.sim.seed,
            cap_bytes=config.memory.normals_bytes,
            device="cuda" if self.device.type == "cuda" else "cpu",
        )
        self._stream = self._normals.stream(TRAIN_STREAM)
        self._val_theta, self._val_target = self._build_validation_set()
        # oracle put prices of the validation set: reported error only, never a training input
        self._val_reference = validation_reference(self._val_theta, config)
        self._val_floor_bp: float | None = None

    # ------------------------------------------------------------------ batches
    def _spectrum_targets(self, theta: np.ndarray, z: Any) -> tuple[torch.Tensor, float]:
        """MC estimate of F_k for contracts theta (B, P) from normals z (B, M, dims).

        On CUDA, z is already a device array and the paths, labels and FFT stay on the device;
        the target reaches torch by DLPack (no host copy). Returns (B, N) complex128 on
        self.device and the mean truncated mass.
        """
        on_cuda = self.device.type == "cuda"
        # on CUDA the only upload: theta, 8 bytes a parameter a contract
        theta_d = self._xp.asarray(theta) if on_cuda else theta
        F, truncated = self.process.mc_labels(theta_d, z, self.config, xp=self._xp,
                                              on_cuda=on_cuda)
        return to_torch(F), truncated

    def _build_validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        n = c.train.validation_contracts
        sampler = ContractSampler(c.domain, seed=c.train.seed + c.train.validation_seed_offset)
        theta = sampler.sample(n)
        B = c.train.batch_contracts
        targets = []
        with self._normals.stream(VALIDATION_STREAM) as stream:
            for lo in range(0, n, B):
                z = stream.next()
                chunk = theta[lo : lo + B]
                F, _ = self._spectrum_targets(chunk, z[: len(chunk)])
                targets.append(F)
        target = torch.cat(targets).to(self.device, torch.complex64)
        return torch.from_numpy(theta), target

    # ------------------------------------------------------------------ training
    def _set_lr(self) -> float:
        lr = self.guard_scale * lr_at(
            self.config.optim, self.global_step, plateau_scale=self.plateau.scale
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> StepMetrics:
        c = self.config
        t0 = time.perf_counter()
        theta = self.sampler.sample(c.train.batch_contracts)  # (B, P) float64
        z = self._stream.next()  # (B, M, dims) float64
        F, truncated = self._spectrum_targets(theta, z)
        target = F.to(torch.complex64)
        features = self.process.features(
            torch.from_numpy(theta).to(self.device, torch.float32), c.domain
        )

        self.model.train()
        lr = self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        pred = self.model(features)  # (B, N) complex64
        loss = (pred - target).abs().square().mean()
        loss.backward()
        if c.optim.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack(
                    [
                        torch.linalg.vector_norm(p.grad)
                        for p in self.model.parameters()
                        if p.grad is not None
                    ]
                )
            )
        self.optimizer.step()
        self.global_step += 1
        if self.averaged is not None and self.global_step > c.optim.averaging_from():
            self.averaged.update_parameters(self.model)  # the first call copies

        t1 = time.perf_counter()
        dt = max(t1 - t0, 1e-12)
        return StepMetrics(
            step=self.global_step,
            loss=float(loss.detach()),
            grad_norm=float(grad_norm),
            lr=lr,
            samples_per_s=c.train.batch_contracts * c.sim.paths_per_contract / dt,
            steps_per_s=1.0 / dt,
            truncated_mass=truncated,
        )

    @property
    def should_stop(self) -> bool:
        patience = self.config.train.early_stopping_patience
        return patience is not None and self.evals_without_improvement >= patience

    @property
    def served_model(self) -> torch.nn.Module:
        """The weights a commit serves: the average once averaging has begun, else the raw."""
        if self.averaged is not None and int(self.averaged.n_averaged) > 0:
            return self.averaged.module
        return self.model

    def _validation_prediction(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        """CFs of the validation contracts by `model` (default the raw one; eval, no grad)."""
        model = self.model if model is None else model
        model.eval()
        with torch.no_grad():
            features = self.process.features(self._val_theta.to(self.device, torch.float32),
                                             self.config.domain)
            return model(features)

    def noise_floor_bp(self) -> float:
        """Mean held-out put error (bp) of the validation set's own MC labels: the error a
        network that reproduced its labels exactly would have. Computed once."""
        if self._val_floor_bp is None:
            err = validation_price_errors_bp(self._val_target.cpu(), self._val_theta,
                                             self.config, reference=self._val_reference)
            self._val_floor_bp = float(err.mean())
        return self._val_floor_bp

    def quality(self) -> QualityReport:
        """Held-out error, validity and noise floor of the current weights, with no effect on
        training (spectral_core/quality.py): what a commit of this state records. With
        averaging, of the averaged weights (those served)."""
        pred = self._validation_prediction(self.served_model)
        return assess(pred.cpu(), self._val_theta, self.config, reference=self._val_reference,
                      noise_floor_bp=self.noise_floor_bp(), step=self.global_step)

    def validate(self) -> ValidationMetrics:
        """Spectral loss on the held-out MC labels (drives every decision); put prices against
        the process's oracle (bp of spot), reported only."""
        c = self.config
        pred = self._validation_prediction()
        val_loss = float((pred - self._val_target.to(self.device)).abs().square().mean())
        err_bp = validation_price_errors_bp(pred.cpu(), self._val_theta, c,
                                            reference=self._val_reference)
        metrics = ValidationMetrics(
            step=self.global_step,
            val_loss=val_loss,
            mean_abs_bp=float(err_bp.mean()),
            max_abs_bp=float(err_bp.max()),
        )
        limit = c.train.divergence_factor * self.best_val
        diverged = not math.isfinite(val_loss) or val_loss > limit
        if diverged and self._best is not None:
            self._load_training_state(*self._best)
            self.guard_scale *= c.train.divergence_lr_factor
            self.divergences += 1
            self.evals_without_improvement += 1
        else:
            if c.optim.schedule == "plateau":
                self.plateau.observe(c.optim, val_loss)
            if val_loss < self.best_val * (1.0 - c.train.early_stop_min_rel_improvement):
                self.best_val = val_loss
                self.evals_without_improvement = 0
                self._best = self._training_state()
            else:
                self.evals_without_improvement += 1
        self.last_validation = metrics
        return metrics

    def train(
        self,
        *,
        steps: int | None = None,
        seconds: float | None = None,
        on_step: Callable[[StepMetrics], None] | None = None,
        on_validation: Callable[[ValidationMetrics], None] | None = None,
        should_continue: Callable[[], bool] | None = None,
        early_stopping: bool = True,
    ) -> StepMetrics | None:
        """The training loop: `steps` more steps or `seconds` of wall time, whichever ends
        first (neither: until `should_continue` ends it), or until early stopping.

        Each iteration: `should_continue()` (it may block, e.g. while paused; False ends the
        run), one step, the validation when due (`on_validation`), then `on_step(metrics)`,
        after the validation, so that a commit made there carries it. `early_stopping=False`
        trains on past the patience (a continuously training service)."""
        if steps is None and seconds is None and should_continue is None:
            raise ValueError("give a step budget, a time budget, or both")
        deadline = None if seconds is None else time.monotonic() + seconds

        def budget_left() -> bool:
            return (steps is None or done < steps) and (
                deadline is None or time.monotonic() < deadline)

        done = 0
        last: StepMetrics | None = None
        while budget_left():
            if should_continue is not None and not should_continue():
                break
            if not budget_left():  # the wait may have used the time up
                break
            last = self.step()
            done += 1
            stop = False
            if self.global_step % self.config.train.validation_every == 0:
                v = self.validate()
                if on_validation is not None:
                    on_validation(v)
                stop = early_stopping and self.should_stop
            if on_step is not None:
                on_step(last)
            if stop:
                break
        return last

    # ------------------------------------------------------------------ snapshot / restore
    def _training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Model and optimiser as CPU tensor copies (`model.*`, `optim.*`) and optimiser scalars."""
        tensors: dict[str, torch.Tensor] = {}
        for name, t in self.model.state_dict().items():
            tensors[f"{RAW_PREFIX}{name}"] = t.detach().cpu().clone()
        if self.averaged is not None:
            for name, t in self.averaged.state_dict().items():  # n_averaged, module.*
                tensors[f"ema.{name}"] = t.detach().cpu().clone()
        opt = self.optimizer.state_dict()
        opt_scalars: dict[str, dict[str, Any]] = {}
        for idx, state in opt["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{idx}.{key}"] = value.detach().cpu().clone()
                else:
                    opt_scalars.setdefault(str(idx), {})[key] = value
        return tensors, {
            "scalars": opt_scalars,
            "param_groups": _json_param_groups(opt["param_groups"]),
        }

    def _load_training_state(
        self, tensors: dict[str, torch.Tensor], opt_meta: dict[str, Any]
    ) -> None:
        model_state = {
            k.removeprefix(RAW_PREFIX): v for k, v in tensors.items() if k.startswith(RAW_PREFIX)
        }
        self.model.load_state_dict(model_state, strict=True)
        if self.averaged is not None:
            self.averaged.load_state_dict(
                {k.removeprefix("ema."): v.to(self.device) for k, v in tensors.items()
                 if k.startswith("ema.")}, strict=True)
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value.to(self.device).clone()
        for idx, scalars in opt_meta["scalars"].items():
            state.setdefault(int(idx), {}).update(scalars)
        self.optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})

    def snapshot(self) -> Snapshot:
        tensors, opt_meta = self._training_state()
        if self._best is not None:
            tensors.update({f"best.{k}": v for k, v in self._best[0].items()})
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.torch_cuda"] = torch.cuda.get_rng_state(self.device)
        meta: dict[str, Any] = {
            "snapshot_format": SNAPSHOT_FORMAT,
            "config": self.config.to_json(),
            "config_fingerprint": self.config.fingerprint(),
            "global_step": self.global_step,
            "sampler": self.sampler.state(),
            "normals_position": self._stream.position,
            "plateau": self.plateau.to_json(),
            "best_val": None if math.isinf(self.best_val) else self.best_val,
            "evals_without_improvement": self.evals_without_improvement,
            "optim": opt_meta,
            "best_optim": None if self._best is None else self._best[1],
            "guard_scale": self.guard_scale,
            "divergences": self.divergences,
            "validation": None if self.last_validation is None else self.last_validation.as_dict(),
        }
        return Snapshot(tensors=tensors, meta=meta)

    @classmethod
    def restore(cls, snapshot: Snapshot, *, device: str | None = None,
                process: str | None = None) -> Trainer:
        """Rebuild a trainer from `snapshot`; the stored config wins (only the device may vary).

        `process` names the process the caller expects; a snapshot of another one raises
        ProcessMismatch.
        """
        meta = snapshot.meta
        if meta.get("snapshot_format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unsupported snapshot_format {meta.get('snapshot_format')!r}")
        config = CoreConfig.model_validate(meta["config"])
        if process is not None:
            get_process(process).check_config(config)
        if device is not None:
            config = config.model_copy(update={"device": device})
        if config.fingerprint() != meta["config_fingerprint"]:
            raise ValueError("snapshot config does not match its fingerprint")
        trainer = cls.__new__(cls)
        trainer._init_restored(config, snapshot)
        return trainer

    def _init_restored(self, config: CoreConfig, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        self.__init__(config)  # type: ignore[misc]  # fresh components, then overwrite the state
        self._load_training_state(snapshot.tensors, meta["optim"])
        if meta["best_optim"] is not None:
            best_state = {
                k.removeprefix("best."): v
                for k, v in snapshot.tensors.items()
                if k.startswith("best.")
            }
            self._best = (best_state, meta["best_optim"])
        self.guard_scale = float(meta["guard_scale"])
        self.divergences = int(meta["divergences"])
        torch.set_rng_state(snapshot.tensors["rng.torch_cpu"])
        if self.device.type == "cuda" and "rng.torch_cuda" in snapshot.tensors:
            torch.cuda.set_rng_state(snapshot.tensors["rng.torch_cuda"], self.device)
        self.global_step = int(meta["global_step"])
        self.sampler = ContractSampler.from_state(config.domain, meta["sampler"])
        self._stream.close()  # the fresh stream from __init__; reopen at the stored position
        self._stream = self._normals.stream(TRAIN_STREAM, skip=int(meta["normals_position"]))
        self.plateau = PlateauState.from_json(meta["plateau"])
        best = meta.get("best_val")
        self.best_val = math.inf if best is None else float(best)
        v = meta.get("validation")
        # restored too, so a resumed run's snapshots equal an uninterrupted run's, meta included
        self.last_validation = None if v is None else ValidationMetrics.from_dict(v)
        self.evals_without_improvement = int(meta["evals_without_improvement"])

    def close(self) -> None:
        self._normals.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for g in groups:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return out


def validation_reference(theta: torch.Tensor, config: CoreConfig) -> torch.Tensor:
    """Oracle put prices (S0 = 1) of the validation contracts at config.train.validation_moneyness:
    (K_levels * B,) float64, in the order of validation_price_errors_bp."""
    process = get_process(config.process)
    th = theta.to(torch.float64).numpy()
    cols = process.columns(th)
    forward = np.exp((cols["r"] - cols["d"]) * cols["T"])
    ones = np.ones_like(forward)
    refs = [process.reference_put(th, S0=ones, K=mny * forward)
            for mny in config.train.validation_moneyness]
    return torch.from_numpy(np.concatenate(refs))


def validation_price_errors_bp(
    F: torch.Tensor, theta: torch.Tensor, config: CoreConfig, *,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """|COS put price from F - oracle| in bp of spot (S0 = 1) at config.train.validation_moneyness.

    The oracle is the process's (Black-Scholes for GBM, COS on the analytic CF for Heston and
    Bates); pass `reference` (validation_reference) to reuse it. Returns (K_levels * B,).
    """
    if reference is None:
        reference = validation_reference(theta, config)
    puts, _ = validation_puts(F, theta, config)
    return (puts - reference).abs() * 1e4
