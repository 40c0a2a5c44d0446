"""structlog configuration and the request-context middleware (request id, access log)."""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid

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


def configure_logging(settings: LoggingSettings) -> None:
    """Configure structlog (and stdlib logging under it) once per process, at start-up."""
    level = logging.getLevelNamesMapping()[settings.level]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if settings.format == "json"
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # Not cached: a later configure_logging call (tests, reloads) must reach every logger.
        cache_logger_on_first_use=False,
    )
    # Libraries (aiohttp, botocore) log through stdlib; keep them at the same threshold.
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")


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
