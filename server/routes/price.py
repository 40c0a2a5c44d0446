"""Direct pricing: contracts (X0, K and the model's process parameters) as given, no market
data. A request names its model (`model`, default [server] default_model)."""

from __future__ import annotations

from aiohttp import web

from server.http import admitted, canonical_response, deadline_s, limits, read_json
from server.models import request_model
from server.valuation import PriceRequest, check_price_request, price_contracts


async def price(request: web.Request) -> web.Response:
    with admitted(request):
        deadline = deadline_s(request)
        req = await read_json(request, PriceRequest)
        served = request_model(request.app, req.model)
        spec = served.book_model
        check_price_request(req, limits=limits(request), fields=spec.fields, model=spec.name,
                            process=spec.process)
        body = await price_contracts(req, model=served.service, fields=spec.fields,
                                     greeks=spec.greeks, name=spec.name, deadline_s=deadline)
        return canonical_response(body)


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/price", price, name="price")
