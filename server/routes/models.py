"""The named models this server serves: GET /v1/models, GET /v1/models/{model}."""

from __future__ import annotations

from aiohttp import web

from server.keys import MODELS_KEY, SETTINGS_KEY
from server.models import served_model


async def list_models(request: web.Request) -> web.Response:
    models = request.app[MODELS_KEY]
    return web.json_response({
        "default": request.app[SETTINGS_KEY].server.default_model,
        "models": [m.describe() for m in models.values()],
    })


async def get_model(request: web.Request) -> web.Response:
    served = served_model(request.app[MODELS_KEY], request.match_info["model"])
    return web.json_response(served.describe())


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models, name="models")
    app.router.add_get("/v1/models/{model}", get_model, name="model")
