"""Valuations of instrument books against resolved market data, on a named model (`model`,
default [server] default_model) and optionally an exact version of it."""

from __future__ import annotations

from aiohttp import web

from server.http import admitted, canonical_response, deadline_s, limits, read_json
from server.keys import MARKETDATA_KEY, METRICS_KEY
from server.models import request_model
from server.valuation import ValuationRequest, check_valuation_request, value_book


async def post_valuation(request: web.Request) -> web.Response:
    counter = request.app[METRICS_KEY].valuations
    try:
        with admitted(request):
            deadline = deadline_s(request)
            req = await read_json(request, ValuationRequest)
            check_valuation_request(req, limits=limits(request))
            served = request_model(request.app, req.model)
            body = await value_book(
                req,
                marketdata=request.app[MARKETDATA_KEY],
                model=served.service,
                book_model=served.book_model,
                deadline_s=deadline,
            )
            response = canonical_response(body)
    except Exception:
        counter.labels(result="error").inc()
        raise
    counter.labels(result="ok").inc()
    return response


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/valuations", post_valuation, name="valuations")
