"""Job control endpoints, answered by any instance sharing the status store (the NAS folder, or
Redis with STATUS_BACKEND=redis):

    GET  /api/serverless/task?task_id=X     the task's summary, from its status log
    POST /api/serverless/cancel?task_id=X   stop it (here at once; elsewhere through a request
                                            beside its log, or the Redis tier's queue)
    GET  /api/serverless/events?task_id=X   its events as SSE, resumed after `Last-Event-ID` / `after=N`
    GET  /api/tasks                         the tasks, newest first, paged by cursor

An unknown task is 404 with `"state": "unknown"` in `raw` (an async task FC has not delivered yet
is unknown to every instance); a malformed id is 400.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..auth import caller, may_see
from ..core.request import query_flag
from ..errors import InvalidParams
from ..jobs.registry import unknown_task
from ..state import app_state
from ..status.log import parse_after
from ..status.tasklist import TaskQuery
from .events import TaskEvents, job_summary
from .http import EventStream


async def _task_id(request: Request) -> str:
    """The task asked for: a valid id (else 400) of a task this caller may see (with API keys, a
    task another key made answers as unknown: 404)."""
    resources = app_state(request).resources
    task_id = request.query_params.get("task_id")
    if not task_id:
        raise InvalidParams("task_id is required")
    resources.status.validate(task_id)  # the rule of task ids (400)
    owner = caller(request).owner
    if owner is not None and not may_see(owner, await resources.status.owner(task_id)):
        raise unknown_task(task_id)
    return task_id


async def task(request: Request) -> Response:
    """GET /api/serverless/task?task_id=X: state, percent, queue, times and result or error; how
    its webhook went, when it has one."""
    state = app_state(request)
    task_id = await _task_id(request)
    await state.jobs.end_if_stranded(task_id)
    summary = await state.resources.status.summary(task_id)
    job = state.jobs.get(task_id) if summary is None else None
    if job is not None:  # a prompt of ComfyUI's API answered before its log is claimed: the job says
        summary = await job_summary(job)
    if summary is None:
        raise unknown_task(task_id)
    if summary["state"] == "queued":  # in a queue before ComfyUI's (a fleet's): its place there
        place = await state.jobs.queue_position(task_id)
        if place is not None:
            summary["queue_position"] = place
    webhook = await state.resources.status.webhook_record(task_id)
    if webhook is not None:
        summary["webhook"] = json.loads(webhook)
    return JSONResponse(summary)


async def cancel(request: Request) -> Response:
    """POST /api/serverless/cancel?task_id=X: 202 while the job stops (it ends with
    EXECUTION_INTERRUPTED "cancelled by request"; on the Redis tier a job still queued is removed
    and answers `"state": "cancelled"`), 409 when it has already ended."""
    task_id = await _task_id(request)
    state = await app_state(request).jobs.cancel(task_id)
    return JSONResponse({"task_id": task_id, "state": state}, status_code=202)


async def events(request: Request) -> Response:
    """GET /api/serverless/events?task_id=X: the task's events as SSE with the ids of its
    original stream, after `Last-Event-ID` (else `after=N`), until its terminal payload."""
    state = app_state(request)
    resources = state.resources
    task_id = await _task_id(request)
    last_seen = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    after = parse_after(last_seen)
    job = state.jobs.get(task_id)
    if job is None and not await resources.status.known(task_id):
        raise unknown_task(task_id)
    source = TaskEvents(task_id, resources.status, job, state.jobs.end_if_stranded)
    return EventStream(source, resources.settings, after, previews=query_flag(request.query_params, "previews"))


async def tasks(request: Request) -> Response:
    """GET /api/tasks?state=&workflow_id=&limit=&cursor=: the tasks, newest first, a page at a
    time (`next_cursor` names the next; null at the end); with API keys, the caller's own."""
    owner: str | None = request.scope.get("state", {}).get("owner")
    query = TaskQuery.parse(owner, request.query_params)
    found = await app_state(request).resources.status.list_tasks(query)
    return JSONResponse(found.shown())
