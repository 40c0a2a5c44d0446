"""POST /v1/calibrations: fit a named model to an underlying's vol surface and store the fit as
a derived market-data snapshot (server/calibrations.py)."""

from __future__ import annotations

from aiohttp import web

from server.calibrations import CalibrationRequest, NotConverged
from server.errors import error_body
from server.http import canonical_response, read_json
from server.keys import CALIBRATOR_KEY, REQUEST_ID_KEY


async def post_calibration(request: web.Request) -> web.Response:
    req = await read_json(request, CalibrationRequest)
    try:
        stored, body = await request.app[CALIBRATOR_KEY].calibrate(req)
    except NotConverged as exc:
        # not the client's field: the optimiser's trace says why; nothing was written
        out = error_body(kind="not_converged", detail=str(exc),
                         request_id=request.get(REQUEST_ID_KEY))
        out["calibration"] = exc.diagnostics
        response = canonical_response(out)
        response.set_status(422)
        return response
    response = canonical_response(body)
    response.set_status(201 if stored.created else 200)
    return response


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/calibrations", post_calibration, name="calibrations")
