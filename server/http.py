"""The HTTP edge: reading and validating bodies, request limits, deadlines, canonical answers.

Routes parse through here and nowhere else. A body is validated in one pass by pydantic's JSON
parser (no intermediate Python objects); a body it refuses as JSON, or one holding a NaN or
Infinity token (which that parser would accept), goes through the standard library's parser so
the client gets its precise 400. Answers are `storage.documents.canonical_bytes`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from server.errors import FieldError, MalformedBody, RequestInvalid
from server.keys import MODEL_KEY, SETTINGS_KEY
from server.model import Overloaded
from server.valuation import Limits
from storage.documents import canonical_bytes

M = TypeVar("M", bound=BaseModel)

# The client's remaining patience in milliseconds; absent: `[model] deadline_s`.
DEADLINE_HEADER = "X-Deadline-Ms"
_JSON_CONSTANTS = (b"NaN", b"Infinity")


def limits(request: web.Request) -> Limits:
    server = request.app[SETTINGS_KEY].server
    return Limits(max_items=server.max_instruments, max_string_len=server.max_string_len,
                  max_scenarios=server.max_scenarios)


def deadline_s(request: web.Request) -> float | None:
    """The request's deadline in seconds from its `X-Deadline-Ms` header; None if absent."""
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is None:
        return None
    ceiling = request.app[SETTINGS_KEY].server.request_timeout_s * 1e3
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not 1.0 <= ms <= ceiling:  # NaN fails too
        raise RequestInvalid(
            [
                FieldError(
                    f"header.{DEADLINE_HEADER}",
                    f"milliseconds in [1, {ceiling:g}] (the request time-out), got {raw[:40]!r}",
                )
            ],
            "invalid deadline",
        )
    return ms / 1e3


class EdgeAdmission:
    """Bytes of the pricing requests' bodies being handled, bounded: the event loop's share of
    the work (parse, answer, serialisation) grows with them, and the pricing queue's bound
    (`[model] max_inflight_bytes`) does not see it. A request that would pass the bound waits
    nowhere: it is refused (503, Retry-After) before its body is read. One alone always enters,
    so the largest body the server accepts can always be priced."""

    def __init__(self, max_bytes: int, *,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.on_reject = on_reject  # called with the reason of each refusal (metrics)
        self.inflight_bytes = 0
        self.inflight_requests = 0

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        if self.inflight_requests and self.inflight_bytes + cost > self.max_bytes:
            if self.on_reject is not None:
                self.on_reject("inflight_body")
            raise Overloaded(
                "inflight_body",
                f"{self.inflight_requests} pricing requests ({self.inflight_bytes} body bytes) in "
                f"progress; this one ({cost} bytes) would pass the bound of {self.max_bytes} "
                f"bytes ([server] max_inflight_body_bytes)",
                retry_after_s=1,
            )
        self.inflight_bytes += cost
        self.inflight_requests += 1
        try:
            yield
        finally:
            self.inflight_bytes -= cost
            self.inflight_requests -= 1


EDGE_KEY = web.AppKey("edge_admission", EdgeAdmission)


@contextmanager
def admitted(request: web.Request) -> Iterator[None]:
    """Hold a pricing request's place while it is handled; refused before its body is read
    (Overloaded: 503 + Retry-After) when the pricing queue is already full or the bodies in
    progress would pass `[server] max_inflight_body_bytes`. A body of unknown length (chunked)
    counts as the largest the server accepts."""
    request.app[MODEL_KEY].check_admission()
    length = request.content_length
    cost = length if length is not None else request.app[SETTINGS_KEY].server.max_body_bytes
    with request.app[EDGE_KEY].hold(cost):
        yield


def canonical_response(body: Any) -> web.Response:
    return web.Response(body=canonical_bytes(body), content_type="application/json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_stdlib(raw: bytes) -> Any:
    """The standard library's parse, for its precise errors: MalformedBody (400)."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
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


def _validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except OverflowError as exc:
        raise _overflow(exc) from None


def _overflow(exc: OverflowError) -> RequestInvalid:
    # A validator that converts a value (a datetime to UTC, say) can overflow, and pydantic
    # passes only ValueError on as a field error: still the client's input, so 422.
    return RequestInvalid(
        [FieldError("body", f"a value is out of range once converted: {exc}")],
        "request is invalid",
    )


async def read_json(request: web.Request, model: type[M]) -> M:
    """Read, parse and validate the body: 413 too large, 400 malformed, 422 invalid."""
    limit = request.app[SETTINGS_KEY].server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if not raw or raw.isspace():  # no stripped copy of a large body
        raise MalformedBody("request body is empty; expected a JSON object")
    if any(c in raw for c in _JSON_CONSTANTS):
        return _validate(model, _parse_stdlib(raw))
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors(include_url=False)):
            # not JSON to pydantic: the standard parser says why (or, should it disagree,
            # parses it and the model validates the result)
            return _validate(model, _parse_stdlib(raw))
        raise
    except OverflowError as exc:
        raise _overflow(exc) from None
