"""Direct pricing: contracts (X0, K, T, r, d, v) as given, no market data."""

from __future__ import annotations

from aiohttp import web

from server.errors import read_json, register_error
from server.keys import MODEL_KEY, SETTINGS_KEY
from server.model import NoModel
from server.valuation import (
    Limits,
    PriceRequest,
    canonical_bytes,
    check_price_request,
    price_contracts,
)

# No model version loaded yet is a state of the service, not of the request.
register_error(NoModel, 503, "unavailable")


def limits(request: web.Request) -> Limits:
    server = request.app[SETTINGS_KEY].server
    return Limits(max_items=server.max_instruments, max_string_len=server.max_string_len)


def canonical_response(body: object) -> web.Response:
    return web.Response(body=canonical_bytes(body), content_type="application/json")


async def price(request: web.Request) -> web.Response:
    req = await read_json(request, PriceRequest)
    check_price_request(req, limits=limits(request))
    return canonical_response(await price_contracts(req, model=request.app[MODEL_KEY]))


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/price", price, name="price")
