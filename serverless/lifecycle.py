"""Lifecycle and health endpoints: FC's initializer and pre-stop hooks, and our health check."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .core.request import parse_run_request
from .errors import ComfyUIUnavailable, ServerlessError
from .jobs.registry import Jobs
from .jobs.spec import JobSpec
from .resources import Resources

log = logging.getLogger(__name__)


def _state(request: Request) -> tuple[Resources, Jobs]:
    return request.app.state.resources, request.app.state.jobs


async def health(request: Request) -> Response:
    """GET /api/serverless/health: 200 when ComfyUI answers, 503 with the reason otherwise."""
    resources, jobs = _state(request)
    try:
        if not jobs.accepting:
            raise ComfyUIUnavailable("this instance is draining and takes no new jobs")
        if resources.supervisor is not None and not resources.supervisor.ready:
            raise ComfyUIUnavailable("ComfyUI is starting or restarting")
        stats, queue = await asyncio.gather(resources.comfy.system_stats(), resources.comfy.queue())
    except ServerlessError as exc:
        return JSONResponse({"status": "unavailable", "reason": exc.message, "jobs": jobs.running}, 503)
    body: dict[str, Any] = {
        "status": "ok",
        "comfyui": stats.to_payload(),
        "queue": {"running": len(queue.running), "pending": len(queue.pending)},
        "jobs": jobs.running,
    }
    return JSONResponse(body)


class Prewarm:
    """PREWARM_PROMPT, run once per app however many times FC calls the initializer."""

    def __init__(self) -> None:
        self.result: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def run_once(self, resources: Resources, jobs: Jobs) -> dict[str, Any]:
        async with self._lock:
            if self.result is None:
                self.result = await _prewarm(resources, jobs)
        return self.result


async def initialize(request: Request) -> Response:
    """POST /initialize (FC initializer): ComfyUI ready, and PREWARM_PROMPT run once if set."""
    resources, jobs = _state(request)
    deadline = resources.settings.startup_timeout
    await resources.comfyui_ready()
    if resources.supervisor is None and not await _answers_within(resources, deadline):
        raise ComfyUIUnavailable(f"ComfyUI did not answer within {deadline:g}s")
    prewarm: Prewarm = request.app.state.prewarm
    result = await prewarm.run_once(resources, jobs) if resources.settings.prewarm_prompt else None
    return JSONResponse({"status": "ready", "prewarm": result})


async def _answers_within(resources: Resources, seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await resources.comfy.answers():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _prewarm(resources: Resources, jobs: Jobs) -> dict[str, Any]:
    """Run PREWARM_PROMPT (a workflow JSON, or the path of one) as an ordinary job."""
    source = resources.settings.prewarm_prompt
    text = source if source.lstrip().startswith("{") else await asyncio.to_thread(Path(source).read_text)
    request = parse_run_request(text, {}, {})
    job = await jobs.start(JobSpec(workflow=request.workflow, extra_data=request.extra_data))
    terminal = await job.finished()
    outcome = terminal.error.code if terminal.error is not None else "ok"
    log.info("prewarm finished: %s", outcome)
    return {"prompt_id": job.prompt_id, "outcome": outcome}


async def pre_stop(request: Request) -> Response:
    """GET /pre-stop (FC hook): take no new jobs, wait (bounded) for the running ones."""
    resources, jobs = _state(request)
    await jobs.drain(resources.settings.drain_timeout)
    return JSONResponse({"status": "drained", "jobs": jobs.running})
