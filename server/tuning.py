"""`spectralmc tune`: an Optuna search over the optimiser, schedule, batch and width of `[core]`.

Each trial trains a fresh `Trainer` for a fixed wall-time budget on one process and is scored by
the held-out validation error at the end of that budget (`val_loss`, the spectral loss on the
held-out MC labels that drives every training decision; or `mean_abs_bp`, the put-price error
against the process's oracle). The study lives in an RDB storage (`sqlite:///FILE`), so it is
resumable: the same storage and study name add trials to it.

Pruning: at each of the trainer's validations the trial reports its error to the study, keyed by
the share of its time budget spent (REPORT_SLOTS slots). Trials with different batch sizes run
different step counts in the same time, so comparing them at equal wall time, not at equal step,
is what a time-budgeted search needs. The median pruner stops a trial that is worse than the
median of the earlier trials at the same share of their budget.

Lives in `server` (not `spectral_core`): it owns a database and the command line; the numerics
it drives are the trainer's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from spectral_core.config import CoreConfig
from spectral_core.memory import MemoryCapError
from spectral_core.trainer import Trainer, ValidationMetrics

METRICS: tuple[str, ...] = ("val_loss", "mean_abs_bp")
# Intermediate values are reported at each 1/REPORT_SLOTS of a trial's time budget.
REPORT_SLOTS = 20
# No pruning before this many trials completed, nor in the first quarter of a trial's budget.
PRUNER_STARTUP_TRIALS = 3
PRUNER_WARMUP_SLOTS = REPORT_SLOTS // 4
# The searched space. The schedule's step counts are absolute: a tuned schedule is tuned for runs
# as long as the trials (total_steps ~ the steps a trial reaches).
LR_RANGE = (1e-4, 1e-1)
BATCH_CHOICES = (32, 64, 128, 256, 512)
WIDTH_CHOICES = (16, 32, 64, 128)
DEPTH_RANGE = (1, 3)
SCHEDULES = ("constant", "warmup_cosine", "plateau")
WARMUP_RANGE = (0, 500)
TOTAL_STEPS_RANGE = (100, 30_000)
MIN_LR_RANGE = (1e-7, 1e-4)
RESTART_CYCLES_RANGE = (0, 2)
RESTART_DECAY_RANGE = (0.03, 0.5)
PLATEAU_PATIENCE_RANGE = (1, 10)
PLATEAU_FACTOR_RANGE = (0.2, 0.8)
# The study's user attribute that names what its trials measure (checked when resuming).
STUDY_ATTR = "spectralmc"


class TuneError(Exception):
    """A study that cannot be opened, resumed or reported: exit 2 with the message."""


@dataclass(frozen=True)
class TuneSpec:
    """What every trial of a study shares; a study resumes only with the same spec."""

    base: CoreConfig
    seconds_per_trial: float
    metric: str = "val_loss"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise TuneError(f"metric must be one of {list(METRICS)}, got {self.metric!r}")
        if not (self.seconds_per_trial > 0 and math.isfinite(self.seconds_per_trial)):
            raise TuneError(f"seconds per trial must be positive, got {self.seconds_per_trial}")

    def study_attrs(self) -> dict[str, Any]:
        return {
            "process": self.base.process,
            "seconds_per_trial": self.seconds_per_trial,
            "metric": self.metric,
            # the device does not change the model (nor the fingerprint)
            "base_fingerprint": self.base.fingerprint(),
        }


def suggest_config(trial: optuna.Trial, base: CoreConfig) -> CoreConfig:
    """`base` with the trial's optimiser, schedule, batch and architecture."""
    optim: dict[str, Any] = {
        "lr": trial.suggest_float("optim.lr", *LR_RANGE, log=True),
        "schedule": trial.suggest_categorical("optim.schedule", SCHEDULES),
    }
    if optim["schedule"] == "warmup_cosine":
        optim["warmup_steps"] = trial.suggest_int("optim.warmup_steps", *WARMUP_RANGE)
        optim["total_steps"] = trial.suggest_int("optim.total_steps", *TOTAL_STEPS_RANGE, log=True)
        optim["min_lr"] = trial.suggest_float("optim.min_lr", *MIN_LR_RANGE, log=True)
        optim["restart_cycles"] = trial.suggest_int("optim.restart_cycles", *RESTART_CYCLES_RANGE)
        if optim["restart_cycles"]:
            optim["restart_decay"] = trial.suggest_float(
                "optim.restart_decay", *RESTART_DECAY_RANGE, log=True
            )
    elif optim["schedule"] == "plateau":
        optim["plateau_patience"] = trial.suggest_int(
            "optim.plateau_patience", *PLATEAU_PATIENCE_RANGE
        )
        optim["plateau_factor"] = trial.suggest_float(
            "optim.plateau_factor", *PLATEAU_FACTOR_RANGE
        )
        optim["min_lr"] = trial.suggest_float("optim.min_lr", *MIN_LR_RANGE, log=True)
    update = {
        "optim": optim,
        "train": {
            "batch_contracts": trial.suggest_categorical("train.batch_contracts", BATCH_CHOICES)
        },
        "arch": {
            "width": trial.suggest_categorical("arch.width", WIDTH_CHOICES),
            "depth": trial.suggest_int("arch.depth", *DEPTH_RANGE),
        },
    }
    data = base.model_dump(mode="json")
    for table, fields in update.items():
        data[table] = {**data[table], **fields}
    return CoreConfig.model_validate(data)


