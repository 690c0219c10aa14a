"""The fleet's operator endpoints (a box has no queue: nothing to list there):

GET  /api/fleet/dead-letters                 the kept dead letters, newest first (`?limit=`)
POST /api/fleet/dead-letters/{id}/requeue    queue one again: its task runs as a new attempt
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..auth import caller, operator_scope
from ..errors import InvalidParams, NotFound
from ..state import app_state
from ..status.redis import RedisStatus, translated
from . import deadletters
from .heartbeat import live_workers
from .queue import RedisQueue

MAX_LIMIT = 1000


def _queue_status(request: Request) -> RedisStatus | None:
    """The Redis the queue lives in; None without one (a box)."""
    resources = app_state(request).resources
    return resources.redis if resources.settings.fleet.queue_backend == "redis" else None


def _scope(request: Request) -> str | None:
    return operator_scope(caller(request))


async def dead_letters(request: Request) -> Response:
    raw = request.query_params.get("limit") or "100"
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidParams(f"limit must be a whole number from 1 to {MAX_LIMIT}", raw={"limit": raw[:20]})
    status = _queue_status(request)
    if status is None:
        return JSONResponse({"dead_letters": []})
    with translated():
        found = await deadletters.listed(status.client, int(raw), _scope(request))
    return JSONResponse({"dead_letters": [letter.shown() for letter in found]})


async def requeue(request: Request) -> Response:
    letter_id = request.path_params["letter_id"]
    status = _queue_status(request)
    if status is None:
        raise NotFound(f"no dead letter {letter_id}: this instance has no queue", raw={"id": letter_id})
    with translated():
        letter, fields = await deadletters.taken_back(status.client, letter_id, _scope(request))
    assert letter.task_id is not None and letter.priority is not None  # taken_back refuses letters without
    entry = await RedisQueue(status.client, status).requeue(letter.task_id, letter.stream, fields)
    return JSONResponse(
        {"id": letter_id, "task_id": letter.task_id, "state": "queued", "entry": entry}, status_code=202
    )


async def workers(request: Request) -> Response:
    status = _queue_status(request)
    if status is None:
        return JSONResponse({"workers": []})
    with translated():
        found = await live_workers(status.client)
    return JSONResponse({"workers": [view.shown() for view in sorted(found, key=lambda view: view.name)]})
