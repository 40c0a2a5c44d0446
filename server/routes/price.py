"""Direct pricing: contracts (X0, K, T, r, d, v) as given, no market data."""

from __future__ import annotations

from aiohttp import web

from server.http import admit, canonical_response, deadline_s, limits, read_json
from server.keys import MODEL_KEY
from server.valuation import PriceRequest, check_price_request, price_contracts


async def price(request: web.Request) -> web.Response:
    admit(request)
    deadline = deadline_s(request)
    req = await read_json(request, PriceRequest)
    check_price_request(req, limits=limits(request))
    body = await price_contracts(req, model=request.app[MODEL_KEY], deadline_s=deadline)
    return canonical_response(body)


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/price", price, name="price")
