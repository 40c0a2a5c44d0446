"""Operational endpoints: liveness, readiness, Prometheus exposition."""

from __future__ import annotations

from aiohttp import web

from server.keys import METRICS_KEY, MODEL_READY_KEY
from server.metrics import exposition


async def healthz(request: web.Request) -> web.Response:
    # Answering at all proves the event loop runs.
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[MODEL_READY_KEY]()
    if state.ready:
        return web.json_response({"status": "ready", "reason": state.reason})
    return web.json_response({"status": "not_ready", "reason": state.reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = exposition(request.app[METRICS_KEY])
    return web.Response(body=body, headers={"Content-Type": content_type})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
