"""API fuzzing against the contract: schemathesis cases from openapi.yaml against the live app.

python -m bench.fuzz [--requests N] [--seed S]
-> {"bench":"fuzz","requests":..,"server_errors":0,"spec_violations":0,"auth_violations":0,
    "operations":..,"operations_covered":..,"status_counts":{..},"state_ok":true,"seconds":..}

The app runs for real (aiohttp on a TCP port, its own event loop in a thread, a local store in a
temporary directory, training enabled with a tiny network so admin control and commits are
live). It is seeded through its own API (an admin commit, two market-data snapshots), then every
operation of openapi.yaml is fuzzed with positive and negative cases; admin operations are sent
with the valid bearer token, without one, with a wrong one and with a wrong scheme. Each response
is checked by schemathesis (no 5xx; status code, content type, headers and body as documented;
invalid input refused) plus two checks of ours (every response has X-Request-ID; admin answers
401 exactly when the token is not valid). Afterwards the state must be intact: the version chain
verifies, the seeded versions keep their hashes and the seeded market data resolves to the same
hashes, through the API and from the store directly.

Counts: `server_errors` = 5xx answers, `spec_violations` = responses that break openapi.yaml
(or accept data it forbids), `auth_violations` = admin answers that ignore the token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import requests
import schemathesis
import structlog
import yaml
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from schemathesis import Case, GenerationMode
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup, ServerError
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from bench.common import emit
from config.settings import (
    AdminSettings,
    CommitPlan,
    JobsSettings,
    ModelSettings,
    PromotionSettings,
    ServerSettings,
    Settings,
    TrainingSettings,
)
from server.app import create_app
from spectral_core.config import (
    ArchConfig,
    CoreConfig,
    OptimConfig,
    SimConfig,
    SpectrumConfig,
    TrainConfig,
)
from storage.chain import VersionChain
from storage.localstore import LocalStore
from storage.marketdata import MarketDataStore

SPEC_PATH = Path(__file__).resolve().parents[1] / "openapi.yaml"
TOKEN = "fuzz-admin-token-0123456789abcdef"
NAMESPACE = "fuzz-eod"
VAL_DATETIME = "2024-06-28T16:00:00Z"
JOB_NAMESPACE = "fuzz-live"
# Half the admin requests carry the valid token, so the operations behind it get fuzzed too.
AUTH_VARIANTS = ("valid", "valid", "valid", "missing", "wrong", "scheme")
DEFAULT_REQUESTS = 1200
DEFAULT_SEED = 20261127

T = TypeVar("T")


def fuzz_core() -> CoreConfig:
    """A network small enough that training, commits and model swaps cost milliseconds."""
    return CoreConfig(
        sim=SimConfig(paths_per_contract=1024),
        spectrum=SpectrumConfig(n_freq=32, grid=256),
        arch=ArchConfig(width=16, depth=1),
        optim=OptimConfig(lr=3e-3, warmup_steps=5, total_steps=400),
        train=TrainConfig(batch_contracts=32, validation_contracts=64, validation_every=10),
    )


def fuzz_settings(*, jobs_file: Path, core: CoreConfig) -> Settings:
    return Settings(
        # A small body limit so generated bodies reach 413 too.
        server=ServerSettings(max_body_bytes=64 * 1024, request_timeout_s=30.0),
        admin=AdminSettings(token=SecretStr(TOKEN)),
        training=TrainingSettings(enabled=True, device="cpu", commit=CommitPlan(kind="never")),
        # the API under fuzz, not model quality: every commit (even of a barely trained
        # network) is served, so the seed commit makes the app ready
        promotion=PromotionSettings(enabled=False),
        model=ModelSettings(poll_interval_s=0.5),
        jobs=JobsSettings(config_file=jobs_file),
        core=core,
    )


def _jobs_toml() -> str:
    # No market data is ever written for this namespace: the job's runs fail, visibly.
    return f"""
