"""`spectralmc train` reads its core config through the service's settings loader: the same
file and environment train what `spectralmc serve` trains, the top-level [core] or a named
model's, and bad input is exit 2 with a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli import main
from server.tuning import core_toml
from spectral_core.config import CoreConfig
from storage.checkpoint import decode_checkpoint, sha256_hex
from tests.core_fixtures import tiny_config, tiny_heston_config


def settings_file(tmp_path: Path) -> Path:
    """A settings TOML with a tiny GBM [core] and a tiny Heston model `vol`."""
    root = core_toml(tiny_config(), tuned={}, header=[])
    named = core_toml(tiny_heston_config(), tuned={}, header=[]).replace(
        "[core", "[models.vol.core")
    path = tmp_path / "settings.toml"
    path.write_text(f"{root}\n[models.vol]\ntraining = true\n\n{named}")
    return path


def trained_config(out: Path) -> CoreConfig:
    data = out.read_bytes()
    meta = decode_checkpoint(data, expected_sha256=sha256_hex(data)).meta
    return CoreConfig.model_validate(meta["config"])


@pytest.mark.parametrize(("model", "expected"), [(None, tiny_config()),
                                                  ("vol", tiny_heston_config())])
def test_train_takes_the_settings_core_of_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str | None,
    expected: CoreConfig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SPECTRALMC_CORE__SIM__SEED", raising=False)
    out = tmp_path / "model.ckpt"
    argv = ["train", "--steps", "2", "--quiet", "--config", str(settings_file(tmp_path)),
            "--out", str(out), *(["--model", model] if model else [])]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(out)
    assert trained_config(out).fingerprint() == expected.fingerprint()


def test_train_reads_the_environment_like_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SPECTRALMC_CORE__SIM__SEED", "7")
    out = tmp_path / "model.ckpt"
    assert main(["train", "--steps", "1", "--quiet", "--config", str(settings_file(tmp_path)),
                 "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    config = trained_config(out)
    assert config.sim.seed == 7 and config.device == "cpu"


@pytest.mark.parametrize(("extra", "message"), [
    (["--model", "nope"], "--model 'nope' is not a model of the settings (models: bs, vol)"),
    (["--config", "missing.toml"], "does not exist"),
])
def test_train_refuses_bad_input_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str,
) -> None:
    argv = ["train", "--steps", "1", "--out", str(tmp_path / "m.ckpt"),
            "--config", str(settings_file(tmp_path)), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.ckpt").exists()
