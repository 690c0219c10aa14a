"""The ASGI application: routes, the lifespan that owns every async resource, and the one place
where errors become responses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from .core.request import parse_run_request
from .errors import ComfyUIUnavailable, InvalidParams, ServerlessError, Unclassified, status_for_code
from .jobs.feed import Event
from .jobs.job import Job
from .jobs.registry import Jobs
from .resources import Services
from .settings import Settings
from .status.log import parse_after, parse_attempt
from .transports.sse import sse_response
from .transports.websocket import websocket_run

log = logging.getLogger(__name__)


def error_response(exc: Exception) -> JSONResponse:
    """Every error a caller sees is rendered here."""
    if not isinstance(exc, ServerlessError):
        log.error("unexpected error", exc_info=exc)
        exc = Unclassified(f"internal error: {type(exc).__name__}")
    return JSONResponse(exc.to_payload(), status_code=exc.status_code)


async def _serverless_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused past `limit` bytes without reading the rest."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InvalidParams(f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidParams(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _state(request: Request) -> tuple[Services, Jobs]:
    return request.app.state.services, request.app.state.jobs


async def run(request: Request) -> Response:
    """POST /api/serverless/run: one workflow in, its result out."""
    services, jobs = _state(request)
    body = await read_body(request, services.settings.max_body_bytes)
    run_request = parse_run_request(body, request.query_params, request.headers)
    credentials = services.credentials(request.headers)
    services.check_supported(run_request, credentials)
    job = await jobs.start(run_request, credentials)
    if _is_async(request) and not services.settings.on_fc:
        # Outside FC nobody holds the request for us: answer now, the app owns the job.
        return JSONResponse({"task_id": job.task_id}, status_code=202)
    if run_request.stream:
        return sse_response(job, services.settings)
    # On FC an async invocation is held until the job ends, so the instance is not frozen mid-job.
    terminal = await _wait_unless_disconnected(request, job, services.settings.cancel_on_disconnect)
    payload = terminal.payload or {}
    status = 200 if payload.get("type") == "serverless_api" else status_for_code(str(payload.get("error_code")))
    return Response(terminal.data, status_code=status, media_type="application/json")


def _is_async(request: Request) -> bool:
    return request.headers.get("x-fc-invocation-type", "").lower() == "async"


async def status(request: Request) -> Response:
    """GET /api/serverless/status?task_id=X[&after=N][&attempt=K]: the task's payloads so far
    (of its current attempt, or of attempt K)."""
    services, _ = _state(request)
    task_id = request.query_params.get("task_id")
    if not task_id:
        raise InvalidParams("task_id is required")
    after = parse_after(request.query_params.get("after", "0"))
    attempt = request.query_params.get("attempt")
    body = await services.status.read(task_id, after, parse_attempt(attempt) if attempt is not None else None)
    return Response(body, media_type="application/json")


async def _wait_unless_disconnected(request: Request, job: Job, cancel_on_disconnect: bool) -> Event:
    """The job's terminal event; if the caller hangs up first, the job is abandoned (and the
    terminal event it then ends with is returned to nobody)."""
    async def caller_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(caller_gone())
    try:
        waiter = asyncio.create_task(job.feed.wait())
        await asyncio.wait({watcher, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done() and not waiter.done() and cancel_on_disconnect:
            job.abandon("caller disconnected")
        await waiter
        return await job.finished()
    finally:
        watcher.cancel()


async def health(request: Request) -> Response:
    """GET /api/serverless/health: 200 when ComfyUI answers, 503 with the reason otherwise."""
    services, jobs = _state(request)
    try:
        if not jobs.accepting:
            raise ComfyUIUnavailable("this instance is draining and takes no new jobs")
        if services.supervisor is not None and not services.supervisor.ready:
            raise ComfyUIUnavailable("ComfyUI is starting or restarting")
        stats, queue = await asyncio.gather(services.comfy.system_stats(), services.comfy.queue())
    except ServerlessError as exc:
        return JSONResponse({"status": "unavailable", "reason": exc.message, "jobs": jobs.running}, 503)
    system = stats.get("system", {})
    body: dict[str, Any] = {
        "status": "ok",
        "comfyui": {
            "version": system.get("comfyui_version"),
            "python": system.get("python_version"),
            "pytorch": system.get("pytorch_version"),
            "devices": [
                {k: d.get(k) for k in ("name", "type", "vram_total", "vram_free")}
                for d in stats.get("devices", []) if isinstance(d, dict)
            ],
        },
        "queue": {
            "running": len(queue.get("queue_running", [])),
            "pending": len(queue.get("queue_pending", [])),
        },
        "jobs": jobs.running,
    }
    return JSONResponse(body)


async def initialize(request: Request) -> Response:
    """POST /initialize (FC initializer): ComfyUI ready, and PREWARM_PROMPT run once if set."""
    services, jobs = _state(request)
    deadline = services.settings.startup_timeout
    await services.wait_for_comfyui()
    if services.supervisor is None and not await _answers_within(services, deadline):
        raise ComfyUIUnavailable(f"ComfyUI did not answer within {deadline:g}s")
    body: dict[str, Any] = {"status": "ready", "prewarm": None}
    prewarm = request.app.state.prewarm
    if services.settings.prewarm_prompt and not prewarm.done():
        async with request.app.state.prewarm_lock:
            if not prewarm.done():
                prewarm.set_result(await _prewarm(services, jobs))
    if prewarm.done():
        body["prewarm"] = prewarm.result()
    return JSONResponse(body)


async def _answers_within(services: Services, seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await services.comfy.answers():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _prewarm(services: Services, jobs: Jobs) -> dict[str, Any]:
    """Run PREWARM_PROMPT (a workflow JSON, or the path of one) as an ordinary job."""
    source = services.settings.prewarm_prompt
    text = source if source.lstrip().startswith("{") else await asyncio.to_thread(Path(source).read_text)
    job = await jobs.start(parse_run_request(text, {}, {}))
    payload = (await job.finished()).payload or {}
    log.info("prewarm finished: %s", payload.get("error_code", "ok"))
    return {"prompt_id": job.prompt_id, "outcome": payload.get("error_code", "ok")}


async def pre_stop(request: Request) -> Response:
    """GET /pre-stop (FC hook): take no new jobs, wait (bounded) for the running ones."""
    services, jobs = _state(request)
    await jobs.drain(services.settings.drain_timeout)
    return JSONResponse({"status": "drained", "jobs": jobs.running})


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app; settings are read from the environment unless given."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Services.open(settings) as services:
            jobs = Jobs(services)
            app.state.services, app.state.jobs = services, jobs
            app.state.prewarm = asyncio.get_running_loop().create_future()
            app.state.prewarm_lock = asyncio.Lock()
            pruner = asyncio.create_task(services.status.prune_forever(settings.status_retention_days))
            try:
                yield
                await jobs.drain(settings.drain_timeout)
            finally:
                pruner.cancel()
                await asyncio.gather(pruner, return_exceptions=True)

    routes = [
        Route("/api/serverless/run", run, methods=["POST"]),
        Route("/api/serverless/health", health, methods=["GET"]),
        Route("/api/serverless/status", status, methods=["GET"]),
        WebSocketRoute("/api/serverless/ws", websocket_run),
        Route("/initialize", initialize, methods=["POST"]),
        Route("/pre-stop", pre_stop, methods=["GET", "POST"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ServerlessError: _serverless_error, Exception: _serverless_error},
    )
