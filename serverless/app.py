"""The ASGI application: a table of thin endpoints, the lifespan that owns every async resource,
and the one place where errors become HTTP responses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from . import lifecycle
from .errors import InvalidParams, as_serverless_error
from .jobs.registry import Jobs
from .resources import Resources
from .settings import Settings
from .transports.http import EventStream, json_response, read_body
from .transports.start import start_job
from .transports.websocket import websocket_run


async def error_response(request: Request, exc: Exception) -> Response:
    """Every error a caller sees as an HTTP answer is rendered here."""
    error = as_serverless_error(exc, f"{request.method} {request.url.path}")
    return JSONResponse(error.to_payload(), status_code=error.status_code)


async def run(request: Request) -> Response:
    """POST /api/serverless/run: one workflow in, its result out (JSON, SSE, or later)."""
    resources, jobs = request.app.state.resources, request.app.state.jobs
    settings = resources.settings
    body = await read_body(request, settings.max_body_bytes)
    job = await start_job(resources, jobs, body, request.query_params, request.headers, "http")
    if job.spec.mode == "async" and not settings.on_fc:
        # Outside FC nobody holds the request for us: answer now, the app owns the job.
        return JSONResponse({"task_id": job.task_id}, status_code=202)
    if job.spec.mode == "stream":
        return EventStream(job, settings)
    # On FC an async invocation is held until the job ends, so the instance is not frozen mid-job.
    return await json_response(request, job, settings, held_async=job.spec.mode == "async")


async def status(request: Request) -> Response:
    """GET /api/serverless/status?task_id=X[&after=N]: the task's payloads so far."""
    resources = request.app.state.resources
    task_id = request.query_params.get("task_id")
    if not task_id:
        raise InvalidParams("task_id is required")
    after = request.query_params.get("after", "0")
    if not (after.isascii() and after.isdigit()) or len(after) > 12:
        raise InvalidParams("after must be a non-negative whole number")
    return JSONResponse(await resources.status.read(task_id, int(after)))


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app; settings are read from the environment unless given."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Resources.open(settings) as resources:
            jobs = Jobs(resources.runtime(), resources.status, settings.stream_buffer_events)
            app.state.resources, app.state.jobs = resources, jobs
            app.state.prewarm = lifecycle.Prewarm()
            pruner = asyncio.create_task(resources.status.prune_forever(settings.status_retention_days))
            try:
                yield
                await jobs.drain(settings.drain_timeout)
            finally:
                pruner.cancel()
                await asyncio.gather(pruner, return_exceptions=True)

    routes = [
        Route("/api/serverless/run", run, methods=["POST"]),
        Route("/api/serverless/status", status, methods=["GET"]),
        WebSocketRoute("/api/serverless/ws", websocket_run),
        Route("/api/serverless/health", lifecycle.health, methods=["GET"]),
        Route("/initialize", lifecycle.initialize, methods=["POST"]),
        Route("/pre-stop", lifecycle.pre_stop, methods=["GET", "POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={Exception: error_response})
