"""Route modules, one per resource; each exposes `setup_routes(app)`."""

from __future__ import annotations

from aiohttp import web

from server.routes import (
    admin,
    calibrations,
    health,
    jobs,
    marketdata,
    models,
    price,
    scenarios,
    valuations,
)

ROUTE_MODULES = (health, marketdata, admin, models, valuations, price, scenarios, calibrations,
                 jobs)


def setup_routes(app: web.Application) -> None:
    for module in ROUTE_MODULES:
        module.setup_routes(app)
