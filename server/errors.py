"""One error middleware: every failure becomes `{"error", "detail", "fields", "request_id"}`.

Domain errors become HTTP errors here and nowhere else. Routes raise domain exceptions (or
aiohttp's HTTP exceptions) and read bodies through `read_json`; nothing else renders an error.
The table of domain errors is open: `register_error(SomeError, 409, "conflict")`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import BaseModel, ValidationError

from server.keys import REQUEST_ID_KEY, SETTINGS_KEY
from storage.marketdata import BackdatedWrite, MarketDataInvalid
from storage.objectstore import Conflict, Corrupt, Invalid, NotFound, Unavailable

log = structlog.get_logger("spectralmc.server")

M = TypeVar("M", bound=BaseModel)

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
class _Rule:
    exc: type[BaseException]
    status: int
    kind: str
    expose_detail: bool


# Most specific first: the first matching rule wins.
_RULES: list[_Rule] = [
    _Rule(BackdatedWrite, 409, "backdated_write", True),
    _Rule(Conflict, 409, "conflict", True),
    _Rule(NotFound, 404, "not_found", True),
    _Rule(Unavailable, 503, "unavailable", True),
    # Corrupt and Invalid from a store are the operator's problem: log, do not expose.
    _Rule(Corrupt, 500, "internal", False),
    _Rule(Invalid, 500, "internal", False),
]


def register_error(
    exc: type[BaseException], status: int, kind: str, *, expose: bool = True
) -> None:
    """Map a domain exception to a status; registered rules take precedence over the built-ins."""
    if not 400 <= status <= 599:
        raise ValueError(f"status must be an HTTP error status, got {status}")
    _RULES.insert(0, _Rule(exc, status, kind, expose))


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


def error_middleware(*, request_timeout_s: float) -> Middleware:
    """Render every failure as JSON; bound each request by `request_timeout_s`."""

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
            for rule in _RULES:
                if isinstance(exc, rule.exc):
                    if rule.status >= 500:
                        log.error("request_failed", error=rule.kind, exc_info=exc)
                    detail = str(exc) if rule.expose_detail else "internal error; see the logs"
                    return error_response(
                        request, status=rule.status, kind=rule.kind, detail=detail
                    )
            log.error("unhandled_exception", exc_info=exc)
            return error_response(
                request,
                status=500,
                kind="internal",
                detail=f"internal error; quote request id {request.get(REQUEST_ID_KEY)}",
            )

    return middleware


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request, model: type[M]) -> M:
    """Read, parse and validate the body: 413 too large, 400 malformed, 422 invalid."""
    limit = request.app[SETTINGS_KEY].server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if not raw.strip():
        raise MalformedBody("request body is empty; expected a JSON object")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise MalformedBody(
            f"request body is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    except json.JSONDecodeError as exc:
        raise MalformedBody(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise MalformedBody(f"malformed JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except OverflowError as exc:
        # A validator that converts a value (a datetime to UTC, say) can overflow, and pydantic
        # passes only ValueError on as a field error: still the client's input, so 422.
        raise RequestInvalid(
            [FieldError("body", f"a value is out of range once converted: {exc}")],
            "request is invalid",
        ) from None
