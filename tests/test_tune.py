"""`spectralmc tune`: an Optuna study in sqlite, resumable, pruned on intermediate validation,
printing the best [core] TOML that settings loading accepts."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import optuna
import pytest

from config.settings import load_settings
from server.cli import main
from server.tuning import REPORT_SLOTS, TuneSpec, core_toml, make_objective
from spectral_core.config import CoreConfig

# A base small enough for trials of half a second: the search overrides optim, batch and arch.
TINY_BASE = """\
[core.spectrum]
n_freq = 32
grid = 256

[core.train]
validation_contracts = 64
validation_every = 5
"""


def _tune(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    (tmp_path / "base.toml").write_text(TINY_BASE)
    argv = [
        "tune", "--process", "gbm", "--seconds-per-trial", "0.5", "--device", "cpu",
        "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--config", str(tmp_path / "base.toml"),
        *extra,
    ]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(
        study_name="spectralmc-gbm", storage=f"sqlite:///{tmp_path / 'study.db'}"
    )
    return study.trials


def test_study_resumes_and_prints_a_loadable_core_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _tune(tmp_path, capsys, "--trials", "2")
    assert code == 0, err
    trials = _trials(tmp_path)
    assert len(trials) == 2
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.intermediate_values for t in done)  # reported at each validation
    assert all(0 <= s < REPORT_SLOTS for t in done for s in t.intermediate_values)
    assert "trial 0 complete val_loss=" in err

    code, out, err = _tune(tmp_path, capsys, "--trials", "1")  # same storage and study: resume
    assert code == 0, err
    trials = _trials(tmp_path)
    assert len(trials) == 3
    assert trials[2].params != trials[0].params  # not the first run's draws again

    # the printed TOML: the best trial's exact config, for `[core]` of a settings file
    best = min(trials, key=lambda t: math.inf if t.value is None else t.value)
    assert f"trial {best.number}" in out
    core = CoreConfig.model_validate(tomllib.loads(out)["core"])
    assert core.fingerprint() == best.user_attrs["config_fingerprint"]
    assert core.optim.lr == best.params["optim.lr"]
    assert core.train.validation_every == 5  # the base's own fields are kept
    (tmp_path / "best.toml").write_text(out)
    settings = load_settings(config_file=tmp_path / "best.toml", env={})
    assert settings.core.fingerprint() == best.user_attrs["config_fingerprint"]


def test_resuming_with_another_budget_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = TuneSpec(base=CoreConfig(), seconds_per_trial=9.0)
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="spectralmc-gbm"
    )
    study.set_user_attr("spectralmc", spec.study_attrs())
    code, out, err = _tune(tmp_path, capsys, "--trials", "1")
    assert code == 2 and out == ""
    assert "seconds_per_trial 9.0 (now 0.5)" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert _trials(tmp_path) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trials", "0"], "--trials must be positive"),
        (["--trials", "1", "--seconds-per-trial", "-1"], "--seconds-per-trial must be positive"),
        (["--trials", "1", "--storage", "study.db"], "must be a database URL"),
        (["--trials", "1", "--storage", "sqlite:////no/such/dir/s.db"], "cannot open the study"),
        (["--trials", "1", "--storage", "nosuchdb://x"], "cannot open the study"),
        (["--trials", "1", "--process", "heston"], "--process heston but config"),
    ],
)
def test_bad_flags_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    (tmp_path / "gbm.toml").write_text('[core]\nprocess = "gbm"\n')
    argv = ["tune", "--seconds-per-trial", "1", "--storage", f"sqlite:///{tmp_path / 's.db'}",
            "--config", str(tmp_path / "gbm.toml"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_trials_are_pruned_from_the_validation_callback(tmp_path: Path) -> None:
    base = CoreConfig.model_validate(tomllib.loads(TINY_BASE)["core"])
    study = optuna.create_study(pruner=_AlwaysPrune(), sampler=optuna.samplers.RandomSampler(0))
    study.optimize(make_objective(TuneSpec(base=base, seconds_per_trial=5.0)), n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # pruned at the first validation, not at 5 s
    assert trial.user_attrs["steps"] == base.train.validation_every


def test_core_toml_round_trips_other_processes() -> None:
    for process in ("heston", "bates"):
        config = CoreConfig(process=process)
        config = config.model_copy(update={"optim": config.optim.model_copy(update={"lr": 1e-3})})
        text = core_toml(config, tuned=["optim.lr", "train.batch_contracts"])
        back = CoreConfig.model_validate(tomllib.loads(text)["core"])
        assert back.fingerprint() == config.fingerprint()
        assert "batch_contracts = 256" in text  # tuned fields are written even at the default
