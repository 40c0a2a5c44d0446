"""The `spectralmc` command: `train`, `tune`, `store ...`, `serve`.

It lives at the top of the dependency graph (server -> storage -> spectral_core) because it
composes all three. Usage errors exit 2 with a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError


class UsageError(Exception):
    """Bad command-line input: exit 2 with the message."""


def _load_core_config(path: str | None, device: str | None, process: str | None = None) -> Any:
    from spectral_core.config import CoreConfig

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            kind = p.suffix.lstrip(".") or "JSON"
            raise UsageError(f"config {path} is not valid {kind}: {exc}") from None
        data = data.get("core", data)
    if process is not None:
        named = data.get("process", process)
        if named != process:
            raise UsageError(f"--process {process} but config {path} has process = {named!r}")
        data["process"] = process
    if device is not None:
        data["device"] = device
    try:
        return CoreConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise UsageError(f"invalid config: {loc}: {first['msg']}") from None


def _train_config(path: str | None, model: str | None, device: str | None) -> Any:
    """The core config `spectralmc train` trains: read through the service's settings loader
    (config/default.toml, then `path`, then SPECTRALMC_* variables), so it is exactly what
    `spectralmc serve` with the same file and environment trains: the top-level [core] (model
    bs), or [models.<model>.core]. `--device` overrides that config's device, the one device
    setting."""
    from config.settings import SettingsError, load_settings
    from storage.prefixed import ROOT_MODEL

    try:
        settings = load_settings(config_file=path)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
    if model is None or model == ROOT_MODEL:
        core = settings.core
    elif model in settings.models:
        core = settings.models[model].core
    else:
        known = ", ".join([ROOT_MODEL, *sorted(settings.models)])
        raise UsageError(f"--model {model!r} is not a model of the settings (models: {known})")
    return core if device is None else core.model_copy(update={"device": device})


def _cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from spectral_core.device import DeviceError
    from spectral_core.memory import MemoryCapError
    from spectral_core.trainer import Trainer
    from storage.checkpoint import encode_checkpoint

    if args.seconds is None and args.steps is None:
        raise UsageError("give --seconds, --steps, or both")
    if (args.seconds is not None and args.seconds <= 0) or (
        args.steps is not None and args.steps <= 0
    ):
        raise UsageError("--seconds and --steps must be positive")
    config = _train_config(args.config, args.model, args.device)
    try:
        trainer = Trainer(config)
    except (DeviceError, MemoryCapError) as exc:
        raise UsageError(str(exc)) from None
    with trainer, tqdm(total=args.steps, unit="step", file=sys.stderr, disable=args.quiet) as bar:

        def on_step(m: Any) -> None:
            bar.update(1)
            if m.step % 20 == 0:
                bar.set_postfix(
                    loss=f"{m.loss:.3e}", lr=f"{m.lr:.1e}", sps=f"{m.samples_per_s:.2e}"
                )

        trainer.train(steps=args.steps, seconds=args.seconds, on_step=on_step)
        v = trainer.validate()
        snap = trainer.snapshot()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(encode_checkpoint(snap))
    os.replace(tmp, out)
    print(json.dumps({"checkpoint": str(out), **v.as_dict()}))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    import optuna

    from server.tuning import TuneError, TuneSpec, best_core_toml, open_study, run_study
    from spectral_core.device import DeviceError, resolve_device

    if args.trials <= 0:
        raise UsageError(f"--trials must be positive, got {args.trials}")
    if not (args.seconds_per_trial > 0 and args.seconds_per_trial < float("inf")):
        raise UsageError(f"--seconds-per-trial must be positive, got {args.seconds_per_trial}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    base = _load_core_config(args.config, args.device, args.process)
    try:
        resolve_device(base.device)  # `cuda` without a GPU: a usage error, not N failed trials
    except DeviceError as exc:
        raise UsageError(str(exc)) from None
    study_name = args.study_name or f"spectralmc-{base.process}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line a trial, below, instead
    try:
        spec = TuneSpec(base=base, seconds_per_trial=args.seconds_per_trial, metric=args.metric)
        study = open_study(spec, args.storage, study_name, seed=args.seed)
    except TuneError as exc:
        raise UsageError(str(exc)) from None

    def on_trial(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        value = "" if t.value is None else f" {args.metric}={t.value:.4g}"
        steps = t.user_attrs.get("steps")
        try:
            best = f"best: trial {study.best_trial.number} {study.best_value:.4g}"
        except ValueError:  # no completed trial yet
            best = "no completed trial yet"
        print(
            f"trial {t.number} {t.state.name.lower()}{value}"
            f"{'' if steps is None else f' steps={steps}'} ({best}) {t.params}",
            file=sys.stderr,
        )

    print(
        f"study {study_name!r} in {args.storage}: {len(study.trials)} trial(s) so far, "
        f"adding {args.trials} of {args.seconds_per_trial:g} s on {base.process}",
        file=sys.stderr,
    )
    try:
        run_study(spec, study, args.trials, on_trial=on_trial)
    except KeyboardInterrupt:
        print(
            "spectralmc tune: interrupted; finished trials are kept, rerun to go on",
            file=sys.stderr,
        )
        return 130
    try:
        print(best_core_toml(study), end="")
    except TuneError as exc:
        print(f"spectralmc: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_store(argv: list[str]) -> int:
    from storage.cli import main as store_main

    return store_main(argv)


def _cmd_serve(args: argparse.Namespace) -> int:
    import faulthandler
    import signal

    from config.settings import load_settings
    from server.app import run_app

    # `kill -USR1 <pid>` writes every thread's stack to stderr: a hung request can be diagnosed
    # in production without stopping the service.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    try:
        settings = load_settings(config_file=args.config)
    except (ValidationError, ValueError, OSError) as exc:
        raise UsageError(f"invalid settings: {exc}") from None
    if settings.server.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise UsageError("server.event_loop = 'uvloop' needs the uvloop package (pip install "
                         "uvloop), or set server.event_loop = 'asyncio'")
    run_app(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spectralmc", description="SpectralMC learned-pricing service")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model and write a checkpoint file")
    t.add_argument("--seconds", type=float, help="wall-time budget")
    t.add_argument("--steps", type=int, help="step budget")
    t.add_argument(
        "--device", choices=["cpu", "cuda", "auto"], help="overrides the config's device"
    )
    t.add_argument("--config", help="settings TOML, as `spectralmc serve --config` reads it "
                                    "(over config/default.toml and SPECTRALMC_* variables)")
    t.add_argument("--model", help="train [models.MODEL.core] of the settings (default: the "
                                   "top-level [core], model bs)")
    t.add_argument("--out", required=True, help="checkpoint file to write")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    u = sub.add_parser(
        "tune",
        help="search optimiser, schedule, batch and width with Optuna; print the best [core]",
    )
    u.add_argument(
        "--process",
        choices=["gbm", "heston", "bates"],
        help="the process (default: the config's, or gbm)",
    )
    u.add_argument("--trials", type=int, required=True, help="trials to add to the study")
    u.add_argument(
        "--seconds-per-trial", type=float, required=True, help="training wall time of each trial"
    )
    u.add_argument(
        "--storage", required=True, help="Optuna RDB storage URL, e.g. sqlite:///tune.db"
    )
    u.add_argument(
        "--study-name", help="study to create or resume (default: spectralmc-PROCESS)"
    )
    u.add_argument(
        "--metric", choices=["val_loss", "mean_abs_bp"], default="val_loss",
        help="held-out error to minimise: spectral loss on MC labels (default) or the put-price "
        "error against the oracle in bp",
    )
    u.add_argument(
        "--config",
        help="base core config (TOML or JSON); the search overrides its optim, batch and arch",
    )
    u.add_argument(
        "--device", choices=["cpu", "cuda", "auto"], help="overrides the config's device"
    )
    u.add_argument("--seed", type=int, default=0, help="sampler seed")
    sub.add_parser(
        "store",
        help="inspect and maintain a version chain (see `spectralmc store -h`)",
        add_help=False,
    )
    s = sub.add_parser("serve", help="run the HTTP pricing service")
    s.add_argument("--config", help="settings TOML overriding config/default.toml")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "store":
        return _cmd_store(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "tune":
            return _cmd_tune(args)
        return _cmd_serve(args)
    except UsageError as exc:
        print(f"spectralmc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
