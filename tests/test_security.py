"""Security checks: admin authentication, input limits, no unsafe deserialisation, no traversal.

Builds on the checks elsewhere (tests/test_admin_worker.py: missing / wrong / no-scheme / Basic /
empty tokens; tests/test_server_basics.py: 413 on market-data writes; tests/test_valuations.py and
tests/test_price_route.py: instrument counts; tests/test_objectstore.py: key validation) and
covers what they do not: odd Authorization headers sent as raw bytes, every body route's size
limit, every string and list field's bound, pickle payloads in checkpoints, the source itself, and
path traversal through the HTTP API with a look at the filesystem afterwards.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import io
import json
import os
import pickle
import struct
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from config.settings import (
    AdminSettings,
    JobsSettings,
    ModelSettings,
    ServerSettings,
    Settings,
    SettingsError,
    TrainingSettings,
    load_settings,
)
from server.app import create_app
from server.keys import CHAIN_KEY
from storage.chain import VersionChain, VersionRecord, blob_key, version_key
from storage.checkpoint import FORMAT_VERSION, MAGIC, canonical_json, decode_checkpoint
from storage.localstore import LocalStore
from storage.objectstore import Corrupt
from tests.server_fixtures import (
    NOW,
    VDT,
    commit_model,
    market_body,
    openapi_spec,
    put_market_data,
)

Client = TestClient[web.Request, web.Application]

TOKEN = "security-admin-token-0123456789"
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spectral_core", "storage", "server", "config")
# Every operation openapi.yaml marks as needing the bearer token, so a new admin route is covered.
ADMIN_ROUTES = tuple(
    sorted(
        # path parameters filled with a value the app serves: the refusal must come from the
        # token check, not from a 404 for the route
        (method.upper(), path.replace("{model}", "bs"))
        for path, ops in openapi_spec()["paths"].items()
        for method, op in ops.items()
        if isinstance(op, dict) and "security" in op
    )
)
ASOF = NOW - timedelta(hours=1)
VDT_TEXT = "2024-06-28T16:00:00Z"


def settings(*, token: str | None = TOKEN, **server: Any) -> Settings:
    return Settings(
        server=ServerSettings(**server),
        admin=AdminSettings(token=None if token is None else SecretStr(token)),
        training=TrainingSettings(enabled=False),
        model=ModelSettings(poll_interval_s=0.2),
        jobs=JobsSettings(config_file=None),
    )


async def start(aiohttp_client: Any, store_dir: Path, s: Settings) -> Client:
    app = create_app(
        s, store=LocalStore(store_dir), clock=lambda: NOW, registry=CollectorRegistry()
    )
    client: Client = await aiohttp_client(app)
    return client


async def wait_ready(client: Client) -> None:
    for _ in range(200):
        if (await client.get("/readyz")).status == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the app never loaded a model")


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(
    client: Client,
    method: str,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes = b"",
) -> RawResponse:
    """Send exactly these bytes (no client-side normalisation or encoding) and read the answer."""
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        head = [
            method.encode() + b" " + target + b" HTTP/1.1",
            b"Host: localhost",
            b"Connection: close",
            b"Content-Length: " + str(len(body)).encode(),
            *(k + b": " + v for k, v in headers),
        ]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = data.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    parsed = {}
    for line in header_block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        parsed[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    if parsed.get("transfer-encoding") == "chunked":
        out = b""
        while payload:
            size_text, _, payload = payload.partition(b"\r\n")
            size = int(size_text, 16)
            if size == 0:
                break
            out, payload = out + payload[:size], payload[size + 2 :]
        payload = out
    return RawResponse(int(status_line.split()[1]), parsed, payload)


def files_under(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its content (the state the API may not change by accident)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# --- admin authentication -------------------------------------------------------------------


@pytest.fixture
async def admin_client(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Client]:
    store = LocalStore(tmp_path / "store")
    await commit_model(store)
    client = await start(aiohttp_client, tmp_path / "store", settings())
    await wait_ready(client)
    yield client


BAD_AUTH: dict[str, list[tuple[bytes, bytes]]] = {
    "bearer-without-space": [(b"Authorization", b"Bearer" + TOKEN.encode())],
    "bearer-no-token": [(b"Authorization", b"Bearer")],
    "other-scheme": [(b"Authorization", b"Token " + TOKEN.encode())],
    "digest-scheme": [(b"Authorization", b"Digest " + TOKEN.encode())],
    "trailing-junk": [(b"Authorization", b"Bearer " + TOKEN.encode() + b"x")],
    "trailing-word": [(b"Authorization", b"Bearer " + TOKEN.encode() + b" admin")],
    "token-prefix": [(b"Authorization", b"Bearer " + TOKEN[:-1].encode())],
    "tab-separator": [(b"Authorization", b"Bearer\t" + TOKEN.encode())],
    "very-long": [(b"Authorization", b"Bearer " + b"A" * 6000)],
    "latin1-bytes": [(b"Authorization", b"Bearer " + TOKEN.encode() + b"\xe9\xff")],
    "latin1-token": [(b"Authorization", b"Bearer \xe9\xe8\xe0\xfc" * 8)],
    "utf8-token": [(b"Authorization", "Bearer ééééééééééééééééé".encode())],
    "bearer-in-other-header": [(b"X-Authorization", b"Bearer " + TOKEN.encode())],
}
QUERY_TOKENS = (
    b"?token=" + TOKEN.encode(),
    b"?access_token=" + TOKEN.encode(),
    b"?Authorization=Bearer%20" + TOKEN.encode(),
)


def test_the_admin_routes_come_from_the_spec() -> None:
    assert len(ADMIN_ROUTES) >= 6
    assert all(path.startswith("/v1/admin/") for _, path in ADMIN_ROUTES)


async def test_the_raw_client_reaches_admin_with_the_right_token(admin_client: Client) -> None:
    """The control for the refusals below: the same raw path with the token is let in."""
    auth = [(b"Authorization", b"Bearer " + TOKEN.encode())]
    resp = await raw_request(admin_client, "GET", b"/v1/admin/training", auth)
    assert resp.status == 200, resp.body
    assert resp.json()["training"] == {"state": "disabled"}


@pytest.mark.parametrize("case", sorted(BAD_AUTH))
async def test_admin_routes_refuse_malformed_tokens(admin_client: Client, case: str) -> None:
    chain: VersionChain = admin_client.app[CHAIN_KEY]
    body = b'{"version": 1}'
    for method, path in ADMIN_ROUTES:
        resp = await raw_request(
            admin_client,
            method,
            path.encode(),
            [*BAD_AUTH[case], (b"Content-Type", b"application/json")],
            body if method == "PUT" else b"",
        )
        assert resp.status == 401, (case, method, path, resp.body)
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json()["error"] == "unauthorized"
        assert resp.headers["www-authenticate"].startswith("Bearer")
    assert await chain.log() == []  # nothing was audited, so nothing happened
    assert await chain.ref("pin") is None


async def test_admin_token_in_the_query_string_is_ignored(admin_client: Client) -> None:
    for query in QUERY_TOKENS:
        for method, path in ADMIN_ROUTES:
            resp = await raw_request(admin_client, method, path.encode() + query)
            assert resp.status == 401, (query, method, path)
            assert resp.json()["error"] == "unauthorized"
    assert await admin_client.app[CHAIN_KEY].log() == []


async def test_authorization_headers_the_http_parser_refuses_are_4xx(
    admin_client: Client,
) -> None:
    """Past the parser's field limit, or with control characters, the app never sees the request:
    still a 4xx, and the server goes on."""
    for value in (b"Bearer " + b"A" * 20000, b"Bearer " + TOKEN.encode() + b"\x01\x7f"):
        resp = await raw_request(
            admin_client, "GET", b"/v1/admin/training", [(b"Authorization", value)]
        )
        assert 400 <= resp.status < 500, resp.status
    assert await admin_client.app[CHAIN_KEY].log() == []
    assert (await admin_client.get("/healthz")).status == 200


@pytest.mark.parametrize(
    "header",
    [b"", b"Bearer ", b"Bearer None", b"Bearer null", b"Bearer " + TOKEN.encode()],
    ids=["missing", "empty", "none", "null", "some-token"],
)
async def test_admin_disabled_refuses_every_route_whatever_the_header(
    aiohttp_client: Any, tmp_path: Path, header: bytes
) -> None:
    client = await start(aiohttp_client, tmp_path / "store", settings(token=None))
    headers = [(b"Authorization", header)] if header else []
    for method, path in ADMIN_ROUTES:
        resp = await raw_request(client, method, path.encode(), headers)
        assert resp.status == 401, (method, path)
        body = resp.json()
        assert body["error"] == "unauthorized" and "disabled" in body["detail"]
    assert await client.app[CHAIN_KEY].log() == []


# --- size limits ----------------------------------------------------------------------------

BODY_ROUTES = (
    ("PUT", f"/v1/marketdata/eod/{VDT_TEXT}"),
    ("POST", f"/v1/marketdata/eod/{VDT_TEXT}"),
    ("POST", "/v1/valuations"),
    ("POST", "/v1/price"),
    ("PUT", "/v1/admin/model/pin"),
)


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_every_body_over_max_body_bytes_is_413(
    aiohttp_client: Any, tmp_path: Path, method: str, path: str
) -> None:
    limit = 2048
    client = await start(aiohttp_client, tmp_path / "store", settings(max_body_bytes=limit))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    big = json.dumps({"padding": "x" * (2 * limit)}).encode()
    headers = {**auth, "Content-Type": "application/json"}
    resp = await client.request(method, path, data=big, headers=headers)
    assert resp.status == 413, await resp.text()
    assert (await resp.json())["error"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: enforced while reading
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    resp = await client.request(method, path, data=chunks(), headers=headers)
    assert resp.status == 413, await resp.text()
    assert (await resp.json())["error"] == "payload_too_large"
    assert files_under(tmp_path / "store") == {}


@pytest.fixture
async def priced_client(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Client]:
    """Default limits, model version 1 and one snapshot for eod/VDT."""
    store = LocalStore(tmp_path / "store")
    await commit_model(store)
    client = await start(aiohttp_client, tmp_path / "store", settings())
    await wait_ready(client)
    await put_market_data(client, body=market_body(ASOF))
    yield client


def valuation(**extra: Any) -> dict[str, Any]:
    inst = {
        "id": "c1",
        "type": "european_call",
        "underlying": "SPX",
        "strike": 100.0,
        "expiry": "2025-06-27T16:00:00Z",
    }
    inst.update(extra.pop("instrument", {}))
    return {
        "valuation_namespace": "eod",
        "val_datetime": VDT_TEXT,
        "data_asof": NOW.isoformat(),
        "instruments": [inst],
        **extra,
    }


async def test_strings_over_max_string_len_are_422(priced_client: Client) -> None:
    client = priced_client
    long = "a" * (settings().server.max_string_len + 1)
    assert (await client.post("/v1/valuations", json=valuation())).status == 200  # control
    bodies = {
        "valuation_namespace": valuation(valuation_namespace=long),
        "instruments.0.id": valuation(instrument={"id": long}),
        "instruments.0.underlying": valuation(instrument={"underlying": long}),
        "instruments.0.type": valuation(instrument={"type": long}),
        "instruments.0.expiry": valuation(instrument={"expiry": "2025-06-27T16:00:00" + long}),
        "val_datetime": valuation(val_datetime=long),
    }
    for field, body in bodies.items():
        resp = await client.post("/v1/valuations", json=body)
        assert resp.status == 422, (field, await resp.text())
        paths = [f["path"] for f in (await resp.json())["fields"]]
        assert any(p.startswith(field) for p in paths), (field, paths)

    auth = {"Authorization": f"Bearer {TOKEN}"}
    resp = await client.put("/v1/admin/model/pin", json={"ref": long}, headers=auth)
    assert resp.status == 422
    asof = (ASOF + timedelta(minutes=1)).isoformat()
    docs = {
        "spots": {**market_body(ASOF), "spots": {long: 1.0}},
        "zero_curves": {
            **market_body(ASOF),
            "zero_curves": {long: {"tenors": [1.0], "rates": [0.01]}},
        },
        "discount_curve": {**market_body(ASOF), "discount_curve": long},
        "dividend_curves": {
            **market_body(ASOF),
            "dividend_curves": {long: {"tenors": [1.0], "rates": [0.0]}},
        },
        "fixings": {**market_body(ASOF), "fixings": {long: [{"at": VDT_TEXT, "value": 1.0}]}},
        "zero_curves.USD-OIS.interpolation": {
            **market_body(ASOF),
            "zero_curves": {"USD-OIS": {"tenors": [1.0], "rates": [0.01], "interpolation": long}},
        },
        "derived_from.namespace": {
            **market_body(ASOF),
            "derived_from": {
                "namespace": long,
                "val_datetime": VDT_TEXT,
                "data_asof": ASOF.isoformat(),
                "hash": "0" * 64,
            },
        },
    }
    for field, doc in docs.items():
        doc = {**doc, "data_asof": asof}
        resp = await client.put(f"/v1/marketdata/eod/{VDT_TEXT}", json=doc)
        assert resp.status == 422, (field, await resp.text())
    for url in (f"/v1/marketdata/{long}/{VDT_TEXT}", f"/v1/marketdata/eod/{long}"):
        assert (await client.get(url)).status == 422, url
    resp = await client.get(f"/v1/marketdata/eod/{VDT_TEXT}", params={"data_asof": long})
    assert resp.status == 422
    assert (await client.get(f"/v1/marketdata/{long}")).status == 422


async def test_lists_over_max_list_items_are_422(priced_client: Client) -> None:
    client = priced_client
    cap = settings().server.max_list_items
    over = cap + 1
    asof = (ASOF + timedelta(minutes=1)).isoformat()
    url = f"/v1/marketdata/eod/{VDT_TEXT}"
    tenors = [0.001 * (i + 1) for i in range(over)]
    fixings = [
        {"at": (VDT - timedelta(minutes=over - i)).isoformat(), "value": 100.0} for i in range(over)
    ]
    surface = market_body(ASOF)["vol_surfaces"]["SPX"]
    docs = {
        "zero_curves": {"USD-OIS": {"tenors": tenors, "rates": [0.03] * over}},
        "dividend_curves": {"SPX": {"tenors": tenors, "rates": [0.01] * over}},
        "fixings": {"SPX": fixings},
        "vol_surfaces": {
            "SPX": {**surface, "strikes": [50.0 + 0.01 * i for i in range(over)],
                    "vols": [[0.2] * over for _ in surface["expiries"]]}
        },
    }  # fmt: skip
    for field, content in docs.items():
        doc = {**market_body(ASOF), "data_asof": asof, field: content}
        resp = await client.put(url, json=doc)
        assert resp.status == 422, (field, resp.status, (await resp.text())[:300])
        reasons = {f["path"]: f["reason"] for f in (await resp.json())["fields"]}
        assert any(p.startswith(field) and "at most" in r for p, r in reasons.items()), reasons
    resp = await client.get("/v1/marketdata/eod", params={"limit": str(over)})
    assert resp.status == 422
    # Nothing was written by the refused documents: the first snapshot still resolves.
    got = await (await client.get(url)).json()
    assert got["data_asof"] == ASOF.isoformat().replace("+00:00", "Z")


# --- no code execution from stored or uploaded data -------------------------------------------

# Calls (dotted, as written) and modules that deserialise into code or run code.
FORBIDDEN_CALLS = frozenset(
    {
        "eval",
        "exec",
        "compile",
        "__import__",
        "torch.load",
        "torch.serialization.load",
        "torch.jit.load",
        "yaml.load",
        "yaml.load_all",
        "yaml.unsafe_load",
        "yaml.full_load",
        "yaml.full_load_all",
        "numpy.load",
        "np.load",
        "pandas.read_pickle",
        "pd.read_pickle",
    }
)
FORBIDDEN_MODULES = frozenset(
    {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def unsafe_constructs(source: str, filename: str = "<source>") -> list[str]:
    """Every import of a pickle-like module and every call of a code-running loader in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{where} import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{where} from {module} import ...")
            for alias in node.names:
                if f"{module}.{alias.name}" in FORBIDDEN_CALLS:
                    found.append(f"{where} from {module} import {alias.name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in FORBIDDEN_CALLS:
                found.append(f"{where} call {name}")
            if name is not None and name.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{where} call {name}")
            # getattr(torch, "load") and friends dodge the dotted check.
            if name == "getattr" and len(node.args) >= 2:
                attr = node.args[1]
                if isinstance(attr, ast.Constant) and attr.value in {"load", "loads", "eval"}:
                    found.append(f"{where} getattr(..., {attr.value!r})")
    return found


def test_the_scanner_finds_every_forbidden_construct() -> None:
    """The source check below can fail: each construct in a sample is reported."""
    sample = "\n".join(
        [
            "import pickle",
            "import marshal as m",
            "from shelve import open",
            "from torch import load",
            "from yaml import unsafe_load",
            "torch.load(f)",
            "yaml.load(s)",
            "yaml.full_load(s)",
            "np.load(p, allow_pickle=True)",
            "eval('1')",
            "exec('x = 1')",
            "__import__('os')",
            "getattr(torch, 'load')(f)",
            "model.eval()",  # a torch module's eval mode is fine
            "json.loads(s)",  # fine
            "yaml.safe_load(s)",  # fine
        ]
    )
    found = unsafe_constructs(sample)
    assert len(found) == 13, found
    assert not any(":14 " in f or ":15 " in f or ":16 " in f for f in found), found


def test_the_service_source_has_no_unsafe_deserialisation() -> None:
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert len(files) > 20  # the packages were found
    found = [f for p in files for f in unsafe_constructs(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


class _Payload:
    """Unpickling this creates the directory `marker`: proof that a loader ran code from data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def pickle_blobs(marker: Path) -> dict[str, bytes]:
    payload = pickle.dumps(_Payload(marker), protocol=2)
    buf = io.BytesIO()
    torch.save({"weights": _Payload(marker)}, buf)
    meta = canonical_json({"format_version": FORMAT_VERSION, "meta": {}, "tensors": {}})
    header = struct.pack("<8sIQQ", MAGIC, FORMAT_VERSION, len(meta), len(payload))
    return {
        "raw-pickle": payload,
        "torch-save": buf.getvalue(),
        "pickle-as-tensor-data": header + meta + payload,
    }


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    """The control: unpickling the payload does create the marker (so the next tests can fail)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle_blobs(marker)["raw-pickle"])  # the point of the control
    assert marker.exists()


@pytest.mark.parametrize("kind", ["raw-pickle", "torch-save", "pickle-as-tensor-data"])
def test_a_checkpoint_holding_a_pickle_is_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    blob = pickle_blobs(marker)[kind]
    with pytest.raises(Corrupt):
        decode_checkpoint(blob, expected_sha256=hashlib.sha256(blob).hexdigest())
    assert not marker.exists()


async def test_a_stored_pickle_version_is_never_served(aiohttp_client: Any, tmp_path: Path) -> None:
    """A version whose blob is a pickle (hashes all consistent) is refused at load, not run."""
    marker = tmp_path / "ran"
    store = LocalStore(tmp_path / "store")
    blob = pickle_blobs(marker)["torch-save"]
    sha = hashlib.sha256(blob).hexdigest()
    await store.put_if_absent(blob_key(sha), blob)
    record = VersionRecord.build(
        counter=1,
        parent_hash=None,
        blob_sha256=sha,
        blob_size=len(blob),
        created_at=NOW.isoformat(),
        message="planted",
        training_metrics={},
        quality_metrics={},
        config_fingerprint=None,
    )
    await store.put_if_absent(version_key(1), record.to_bytes())
    with pytest.raises(Corrupt):
        await VersionChain(store).load(1)
    client = await start(aiohttp_client, tmp_path / "store", settings())
    for _ in range(5):
        resp = await client.get("/readyz")
        assert resp.status == 503
        await asyncio.sleep(0.05)
    assert "Corrupt" in (await resp.json())["reason"]
    contract = {"X0": 100.0, "K": 100.0, "T": 1.0, "r": 0.02, "d": 0.0, "v": 0.2}
    resp = await client.post("/v1/price", json={"contracts": [contract]})
    assert resp.status == 503
    assert not marker.exists()


# --- keys from validated names only: no traversal into (or out of) the store ------------------

TRAVERSAL_NAMES = (
    "..",
    ".",
    "../x",
    "..%2fx",
    "a/../../b",
    "a%2f..%2f..%2fb",
    "%2e%2e",
    "%2e%2e%2f",
    "%2e%2e%2fetc%2fpasswd",
    "%2fetc%2fpasswd",
    "/etc/passwd",
    "%00",
    "a%00b",
    ".hidden",
    "..%5c..%5cx",
    "C:%5cwindows",
    "%252e%252e%252f",
)


async def test_names_cannot_traverse_the_store(aiohttp_client: Any, tmp_path: Path) -> None:
    """Namespaces, val_datetimes and ref names like '../x' are 4xx; nothing moves on disk."""
    root = tmp_path / "srv"
    store_dir = root / "store"
    store = LocalStore(store_dir)
    await commit_model(store)
    client = await start(aiohttp_client, store_dir, settings())
    await wait_ready(client)
    await put_market_data(client, body=market_body(ASOF))
    before_store = files_under(store_dir)
    before_all = files_under(tmp_path)
    auth = [(b"Authorization", b"Bearer " + TOKEN.encode()), (b"Content-Type", b"application/json")]
    doc = json.dumps(market_body(ASOF + timedelta(minutes=5))).encode()
    statuses: list[tuple[str, int]] = []

    async def attempt(method: str, target: str, body: bytes = b"", headers: Any = ()) -> None:
        resp = await raw_request(client, method, target.encode(), headers or auth, body)
        statuses.append((f"{method} {target}", resp.status))
        assert 400 <= resp.status < 500, (method, target, resp.status, resp.body[:300])
        assert resp.headers.get("content-type", "").startswith("application/json"), target

    for name in TRAVERSAL_NAMES:
        await attempt("PUT", f"/v1/marketdata/{name}/{VDT_TEXT}", doc)
        await attempt("GET", f"/v1/marketdata/{name}/{VDT_TEXT}")
        await attempt("GET", f"/v1/marketdata/{name}")
        await attempt("PUT", f"/v1/marketdata/eod/{name}", doc)
        await attempt("GET", f"/v1/marketdata/eod/{name}")
        await attempt("GET", f"/v1/marketdata/eod/{VDT_TEXT}%2f{name}")
    for text in ("../x", "..", "a/../../b", "/etc/passwd", "x\x00y", "%2e%2e%2f", "..\\x", ".tmp"):
        pin = json.dumps({"ref": text}).encode()
        await attempt("PUT", "/v1/admin/model/pin", pin)
        for field in ("valuation_namespace", "underlying"):
            if field == "valuation_namespace":
                body = valuation(valuation_namespace=text)
            else:
                body = valuation(instrument={"underlying": text})
            await attempt("POST", "/v1/valuations", json.dumps(body).encode())
        bad_doc = {**market_body(ASOF + timedelta(minutes=5)), "spots": {text: 1.0}}
        await attempt("PUT", f"/v1/marketdata/eod/{VDT_TEXT}", json.dumps(bad_doc).encode())
    assert len(statuses) == 6 * len(TRAVERSAL_NAMES) + 8 * 4
    assert files_under(store_dir) == before_store
    assert files_under(tmp_path) == before_all
    assert await client.app[CHAIN_KEY].log() == []
    # Raw-byte targets the HTTP parser itself refuses are still 4xx, never a crash.
    for target in (b"/v1/marketdata/\x00/x", b"/v1/marketdata/eod/2024\xff", b"/../../etc/passwd"):
        resp = await raw_request(client, "GET", target)
        assert 400 <= resp.status < 500, (target, resp.status)
    assert (await client.get("/healthz")).status == 200
    assert not any(p.name == "x" or p.name == "b" for p in root.parent.rglob("*"))


# --- configuration and observability under hostile input ---------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        " padded-token-0123456789 ",
        "tokén-0123456789abcdef",
        "two words 0123456789ab",
        'q"0123456789abcdef',
    ],
    ids=["whitespace", "non-ascii", "space", "quote"],
)
def test_an_admin_token_that_cannot_be_sent_as_a_bearer_is_refused(token: str) -> None:
    """Such a token could never match a header (or only after the server strips it)."""
    with pytest.raises(SettingsError) as err:
        load_settings(env={"SPECTRALMC_ADMIN__TOKEN": token})
    assert "token" in str(err.value) and token.strip() not in str(err.value)


def test_a_bearer_token_setting_is_accepted() -> None:
    token = "Ab0-._~+/token-0123456789=="
    got = load_settings(env={"SPECTRALMC_ADMIN__TOKEN": token}).admin.token
    assert got is not None and got.get_secret_value() == token


async def test_client_chosen_methods_do_not_grow_the_metrics(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """Every method the HTTP parser accepts beyond the usual ones is one `other` label value."""
    client = await start(aiohttp_client, tmp_path / "store", settings())
    odd = ("PROPFIND", "PURGE", "MKCOL", "LINK", "REPORT", "SEARCH", "LOCK", "COPY", "MOVE")
    for method in odd:
        for target in (b"/healthz", b"/no/such/route"):
            resp = await raw_request(client, method, target)
            assert 400 <= resp.status < 500, (method, resp.status)
    text = await (await client.get("/metrics")).text()
    methods = {
        line.split('method="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("spectralmc_http_requests_total{")
    }
    assert methods == {"other"}
    assert (
        'spectralmc_http_requests_total{method="other",route="unmatched",status="405"} 9.0' in text
    )