def _metric(v: ValidationMetrics, metric: str) -> float:
    return float(getattr(v, metric))


def make_objective(spec: TuneSpec) -> Callable[[optuna.Trial], float]:
    budget = spec.seconds_per_trial

    def objective(trial: optuna.Trial) -> float:
        config = suggest_config(trial, spec.base)
        trial.set_user_attr("config", config.to_json())
        trial.set_user_attr("config_fingerprint", config.fingerprint())
        reported: set[int] = set()
        with Trainer(config) as trainer:
            t0 = time.monotonic()

            def on_validation(v: ValidationMetrics) -> None:
                slot = min(int((time.monotonic() - t0) / budget * REPORT_SLOTS), REPORT_SLOTS - 1)
                if slot in reported:  # one value a slot (the study keeps the first anyway)
                    return
                reported.add(slot)
                trial.report(_metric(v, spec.metric), slot)
                if trial.should_prune():
                    trial.set_user_attr("steps", trainer.global_step)
                    raise optuna.TrialPruned(
                        f"{spec.metric} {_metric(v, spec.metric):.4g} at step {v.step} "
                        f"({100 * slot // REPORT_SLOTS}% of the budget) is worse than the median"
                    )

            trainer.train(seconds=budget, on_validation=on_validation)
            final = trainer.validate()
            trial.set_user_attr("steps", trainer.global_step)
        trial.set_user_attr(
            "validation", {k: x for k, x in final.as_dict().items() if math.isfinite(x)}
        )
        value = _metric(final, spec.metric)
        return value if math.isfinite(value) else math.inf  # a diverged trial: the worst score

    return objective


