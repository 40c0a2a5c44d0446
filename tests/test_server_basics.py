"""The server skeleton: settings, health, metrics, request ids, errors, market-data routes."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import redirect_stderr
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from config.settings import (
    DEFAULT_TOML,
    LoggingSettings,
    ServerSettings,
    Settings,
    SettingsError,
    StoreSettings,
    TrainingSettings,
    load_settings,
)
from server.app import create_app
from server.keys import MODEL_READY_KEY, STORE_KEY, Readiness
from server.logging import configure_logging
from storage.objectstore import Corrupt, MemoryStore, ObjectStore

NOW = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)
VDT = "2024-06-28T16:00:00Z"
URL = f"/v1/marketdata/eod/{VDT}"

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def snapshot_body(asof: datetime, *, spot: float = 100.0) -> dict[str, Any]:
    return {
        "data_asof": asof.isoformat(),
        "spots": {"SPX": spot},
        "zero_curves": {"USD-OIS": {"tenors": [0.5, 1.0], "rates": [0.02, 0.03]}},
        "vol_surfaces": {
            "SPX": {
                "expiries": [0.5, 1.0],
                "strikes": [90.0, 110.0],
                "vols": [[0.2, 0.3], [0.25, 0.35]],
            }
        },
    }


def make_settings(**server: Any) -> Settings:
    return Settings(
        server=ServerSettings(max_body_bytes=16 * 1024, **server),
        training=TrainingSettings(enabled=False),
    )


@pytest.fixture
def make_client(aiohttp_client: Any) -> MakeClient:
    async def make(
        settings: Settings | None = None,
        *,
        store: ObjectStore | None = None,
        extra: Callable[[web.Application], None] | None = None,
    ) -> Client:
        app = create_app(
            settings or make_settings(),
            store=store if store is not None else MemoryStore(),
            clock=lambda: NOW,
            registry=CollectorRegistry(),
        )
        if extra is not None:
            extra(app)
        client: Client = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


async def check_error(resp: Any, status: int, kind: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body: dict[str, Any] = await resp.json()
    assert body["error"] == kind
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["request_id"] == resp.headers["X-Request-ID"]
    return body


# --- settings -----------------------------------------------------------------------------------


def test_default_toml_equals_code_defaults() -> None:
    assert load_settings(env={}) == Settings()
    assert Settings().store.url == "file://./var/store"
    assert Settings().server.port == 8080
    assert Settings().server.max_body_bytes == 1024 * 1024
    assert Settings().admin.token is None


def test_file_then_env_override_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "override.toml"
    cfg.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[core.sim]\nseed = 7\n')
    env = {
        "SPECTRALMC_SERVER__PORT": "9100",
        "SPECTRALMC_ADMIN__TOKEN": "t" * 32,
        "SPECTRALMC_MODEL__MODE": "pinned",
        "UNRELATED": "ignored",
    }
    s = load_settings(config_file=cfg, env=env)
    assert s.server.port == 9100  # env beats the file
    assert s.server.host == "0.0.0.0"  # the file beats the defaults
    assert s.server.max_instruments == 10_000  # untouched defaults stay
    assert s.core.sim.seed == 7
    assert s.model.mode == "pinned"
    assert s.admin.token is not None and s.admin.token.get_secret_value() == "t" * 32
    assert "t" * 32 not in repr(s)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SPECTRALMC_SERVER__PORT": "not-a-port"}, "server.port"),
        ({"SPECTRALMC_SERVER__PORT": "70000"}, "server.port"),
        ({"SPECTRALMC_MODEL__MODE": "sometimes"}, "model.mode"),
        ({"SPECTRALMC_CORE__SIM__PATHS_PER_CONTRACT": "1000"}, "core.sim"),
        ({"SPECTRALMC_TRAINING__COMMIT__MESSAGE_TEMPLATE": "{oops}"}, "unknown fields ['oops']"),
        ({"SPECTRALMC_CORE__PROCESS": "heston"}, "serve heston as a named model"),
        ({"SPECTRALMC_CORE__PROCESS": "sabr"}, "core.process"),
    ],
)
def test_invalid_settings_name_the_field(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(env=env)


def test_short_admin_token_is_refused_without_echoing_it() -> None:
    with pytest.raises(SettingsError, match=r"admin") as info:
        load_settings(env={"SPECTRALMC_ADMIN__TOKEN": "hunter2"})
    assert "hunter2" not in str(info.value)


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"does not exist"):
        load_settings(config_file=tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1\n")
    with pytest.raises(SettingsError, match=r"not valid TOML"):
        load_settings(config_file=bad, env={})
    typo = tmp_path / "typo.toml"
    typo.write_text("[server]\nprot = 1\n")
    with pytest.raises(SettingsError, match=r"server.prot"):
        load_settings(config_file=typo, env={})
    assert DEFAULT_TOML.is_file()


# --- health, readiness, metrics, request ids ----------------------------------------------------


async def test_healthz_and_readyz(client: Client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    # An empty store: the model service started but has no committed version to load.
    assert body["status"] == "not_ready" and set(body) == {"status", "reason"}
    assert "no model version" in body["reason"]
    # What the lead's model tracker does once a version is loaded (after start-up).
    client.app[MODEL_READY_KEY].set(lambda: Readiness(True, "model version 3"))
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready", "reason": "model version 3"}


async def test_metrics_count_requests_by_canonical_route(client: Client) -> None:
    for _ in range(2):
        assert (await client.get("/healthz")).status == 200
    assert (await client.get("/v1/marketdata/eod/2024-01-01T00:00:00Z")).status == 404
    assert (await client.get("/v1/marketdata/eod/2024-01-02T00:00:00Z")).status == 404
    assert (await client.get("/no/such/path")).status == 404
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    assert 'spectralmc_http_requests_total{method="GET",route="/healthz",status="200"} 2.0' in text
    route = "/v1/marketdata/{namespace}/{val_datetime}"
    assert (
        f'spectralmc_http_requests_total{{method="GET",route="{route}",status="404"}} 2.0' in text
    )
    assert 'route="unmatched",status="404"} 1.0' in text
    assert "2024-01-01" not in text  # raw URLs never become labels
    assert (
        'spectralmc_http_request_duration_seconds_count{method="GET",route="/healthz"} 2.0' in text
    )
    for name in (
        "spectralmc_valuations_total",
        "spectralmc_contracts_priced_total",
        "spectralmc_model_swaps_total",
        "spectralmc_training_loss",
        "spectralmc_commits_total",
        "spectralmc_job_misses_total",
        "spectralmc_job_lag_seconds",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name


async def test_two_apps_have_separate_registries(make_client: MakeClient) -> None:
    a, b = await make_client(), await make_client()
    await a.get("/healthz")
    text_b = await (await b.get("/metrics")).text()
    assert 'route="/healthz"' not in text_b


async def test_request_id_is_echoed_or_generated(client: Client) -> None:
    resp = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await client.get("/healthz")
    generated = resp.headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    resp = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert resp.headers["X-Request-ID"] != "bad id\twith spaces"


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    with redirect_stderr(buf):
        configure_logging(LoggingSettings(level="INFO", format="json"))
        yield buf
    structlog.reset_defaults()


async def test_access_log_lines_carry_the_request_id(
    client: Client, json_logs: io.StringIO
) -> None:
    await client.get("/healthz", headers={"X-Request-ID": "req-42"})
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("event") == "http_request"]
    assert access, json_logs.getvalue()
    assert access[-1]["request_id"] == "req-42"
    assert access[-1]["route"] == "/healthz"
    assert access[-1]["status"] == 200
    assert access[-1]["level"] == "info"


# --- errors -------------------------------------------------------------------------------------


async def test_malformed_json_is_400(client: Client) -> None:
    hdr = {"Content-Type": "application/json"}
    body = await check_error(
        await client.put(URL, data=b'{"spots": ', headers=hdr), 400, "bad_request"
    )
    assert "malformed JSON" in body["detail"]
    await check_error(await client.put(URL, data=b"", headers=hdr), 400, "bad_request")
    await check_error(await client.put(URL, data=b'{"a": NaN}', headers=hdr), 400, "bad_request")
    await check_error(await client.put(URL, data=b"\xff\xfe", headers=hdr), 400, "bad_request")


async def test_schema_violation_is_422_with_field_paths(client: Client) -> None:
    bad = snapshot_body(NOW)
    bad["spots"]["SPX"] = -1.0
    bad["zero_curves"]["USD-OIS"]["tenors"] = [0.5, "soon"]
    body = await check_error(await client.put(URL, json=bad), 422, "validation_error")
    paths = {f["path"] for f in body["fields"]}
    assert "spots.SPX" in paths
    assert "zero_curves.USD-OIS.tenors.1" in paths
    assert all(f["reason"] for f in body["fields"])
    missing = snapshot_body(NOW)
    del missing["data_asof"]
    body = await check_error(await client.put(URL, json=missing), 422, "validation_error")
    assert body["fields"] == [{"path": "data_asof", "reason": "Field required"}]


async def test_bad_path_and_query_are_422(client: Client) -> None:
    naive = "/v1/marketdata/eod/2024-06-28T16:00:00"
    body = await check_error(
        await client.put(naive, json=snapshot_body(NOW)), 422, "validation_error"
    )
    assert body["fields"][0]["path"] == "path.val_datetime"
    assert "no timezone" in body["fields"][0]["reason"]
    body = await check_error(await client.get(f"{URL}?data_asof=soon"), 422, "validation_error")
    assert body["fields"][0]["path"] == "query.data_asof"
    body = await check_error(
        await client.get("/v1/marketdata/eod?limit=0"), 422, "validation_error"
    )
    assert body["fields"][0]["path"] == "query.limit"
    body = await check_error(await client.get("/v1/marketdata/bad%20ns"), 422, "validation_error")
    assert body["fields"][0]["path"] == "path.namespace"


async def test_future_data_asof_is_422(client: Client) -> None:
    body = await check_error(
        await client.put(URL, json=snapshot_body(NOW + timedelta(hours=1))), 422, "validation_error"
    )
    assert body["fields"][0]["path"] == "data_asof"


async def test_missing_snapshot_is_404_naming_it(client: Client) -> None:
    body = await check_error(await client.get(URL), 404, "not_found")
    assert "eod" in body["detail"] and "2024-06-28T16:00:00" in body["detail"]
    body = await check_error(await client.get("/nothing/here"), 404, "not_found")


async def test_backdated_write_is_409(client: Client) -> None:
    assert (await client.put(URL, json=snapshot_body(NOW))).status == 201
    body = await check_error(
        await client.put(URL, json=snapshot_body(NOW - timedelta(hours=1))), 409, "backdated_write"
    )
    assert "append-only" in body["detail"]


async def test_oversized_body_is_413(client: Client) -> None:
    huge = snapshot_body(NOW)
    huge["spots"] = {f"U{i:05d}": 1.0 for i in range(2000)}  # ~26 KB > 16 KiB
    await check_error(await client.put(URL, json=huge), 413, "payload_too_large")

    # Without a Content-Length (chunked), the limit is enforced while reading.
    async def chunks() -> Any:
        data = json.dumps(huge).encode()
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    await check_error(await client.put(URL, data=chunks()), 413, "payload_too_large")


async def test_method_not_allowed_is_json_with_allow_header(client: Client) -> None:
    resp = await client.delete(URL)
    await check_error(resp, 405, "method_not_allowed")
    assert "PUT" in resp.headers["Allow"]


def _failing_routes(app: web.Application) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals /etc/passwd")

    async def corrupt(request: web.Request) -> web.Response:
        raise Corrupt("objects/abc hash mismatch")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    app.router.add_get("/test/boom", boom)
    app.router.add_get("/test/corrupt", corrupt)
    app.router.add_get("/test/slow", slow)


async def test_unexpected_error_is_500_without_internals(
    make_client: MakeClient, json_logs: io.StringIO
) -> None:
    client = await make_client(extra=_failing_routes)
    resp = await client.get("/test/boom", headers={"X-Request-ID": "req-500"})
    body = await check_error(resp, 500, "internal")
    text = json.dumps(body)
    assert "secret" not in text and "Traceback" not in text and "RuntimeError" not in text
    assert body["request_id"] == "req-500" and "req-500" in body["detail"]
    logged = json_logs.getvalue()
    assert "secret internals" in logged and "req-500" in logged  # the operator sees it
    body = await check_error(await client.get("/test/corrupt"), 500, "internal")
    assert "objects/abc" not in body["detail"]


async def test_slow_request_times_out_with_504(make_client: MakeClient) -> None:
    client = await make_client(make_settings(request_timeout_s=0.05), extra=_failing_routes)
    await check_error(await client.get("/test/slow"), 504, "timeout")


# --- market-data routes -------------------------------------------------------------------------


async def test_market_data_round_trip(client: Client) -> None:
    first, second = NOW - timedelta(hours=2), NOW - timedelta(hours=1)
    resp = await client.put(URL, json=snapshot_body(first))
    assert resp.status == 201
    put1 = await resp.json()
    assert put1["key"] == "marketdata/eod/20240628T160000.000000Z/20240701T100000.000000Z.json"
    assert len(put1["hash"]) == 64 and put1["created"] is True
    resp = await client.post(URL, json=snapshot_body(second, spot=101.0))
    assert resp.status == 201
    put2 = await resp.json()

    got = await (await client.get(URL)).json()  # default: as of the clock's now
    assert got["hash"] == put2["hash"]
    assert got["data_asof"] == "2024-07-01T11:00:00Z"
    assert got["snapshot"]["spots"] == {"SPX": 101.0}
    between = (first + timedelta(minutes=30)).isoformat().replace("+00:00", "Z")
    got = await (await client.get(URL, params={"data_asof": between})).json()
    assert got["hash"] == put1["hash"] and got["snapshot"]["spots"] == {"SPX": 100.0}
    early = (first - timedelta(seconds=1)).isoformat()
    await check_error(await client.get(URL, params={"data_asof": early}), 404, "not_found")

    # The stored bytes are what the hash names.
    store = client.app[STORE_KEY]
    import hashlib

    raw = await store.get(put1["key"])
    assert hashlib.sha256(raw.data).hexdigest() == put1["hash"]

    # An identical retry is not an error and changes nothing.
    resp = await client.put(URL, json=snapshot_body(second, spot=101.0))
    assert resp.status == 200
    assert (await resp.json())["created"] is False


async def test_list_val_datetimes_is_bounded(make_client: MakeClient) -> None:
    client = await make_client(make_settings(max_list_items=2))
    for day in (28, 26, 27):
        url = f"/v1/marketdata/eod/2024-06-{day}T16:00:00Z"
        assert (await client.put(url, json=snapshot_body(NOW))).status == 201
    body = await (await client.get("/v1/marketdata/eod")).json()
    assert body == {
        "namespace": "eod",
        "val_datetimes": ["2024-06-26T16:00:00Z", "2024-06-27T16:00:00Z"],
        "truncated": True,
    }
    body = await (
        await client.get("/v1/marketdata/eod", params={"after": "2024-06-27T16:00:00Z"})
    ).json()
    assert body["val_datetimes"] == ["2024-06-28T16:00:00Z"] and body["truncated"] is False
    await check_error(await client.get("/v1/marketdata/eod?limit=3"), 422, "validation_error")


async def test_app_opens_its_store_from_the_settings_url(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    settings = Settings(
        store=StoreSettings(url=f"file://{tmp_path}/store"),
        training=TrainingSettings(enabled=False),
    )
    app = create_app(settings, clock=lambda: NOW)
    client = await aiohttp_client(app)
    assert (await client.put(URL, json=snapshot_body(NOW))).status == 201
    assert (await client.get(URL)).status == 200
    assert any((tmp_path / "store").rglob("index.json"))


def test_serve_on_uvloop_without_the_package_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`spectralmc serve` checks the configured event loop is installed: exit 2 with a message
    naming the setting, before it binds a port."""
    import importlib.util

    from server import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvloop" else real(name, *a))
    monkeypatch.setenv("SPECTRALMC_SERVER__EVENT_LOOP", "uvloop")
    assert cli.main(["serve"]) == 2
    assert "server.event_loop = 'uvloop' needs the uvloop package" in capfd.readouterr().err