[[jobs]]
name = "fuzz-book"
every_s = 2.0
namespace = "{JOB_NAMESPACE}"

[[jobs.instruments]]
id = "c1"
type = "european_call"
underlying = "SPX"
strike = 100.0
expiry = "2030-12-20T21:00:00Z"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """An app on 127.0.0.1:<free port>, served by its own event loop in a daemon thread."""

    def __init__(self, make_app: Callable[[], web.Application]) -> None:
        self.make_app = make_app  # called on the server's loop
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> None:
        self._thread.start()
        self._run(self._start())

    def stop(self) -> None:
        """Graceful shutdown (the worker stops and makes its final commit), then the loop."""
        if self._loop.is_closed():
            return
        if self._runner is not None:
            self._run(self._runner.cleanup())
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


@contextlib.contextmanager
def serving(make_app: Callable[[], web.Application]) -> Iterator[LiveServer]:
    server = LiveServer(make_app)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def live_app(core: CoreConfig | None = None) -> Iterator[tuple[LiveServer, Path]]:
    """The service on a local store in a temporary directory: (server, store directory)."""
    with tempfile.TemporaryDirectory(prefix="spectralmc-fuzz-") as tmp:
        jobs_file = Path(tmp) / "jobs.toml"
        jobs_file.write_text(_jobs_toml())
        settings = fuzz_settings(jobs_file=jobs_file, core=core or fuzz_core())
        store_dir = Path(tmp) / "store"

        def make_app() -> web.Application:
            return create_app(settings, store=LocalStore(store_dir), registry=CollectorRegistry())

        with serving(make_app) as server:
            yield server, store_dir


