"""structlog configuration and the request-context middleware (request id, access log)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from typing import Any, TextIO

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from config.settings import LoggingSettings
from server.keys import REQUEST_ID_KEY
from server.metrics import route_label

REQUEST_ID_HEADER = "X-Request-ID"
# A caller's id is echoed into logs and headers, so only a safe, bounded one is accepted.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

access_log = structlog.get_logger("spectralmc.access")


_HANDLER_MARK = "_spectralmc_log_handler"


def _foreign_stack_info(
    logger: object, method_name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A stdlib record's `stack_info` (already a string) under the key structlog uses."""
    stack = event_dict.pop("stack_info", None)
    if stack:
        event_dict["stack"] = stack
    return event_dict


def _drop_formatter_fields(
    logger: object, method_name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """`message` / `asctime` are set on a record by another handler's formatter (e.g. pytest's),
    not by the caller (logging refuses them as extras): ExtraAdder must not repeat them."""
    event_dict.pop("message", None)
    event_dict.pop("asctime", None)
    return event_dict


def _is_plain_console_handler(handler: logging.Handler) -> bool:
    """A `logging.basicConfig`-style handler: it would print non-JSON lines beside ours."""
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
        sys.stderr,
        sys.stdout,
        sys.__stderr__,
        sys.__stdout__,
    )


def _dumps(event_dict: structlog.typing.EventDict, **kw: Any) -> str:
    """orjson for speed; json (what JSONRenderer uses by default) for what orjson refuses:
    ints beyond 64 bits, lone surrogates, very deep nesting."""
    try:
        rendered = orjson.dumps(
            event_dict, default=kw.get("default"), option=orjson.OPT_NON_STR_KEYS
        )
        return rendered.decode()
    except orjson.JSONEncodeError:
        return json.dumps(event_dict, **kw)


class _NamedWriteLogger(structlog.WriteLogger):
    """A WriteLogger with the `name` that `add_logger_name` reads."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name

    def msg(self, message: str) -> None:
        # As stdlib's Handler.handleError: a closed or broken stderr never fails the caller
        # (the access line is written in the middleware's `finally`). Not contextlib.suppress:
        # that is an object per line.
        try:  # noqa: SIM105
            super().msg(message)
        except (OSError, ValueError):
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _calling_module() -> str:
    """The module that logged, as stdlib's LoggerFactory names a `get_logger()` without one."""
    frame = sys._getframe(2)  # past this function and the factory
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("structlog"):
        frame = frame.f_back
    return str(frame.f_globals.get("__name__") or "?")


class _NamedWriteLoggerFactory:
    """One writer per logger name, all on one stream. Loggers are not cached (see configure),
    so this runs on every log call: it must be a dict lookup, not a construction."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._loggers: dict[str, _NamedWriteLogger] = {}

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        name = str(args[0]) if args and args[0] is not None else _calling_module()
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers[name] = _NamedWriteLogger(self._file, name)
        return logger


def configure_logging(settings: LoggingSettings) -> None:
    """Write every log line, structlog's and stdlib's (storage, aiohttp, botocore), to stderr
    as JSON (or console) with level, timestamp, logger name and the bound context variables
    (request_id, method, route inside a request). structlog's own events are rendered and
    written directly, without stdlib logging's records and handlers (most of the cost of a
    line); stdlib records go through one structlog formatter on the root logger.

    Idempotent: a second call replaces the handler it installed (and any basicConfig-style
    console handler) instead of adding another; other handlers (pytest's capture) are kept.
    """
    level = logging.getLevelNamesMapping()[settings.level]
    json_format = settings.format == "json"
    # Both sources get the same fields: structlog's events from its own chain, stdlib records
    # from the formatter's foreign_pre_chain. add_logger_name reads the writer's name or the
    # record's.
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if json_format
        else structlog.dev.ConsoleRenderer()
    )
    # The console renderer formats exceptions itself (and warns if they arrive pre-formatted).
    exc: list[structlog.typing.Processor] = (
        [structlog.processors.format_exc_info] if json_format else []
    )
    # sys.stderr as it is now (a redirect or capture in force at configure time is honoured).
    stream = sys.stderr
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *exc, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_NamedWriteLoggerFactory(stream),
        # Not cached: a later configure_logging call (tests, reloads) must reach every logger.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            *shared,
            structlog.stdlib.ExtraAdder(),
            _drop_formatter_fields,
            _foreign_stack_info,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *exc, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False) or _is_plain_console_handler(old):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    # Libraries (aiohttp, botocore) log through stdlib at the same threshold.
    root.setLevel(level)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_of(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is not None and _REQUEST_ID_RE.match(given):
        return given
    return new_request_id()


def request_context_middleware() -> Middleware:
    """Bind request_id, method and route to every log line; echo the id; one access line."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request_id_of(request)
        request[REQUEST_ID_KEY] = request_id
        start = time.perf_counter()
        status = 500
        with structlog.contextvars.bound_contextvars(
            request_id=request_id, method=request.method, route=route_label(request)
        ):
            try:
                response = await handler(request)
                status = response.status
                response.headers[REQUEST_ID_HEADER] = request_id
                return response
            except web.HTTPException as exc:
                status = exc.status
                exc.headers[REQUEST_ID_HEADER] = request_id
                raise
            finally:
                access_log.info(
                    "http_request",
                    path=request.path,
                    status=status,
                    duration_ms=round((time.perf_counter() - start) * 1e3, 3),
                )

    return middleware
