"""JSON logs everywhere: structlog and stdlib (storage, libraries) lines, with the request id."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from config.settings import LoggingSettings
from server.logging import REQUEST_ID_HEADER, configure_logging, request_context_middleware

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger and structlog back as they were after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    structlog.reset_defaults()


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty stderr line, each of which must be one JSON object."""
    out = []
    for line in text.splitlines():
        if line.strip():
            doc = json.loads(line)  # a non-JSON line fails the test here
            assert isinstance(doc, dict), line
            out.append(doc)
    return out


def configure(fmt: str = "json", level: str = "INFO") -> None:
    configure_logging(LoggingSettings(level=level, format=fmt))  # type: ignore[arg-type]


def test_stdlib_and_structlog_lines_are_json_with_the_request_id(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure()
    with structlog.contextvars.bound_contextvars(request_id="abc"):
        logging.getLogger("storage.chain").warning("HEAD hint not advanced to %d: %s", 7, "slow")
        structlog.get_logger("spectralmc.server").info("model_swapped", counter=7)
    logging.getLogger("storage.retry").info("outside any request")
    lines = json_lines(capsys.readouterr().err)
    assert len(lines) == 3, lines
    stdlib, native, outside = lines
    assert stdlib["event"] == "HEAD hint not advanced to 7: slow"
    assert stdlib["logger"] == "storage.chain"
    assert stdlib["level"] == "warning"
    assert stdlib["request_id"] == "abc"
    assert stdlib["timestamp"].endswith("Z")
    assert native["event"] == "model_swapped"
    assert native["logger"] == "spectralmc.server"
    assert native["level"] == "info"
    assert native["request_id"] == "abc"
    assert native["counter"] == 7
    assert "timestamp" in native
    assert outside["logger"] == "storage.retry"
    assert "request_id" not in outside


def test_library_loggers_extras_and_exceptions_are_json(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure()
    logging.getLogger("aiohttp.access").info("GET /x 200", extra={"remote": "127.0.0.1"})
    logging.getLogger("botocore.endpoint").debug("below the threshold: not written")
    try:
        raise RuntimeError("store down")
    except RuntimeError:
        logging.getLogger("botocore.retryhandler").exception("request failed")
        structlog.get_logger("spectralmc.worker").exception("commit_failed")
    lines = json_lines(capsys.readouterr().err)
    assert [line["logger"] for line in lines] == [
        "aiohttp.access",
        "botocore.retryhandler",
        "spectralmc.worker",
    ]
    assert lines[0]["remote"] == "127.0.0.1"
    assert "message" not in lines[0]  # set by pytest's capture handler, not an extra
    for line in lines[1:]:
        assert line["level"] == "error"
        assert "RuntimeError: store down" in line["exception"]


def test_configure_logging_is_idempotent(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    root = logging.getLogger()
    # A basicConfig-style console handler (pytest's own handlers stop basicConfig adding one).
    root.addHandler(logging.StreamHandler(sys.stderr))
    configure()
    configure()
    configure(level="WARNING")
    formatters = [h.formatter for h in root.handlers]
    ours = [f for f in formatters if isinstance(f, structlog.stdlib.ProcessorFormatter)]
    assert len(ours) == 1
    plain = [h for h in root.handlers if type(h) is logging.StreamHandler]
    assert len(plain) == 1  # ours, the stray one is gone
    logging.getLogger("storage.chain").info("filtered out at WARNING")
    structlog.get_logger("x").info("filtered out too")
    logging.getLogger("storage.chain").error("once")
    structlog.get_logger("x").error("once too")
    lines = json_lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == ["once", "once too"]


def test_console_format_still_works(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure("console")
    logging.getLogger("storage.chain").warning("console line %d", 1)
    structlog.get_logger("spectralmc.x").info("native console line", a=1)
    err = capsys.readouterr().err
    assert "console line 1" in err and "storage.chain" in err
    assert "native console line" in err and "spectralmc.x" in err
    assert not err.lstrip().startswith("{")


def test_stack_info_of_both_sources(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure()
    logging.getLogger("storage.chain").info("stdlib with stack", stack_info=True)
    structlog.get_logger("spectralmc.x").info("native with stack", stack_info=True)
    lines = json_lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == ["stdlib with stack", "native with stack"]
    for line in lines:
        assert line["stack"].startswith("Stack (most recent call last):"), line
        assert "test_stack_info_of_both_sources" in line["stack"]


def test_values_json_cannot_hold_natively_still_give_one_json_line(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """orjson refuses ints beyond 64 bits and lone surrogates; the line is written anyway."""

    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    configure()
    log = structlog.get_logger("spectralmc.x")
    log.info("odd values", obj=Opaque(), keys={1: "int key"}, text="é✓")
    log.info("big int", n=2**70)
    log.info("surrogate", s="\ud800")
    lines = json_lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == ["odd values", "big int", "surrogate"]
    assert lines[0]["obj"] == "<opaque>"
    assert lines[0]["keys"] == {"1": "int key"}
    assert lines[0]["text"] == "é✓"
    assert lines[1]["n"] == 2**70
    assert lines[2]["s"] == "\ud800"


def test_a_log_call_never_raises_on_a_closed_stream(restore_logging: None) -> None:
    """The access line is written in the middleware's `finally`: a dead stderr must not turn
    a response into an error."""
    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):
        configure()
    stream.close()
    structlog.get_logger("spectralmc.access").info("http_request", status=200)


def test_get_logger_without_a_name_is_named_after_the_calling_module(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure()
    structlog.get_logger().info("nameless")
    (line,) = json_lines(capsys.readouterr().err)
    assert line["logger"] == __name__


async def test_request_id_reaches_stdlib_lines_of_a_request(
    aiohttp_client: Callable[..., Awaitable[Client]],
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    """End to end: the middleware binds the id; storage code (stdlib logging, also in a worker
    thread as the stores run it) logs inside the request; every line carries the id."""
    storage_log = logging.getLogger("storage.localstore")
    server_log = structlog.get_logger("spectralmc.server")

    async def handler(request: web.Request) -> web.Response:
        storage_log.info("read in the handler")
        server_log.info("priced", contracts=1)
        await asyncio.to_thread(storage_log.info, "read in a worker thread")
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[request_context_middleware()])
    app.router.add_get("/thing", handler)
    configure()
    client = await aiohttp_client(app)
    resp = await client.get("/thing", headers={REQUEST_ID_HEADER: "req-77"})
    assert resp.status == 200
    lines = json_lines(capsys.readouterr().err)
    mine = [line for line in lines if line.get("request_id") == "req-77"]
    events = {line["event"]: line for line in mine}
    assert {"read in the handler", "priced", "read in a worker thread", "http_request"} <= set(
        events
    )
    for line in mine:  # one JSON object per line (json_lines), each with the common fields
        assert {"level", "timestamp", "logger", "event", "request_id"} <= line.keys(), line
        assert line["timestamp"].endswith("Z")
        assert line["method"] == "GET" and line["route"] == "/thing"
    assert events["read in the handler"]["logger"] == "storage.localstore"
    assert events["read in a worker thread"]["logger"] == "storage.localstore"
    assert events["priced"]["logger"] == "spectralmc.server"
    assert events["priced"]["contracts"] == 1
    assert events["priced"]["level"] == "info"
    assert events["http_request"]["logger"] == "spectralmc.access"
    assert events["http_request"]["status"] == 200
