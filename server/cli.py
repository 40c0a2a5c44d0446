"""The `spectralmc` command: `train`, `store ...`, `serve`.

It lives at the top of the dependency graph (server -> storage -> spectral_core) because it
composes all three. Usage errors exit 2 with a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError


class UsageError(Exception):
    """Bad command-line input: exit 2 with the message."""


def _load_core_config(path: str | None, device: str | None) -> Any:
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
    if device is not None:
        data["device"] = device
    try:
        return CoreConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise UsageError(f"invalid config: {loc}: {first['msg']}") from None


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
    config = _load_core_config(args.config, args.device)
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
    t.add_argument("--config", help="core config as TOML (a [core] table or top level) or JSON")
    t.add_argument("--out", required=True, help="checkpoint file to write")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
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
        return _cmd_serve(args)
    except UsageError as exc:
        print(f"spectralmc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
