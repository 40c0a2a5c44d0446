"""Scenario sampling: draws of S_T from the learned distribution (server/scenarios.py)."""

from __future__ import annotations

from aiohttp import web

from server.http import canonical_response, read_json
from server.models import request_model
from server.scenarios import ScenarioRequest


async def scenarios(request: web.Request) -> web.Response:
    req = await read_json(request, ScenarioRequest)
    body = await request_model(request.app, req.model).sampler.sample(req)
    return canonical_response(body)


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/scenarios", scenarios, name="scenarios")
