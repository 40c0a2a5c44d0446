"""Market-data snapshots: write (append-only), resolve by data_asof, list val_datetimes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from server.errors import FieldError, RequestInvalid
from server.http import read_json
from server.keys import MARKETDATA_KEY, SETTINGS_KEY
from storage.marketdata import (
    MarketDataInvalid,
    SnapshotBody,
    StoredSnapshot,
    check_name,
    format_utc,
    parse_aware_datetime,
)

PREFIX = "/v1/marketdata"


def _datetime(text: str, *, path: str) -> datetime | FieldError:
    """The UTC datetime `text` names, or the field error saying why it names none."""
    try:
        return parse_aware_datetime(text, field=path)
    except MarketDataInvalid as exc:
        return FieldError(path, exc.reason)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        return FieldError(path, f"{text!r} is outside the datetime range once converted to UTC")


def _path_params(request: web.Request) -> tuple[str, datetime]:
    fields: list[FieldError] = []
    namespace = request.match_info["namespace"]
    try:
        check_name(namespace, field="namespace")
    except MarketDataInvalid as exc:
        fields.append(FieldError("path.namespace", exc.reason))
    val_datetime = _datetime(request.match_info["val_datetime"], path="path.val_datetime")
    if isinstance(val_datetime, FieldError):
        fields.append(val_datetime)
    if fields or not isinstance(val_datetime, datetime):
        raise RequestInvalid(fields, "invalid path parameters")
    return namespace, val_datetime


def _query_datetime(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name)
    if text is None:
        return None
    value = _datetime(text, path=f"query.{name}")
    if isinstance(value, FieldError):
        raise RequestInvalid([value], "invalid query")
    return value


def _snapshot_json(stored: StoredSnapshot) -> dict[str, Any]:
    snap = stored.snapshot
    return {
        "key": stored.key,
        "hash": stored.content_hash,
        "namespace": snap.namespace,
        "val_datetime": format_utc(snap.val_datetime),
        "data_asof": format_utc(snap.data_asof),
        "snapshot": snap.model_dump(mode="json"),
    }


async def put_snapshot(request: web.Request) -> web.Response:
    namespace, val_datetime = _path_params(request)
    body = await read_json(request, SnapshotBody)
    stored = await request.app[MARKETDATA_KEY].put(
        namespace=namespace, val_datetime=val_datetime, body=body
    )
    answer = {
        "key": stored.key,
        "hash": stored.content_hash,
        "namespace": namespace,
        "val_datetime": format_utc(stored.snapshot.val_datetime),
        "data_asof": format_utc(stored.snapshot.data_asof),
        "created": stored.created,
    }
    # 201 for a new snapshot, 200 for an identical retry of a committed one.
    return web.json_response(answer, status=201 if stored.created else 200)


async def get_snapshot(request: web.Request) -> web.Response:
    namespace, val_datetime = _path_params(request)
    data_asof = _query_datetime(request, "data_asof")
    stored = await request.app[MARKETDATA_KEY].resolve(
        namespace=namespace, val_datetime=val_datetime, data_asof=data_asof
    )
    return web.json_response(_snapshot_json(stored))


async def list_val_datetimes(request: web.Request) -> web.Response:
    namespace = request.match_info["namespace"]
    try:
        check_name(namespace, field="namespace")
    except MarketDataInvalid as exc:
        raise RequestInvalid([FieldError("path.namespace", exc.reason)], "invalid path") from None
    cap = request.app[SETTINGS_KEY].server.max_list_items
    limit_text = request.query.get("limit", str(cap))
    try:
        limit = int(limit_text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= cap:
        raise RequestInvalid(
            [FieldError("query.limit", f"must be an integer in [1, {cap}], got {limit_text!r}")],
            "invalid query",
        )
    after = _query_datetime(request, "after")
    found, truncated = await request.app[MARKETDATA_KEY].list_val_datetimes(
        namespace=namespace, limit=limit, after=after
    )
    return web.json_response(
        {
            "namespace": namespace,
            "val_datetimes": [format_utc(v) for v in found],
            "truncated": truncated,
        }
    )


def setup_routes(app: web.Application) -> None:
    one = f"{PREFIX}/{{namespace}}/{{val_datetime}}"
    app.router.add_put(one, put_snapshot, name="marketdata_put")
    app.router.add_post(one, put_snapshot, name="marketdata_post")
    app.router.add_get(one, get_snapshot, name="marketdata_get")
    app.router.add_get(f"{PREFIX}/{{namespace}}", list_val_datetimes, name="marketdata_list")
