"""The ASGI application: a table of thin endpoints, the lifespan that owns every async resource,
and the one place where errors become HTTP responses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from . import auth, batches, comfyapi, fleet, lifecycle
from .auth import RequireApiKey, may_see
from .core.request import RUN_QUERY_FLAGS, query_flag, unknown_parameters
from .docs import endpoints as docs
from .errors import (
    ComfyUIUnavailable,
    InvalidParams,
    MethodNotAllowed,
    NotFound,
    ServerlessError,
    Unavailable,
    as_serverless_error,
)
from .fleet import endpoints as fleet_endpoints
from .genstudio import endpoints as genstudio
from .jobs import feed
from .jobs.registry import Jobs
from .jobs.runner import EventSource
from .models import endpoints as models
from .ops import endpoints as ops
from .ops.metrics import Metrics
from .resources import Resources
from .settings import Settings
from .state import AppState, app_state
from .status.log import parse_after, parse_attempt
from .tenants import endpoints as tenants
from .tenants import keys as tenant_keys
from .tenants.keys import ApiKeys
from .transports import control, files
from .transports.events import recorded_if_ended
from .transports.http import EventStream, hang_up, json_response, read_body
from .transports.idempotency import idempotency_key, requested_mode, start_or_attach
from .transports.routing import IndexedRouter
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
    if isinstance(exc, Unavailable | ComfyUIUnavailable) and app_state(request).jobs.accepting:
        # A dependency failed (the status store, Redis, ComfyUI): the caller is told, and so is
        # the operator. Not a refusal: BUSY (they come in floods; the metrics count them), nor a
        # draining instance's (its drain is logged once).
        log.warning(
            "%s %s answered %d %s: %s", request.method, request.url.path, error.status_code, error.code, error.message
        )
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
    if isinstance(exc, ServerlessError):
        return exc.headers or None  # e.g. BUSY's Retry-After
    return dict(exc.headers) if isinstance(exc, HTTPException) and exc.headers else None


async def run(request: Request) -> Response:
    """POST /api/serverless/run: one workflow in, its result out (JSON, SSE, or later). Also
    POST /api/workflows/{workflow_id}/run (and `?workflow_id=`): a hosted workflow's overrides in."""
    state = app_state(request)
    resources, jobs = state.resources, state.jobs
    settings = resources.settings
    await jobs.check_room()  # BUSY before the body is read
    body = await read_body(request, settings.inputs.max_body_bytes, settings.inputs.timeout)
    owner = caller(request)
    workflow_id = request.path_params.get("workflow_id")  # POST /api/workflows/{workflow_id}/run
    query, headers = request.query_params, request.headers
    # Where the caller reached us prefixes download links, asked only by ?output_url= (from the
    # query alone: a hosted workflow's `output` options do not name it); making it costs a URL parse.
    base_url = str(request.base_url) if query_flag(query, "output_url") else None
    key = idempotency_key(headers)
    job: EventSource
    abandon = None  # what this caller hanging up does
    if key is None or settings.fleet.queue_backend == "redis":  # the Redis tier claims keys in Redis itself
        started = await start_job(
            resources, jobs, body, query, headers, "http", workflow_id, base_url=base_url, owner=owner
        )
        job, abandon = started, hang_up(started, settings, keep=key is not None)
    else:  # a repeated request attaches to the task its key started (here or elsewhere); kept if it hangs up
        job = await start_or_attach(resources, jobs, key, body, query, headers, workflow_id, base_url, owner)
    mode = requested_mode(query, headers)
    response: Response
    if mode == "async" and not settings.service.on_fc:
        # Outside FC nobody holds the request for us: answer now, the app owns the job.
        response = JSONResponse({"task_id": job.task_id}, status_code=202)
    elif mode == "stream":
        previews = query_flag(query, "previews")
        response = EventStream(job, settings, abandon=abandon, metrics=resources.metrics, previews=previews)
    else:
        # On FC an async invocation is held until the job ends, so the instance is not frozen mid-job.
        response = await json_response(request, job, settings, held_async=mode == "async", abandon=abandon)
        if mode == "async":
            await resources.webhooks.settled(job)  # nor frozen mid-delivery (bounded by webhooks.TIMEOUT)
    return _warn_unknown(request, response, job.task_id)