def quiet_logs() -> None:
    """The app logs every request; a fuzz run makes thousands."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


# --- seeding and the state check -----------------------------------------------------------------


@dataclass
class Seeded:
    versions: dict[int, str] = field(default_factory=dict)  # counter -> version_hash
    snapshots: dict[str, str] = field(default_factory=dict)  # data_asof -> content hash


def _utc(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def market_body(asof: datetime) -> dict[str, Any]:
    """SPX with curves and a surface inside the default training domain."""
    return {
        "data_asof": _utc(asof),
        "spots": {"SPX": 100.0},
        "zero_curves": {"USD-OIS": {"tenors": [0.25, 1.0, 5.0], "rates": [0.03, 0.035, 0.04]}},
        "dividend_curves": {"SPX": {"tenors": [1.0], "rates": [0.015]}},
        "vol_surfaces": {
            "SPX": {
                "expiries": [0.25, 1.0, 5.0],
                "strikes": [80.0, 100.0, 120.0],
                "vols": [[0.28, 0.22, 0.19], [0.26, 0.21, 0.19], [0.25, 0.21, 0.2]],
            }
        },
    }


def _admin(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "X-Actor": "bench-fuzz", **(extra or {})}


def seed_state(session: requests.Session, base_url: str, *, timeout: float = 120.0) -> Seeded:
    """Commit a version through the admin API, wait until it serves, write market data."""
    seeded = Seeded()
    resp = session.post(f"{base_url}/v1/admin/training/commit", headers=_admin(), timeout=timeout)
    if resp.status_code != 201:
        raise RuntimeError(f"seed commit failed: {resp.status_code} {resp.text}")
    committed = resp.json()["committed"]
    seeded.versions[committed["counter"]] = committed["version_hash"]
    deadline = time.monotonic() + timeout
    while session.get(f"{base_url}/readyz", timeout=timeout).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the app never became ready")
        time.sleep(0.05)
    now = datetime.now(UTC)
    for asof in (now - timedelta(hours=2), now - timedelta(hours=1)):
        url = f"{base_url}/v1/marketdata/{NAMESPACE}/{VAL_DATETIME}"
        resp = session.put(url, json=market_body(asof), timeout=timeout)
        if resp.status_code != 201:
            raise RuntimeError(f"seed market data failed: {resp.status_code} {resp.text}")
        body = resp.json()
        seeded.snapshots[body["data_asof"]] = body["hash"]
    return seeded


def check_state_live(session: requests.Session, base_url: str, seeded: Seeded) -> list[str]:
    """Through the API: each seeded data_asof resolves to the same snapshot."""
    problems = []
    for asof, digest in seeded.snapshots.items():
        resp = session.get(
            f"{base_url}/v1/marketdata/{NAMESPACE}/{VAL_DATETIME}",
            params={"data_asof": asof},
            timeout=60,
        )
        got = resp.json().get("hash") if resp.status_code == 200 else resp.status_code
        if got != digest:
            problems.append(f"market data as of {asof} resolves to {got}, was {digest}")
    return problems


async def check_state_stored(store_dir: Path, seeded: Seeded) -> list[str]:
    """From the store, after shutdown: the chain and the audit log verify, nothing seeded is
    lost or changed."""
    store = LocalStore(store_dir)
    problems = []
    try:
        chain = VersionChain(store)
        report = await chain.verify()
        if not report.ok:
            problems.append(f"chain: {report.summary()}")
        if not await chain.log():  # hash-checks every entry; the seed commit wrote the first
            problems.append("the audit log is empty")
        for counter, digest in seeded.versions.items():
            record = await chain.get(counter)
            if record.version_hash != digest:
                problems.append(f"version {counter} hash {record.version_hash}, was {digest}")
        marketdata = MarketDataStore(store, clock=lambda: datetime.now(UTC))
        vdt = datetime.fromisoformat(VAL_DATETIME)
        for asof, digest in seeded.snapshots.items():
            stored = await marketdata.resolve(
                namespace=NAMESPACE, val_datetime=vdt, data_asof=datetime.fromisoformat(asof)
            )
            if stored.content_hash != digest:
                problems.append(f"stored market data as of {asof}: {stored.content_hash}")
    finally:
        await store.aclose()
    return problems


# --- the fuzzer ---------------------------------------------------------------------------------


def check_request_id(ctx: CheckContext, response: Any, case: Case) -> bool | None:
    """openapi.yaml: every response carries X-Request-ID."""
    if not response.headers.get("x-request-id"):
        raise Failure(
            operation=case.operation.label,
            title="Missing X-Request-ID",
            message="the response has no X-Request-ID header",
        )
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
    allow_header_conformance,
    check_request_id,
]


def auth_headers(variant: str) -> dict[str, str]:
    return {
        "valid": {"Authorization": f"Bearer {TOKEN}"},
        "missing": {},
        "wrong": {"Authorization": "Bearer not-the-admin-token"},
        "scheme": {"Authorization": f"Basic {TOKEN}"},
    }[variant]


def load_schema(path: Path = SPEC_PATH) -> Any:
    """openapi.yaml for schemathesis, with the operations' `security` requirements dropped.

    The fuzzer sends the Authorization header itself (valid, missing, wrong, wrong scheme) and
    checks that admin operations answer 401 exactly when it is not valid. Left in, the security
    scheme makes schemathesis generate (and, in negative cases, strip) Authorization too, and a
    case would no longer say which token was sent.
    """
    with path.open() as fh:
        doc = yaml.safe_load(fh)
    for item in doc["paths"].values():
        for operation in item.values():
            if isinstance(operation, dict):
                operation.pop("security", None)
    # 413 (body over server.max_body_bytes) refuses invalid data as much as 400 and 422 do.
    rejected = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5XX"]
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": rejected}}}
    )
    return schemathesis.openapi.from_dict(doc, config=config)


@dataclass
class Tally:
    requests: int = 0
    coverage_requests: int = 0
    server_errors: int = 0
    spec_violations: int = 0
    auth_violations: int = 0
    status_counts: Counter[int] = field(default_factory=Counter)
    per_operation: Counter[str] = field(default_factory=Counter)
    per_operation_status: Counter[str] = field(default_factory=Counter)
    per_operation_seconds: dict[str, float] = field(default_factory=dict)
    # operation label -> auth variants sent and the statuses they got
    admin_statuses: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    failure_kinds: Counter[str] = field(default_factory=Counter)  # check failure title -> count
    failures: list[str] = field(default_factory=list)  # the first few, in full

    def note(self, message: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(message)


def _body_dict(case: Case) -> dict[str, Any] | None:
    return case.body if isinstance(case.body, dict) else None


def _steer(case: Case, data: st.DataObject, seeded: Seeded, core: CoreConfig) -> str:
    """Point some positive cases at the seeded state, so success paths get fuzzed too.

    The edits keep the case valid against the spec (only fields it allows, with valid values).
    """
    path = case.operation.path
    how = data.draw(st.sampled_from(["raw", "key", "book", "book"]), label="steer")
    if how == "raw":
        return how
    body = _body_dict(case)
    if path.startswith("/v1/marketdata/") and case.path_parameters is not None:
        if "val_datetime" in case.path_parameters:
            case.path_parameters["namespace"] = NAMESPACE
            case.path_parameters["val_datetime"] = VAL_DATETIME
        if body is not None and how == "book":
            # Valid curves and surfaces with the generated spots, later than every committed
            # data_asof and not in the future: the write can succeed.
            spots = body.get("spots")
            body.clear()
            body.update(market_body(datetime.now(UTC)))
            if isinstance(spots, dict):
                body["spots"].update(spots)
            if data.draw(st.booleans(), label="wild_curves"):
                # Steep or inverted curves and a log-moneyness surface (it needs the forward):
                # later valuations at data_asof = now price off them, far expiries included.
                rate = st.floats(-5.0, 5.0)
                vol = st.floats(1e-6, 10.0)
                body["zero_curves"] = {
                    "USD-OIS": {"tenors": [1.0, 5.0], "rates": [data.draw(rate), data.draw(rate)]}
                }
                body["dividend_curves"] = {"SPX": {"tenors": [1.0], "rates": [data.draw(rate)]}}
                body["vol_surfaces"] = {
                    "SPX": {
                        "expiries": [1.0],
                        "log_moneyness": [-0.5, 0.5],
                        "vols": [[data.draw(vol), data.draw(vol)]],
                    }
                }
        if case.method.upper() == "GET" and case.query is not None and how == "book":
            case.query.pop("data_asof", None)
    elif path == "/v1/valuations" and body is not None:
        body["valuation_namespace"] = NAMESPACE
        body["val_datetime"] = VAL_DATETIME
        body["data_asof"] = data.draw(st.sampled_from([*seeded.snapshots, _utc(datetime.now(UTC))]))
        if how == "book" and isinstance(body.get("instruments"), list):
            body.pop("model_version", None)
            for i, inst in enumerate(body["instruments"]):
                if isinstance(inst, dict):
                    inst["id"] = f"i{i}"
                    inst["underlying"] = "SPX"
                    horizon = st.one_of(st.floats(0.05, 4.5), st.floats(4.5, 7500.0))
                    years = data.draw(horizon, label="expiry_years")
                    expiry = datetime.fromisoformat(VAL_DATETIME) + timedelta(days=365 * years)
                    inst["expiry"] = _utc(expiry)
    elif path == "/v1/price" and body is not None and how == "book":
        dom = core.domain
        body.pop("model_version", None)
        for contract in body.get("contracts", []):
            if isinstance(contract, dict):
                for name, bounds in (("T", dom.T), ("r", dom.r), ("d", dom.d), ("v", dom.sigma)):
                    contract[name] = data.draw(st.floats(bounds.lower, bounds.upper), label=name)
    elif path == "/v1/admin/model/pin" and body is not None and how == "book":
        body.clear()
        body["version"] = data.draw(st.sampled_from(sorted(seeded.versions)))
    return how


def _record(
    tally: Tally, case: Case, response: Any, variant: str | None, mode: GenerationMode
) -> None:
    label = case.operation.label
    status = int(response.status_code)
    tally.requests += 1
    tally.status_counts[status] += 1
    tally.per_operation[label] += 1
    tally.per_operation_status[f"{label} -> {status}"] += 1
    seconds = tally.per_operation_seconds
    seconds[label] = seconds.get(label, 0.0) + float(response.elapsed)
    if variant is not None and case.method.upper() == case.operation.method.upper():
        tally.admin_statuses.setdefault(label, set()).add((variant, status))
        bad = status == 401 if variant == "valid" else status != 401
        if variant != "valid" and "www-authenticate" not in response.headers:
            bad = True
        if bad:
            tally.auth_violations += 1
            tally.failure_kinds["Admin answer ignores the token"] += 1
            tally.note(
                f"auth: {label} with {variant} token -> {status}: {response.text[:300]}\n"
                f"  sent: {dict(response.request.headers)}"
            )
    try:
        case.validate_response(response, checks=CHECKS)
    except FailureGroup as group:
        for failure in group.exceptions:
            tally.failure_kinds[failure.title] += 1
            if isinstance(failure, ServerError):
                tally.server_errors += 1
            else:
                tally.spec_violations += 1
            curl = case.as_curl_command()
            tally.note(
                f"{failure.title}: {label} ({mode.value}) -> {status}: {failure.message[:400]}\n"
                f"  body: {response.text[:300]}\n  {curl if len(curl) < 5000 else curl[:600]}"
            )
    except Failure as failure:
        tally.failure_kinds[failure.title] += 1
        if isinstance(failure, ServerError):
            tally.server_errors += 1
        else:
            tally.spec_violations += 1
        tally.note(f"{failure.title}: {label} -> {status}: {failure.message[:400]}")


def _fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    *,
    examples: int,
    run_seed: int,
    base_url: str,
    session: requests.Session,
    tally: Tally,
    seeded: Seeded,
    core: CoreConfig,
) -> None:
    admin = operation.path.startswith("/v1/admin/")

    @seed(run_seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Case, data: st.DataObject) -> None:
        if mode == GenerationMode.POSITIVE:
            _steer(case, data, seeded, core)
        variant = data.draw(st.sampled_from(AUTH_VARIANTS), label="auth") if admin else None
        headers = auth_headers(variant) if variant is not None else None
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
        _record(tally, case, response, variant, mode)

    with contextlib.suppress(Unsatisfiable):  # negative cases of parameterless operations
        run()


def _coverage_pass(
    schema: Any, operations: list[Any], *, base_url: str, session: requests.Session, tally: Tally
) -> None:
    """schemathesis' deterministic coverage cases: boundary values, missing and wrongly typed
    fields, undeclared methods (405); admin ones cycle through the token variants."""
    for op in operations:
        admin = op.path.startswith("/v1/admin/")
        config = schema.config.generation_for(operation=op)
        cases = schema.iter_coverage_cases(
            op, generation_modes=list(GenerationMode), generation_config=config
        )
        for k, case in enumerate(cases):
            variant = AUTH_VARIANTS[k % len(AUTH_VARIANTS)] if admin else None
            headers = auth_headers(variant) if variant is not None else None
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
            mode = case.meta.generation.mode if case.meta is not None else GenerationMode.POSITIVE
            _record(tally, case, response, variant, mode)


def fuzz(
    base_url: str,
    *,
    requests_wanted: int,
    run_seed: int,
    seeded: Seeded,
    core: CoreConfig,
    coverage: bool = False,
    include: Callable[[str], bool] = lambda _: True,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[Tally, int]:
    """Fuzz every operation (whose label `include` accepts): first, with `coverage`, all of
    schemathesis' coverage cases, then random positive and negative cases until
    `requests_wanted` more requests have been sent; (tally, number of operations)."""
    schema = load_schema()
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if include(op.label)]
    pairs = [(op, mode) for op in operations for mode in GenerationMode]
    tally = Tally()
    with requests.Session() as session:
        if coverage:
            _coverage_pass(schema, operations, base_url=base_url, session=session, tally=tally)
            tally.coverage_requests = tally.requests
            progress(f"coverage cases: {tally.requests} requests")
        requests_wanted += tally.requests
        round_no = 0
        while tally.requests < requests_wanted:
            # Operations with few distinct inputs run out early: later rounds make up the rest.
            per_pair = max(1, math.ceil((requests_wanted - tally.requests) / len(pairs)))
            sent = tally.requests
            for k, (op, mode) in enumerate(pairs):
                _fuzz_operation(
                    op,
                    mode,
                    examples=per_pair,
                    run_seed=run_seed + 1000 * round_no + k,
                    base_url=base_url,
                    session=session,
                    tally=tally,
                    seeded=seeded,
                    core=core,
                )
            round_no += 1
            progress(f"round {round_no}: {tally.requests} requests")
            if tally.requests == sent:
                break  # nothing left to generate
    return tally, len(operations)


@dataclass
class FuzzResult:
    tally: Tally
    operations: int
    state_problems: list[str]
    seconds: float

    @property
    def state_ok(self) -> bool:
        return not self.state_problems

    def as_json(self) -> dict[str, Any]:
        t = self.tally
        return {
            "bench": "fuzz",
            "requests": t.requests,
            "coverage_requests": t.coverage_requests,
            "server_errors": t.server_errors,
            "spec_violations": t.spec_violations,
            "auth_violations": t.auth_violations,
            "operations": self.operations,
            "operations_covered": len(t.per_operation),
            "status_counts": {str(k): v for k, v in sorted(t.status_counts.items())},
            "state_ok": self.state_ok,
            "seconds": round(self.seconds, 1),
        }


def run_fuzz(
    *,
    requests_wanted: int,
    run_seed: int = DEFAULT_SEED,
    core: CoreConfig | None = None,
    coverage: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> FuzzResult:
    """Start the app, seed it, fuzz it, stop it, check its state."""
    core = core or fuzz_core()
    start = time.perf_counter()
    with live_app(core) as (server, store_dir):
        with requests.Session() as session:
            seeded = seed_state(session, server.base_url)
        progress(f"seeded: versions {seeded.versions}, snapshots {seeded.snapshots}")
        tally, operations = fuzz(
            server.base_url,
            requests_wanted=requests_wanted,
            run_seed=run_seed,
            seeded=seeded,
            core=core,
            coverage=coverage,
            progress=progress,
        )
        with requests.Session() as session:
            problems = check_state_live(session, server.base_url, seeded)
        server.stop()
        problems += asyncio.run(check_state_stored(store_dir, seeded))
    return FuzzResult(tally, operations, problems, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz")
    p.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help="random cases to send, at least (after the coverage cases)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument(
        "--no-coverage", action="store_true", help="skip schemathesis' deterministic coverage cases"
    )
    args = p.parse_args(argv)
    quiet_logs()

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run_fuzz(
        requests_wanted=args.requests,
        run_seed=args.seed,
        coverage=not args.no_coverage,
        progress=progress,
    )
    for line in result.tally.failures:
        progress(line)
    for line in result.state_problems:
        progress(f"state: {line}")
    t = result.tally
    progress("failure kinds: " + json.dumps(dict(t.failure_kinds)))
    progress("statuses by operation: " + json.dumps(dict(sorted(t.per_operation_status.items()))))
    server_s = {k: round(v, 2) for k, v in t.per_operation_seconds.items()}
    progress("server seconds by operation: " + json.dumps(server_s))
    emit(result.as_json())


if __name__ == "__main__":
    main()
