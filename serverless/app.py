"""The ASGI application: a table of thin endpoints, the lifespan that owns every async resource,
and the one place where errors become HTTP responses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from . import fleet, lifecycle
from .core.request import RUN_QUERY_FLAGS, unknown_parameters
from .errors import InvalidParams, MethodNotAllowed, NotFound, ServerlessError, as_serverless_error
from .jobs.registry import Jobs
from .resources import Resources
from .settings import Settings
from .status.log import parse_after, parse_attempt
from .transports.http import EventStream, json_response, read_body
from .transports.start import start_job
from .transports.websocket import websocket_run
from .workflows import endpoints as workflows

log = logging.getLogger(__name__)


async def error_response(request: Request, exc: Exception) -> Response:
    """Every error a caller sees as an HTTP answer is rendered here."""
    if isinstance(exc, ClientDisconnect):  # the caller hung up mid-body: nobody to answer, no bug
        log.info("%s %s: the caller hung up before its body arrived", request.method, request.url.path)
        return Response(status_code=400)
    error = as_serverless_error(_ours(request, exc), f"{request.method} {request.url.path}")
    return JSONResponse(error.to_payload(), status_code=error.status_code, headers=_headers(exc))


def _ours(request: Request, exc: Exception) -> Exception:
    """Starlette's own refusals (no route, wrong method) in our error shape."""
    if not isinstance(exc, HTTPException):
        return exc
    if exc.status_code == 404:
        return NotFound(f"no such endpoint: {request.url.path}")
    if exc.status_code == 405:
        return MethodNotAllowed(f"{request.url.path} does not answer {request.method}")
    error = InvalidParams(str(exc.detail))
    error.status_code = exc.status_code
    return error


def _headers(exc: Exception) -> dict[str, str] | None:
    return dict(exc.headers) if isinstance(exc, HTTPException) and exc.headers else None


async def run(request: Request) -> Response:
    """POST /api/serverless/run: one workflow in, its result out (JSON, SSE, or later). Also
    POST /api/workflows/{workflow_id}/run (and `?workflow_id=`): a hosted workflow's overrides in."""
    resources, jobs = request.app.state.resources, request.app.state.jobs
    settings = resources.settings
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout)
    workflow_id = request.path_params.get("workflow_id")  # POST /api/workflows/{workflow_id}/run
    job = await start_job(resources, jobs, body, request.query_params, request.headers, "http", workflow_id)
    response: Response
    if job.spec.mode == "async" and not settings.on_fc:
        # Outside FC nobody holds the request for us: answer now, the app owns the job.
        response = JSONResponse({"task_id": job.task_id}, status_code=202)
    elif job.spec.mode == "stream":
        response = EventStream(job, settings)
    else:
        # On FC an async invocation is held until the job ends, so the instance is not frozen mid-job.
        response = await json_response(request, job, settings, held_async=job.spec.mode == "async")
    return _warn_unknown(request, response, job.task_id)


def _warn_unknown(request: Request, response: Response, task_id: str) -> Response:
    """A misspelt flag is ignored, as FC ignores what it does not know; but say so."""
    unknown = unknown_parameters(request.query_params)
    if unknown:
        names, known = ", ".join(unknown), ", ".join(RUN_QUERY_FLAGS)
        log.warning("task_id=%s: unknown query parameter(s) ignored: %s (known: %s)", task_id, names, known)
        text = f"unknown query parameter(s) ignored: {names}; known: {known}"
        response.headers.append("Warning", f'299 - "{text}"')
    return response


async def status(request: Request) -> Response:
    """GET /api/serverless/status?task_id=X[&after=N][&attempt=K]: the task's payloads so far
    (of its current attempt, or of attempt K)."""
    resources = request.app.state.resources
    task_id = request.query_params.get("task_id")
    if not task_id:
        raise InvalidParams("task_id is required")
    after = parse_after(request.query_params.get("after", "0"))
    attempt = request.query_params.get("attempt")
    body = await resources.status.read(task_id, after, parse_attempt(attempt) if attempt is not None else None)
    return Response(body, media_type="application/json")


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app; settings are read from the environment unless given."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Resources.open(settings) as resources:
            jobs = Jobs(
                resources.runtime(), resources.status, settings.stream_buffer_events, settings.job_max_event_bytes
            )
            app.state.resources = resources
            app.state.prewarm = lifecycle.Prewarm()
            app.state.queue_watch = lifecycle.QueueWatch(settings.queue_stall_after)
            pruner = asyncio.create_task(resources.status.prune_forever(settings.status_retention_days))
            try:
                async with fleet.running(resources, jobs) as tier:  # the Redis tier, if configured
                    app.state.jobs, app.state.consumer = tier.jobs, tier.consumer
                    yield
                    await tier.jobs.drain(settings.drain_timeout)
                    await jobs.drain(settings.drain_timeout)
            finally:
                pruner.cancel()
                await asyncio.gather(pruner, return_exceptions=True)

    routes = [  # each endpoint is a few lines: the work is in the modules it calls
        Route("/api/serverless/run", run, methods=["POST"]),
        Route("/api/serverless/status", status, methods=["GET"]),
        WebSocketRoute("/api/serverless/ws", websocket_run),
        Route("/api/serverless/health", lifecycle.health, methods=["GET"]),
        Route("/initialize", lifecycle.initialize, methods=["POST"]),
        Route("/pre-stop", lifecycle.pre_stop, methods=["GET", "POST"]),
        Route("/api/workflows", workflows.list_workflows, methods=["GET"]),
        Route("/api/workflows/{workflow_id}", workflows.get_workflow, methods=["GET"]),
        Route("/api/workflows/{workflow_id}", workflows.put_workflow, methods=["PUT"]),
        Route("/api/workflows/{workflow_id}", workflows.delete_workflow, methods=["DELETE"]),
        Route("/api/workflows/{workflow_id}/openapi.json", workflows.openapi_json, methods=["GET"]),
        Route("/api/workflows/{workflow_id}/run", run, methods=["POST"]),
        *fleet.routes(settings.queue_backend),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        # Our errors, starlette's refusals and hang-ups are answered by starlette's exception
        # middleware; anything else (a bug) also reaches the server error middleware, which
        # answers the same way and then lets uvicorn log it.
        exception_handlers={
            ServerlessError: error_response,
            HTTPException: error_response,
            ClientDisconnect: error_response,
            Exception: error_response,
        },
    )
