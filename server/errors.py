"""One error middleware: every failure becomes `{"error", "detail", "fields", "request_id"}`.

Domain errors become HTTP errors here and nowhere else. Routes raise domain exceptions (or
aiohttp's HTTP exceptions) and read bodies through `server.http.read_json`; nothing else renders
an error. The table of domain errors belongs to the app: `create_app` passes the service's own
rules (NoModel, Overloaded) ahead of `builtin_rules()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import ValidationError

from server.keys import REQUEST_ID_KEY
from storage.marketdata import BackdatedWrite, MarketDataInvalid
from storage.objectstore import Conflict, Corrupt, Invalid, NotFound, Unavailable

log = structlog.get_logger("spectralmc.server")

_KINDS: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}


@dataclass(frozen=True)
class FieldError:
    path: str
    reason: str

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


class RequestInvalid(Exception):
    """A request parameter (path, query or body) fails a check: 422 with its field path."""

    def __init__(self, fields: list[FieldError], detail: str = "request is invalid") -> None:
        super().__init__(detail)
        self.fields = fields
        self.detail = detail


class MalformedBody(Exception):
    """The body is not JSON (or not UTF-8): 400."""


@dataclass(frozen=True)
class ErrorRule:
    """A domain exception and its answer. `headers(exc)` adds response headers (Retry-After);
    `log` is False for refusals that are part of normal operation (load shedding), which are
    counted in /metrics instead of logged per request."""

    exc: type[BaseException]
    status: int
    kind: str
    expose_detail: bool = True
    headers: Callable[[BaseException], Mapping[str, str]] | None = None
    log: bool = True

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP error status, got {self.status}")


def builtin_rules() -> list[ErrorRule]:
    """The store's and market data's errors, most specific first (the first match wins)."""
    return [
        ErrorRule(BackdatedWrite, 409, "backdated_write"),
        ErrorRule(Conflict, 409, "conflict"),
        ErrorRule(NotFound, 404, "not_found"),
        ErrorRule(Unavailable, 503, "unavailable"),
        # Corrupt and Invalid from a store are the operator's problem: log, do not expose.
        ErrorRule(Corrupt, 500, "internal", expose_detail=False),
        ErrorRule(Invalid, 500, "internal", expose_detail=False),
    ]


def error_body(
    *, kind: str, detail: str, request_id: str | None, fields: list[FieldError] | None = None
) -> dict[str, Any]:
    return {
        "error": kind,
        "detail": detail,
        "fields": [f.as_json() for f in fields or []],
        "request_id": request_id,
    }


def error_response(
    request: web.Request,
    *,
    status: int,
    kind: str,
    detail: str,
    fields: list[FieldError] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = error_body(
        kind=kind, detail=detail, request_id=request.get(REQUEST_ID_KEY), fields=fields
    )
    return web.json_response(body, status=status, headers=headers)


def validation_fields(exc: ValidationError) -> list[FieldError]:
    """Each error's location joined with '.', e.g. `zero_curves.USD.rates.2`; `body` if none."""
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        path = ".".join(str(p) for p in err["loc"]) or "body"
        out.append(FieldError(path, err["msg"]))
    return out


def _http_exception(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    if exc.status < 400:
        raise exc  # redirects and 2xx/3xx exceptions are responses, not errors
    # Keep the headers that carry meaning (Allow on 405, WWW-Authenticate on 401, ...).
    headers = {
        k: v for k, v in exc.headers.items() if k.lower() not in {"content-type", "content-length"}
    }
    kind = _KINDS.get(exc.status, "error")
    detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
    return error_response(request, status=exc.status, kind=kind, detail=detail, headers=headers)


def error_middleware(
    *, request_timeout_s: float, rules: Sequence[ErrorRule] | None = None
) -> Middleware:
    """Render every failure as JSON; bound each request by `request_timeout_s`. `rules`: the
    domain errors in order of precedence (default `builtin_rules()`)."""
    table = tuple(builtin_rules() if rules is None else rules)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            async with asyncio.timeout(request_timeout_s):
                return await handler(request)
        except web.HTTPException as exc:
            return _http_exception(request, exc)
        except MalformedBody as exc:
            return error_response(request, status=400, kind="bad_request", detail=str(exc))
        except ValidationError as exc:
            return error_response(
                request,
                status=422,
                kind="validation_error",
                detail=f"{exc.error_count()} invalid field(s)",
                fields=validation_fields(exc),
            )
        except RequestInvalid as exc:
            return error_response(
                request, status=422, kind="validation_error", detail=exc.detail, fields=exc.fields
            )
        except MarketDataInvalid as exc:
            return error_response(
                request,
                status=422,
                kind="validation_error",
                detail=str(exc),
                fields=[FieldError(exc.field, exc.reason)],
            )
        except TimeoutError:
            log.warning("request_timeout", timeout_s=request_timeout_s)
            return error_response(
                request,
                status=504,
                kind="timeout",
                detail=f"request took longer than {request_timeout_s:g} s",
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            for rule in table:
                if isinstance(exc, rule.exc):
                    if rule.status >= 500 and rule.log:
                        log.error("request_failed", error=rule.kind, exc_info=exc)
                    detail = str(exc) if rule.expose_detail else "internal error; see the logs"
                    return error_response(
                        request,
                        status=rule.status,
                        kind=rule.kind,
                        detail=detail,
                        headers=None if rule.headers is None else rule.headers(exc),
                    )
            log.error("unhandled_exception", exc_info=exc)
            return error_response(
                request,
                status=500,
                kind="internal",
                detail=f"internal error; quote request id {request.get(REQUEST_ID_KEY)}",
            )

    return middleware
