"""openapi.yaml is the contract: the app's routes match it both ways and real responses validate."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from config.settings import (
    AdminSettings,
    CommitPlan,
    ModelSettings,
    ServerSettings,
    Settings,
    TrainingSettings,
)
from server.app import create_app
from server.keys import CHAIN_KEY, MODEL_KEY, MODEL_READY_KEY, Readiness
from storage.localstore import LocalStore
from storage.objectstore import MemoryStore
from tests.core_fixtures import tiny_config
from tests.server_fixtures import until

SPEC_PATH = Path(__file__).resolve().parents[1] / "openapi.yaml"
METHODS = ("get", "put", "post", "delete", "patch")
NOW = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)

Client = TestClient[web.Request, web.Application]


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    with SPEC_PATH.open() as fh:
        loaded: dict[str, Any] = yaml.safe_load(fh)
    return loaded


def _app() -> web.Application:
    settings = Settings(
        server=ServerSettings(max_body_bytes=16 * 1024), training=TrainingSettings(enabled=False)
    )
    return create_app(
        settings, store=MemoryStore(), clock=lambda: NOW, registry=CollectorRegistry()
    )


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue  # aiohttp adds HEAD beside every GET
        out.add((route.method.lower(), route.resource.canonical))
    return out


def spec_routes(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m, path) for path, item in spec["paths"].items() for m in METHODS if m in item}


def test_spec_is_a_3_1_document_with_servers_and_error_schema(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    assert spec["info"]["title"] and spec["info"]["version"]
    assert spec["servers"]
    jsonschema.Draft202012Validator.check_schema(spec["components"]["schemas"]["Error"])


def test_every_app_route_is_in_the_spec_and_vice_versa(spec: dict[str, Any]) -> None:
    ours, documented = app_routes(_app()), spec_routes(spec)
    assert ours - documented == set(), "routes missing from openapi.yaml"
    assert documented - ours == set(), "openapi.yaml documents routes the app lacks"


def _schema_validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Validator:
    # Wrap so '#/components/...' references resolve against the spec.
    root = {"allOf": [schema], "components": spec["components"]}
    return jsonschema.Draft202012Validator(root)


def _response(spec: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    operation = spec["paths"][path][method]
    responses = operation["responses"]
    assert str(status) in responses, f"{method.upper()} {path} -> {status} is not documented"
    response: dict[str, Any] = responses[str(status)]
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    return response


def _response_schema(
    spec: dict[str, Any], path: str, method: str, status: int, content_type: str
) -> dict[str, Any]:
    response = _response(spec, path, method, status)
    assert content_type in response["content"], f"{content_type} not documented for {status}"
    schema: dict[str, Any] = response["content"][content_type]["schema"]
    return schema


Check = Callable[..., Awaitable[Any]]
MakeCheck = Callable[[web.Application], Awaitable[Check]]


@pytest.fixture
def make_check(aiohttp_client: Any, spec: dict[str, Any]) -> MakeCheck:
    """A client for `app` whose every call checks status, headers and body against the spec."""

    async def make(app: web.Application) -> Check:
        client: Client = await aiohttp_client(app)
        seen: set[tuple[str, str]] = set()

        async def call(
            method: str, url: str, path: str, *, status: int, json_body: Any = None, **kw: Any
        ) -> Any:
            if json_body is not None:
                operation = spec["paths"][path][method]
                body_schema = operation["requestBody"]["content"]["application/json"]
                _schema_validator(spec, body_schema["schema"]).validate(json_body)
                kw["json"] = json_body
            resp = await client.request(method.upper(), url, **kw)
            assert resp.status == status, await resp.text()
            for header in _response(spec, path, method, status).get("headers", {}):
                assert header in resp.headers, f"documented header {header} is missing"
            schema = _response_schema(spec, path, method, status, resp.content_type)
            if resp.content_type == "application/json":
                body = await resp.json()
            else:
                body = await resp.text()
            _schema_validator(spec, schema).validate(body)
            seen.add((method, path))
            return body

        call.client = client  # type: ignore[attr-defined]
        call.seen = seen  # type: ignore[attr-defined]
        return call

    return make


@pytest.fixture
async def check(make_check: MakeCheck) -> Check:
    return await make_check(_app())


def _snapshot(asof: datetime, **extra: Any) -> dict[str, Any]:
    return {
        "data_asof": asof.isoformat().replace("+00:00", "Z"),
        "spots": {"SPX": 100.0},
        "fixings": {"SOFR": [{"at": "2024-06-27T00:00:00Z", "value": 0.0531}]},
        "zero_curves": {"USD-OIS": {"tenors": [0.5, 1.0], "rates": [0.02, 0.03]}},
        "dividend_curves": {
            "SPX": {"tenors": [1.0], "rates": [0.01], "interpolation": "linear_rt"}
        },
        "vol_surfaces": {
            "SPX": {"expiries": [1.0], "log_moneyness": [-0.1, 0.1], "vols": [[0.3, 0.2]]}
        },
        **extra,
    }


async def test_operational_responses_match_the_spec(check: Check) -> None:
    await check("get", "/healthz", "/healthz", status=200)
    body = await check("get", "/readyz", "/readyz", status=503)
    assert body["status"] == "not_ready"
    check.client.app[MODEL_READY_KEY].set(lambda: Readiness(True, "v1"))  # type: ignore[attr-defined]
    await check("get", "/readyz", "/readyz", status=200)
    text = await check("get", "/metrics", "/metrics", status=200)
    assert "spectralmc_http_requests_total" in text


async def test_market_data_responses_match_the_spec(check: Check) -> None:
    one = "/v1/marketdata/{namespace}/{val_datetime}"
    url = "/v1/marketdata/eod/2024-06-28T16:00:00Z"
    first = _snapshot(NOW - timedelta(hours=1))
    put = await check("put", url, one, status=201, json_body=first)
    await check("put", url, one, status=200, json_body=first)
    derived = _snapshot(
        NOW,
        derived_from={
            "namespace": "eod",
            "val_datetime": "2024-06-28T16:00:00Z",
            "data_asof": first["data_asof"],
            "hash": put["hash"],
        },
    )
    await check("post", url, one, status=201, json_body=derived)
    got = await check("get", url, one, status=200)
    assert got["snapshot"]["derived_from"]["hash"] == put["hash"]
    got = await check("get", f"{url}?data_asof={first['data_asof']}", one, status=200)
    assert got["hash"] == put["hash"]
    await check("get", f"{url}?data_asof=2020-01-01T00:00:00Z", one, status=404)
    await check("get", f"{url}?data_asof=yesterday", one, status=422)
    listing = await check("get", "/v1/marketdata/eod", "/v1/marketdata/{namespace}", status=200)
    assert listing["val_datetimes"] == ["2024-06-28T16:00:00Z"]
    await check("get", "/v1/marketdata/eod?limit=x", "/v1/marketdata/{namespace}", status=422)

    # Error bodies: malformed 400, schema 422, back-dated 409, too large 413.
    headers = {"Content-Type": "application/json"}
    await check("put", url, one, status=400, data=b"{not json", headers=headers)
    bad = {**first, "spots": {"SPX": -1}}
    body = await check("put", url, one, status=422, data=json.dumps(bad), headers=headers)
    assert body["fields"][0]["path"] == "spots.SPX"
    await check("put", url, one, status=409, json_body=_snapshot(NOW - timedelta(hours=2)))
    huge = _snapshot(NOW, spots={f"U{i:05d}": 1.0 for i in range(2000)})
    await check("put", url, one, status=413, json_body=huge)
    assert check.seen >= {  # type: ignore[attr-defined]
        ("put", one),
        ("post", one),
        ("get", one),
        ("get", "/v1/marketdata/{namespace}"),
    }


# --- admin ---------------------------------------------------------------------------------------

TOKEN = "openapi-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Actor": "openapi-test"}
PIN = "/v1/admin/model/pin"
TRAINING = "/v1/admin/training"
CONTROL = ("/v1/admin/training/pause", "/v1/admin/training/resume", "/v1/admin/training/commit")
_DEFAULT_MODEL_ADMIN = {
    ("put", PIN),
    ("delete", PIN),
    ("get", TRAINING),
    *(("post", path) for path in CONTROL),
}
# the same routes per named model: /v1/admin/models/{model}/pin, .../training, ...
ADMIN_ROUTES = _DEFAULT_MODEL_ADMIN | {
    (method, path.replace("/v1/admin/model/", "/v1/admin/models/{model}/").replace(
        "/v1/admin/training", "/v1/admin/models/{model}/training"))
    for method, path in _DEFAULT_MODEL_ADMIN
}


def _admin_app(store_dir: Path, *, training: bool, token: str | None = TOKEN) -> web.Application:
    settings = Settings(
        training=TrainingSettings(
            enabled=training,
            device="cpu",
            commit=CommitPlan(kind="every_steps", every_steps=10),
        ),
        admin=AdminSettings(token=None if token is None else SecretStr(token)),
        model=ModelSettings(poll_interval_s=0.1),
        core=tiny_config(),
    )
    return create_app(settings, store=LocalStore(store_dir), registry=CollectorRegistry())


def test_admin_routes_are_bearer_protected_in_the_spec(spec: dict[str, Any]) -> None:
    scheme = spec["components"]["securitySchemes"]["adminBearer"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    for method, path in ADMIN_ROUTES:
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"adminBearer": []}], (method, path)
        assert "401" in operation["responses"], (method, path)
    protected = {(m, p) for m, p in spec_routes(spec) if "security" in spec["paths"][p][m]}
    assert protected == ADMIN_ROUTES


async def test_admin_responses_with_training_disabled_match_the_spec(
    tmp_path: Path, make_check: MakeCheck, spec: dict[str, Any]
) -> None:
    check = await make_check(_admin_app(tmp_path / "store", training=False))
    body = await check("get", TRAINING, TRAINING, status=200, headers=AUTH)
    assert body["training"] == {"state": "disabled"}
    assert body["model"]["loaded"] is None and body["model"]["mode"] == "tracking"
    for path in CONTROL:
        body = await check("post", path, path, status=409, headers=AUTH)
        assert body["error"] == "conflict" and "disabled" in body["detail"]
    # Empty store: nothing to pin, nothing pinned.
    body = await check("put", PIN, PIN, status=404, json_body={"version": 1}, headers=AUTH)
    assert body["error"] == "not_found"
    body = await check("put", PIN, PIN, status=404, json_body={"ref": "production"}, headers=AUTH)
    assert body["error"] == "not_found"
    assert await check("delete", PIN, PIN, status=200, headers=AUTH) == {
        "unpinned": None,
        "model": None,
    }
    headers = {**AUTH, "Content-Type": "application/json"}
    pin_request = _schema_validator(spec, {"$ref": "#/components/schemas/PinRequest"})
    for bad in ({}, {"version": 1, "ref": "production"}, {"version": 0}, {"ref": "../etc"}):
        with pytest.raises(jsonschema.ValidationError):  # the spec refuses what the app refuses
            pin_request.validate(bad)
        body = await check("put", PIN, PIN, status=422, data=json.dumps(bad), headers=headers)
        assert body["error"] == "validation_error"
    await check("put", PIN, PIN, status=400, data=b"{version", headers=headers)
    for token_header in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
        for method, path in sorted(ADMIN_ROUTES):
            url = path.replace("{model}", "bs")
            body = await check(method, url, path, status=401, headers=token_header)
            assert body["error"] == "unauthorized"
    assert check.seen == ADMIN_ROUTES  # type: ignore[attr-defined]
    assert await check.client.app[CHAIN_KEY].log() == []  # type: ignore[attr-defined]


async def test_admin_routes_without_a_configured_token_answer_401(
    tmp_path: Path, make_check: MakeCheck
) -> None:
    check = await make_check(_admin_app(tmp_path / "store", training=False, token=None))
    for method, path in sorted(ADMIN_ROUTES):
        body = await check(method, path.replace("{model}", "bs"), path, status=401, headers=AUTH)
        assert "disabled" in body["detail"]


async def test_admin_responses_while_training_match_the_spec(
    tmp_path: Path, make_check: MakeCheck
) -> None:
    app = _admin_app(tmp_path / "store", training=True)
    check = await make_check(app)

    async def validated_and_served() -> bool:
        body = await check("get", TRAINING, TRAINING, status=200, headers=AUTH)
        t = body["training"]
        return (
            t["validation"] is not None
            and t["last_commit"] is not None
            and body["model"]["loaded"] is not None
        )

    await until(validated_and_served, what="a validation, a commit and a served model")
    body = await check("post", CONTROL[0], CONTROL[0], status=200, headers=AUTH)
    assert body["training"]["state"] == "paused"
    body = await check("post", CONTROL[2], CONTROL[2], status=201, headers=AUTH)
    committed = body["committed"]
    assert committed["message"].startswith("manual commit by admin:openapi-test")
    body = await check("post", CONTROL[1], CONTROL[1], status=200, headers=AUTH)
    assert body["training"]["state"] == "running"

    body = await check("put", PIN, PIN, status=200, json_body={"version": 1}, headers=AUTH)
    assert body["pinned"] == 1 and body["model"] == {
        "counter": 1,
        "version_hash": (await app[CHAIN_KEY].get(1)).version_hash,
        "mode": "pinned",
    }
    overview = await check("get", TRAINING, TRAINING, status=200, headers=AUTH)
    assert overview["model"]["mode"] == "pinned:pin"
    assert overview["model"]["loaded"]["counter"] == 1
    body = await check("delete", PIN, PIN, status=200, headers=AUTH)
    assert body["unpinned"] == 1
    assert body["model"]["mode"] == "tracking"
    assert app[MODEL_KEY].current is not None
    per_model = "/v1/admin/models/{model}/training"
    body = await check("get", "/v1/admin/models/bs/training", per_model, status=200, headers=AUTH)
    assert body["name"] == "bs" and body["model"]["loaded"] is not None
    missing = await check("get", "/v1/admin/models/sabr/training", per_model, status=404,
                          headers=AUTH)
    assert "sabr" in missing["detail"]
    assert check.seen == _DEFAULT_MODEL_ADMIN | {("get", per_model)}  # type: ignore[attr-defined]


def test_schemas_reject_drift(spec: dict[str, Any]) -> None:
    """The validation above can fail: an extra or missing field is caught."""
    error = {"$ref": "#/components/schemas/Error"}
    ok = {"error": "not_found", "detail": "x", "fields": [], "request_id": "r"}
    _schema_validator(spec, error).validate(ok)
    for bad in ({**ok, "trace": "..."}, {k: v for k, v in ok.items() if k != "fields"}):
        with pytest.raises(jsonschema.ValidationError):
            _schema_validator(spec, error).validate(bad)
    body = {"$ref": "#/components/schemas/SnapshotBody"}
    with pytest.raises(jsonschema.ValidationError):
        _schema_validator(spec, body).validate({**_snapshot(NOW), "spot": {"SPX": 1.0}})
