"""Real-time jobs: what is scheduled and how its runs went."""

from __future__ import annotations

from aiohttp import web

from server.keys import JOBS_KEY


async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response({"jobs": request.app[JOBS_KEY].status()})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/jobs", list_jobs, name="jobs")