def _warn_unknown(request: Request, response: Response, task_id: str) -> Response:
    """A misspelt flag is ignored, as FC ignores what it does not know; but say so."""
    unknown = unknown_parameters(request.query_params)
    if unknown:
        # Names were checked before the job started (check_parameter_names); none goes in a header.
        names, known = ascii(", ".join(unknown))[1:-1], ", ".join(RUN_QUERY_FLAGS)
        log.warning("task_id=%s: unknown query parameter(s) ignored: %s (known: %s)", task_id, names, known)
        text = f"{len(unknown)} unknown query parameter(s) ignored; known: {known}"
        response.headers.append("Warning", f'299 - "{text}"')
    return response


def caller(request: Request) -> str | None:
    """Who calls: the owner id of its API key (None when API keys are off)."""
    return auth.caller(request).owner


async def status(request: Request) -> Response:
    """GET /api/serverless/status?task_id=X[&after=N][&attempt=K]: the task's payloads so far
    (of its current attempt, or of attempt K)."""
    state = app_state(request)
    resources = state.resources
    task_id = request.query_params.get("task_id")
    if not task_id:
        raise InvalidParams("task_id is required")
    after = parse_after(request.query_params.get("after", "0"))
    attempt = request.query_params.get("attempt")
    job = state.jobs.get(task_id)
    if job is not None and attempt is None:
        await recorded_if_ended(job)  # its caller may have had the end from this instance already
    owner = caller(request)
    if owner is not None:
        task_owner = await resources.status.owner(task_id)
        if task_owner == "":
            return Response(b"[]", media_type="application/json")  # nothing written yet (or no such task)
        if not may_see(owner, task_owner):
            raise NotFound(f"no task {task_id}")  # another key's task: as if it did not exist
    await state.jobs.end_if_stranded(task_id)  # a fleet job no worker will ever take: ended now
    body = await resources.status.read(task_id, after, parse_attempt(attempt) if attempt is not None else None)
    return Response(body, media_type="application/json")


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app; settings are read from the environment unless given."""
    settings = settings or Settings.from_env()
    for line in settings.deprecated:  # once per app, whatever started it
        log.warning("setting %s", line)
    keys = ApiKeys.from_settings(settings.security.api_keys, settings.tenants.keys_file)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        metrics = Metrics()  # this app's own registry: several apps may share a process
        async with Resources.open(settings, metrics) as resources:
            jobs = Jobs(
                resources.runtime(),
                resources.status,
                feed.READER_LAG,
                feed.MAX_JOB_BYTES,
                settings.service.max_pending_jobs,
                metrics,
                resources.webhooks,
                resources.tenants,
            )
            state = AppState(resources, jobs, lifecycle.Prewarm(), lifecycle.QueueWatch(lifecycle.QUEUE_STALL_AFTER))
            state.keys = keys
            app.state.serverless = state
            background = [asyncio.create_task(resources.status.prune_forever(settings.status.retention_days))]
            background.append(asyncio.create_task(keys.watch(tenant_keys.POLL_INTERVAL)))  # API_KEYS_FILE
            background.append(asyncio.create_task(resources.tenants.usage.flush_forever()))  # usage per key
            if settings.fleet.queue_backend != "redis":  # the tier's workers watch the queue's cancel keys instead
                background.append(asyncio.create_task(jobs.watch_cancels()))  # cancels asked through others
            try:
                async with fleet.running(resources, jobs) as tier:  # the Redis tier, if configured
                    state.jobs, state.consumer = tier.jobs, tier.consumer
                    async with batches.feeding(state):  # stopped before the drains: nothing more submitted
                        yield
                    if tier.jobs is not jobs:
                        await tier.jobs.drain(settings.service.drain_timeout)
                    await jobs.drain(settings.service.drain_timeout)
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)

    routes = [  # each endpoint is a few lines: the work is in the modules it calls
        Route("/api/serverless/run", run, methods=["POST"]),
        Route("/api/serverless/status", status, methods=["GET"]),
        Route("/api/serverless/task", control.task, methods=["GET"]),
        Route("/api/serverless/cancel", control.cancel, methods=["POST"]),
        Route("/api/serverless/events", control.events, methods=["GET"]),
        Route("/api/tasks", control.tasks, methods=["GET"]),
        Route("/api/fleet/dead-letters", fleet_endpoints.dead_letters, methods=["GET"]),
        Route("/api/fleet/dead-letters/{letter_id}/requeue", fleet_endpoints.requeue, methods=["POST"]),
        Route("/api/fleet/workers", fleet_endpoints.workers, methods=["GET"]),
        WebSocketRoute("/api/serverless/ws", websocket_run),
        Route("/api/serverless/health", lifecycle.health, methods=["GET"]),
        Route("/api/serverless/ready", ops.ready, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
        Route("/initialize", lifecycle.initialize, methods=["POST"]),
        Route("/pre-stop", lifecycle.pre_stop, methods=["GET", "POST"]),
        Route("/api/usage", tenants.usage, methods=["GET"]),
        Route("/api/workflows", workflows.list_workflows, methods=["GET"]),
        Route("/api/workflows/convert", workflows.convert_workflow, methods=["POST"]),
        Route("/api/workflows/{workflow_id}", workflows.get_workflow, methods=["GET"]),
        Route("/api/workflows/{workflow_id}", workflows.put_workflow, methods=["PUT"]),
        Route("/api/workflows/{workflow_id}", workflows.delete_workflow, methods=["DELETE"]),
        Route("/api/workflows/{workflow_id}/openapi.json", workflows.openapi_json, methods=["GET"]),
        Route("/api/workflows/{workflow_id}/run", run, methods=["POST"]),
        Route("/api/workflows/{workflow_id}/versions", workflows.list_versions, methods=["GET"]),
        Route("/api/workflows/{workflow_id}/versions/{version}", workflows.delete_version, methods=["DELETE"]),
        Route("/api/workflows/{workflow_id}/aliases/{alias}", workflows.put_alias, methods=["PUT"]),
        Route("/api/workflows/{workflow_id}/aliases/{alias}", workflows.delete_alias, methods=["DELETE"]),
        Route("/api/models", models.list_models, methods=["GET"]),
        Route("/api/models", models.import_model, methods=["POST"]),
        Route("/api/models/{folder}/{name}/pin", models.pin_model, methods=["PUT"]),
        Route("/api/models/{folder}/{name}", models.delete_model, methods=["DELETE"]),
        Route("/api/files/{token}", files.download, methods=["GET"]),
        Route("/api/files/{token}/{name}", files.download, methods=["GET"]),  # the same, named for saving
        Route("/api/maas/comfy_task_api/prompt", genstudio.prompt, methods=["POST"]),
        Route("/api/maas/comfy_task_api/get_task_info", genstudio.get_task_info, methods=["POST"]),
        Route("/api/maas/comfy_task_api/cancel", genstudio.cancel, methods=["POST"]),
        Route("/api/maas/comfy_task_api/upload/image", genstudio.upload_image, methods=["POST"]),
        WebSocketRoute("/api/maas/comfy_task_ws_api/get_task_progress", genstudio.get_task_progress),
        *batches.routes(),  # POST /api/batches, GET /api/batches/{id} (events, cancel, retry, manifest)
        *comfyapi.routes(),  # ComfyUI's own API: /prompt, /ws, /history, /view... (and under /api/)
        *docs.routes(),  # /api/openapi.json, /docs, the playground at /; describe new routes in docs/catalog.py
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                RequireApiKey,
                keys=keys,
                own_token=("/metrics",) if settings.security.metrics_token else (),
            )
        ],
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
    app.router = IndexedRouter(routes, lifespan=lifespan)  # the same table, its static paths looked up
    return app