def open_study(spec: TuneSpec, storage_url: str, study_name: str, *, seed: int) -> optuna.Study:
    """Create the study, or load it when it exists and was made with the same spec."""
    if "://" not in storage_url:
        raise TuneError(
            f"--storage must be a database URL such as sqlite:///tune.db, got {storage_url!r}"
        )
    try:
        storage = optuna.storages.RDBStorage(storage_url)
    except Exception as exc:  # SQLAlchemy URL/driver/file errors, a missing DB driver module
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TuneError(f"cannot open the study storage {storage_url}: {first}") from None
    # Resuming with the seed of the first run would draw that run's random trials again.
    n_before = _n_trials(storage, study_name)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed + n_before),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_SLOTS
        ),
        load_if_exists=True,
    )
    want = spec.study_attrs()
    have = study.user_attrs.get(STUDY_ATTR)
    if have is None:
        if study.trials:
            raise TuneError(
                f"study {study_name!r} in {storage_url} was not made by spectralmc tune"
            )
        study.set_user_attr(STUDY_ATTR, want)
    elif have != want:
        diff = ", ".join(
            f"{k} {have.get(k)!r} (now {want[k]!r})" for k in want if have.get(k) != want[k]
        )
        raise TuneError(
            f"study {study_name!r} in {storage_url} was made with {diff}; resume it with the "
            "same --process, --seconds-per-trial, --metric and --config, or pick another "
            "--study-name"
        )
    return study


def _n_trials(storage: optuna.storages.BaseStorage, study_name: str) -> int:
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def run_study(
    spec: TuneSpec,
    study: optuna.Study,
    n_trials: int,
    *,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> None:
    """Add `n_trials` trials. A trial whose config exceeds a memory cap fails; the rest go on."""
    callbacks = [] if on_trial is None else [on_trial]
    study.optimize(
        make_objective(spec),
        n_trials=n_trials,
        catch=(MemoryCapError,),
        callbacks=callbacks,
        gc_after_trial=False,
    )


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise TuneError(f"study {study.study_name!r} has no completed trial yet")
    return study.best_trial


def best_core_toml(study: optuna.Study) -> str:
    """The `[core]` TOML of the best completed trial (settings files and `spectralmc train
    --config` read it)."""
    best = best_trial(study)
    config = CoreConfig.model_validate(best.user_attrs["config"])
    attrs = study.user_attrs.get(STUDY_ATTR, {})
    n_done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    header = [
        f"spectralmc tune: study {study.study_name!r}, best of {n_done} completed trial(s) "
        f"({len(study.trials)} in all): trial {best.number}",
        f"{attrs.get('metric', 'value')} = {best.value:.6g} after "
        f"{attrs.get('seconds_per_trial', '?')} s ({best.user_attrs.get('steps', '?')} steps) "
        f"on {config.process}",
        f"config fingerprint {config.fingerprint()}",
    ]
    return core_toml(config, tuned=best.params, header=header)


def core_toml(config: CoreConfig, *, tuned: Iterable[str] = (), header: Iterable[str] = ()) -> str:
    """`config` as a `[core]` TOML table: the process, the fields that differ from the defaults
    and the `tuned` fields (dotted names, e.g. `optim.lr`), always. The device is left out (the
    settings' `[training] device` or `--device` chooses it)."""
    full = config.model_dump(mode="json")
    body: dict[str, Any] = config.model_dump(mode="json", exclude_defaults=True)
    body["process"] = config.process
    for dotted in tuned:
        src: Any = full
        dst = body
        *tables, name = dotted.split(".")
        for t in tables:
            src = src[t]
            dst = dst.setdefault(t, {})
        dst[name] = src[name]
    body.pop("device", None)
    lines = [f"# {h}" for h in header]
    _emit_table(lines, "core", body)
    return "\n".join(lines) + "\n"


def _emit_table(lines: list[str], name: str, table: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    subtables = {k: v for k, v in table.items() if isinstance(v, Mapping) and v}
    lines.append(f"[{name}]")
    for key in sorted(scalars):
        value = scalars[key]
        if value is None:  # TOML has no null: say so rather than write a wrong value
            lines.append(f"# {key} = None (TOML has no null; set it in a JSON config)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key in sorted(subtables):
        lines.append("")
        _emit_table(lines, f"{name}.{key}", subtables[key])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


__all__ = [
    "METRICS",
    "TuneError",
    "TuneSpec",
    "best_core_toml",
    "best_trial",
    "core_toml",
    "make_objective",
    "open_study",
    "run_study",
    "suggest_config",
]
