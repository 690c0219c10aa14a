"""Lifecycle and health endpoints: FC's initializer and pre-stop hooks, and our health check.

The hooks change the instance (pre-stop takes it out of service for good), so they answer only
the platform: on FC, a call FC makes itself carries `x-fc-control-path: /initialize` (or
`/pre-stop`), a header FC sets on every request it forwards (`/http-invoke` for an HTTP trigger),
so a caller cannot pass one off as the other. Elsewhere: a loopback caller, or anyone holding
`LIFECYCLE_TOKEN` (`Authorization: Bearer <token>`, e.g. a Kubernetes preStop hook).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import fleet
from .auth import sole_authorization
from .comfyui.client import QueueState
from .core.request import parse_run_request
from .errors import ComfyUIUnavailable, ServerlessError, Unauthorized, Unavailable
from .jobs.runner import JobRunner
from .jobs.spec import JobSpec
from .resources import Resources
from .state import app_state

log = logging.getLogger(__name__)

# Seconds ComfyUI may hold waiting prompts with none running before health reports its queue
# stuck: its one prompt worker takes the next prompt at once, so this is long past any doubt.
QUEUE_STALL_AFTER = 30.0


def _state(request: Request) -> tuple[Resources, JobRunner]:
    state = app_state(request)
    return state.resources, state.jobs


class QueueWatch:
    """Notices a ComfyUI whose queue no longer moves: prompts waiting and none running, for longer
    than `stall_after` seconds. ComfyUI's one prompt worker takes the next prompt at once, so that
    means the worker died (e.g. on a prompt it could not copy) and every job would hang."""

    def __init__(self, stall_after: float) -> None:
        self.stall_after = stall_after
        self._since: float | None = None

    def check(self, queue: QueueState) -> None:
        now = time.monotonic()
        if queue.running or not queue.pending:
            self._since = None
            return
        self._since = self._since if self._since is not None else now
        if now - self._since > self.stall_after:
            raise ComfyUIUnavailable(
                f"ComfyUI's queue is not moving: {len(queue.pending)} prompt(s) wait and none has run "
                f"for {now - self._since:.0f}s (its prompt worker may have died; restart ComfyUI)"
            )


async def health(request: Request) -> Response:
    """GET /api/serverless/health: 200 when ComfyUI answers, 503 with the reason otherwise. A
    Redis-tier gateway has no ComfyUI: 200 when Redis answers."""
    resources, jobs = _state(request)
    if resources.settings.fleet.role == "gateway":
        return await _gateway_health(request)
    try:
        if not jobs.accepting:
            raise Unavailable("this instance is draining and takes no new jobs")
        if resources.supervisor is not None and not resources.supervisor.ready:
            raise ComfyUIUnavailable(resources.supervisor.problem)  # starting, restarting, port taken
        try:
            stats, queue = await asyncio.gather(resources.comfy.system_stats(), resources.comfy.queue())
        except ServerlessError:
            resources.metrics.comfyui_up.set(0)
            raise
        resources.metrics.comfyui_up.set(1)
        app_state(request).queue_watch.check(queue)
        if not await _status_writable(resources):
            reason = resources.status.health()["not_writable_because"]
            raise Unavailable(f"the status folder cannot be written ({reason}): async jobs are refused")
    except ServerlessError as exc:
        failure = {
            "status": "unavailable",
            "reason": exc.message,
            "jobs": jobs.running,
            "status_log": resources.status.health(),
        }
        return JSONResponse(failure, 503)
    body: dict[str, Any] = {
        "status": "ok",
        "comfyui": stats.to_payload(),
        "queue": {"running": len(queue.running), "pending": len(queue.pending)},
        "jobs": jobs.running,
        "status_log": resources.status.health(),
    }
    if resources.settings.fleet.queue_backend != "none":
        body["tier"] = fleet.health(resources.settings, app_state(request).consumer)
    return JSONResponse(body)


async def _status_writable(resources: Resources) -> bool:
    """Whether the status store takes writes. A store that knows without waiting (the file store,
    from its last probe, refreshed in the background) answers at once, so health answers even
    while the shared disk hangs; another is asked."""
    known = resources.status.writable_now()
    return known if known is not None else await resources.status.writable()


async def _gateway_health(request: Request) -> Response:
    resources, jobs = _state(request)
    body = {
        "jobs": jobs.running,
        "status_log": resources.status.health(),
        "tier": fleet.health(resources.settings, None),
    }
    if not jobs.accepting:
        return JSONResponse({"status": "unavailable", "reason": "this gateway is draining", **body}, 503)
    if not await resources.status.writable():
        reason = resources.status.health()["not_writable_because"]
        return JSONResponse({"status": "unavailable", "reason": reason, **body}, 503)
    return JSONResponse({"status": "ok", **body})


class Prewarm:
    """PREWARM_PROMPT, run once per app however many times FC calls the initializer."""

    def __init__(self) -> None:
        self.result: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def run_once(self, resources: Resources, jobs: JobRunner) -> dict[str, Any]:
        async with self._lock:
            if self.result is None:
                self.result = await _prewarm(resources, jobs)
        return self.result


def check_platform_call(request: Request, hook: str) -> None:
    """Refuse a lifecycle hook that the platform did not make (see the module docstring)."""
    settings = app_state(request).resources.settings
    token = settings.security.lifecycle_token
    given = sole_authorization(request.headers.getlist("authorization"))
    if token and hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return
    if settings.service.on_fc and request.headers.get("x-fc-control-path") == hook:
        return
    if not settings.service.on_fc and not token and _loopback(request):
        return
    log.warning("refused %s from %s: not a platform call", hook, request.client.host if request.client else "?")
    raise Unauthorized(f"{hook} is a lifecycle hook: only the platform may call it")


def _loopback(request: Request) -> bool:
    try:
        return request.client is not None and ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


async def initialize(request: Request) -> Response:
    """POST /initialize (FC initializer): ComfyUI ready, and PREWARM_PROMPT run once if set."""
    check_platform_call(request, "/initialize")
    resources, jobs = _state(request)
    deadline = resources.settings.comfyui.startup_timeout
    await resources.comfyui_ready()
    if resources.supervisor is None and not await _answers_within(resources, deadline):
        raise ComfyUIUnavailable(f"ComfyUI did not answer within {deadline:g}s")
    prewarm = app_state(request).prewarm
    result = await prewarm.run_once(resources, jobs) if resources.settings.comfyui.prewarm_prompt else None
    return JSONResponse({"status": "ready", "prewarm": result})


async def _answers_within(resources: Resources, seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await resources.comfy.answers():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _prewarm(resources: Resources, jobs: JobRunner) -> dict[str, Any]:
    """Run PREWARM_PROMPT (a workflow JSON, or the path of one) as an ordinary job."""
    source = resources.settings.comfyui.prewarm_prompt
    text = source if source.lstrip().startswith("{") else await asyncio.to_thread(Path(source).read_text)
    request = parse_run_request(text, {}, {})
    job = await jobs.start(JobSpec(workflow=request.workflow, extra_data=request.extra_data))
    terminal = await job.finished()
    outcome = terminal.error.code if terminal.error is not None else "ok"
    log.info("prewarm finished: %s", outcome)
    return {"prompt_id": job.prompt_id, "outcome": outcome}


async def pre_stop(request: Request) -> Response:
    """GET /pre-stop (FC hook): take no new jobs, wait (bounded) for the running ones."""
    check_platform_call(request, "/pre-stop")
    resources, jobs = _state(request)
    await jobs.drain(resources.settings.service.drain_timeout)
    return JSONResponse({"status": "drained", "jobs": jobs.running})
