"""The job-result document and its key layout: `<prefix>/<job name>/<slot token>.json`.

One document per (job, slot), written put-if-absent so that whichever replica runs the slot
first keeps it: the request, the resolved dataset (key + hash), the model (counter + hash), the
scheduled, started and finished times, the lag, and the answer itself. The bytes are
`storage.documents.canonical_bytes`, so a stored answer equals the API's answer byte for byte.
The server's scheduler (server/jobs.py) writes them; retention (storage/retention.py) parses the
keys to prune by slot age.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from storage.documents import canonical_bytes
from storage.marketdata import datetime_token, format_utc, parse_datetime_token
from storage.objectstore import ObjectStore

JOB_RESULTS_PREFIX = "jobs"
FORMAT_VERSION = 1


def job_result_key(name: str, scheduled: datetime, *, prefix: str = JOB_RESULTS_PREFIX) -> str:
    return f"{prefix}/{name}/{datetime_token(scheduled)}.json"


def parse_job_result_key(
    key: str, *, prefix: str = JOB_RESULTS_PREFIX
) -> tuple[str, datetime] | None:
    """(job name, slot time) of a result key; None for a key of another shape."""
    head = f"{prefix}/"
    if not key.startswith(head) or not key.endswith(".json"):
        return None
    parts = key[len(head) :].split("/")
    if len(parts) != 2 or not parts[0]:
        return None
    try:
        return parts[0], parse_datetime_token(parts[1][: -len(".json")])
    except ValueError:
        return None


def job_result_document(
    *,
    job: str,
    error: str | None,
    scheduled: datetime,
    started: datetime,
    finished: datetime,
    lag_s: float,
    request: dict[str, Any],
    result: dict[str, Any] | None,
) -> dict[str, Any]:
    """A slot's document; `result` is the valuation answer (None when the slot failed)."""
    return {
        "format_version": FORMAT_VERSION,
        "job": job,
        "status": "ok" if error is None else "error",
        "error": error,
        "scheduled": format_utc(scheduled),
        "started": format_utc(started),
        "finished": format_utc(finished),
        "lag_s": lag_s,
        "request": request,
        "dataset": None if result is None else result["dataset"],
        "model": None if result is None else result["model"],
        "result": result,
    }


async def put_job_result(store: ObjectStore, key: str, document: dict[str, Any]) -> None:
    """Write a slot's document once (Conflict if the slot was already written)."""
    await store.put_if_absent(key, canonical_bytes(document))
