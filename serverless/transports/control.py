"""Job control endpoints, answered by any instance sharing the status store (the NAS folder, or
Redis with STATUS_BACKEND=redis):

    GET  /api/serverless/task?task_id=X     the task's summary, from its status log
    POST /api/serverless/cancel?task_id=X   stop it (here at once; elsewhere through a request
                                            beside its log, or the Redis tier's queue)
    GET  /api/serverless/events?task_id=X   its events as SSE, resumed after `Last-Event-ID` / `after=N`

An unknown task is 404 with `"state": "unknown"` in `raw` (an async task FC has not delivered yet
is unknown to every instance); a malformed id is 400.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..auth import may_see
from ..errors import Conflict, InvalidParams, NotFound
from ..fleet.gateway import RemoteJobs
from ..jobs.registry import Jobs, cancelled
from ..resources import Resources
from ..status.log import parse_after
from ..status.summary import ENDED
from .events import TaskEvents
from .http import EventStream

log = logging.getLogger(__name__)


async def _task_id(request: Request) -> str:
    """The task asked for: a valid id (else 400) of a task this caller may see (with API keys, a
    task another key made answers as unknown: 404)."""
    resources: Resources = request.app.state.resources
    task_id = request.query_params.get("task_id")
    if not task_id:
        raise InvalidParams("task_id is required")
    resources.status.validate(task_id)  # the rule of task ids (400)
    owner: str | None = request.scope.get("state", {}).get("owner")
    if owner is not None and not may_see(owner, await resources.status.owner(task_id)):
        raise _unknown(task_id)
    return task_id


def _unknown(task_id: str) -> NotFound:
    return NotFound(f"no task {task_id} on the status folder", raw={"task_id": task_id, "state": "unknown"})


async def task(request: Request) -> Response:
    """GET /api/serverless/task?task_id=X: state, percent, queue, times and result or error."""
    resources: Resources = request.app.state.resources
    task_id = await _task_id(request)
    summary = await resources.status.summary(task_id)
    if summary is None:
        raise _unknown(task_id)
    return JSONResponse(summary)


async def cancel(request: Request) -> Response:
    """POST /api/serverless/cancel?task_id=X: 202 while the job stops (it ends with
    EXECUTION_INTERRUPTED "cancelled by request"; on the Redis tier a job still queued is removed
    and answers `"state": "cancelled"`), 409 when it has already ended."""
    resources: Resources = request.app.state.resources
    jobs: Jobs | RemoteJobs = request.app.state.jobs
    task_id = await _task_id(request)
    state = await cancel_task(resources, jobs, task_id)
    return JSONResponse({"task_id": task_id, "state": state}, status_code=202)


async def cancel_task(resources: Resources, jobs: Jobs | RemoteJobs, task_id: str) -> str:
    """Stop task `task_id` (here at once; elsewhere through a request beside its log, or the Redis
    tier's queue); returns its state: "cancelling", or "cancelled" for a job the queue still held.
    NotFound for an unknown task, Conflict for one that has already ended."""
    if isinstance(jobs, RemoteJobs):  # the tier: whichever worker took it watches the queue's cancel key
        return await jobs.queue.cancel(task_id)
    job = jobs.get(task_id)
    if job is not None:
        if job.feed.done:
            raise _ended(task_id, job.progress.state)
        job.stop(cancelled(), "cancel requested")
    else:
        summary = await resources.status.summary(task_id)
        if summary is None:
            raise _unknown(task_id)
        if summary["state"] in ENDED:
            raise _ended(task_id, summary["state"])
        # It runs elsewhere: its instance looks for the request every CANCEL_POLL seconds.
        attempt = await resources.status.request_cancel(task_id)
        log.info("task_id=%s: cancel of attempt %s requested for the instance running it", task_id, attempt)
    return "cancelling"


def _ended(task_id: str, state: str) -> Conflict:
    return Conflict(f"task {task_id} has already ended ({state})", raw={"task_id": task_id, "state": state})


async def events(request: Request) -> Response:
    """GET /api/serverless/events?task_id=X: the task's events as SSE with the ids of its
    original stream, after `Last-Event-ID` (else `after=N`), until its terminal payload."""
    resources: Resources = request.app.state.resources
    jobs: Jobs | RemoteJobs = request.app.state.jobs
    task_id = await _task_id(request)
    last_seen = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    after = parse_after(last_seen)
    job = jobs.get(task_id)
    if job is None and not await resources.status.known(task_id):
        raise _unknown(task_id)
    return EventStream(TaskEvents(task_id, resources.status, job), resources.settings, after)
