"""`spectralmc store --url URL <command>`: inspect, verify, tag, pin and collect a version chain.

Exit status: 0 ok, 1 integrity failure (verify found a problem, corrupt data), 2 usage error (bad
arguments, unknown version or ref), 3 store unavailable. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from storage.chain import VersionChain, VersionRecord
from storage.objectstore import Conflict, Corrupt, Invalid, NotFound, StoreError, Unavailable
from storage.prefixed import MODEL_NAME_PATTERN, ROOT_MODEL, is_model_name, model_store
from storage.retry import RetryPolicy
from storage.tensorboard import ScalarWriter, finite_scalars
from storage.url import open_store

EXIT_OK, EXIT_INTEGRITY, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _counter(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a version number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"version must be >= 1, got {value}")
    return value


def _model_name(text: str) -> str:
    if not is_model_name(text):
        raise argparse.ArgumentTypeError(f"a model name must match {MODEL_NAME_PATTERN}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spectralmc store", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="store URL: file:///path, s3://bucket/prefix")
    p.add_argument("--actor", default=None, help="who is acting, for the audit log")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (overrides ?endpoint=)")
    p.add_argument(
        "--model",
        type=_model_name,
        default=ROOT_MODEL,
        help=f"the named model whose chain to act on (default {ROOT_MODEL}: the store's root; "
        "any other lives under models/NAME/)",
    )
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sub.add_parser("list-versions", help="one line per version")
    sub.add_parser("inspect", help="print one version record as JSON").add_argument(
        "version", type=_counter
    )
    sub.add_parser("verify", help="check the whole chain; exit 1 on any problem")
    sub.add_parser("find-corruption", help="list every problem in the chain")
    for name in ("gc-preview", "gc-run"):
        g = sub.add_parser(name, help="garbage collection (preview / execute)")
        g.add_argument("--keep", type=_counter, required=True, help="keep the newest N versions")
        if name == "gc-run":
            g.add_argument("--yes", action="store_true", help="really delete")
    t = sub.add_parser("tag", help="point tag NAME at version N")
    t.add_argument("name")
    t.add_argument("version", type=_counter)
    sub.add_parser("pin", help="pin the serving version (N or a ref)").add_argument("target")
    sub.add_parser("unpin", help="remove the serving pin")
    sub.add_parser("log", help="the audit log")
    sub.add_parser(
        "tensorboard-log", help="write per-version scalars as TensorBoard events"
    ).add_argument("dir", type=Path)
    return p


def _line(rec: VersionRecord, refs: dict[int, list[str]]) -> str:
    names = f" [{', '.join(refs[rec.counter])}]" if rec.counter in refs else ""
    return (
        f"{rec.counter:>6}  {rec.created_at}  {rec.version_hash[:12]}  "
        f"{rec.blob_size:>10}B  {rec.message}{names}"
    )


async def _run(args: argparse.Namespace, out: Any) -> int:
    options: dict[str, Any] = {}
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    store = open_store(args.url, **options)
    chain = VersionChain(
        model_store(store, args.model),
        retry=RetryPolicy(attempts=3, base_delay_s=0.05, max_delay_s=0.5),
    )
    actor = args.actor or getpass.getuser() or "cli"
    try:
        return await _dispatch(args, chain, actor, out)
    finally:
        await store.aclose()


async def _dispatch(args: argparse.Namespace, chain: VersionChain, actor: str, out: Any) -> int:
    cmd = args.cmd
    if cmd == "list-versions":
        by_counter: dict[int, list[str]] = {}
        for name, c in (await chain.refs()).items():
            by_counter.setdefault(c, []).append(name)
        for rec in await chain.list():
            print(_line(rec, by_counter), file=out)
        return EXIT_OK
    if cmd == "inspect":
        rec = await chain.get(args.version)
        print(json.dumps(rec.to_dict(), indent=2, sort_keys=True), file=out)
        return EXIT_OK
    if cmd in ("verify", "find-corruption"):
        report = await chain.verify()
        if cmd == "find-corruption":
            for problem in report.problems:
                print(str(problem), file=out)
        print(report.summary(), file=out)
        if not report.ok:
            print(f"spectralmc store: {report.summary()}", file=sys.stderr)
            return EXIT_INTEGRITY
        return EXIT_OK
    if cmd in ("gc-preview", "gc-run"):
        execute = cmd == "gc-run"
        if execute and not args.yes:
            raise UsageError("gc-run deletes checkpoint blobs; pass --yes to confirm")
        plan = await chain.gc(keep=args.keep, execute=execute, actor=actor)
        verb = "collected" if plan.executed else "would collect"
        print(
            f"{verb} {len(plan.collect)} version(s) {plan.collect}, "
            f"{len(plan.delete_blobs)} blob(s); keeping {plan.kept}",
            file=out,
        )
        return EXIT_OK
    if cmd == "tag":
        counter = await chain.set_ref(args.name, args.version, actor=actor, action="tag")
        print(f"tag {args.name} -> {counter}", file=out)
        return EXIT_OK
    if cmd == "pin":
        counter = await chain.pin(args.target, actor=actor)
        print(f"pin -> {counter}", file=out)
        return EXIT_OK
    if cmd == "unpin":
        old = await chain.unpin(actor=actor)
        print(f"unpinned (was {old})" if old is not None else "no pin was set", file=out)
        return EXIT_OK
    if cmd == "log":
        for e in await chain.log():
            ref = f" {e.ref}: {e.old} -> {e.new}" if e.ref else ""
            extra = f" {json.dumps(e.detail, sort_keys=True)}" if e.detail else ""
            print(f"{e.n:>6}  {e.at}  {e.actor}  {e.action}{ref}{extra}", file=out)
        return EXIT_OK
    if cmd == "tensorboard-log":
        records = await chain.list()
        try:
            path = write_tensorboard_log(args.dir, records)
        except OSError as exc:
            raise UsageError(f"cannot write TensorBoard events to {args.dir}: {exc}") from None
        print(f"wrote {len(records)} version(s) to {path}", file=out)
        return EXIT_OK
    raise UsageError(f"unknown command {cmd!r}")


def main(argv: Sequence[str] | None = None, *, out: Any = None) -> int:
    out = out or sys.stdout
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"spectralmc store: usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help prints and exits 0
        return int(exc.code or 0)
    try:
        return asyncio.run(_run(args, out))
    except UsageError as exc:
        msg, code = f"usage error: {exc}", EXIT_USAGE
    except Corrupt as exc:
        msg, code = f"integrity failure: {exc}", EXIT_INTEGRITY
    except NotFound as exc:
        msg, code = f"not found: {exc}", EXIT_USAGE
    except (Invalid, ValueError) as exc:
        msg, code = f"invalid: {exc}", EXIT_USAGE
    except Unavailable as exc:
        msg, code = f"store unavailable: {exc}", EXIT_UNAVAILABLE
    except Conflict as exc:
        msg, code = f"conflict, try again: {exc}", EXIT_UNAVAILABLE
    except StoreError as exc:
        msg, code = f"store error: {exc}", EXIT_UNAVAILABLE
    print(f"spectralmc store: {' '.join(msg.split())}", file=sys.stderr)
    return code


def _scalars(rec: VersionRecord) -> dict[str, float]:
    return {
        **finite_scalars("train", rec.training_metrics),
        **finite_scalars("quality", rec.quality_metrics),
    }


def write_tensorboard_log(directory: Path, records: Sequence[VersionRecord]) -> Path:
    """One new event file under `directory` with train/* and quality/* scalars and
    chain/version per version (step = the metrics' step, wall time = the commit time).
    Returns the event file (the directory if TensorBoard hides its name)."""
    with ScalarWriter(directory) as writer:
        for rec in records:
            step = rec.training_metrics.get("step", rec.counter)
            if isinstance(step, bool) or not isinstance(step, int):
                step = rec.counter
            wall = datetime.fromisoformat(rec.created_at).timestamp()
            scalars = {**_scalars(rec), "chain/version": float(rec.counter)}
            writer.scalars(step, scalars, walltime=wall)
        path = writer.path or Path(directory)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
