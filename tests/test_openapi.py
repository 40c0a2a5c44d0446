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

from config.settings import ServerSettings, Settings, TrainingSettings
from server.app import create_app
from server.keys import MODEL_READY_KEY, Readiness
from storage.objectstore import MemoryStore

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


def _response_schema(
    spec: dict[str, Any], path: str, method: str, status: int, content_type: str
) -> dict[str, Any]:
    operation = spec["paths"][path][method]
    responses = operation["responses"]
    assert str(status) in responses, f"{method.upper()} {path} -> {status} is not documented"
    response = responses[str(status)]
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    assert content_type in response["content"], f"{content_type} not documented for {status}"
    schema: dict[str, Any] = response["content"][content_type]["schema"]
    return schema


Check = Callable[..., Awaitable[Any]]


@pytest.fixture
async def check(aiohttp_client: Any, spec: dict[str, Any]) -> Check:
    client: Client = await aiohttp_client(_app())
    seen: set[tuple[str, str]] = set()

    async def call(
        method: str, url: str, path: str, *, status: int, json_body: Any = None, **kw: Any
    ) -> Any:
        if json_body is not None:
            body_schema = spec["paths"][path][method]["requestBody"]["content"]["application/json"]
            _schema_validator(spec, body_schema["schema"]).validate(json_body)
            kw["json"] = json_body
        resp = await client.request(method.upper(), url, **kw)
        assert resp.status == status, await resp.text()
        schema = _response_schema(spec, path, method, status, resp.content_type)
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        _schema_validator(spec, schema).validate(body)
        seen.add((method, path))
        return body

    call.client = client  # type: ignore[attr-defined]
    call.seen = seen  # type: ignore[attr-defined]
    return call


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
