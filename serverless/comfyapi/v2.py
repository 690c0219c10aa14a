"""Comfy API v2 (`/api/v2`, as its published OpenAPI describes) over the same prompts as
ComfyUI's own API (`native.submit`): a job is a prompt, so it shows in `/queue` and `/history`
too, and any gateway answers for it. Our additions stay: events carry `id:` and resume from
`Last-Event-ID`, a `callback_url` (or `X-Callback-Url`) gets the webhook.

    POST /api/v2/jobs                 submit (`core/ASSET` references become the staged files)
    GET  /api/v2/jobs                 newest first, `limit` and `cursor`
    GET  /api/v2/jobs/{id}            the `Job`
    GET  /api/v2/jobs/{id}/events     SSE: status, progress, output
    POST /api/v2/jobs/{id}/cancel     cancel; the `Job`
    GET  /api/v2/jobs/{id}/workflow   the API-format graph it ran

and its assets (`v2assets`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..auth import may_see, scoped_key
from ..errors import Busy, Conflict, InvalidParams, NotFound, ServerlessError, as_serverless_error
from ..state import AppState, app_state
from ..transports.events import TaskEvents
from ..transports.http import json_value, read_body
from . import jobview
from .index import PromptEntry
from .native import Refused, owner_of, prompts, submit, task_payloads

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]
CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict"}


class V2Error(Exception):
    """A refusal in API v2's envelope."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def answered(endpoint: Endpoint) -> Endpoint:
    """Every refusal in API v2's error envelope, rendered here only."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except V2Error as exc:
            return JSONResponse(jobview.envelope(exc.code, exc.message, exc.details), status_code=exc.status)
        except Refused as exc:
            details = {"type": exc.kind, "details": exc.details, "node_errors": exc.errors}
            return JSONResponse(jobview.envelope("invalid_workflow", exc.message, details), status_code=422)
        except ServerlessError as exc:
            return _ours(exc)

    answer.__doc__ = endpoint.__doc__
    return answer


def _ours(exc: ServerlessError) -> JSONResponse:
    if isinstance(exc, Busy):
        body = jobview.envelope("queue_full", exc.message)
        return JSONResponse(body, status_code=429, headers=exc.headers or {"Retry-After": "2"})
    error = as_serverless_error(exc, "api v2")
    status = error.status_code
    code = CODES.get(status, "upstream_error")
    if isinstance(error, InvalidParams) and status == 400:
        status, code = 422, "invalid_workflow"
    return JSONResponse(jobview.envelope(code, error.message, {"code": error.code}), status_code=status)


# -- jobs ------------------------------------------------------------------------------------


async def entry_of(request: Request, task_id: str) -> PromptEntry:
    entry = await prompts(app_state(request)).get(task_id)
    if entry is None or not may_see(owner_of(request), entry.owner):
        raise V2Error(404, "not_found", f"no job {task_id}")
    return entry


def base_of(request: Request) -> str:
    """Where the caller reached us: the `url`s of outputs and assets are absolute (a `uri`)."""
    return str(request.base_url).rstrip("/")


async def _view(request: Request, entry: PromptEntry, canceling: bool = False) -> dict[str, Any]:
    state = app_state(request)
    payloads = await task_payloads(state, entry.task_id)
    retention = state.resources.settings.status.retention_days * 86400
    return jobview.job(entry, payloads, time.time(), retention, canceling, base_of(request))


@answered
async def post_jobs(request: Request) -> Response:
    """Submit `{"workflow", "extra_data"?}` -> 201 `Job`."""
    state = app_state(request)
    await state.jobs.check_room()
    settings = state.resources.settings
    body = await read_body(request, settings.inputs.max_body_bytes, settings.inputs.timeout)
    try:
        asked = await json_value(body)
    except InvalidParams as exc:
        raise V2Error(422, "invalid_workflow", exc.message) from None
    workflow = asked.get("workflow") if isinstance(asked, dict) else None
    if isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) and "links" in workflow:
        raise V2Error(422, "workflow_format_ui", 'a UI-format workflow: export it with "Save (API Format)"')
    if not isinstance(workflow, dict):
        raise V2Error(422, "invalid_workflow", "workflow must be an API-format workflow object")
    workflow = await _with_assets(state, workflow, owner_of(request))
    extra = asked.get("extra_data")
    key = request.headers.get("idempotency-key")
    index = prompts(state)
    if key:  # single-use, as API v2 has it: a repeat is refused, never run again
        key = scoped_key(key[:255], owner_of(request))
        if not await index.claim_key(key):
            raise V2Error(422, "idempotency_key_reuse", "this Idempotency-Key was used before")
    try:
        asked = {"prompt": workflow, "extra_data": extra if isinstance(extra, dict) else None}
        entry, _ = await submit(request, asked, len(body))
    except (Refused, InvalidParams, Busy):  # nothing was queued: the key may be used again
        if key:
            await index.release_key(key)
        raise
    return JSONResponse(await _view(request, entry), status_code=201)


async def _with_assets(state: AppState, workflow: dict[str, Any], owner: str | None) -> dict[str, Any]:
    """`core/ASSET` references replaced by the names their files are staged under."""
    index = prompts(state)
    changed: dict[str, Any] = {}
    for node_id, node in workflow.items():
        fields = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(fields, dict):
            changed[node_id] = node
            continue
        inputs_now = dict(fields)
        for name, value in fields.items():
            if isinstance(value, dict) and value.get("__type") == "core/ASSET":
                asset_id = str((value.get("info") or {}).get("id", ""))
                record = await index.asset(asset_id)
                if record is None or not may_see(owner, record.get("owner")):
                    raise V2Error(422, "missing_asset", f"node {node_id} input {name}: no asset {asset_id}")
                inputs_now[name] = record["name"]
        changed[node_id] = {**node, "inputs": inputs_now}
    return changed


@answered
async def list_jobs(request: Request) -> Response:
    """`{"jobs": [...], "next_cursor"?}`, newest first."""
    state = app_state(request)
    owner = owner_of(request)
    limit = int(request.query_params.get("limit") or 20)
    start = int(request.query_params.get("cursor") or 0)
    entries = [entry for entry in reversed(await prompts(state).recent(None)) if may_see(owner, entry.owner)]
    page = entries[start : start + max(1, min(limit, 100))]
    views = await asyncio.gather(*(_view(request, entry) for entry in page))
    answer: dict[str, Any] = {"jobs": list(views)}
    if start + len(page) < len(entries):
        answer["next_cursor"] = str(start + len(page))
    return JSONResponse(answer)


@answered
async def get_job(request: Request) -> Response:
    entry = await entry_of(request, request.path_params["id"])
    return JSONResponse(await _view(request, entry))


@answered
async def job_workflow(request: Request) -> Response:
    entry = await entry_of(request, request.path_params["id"])
    return JSONResponse({"workflow": entry.workflow, "format": "api"})


@answered
async def cancel_job(request: Request) -> Response:
    """Idempotent: a job that ended stays as it ended."""
    state = app_state(request)
    entry = await entry_of(request, request.path_params["id"])
    canceling = False
    try:
        canceling = await state.jobs.cancel(entry.task_id) == "cancelling"
    except (Conflict, NotFound) as exc:
        log.info("task_id=%s: v2 cancel of a job that ended (%s)", entry.task_id, exc.message)
    return JSONResponse(await _view(request, entry, canceling))


@answered
async def job_events(request: Request) -> Response:
    """SSE: `status` on every change of state, `progress` snapshots, each `output`, then the
    terminal `status`. Ours: `id:` lines; `Last-Event-ID` resumes after that event."""
    state = app_state(request)
    entry = await entry_of(request, request.path_params["id"])
    after = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    source = TaskEvents(
        entry.task_id, state.resources.status, state.jobs.get(entry.task_id), state.jobs.end_if_stranded
    )
    frames = _frames(source, entry, int(after) if after.isdigit() else 0, base_of(request))
    return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _frames(source: TaskEvents, entry: PromptEntry, after: int, base: str) -> AsyncIterator[str]:
    payloads: list[Any] = []
    sent: tuple[Any, ...] | None = None
    told: set[str] = set()
    async for event in source.events(after, idle=15.0):
        if event is None:
            yield ": ping\n\n"
            continue
        payload = json.loads(event.text)
        kind = payload.get("type")
        if kind == "serverless_preview":  # a sampler preview (once jobs record them): not kept
            yield jobview.sse("preview", jobview.preview(payload), event.seq)
            continue
        payloads.append(payload)
        if not event.terminal and kind not in ("serverless_progress", "serverless_output", "progress", "executing"):
            continue
        view = jobview.job(entry, payloads, time.time(), 0.0, base=base)
        for output in view["outputs"]:
            if output["id"] not in told:  # the moment each output lands
                told.add(output["id"])
                yield jobview.sse("output", output, event.seq)
        status = (view["status"], view["queue_position"])
        if status[0] in jobview.TERMINAL and not event.terminal:
            continue  # told last, after the outputs
        if status != sent:
            yield jobview.sse("status", {"status": status[0], "queue_position": status[1]}, event.seq)
            sent = status
        if not event.terminal and view["status"] == "running":
            yield jobview.sse("progress", view["progress"], event.seq)
