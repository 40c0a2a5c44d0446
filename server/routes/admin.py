"""Admin API: model pinning and training control, behind a bearer token.

Every change is written to the chain's append-only audit log (pins through the ref machinery,
training actions as plain audit entries), so `spectralmc store log` shows who did what and when.
"""

from __future__ import annotations

import hmac
import re
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.errors import FieldError, RequestInvalid
from server.http import read_json
from server.keys import SETTINGS_KEY
from server.models import ServedModel, request_model
from server.valuation import MAX_VERSION
from server.worker import TrainingWorker

_ACTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class PinBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Annotated[int, Field(ge=1, le=MAX_VERSION)] | None = None
    ref: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = None

    @field_validator("ref")
    @classmethod
    def _numeric_ref_is_a_counter(cls, ref: str | None) -> str | None:
        # chain.resolve reads a ref of digits only as a version counter
        if ref is not None and ref.isdigit() and not 1 <= int(ref) <= MAX_VERSION:
            raise ValueError(
                f"a ref of digits names a version counter, which must be in 1..{MAX_VERSION}"
            )
        return ref

    @model_validator(mode="after")
    def _one(self) -> PinBody:
        if (self.version is None) == (self.ref is None):
            raise ValueError("give exactly one of version or ref")
        return self


def _unauthorized(detail: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        text=detail, headers={"WWW-Authenticate": 'Bearer realm="spectralmc-admin"'}
    )


def require_admin(request: web.Request) -> None:
    """Check the bearer token (constant-time): 401 unless it is the configured one."""
    token = request.app[SETTINGS_KEY].admin.token
    if token is None:
        raise _unauthorized("admin API disabled: no admin token is configured")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise _unauthorized("missing or malformed bearer token")
    # Header bytes that are not UTF-8 arrive as surrogate escapes: compare them as the raw bytes
    # they were (never equal to the token), not fail to encode them (a 500).
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given_bytes, token.get_secret_value().encode()):
        raise _unauthorized("invalid bearer token")


def admin_actor(request: web.Request) -> str:
    """`require_admin`, then the actor for the audit log: `admin:<X-Actor>` (default `admin`).

    An X-Actor the audit log cannot record as given is refused (422), not replaced.
    """
    require_admin(request)
    actor = request.headers.get("X-Actor", "admin")
    if not _ACTOR_RE.match(actor):
        raise RequestInvalid(
            [FieldError("header.X-Actor", f"must match {_ACTOR_RE.pattern}, got {actor[:80]!a}")],
            "invalid header",
        )
    return f"admin:{actor}"


def _model(request: web.Request) -> ServedModel:
    """The model the path names (`/v1/admin/models/{model}/...`), else the default model;
    404 naming an unknown one."""
    return request_model(request.app, request.match_info.get("model"))


async def put_pin(request: web.Request) -> web.Response:
    actor = admin_actor(request)
    service = _model(request).service
    body = await read_json(request, PinBody)
    target: int | str = body.version if body.version is not None else str(body.ref)
    counter = await service.pin(target, actor=actor)
    cur = service.current
    return web.json_response({"pinned": counter, "model": None if cur is None else cur.as_json()})


async def delete_pin(request: web.Request) -> web.Response:
    actor = admin_actor(request)
    service = _model(request).service
    old = await service.unpin(actor=actor)
    cur = service.current
    return web.json_response({"unpinned": old, "model": None if cur is None else cur.as_json()})


async def get_training(request: web.Request) -> web.Response:
    require_admin(request)
    served = _model(request)
    worker = served.worker
    return web.json_response(
        {
            "name": served.name,
            "training": worker.status() if worker is not None else {"state": "disabled"},
            "model": served.service.status(),
        }
    )


def _worker(request: web.Request) -> tuple[ServedModel, TrainingWorker]:
    served = _model(request)
    if served.worker is None:
        raise web.HTTPConflict(
            text=f"training of model {served.name!r} is disabled in settings "
            "(training.enabled = false, or models.<name>.training = false)"
        )
    return served, served.worker


async def post_pause(request: web.Request) -> web.Response:
    actor = admin_actor(request)
    served, worker = _worker(request)
    worker.pause()
    await served.chain.append_audit("training.pause", actor=actor)
    return web.json_response({"training": worker.status()})


async def post_resume(request: web.Request) -> web.Response:
    actor = admin_actor(request)
    served, worker = _worker(request)
    worker.resume()
    await served.chain.append_audit("training.resume", actor=actor)
    return web.json_response({"training": worker.status()})


async def post_commit(request: web.Request) -> web.Response:
    actor = admin_actor(request)
    served, worker = _worker(request)
    try:
        record = await worker.commit_now(actor=actor)
    except RuntimeError as exc:
        raise web.HTTPConflict(text=str(exc)) from None
    await served.chain.append_audit(
        "training.commit",
        actor=actor,
        new=record.counter,
        detail={"version_hash": record.version_hash},
    )
    committed = {
        "counter": record.counter,
        "version_hash": record.version_hash,
        "message": record.message,
    }
    return web.json_response({"committed": committed}, status=201)


def setup_routes(app: web.Application) -> None:
    app.router.add_put("/v1/admin/model/pin", put_pin, name="admin_pin")
    app.router.add_delete("/v1/admin/model/pin", delete_pin, name="admin_unpin")
    app.router.add_get("/v1/admin/training", get_training, name="admin_training")
    app.router.add_post("/v1/admin/training/pause", post_pause, name="admin_training_pause")
    app.router.add_post("/v1/admin/training/resume", post_resume, name="admin_training_resume")
    app.router.add_post("/v1/admin/training/commit", post_commit, name="admin_training_commit")
    # the same per named model; the routes above act on [server] default_model
    m = "/v1/admin/models/{model}"
    app.router.add_put(f"{m}/pin", put_pin, name="admin_model_pin")
    app.router.add_delete(f"{m}/pin", delete_pin, name="admin_model_unpin")
    app.router.add_get(f"{m}/training", get_training, name="admin_model_training")
    app.router.add_post(f"{m}/training/pause", post_pause, name="admin_model_training_pause")
    app.router.add_post(f"{m}/training/resume", post_resume, name="admin_model_training_resume")
    app.router.add_post(f"{m}/training/commit", post_commit, name="admin_model_training_commit")
