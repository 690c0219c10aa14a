"""HTTP endpoints of the models API (CONTRACT.md section 8, "Models"). Changes (import, delete,
pin) are model tasks started through the job runner, so they run where the models live: on one
box by its own jobs, on a fleet by a worker; a gateway lists what its workers publish."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..auth import caller, require_admin
from ..core.credentials import Credentials
from ..errors import InvalidParams
from ..inputs.resolve import BIG_WORKFLOW_NODES
from ..jobs.runner import RunningJob
from ..jobs.spec import JobSpec
from ..resources import Resources
from ..state import app_state
from ..transports.http import read_json
from . import listing
from .needs import needed_models
from .refs import check_folder, check_name
from .tasks import import_task

MAX_BODY = 64 * 1024


def check_may_change(request: Request) -> str | None:
    """Who may import, delete and pin models: with keys, an admin key (`admin=yes`; a key of
    API_KEYS has every right), else 403 FORBIDDEN; without keys, anyone who reaches the instance."""
    who = caller(request)
    require_admin(who, "change the model store")
    return who.owner


async def list_models(request: Request) -> Response:
    """GET /api/models[?folder=]: the store's models (a gateway: its workers' stores)."""
    resources = app_state(request).resources
    folder = request.query_params.get("folder")
    if folder is not None:
        check_folder(folder)
    return JSONResponse({"models": await held_models(resources, folder)})


async def held_models(resources: Resources, folder: str | None = None) -> list[dict[str, Any]]:
    """The store's listing here; a gateway's: what its workers published."""
    if resources.models is not None:
        return await resources.models.listing(folder)
    if resources.redis is not None and resources.settings.fleet.role == "gateway":
        return await listing.merged(resources.redis.client, folder)
    return []


async def workflow_models(request: Request, workflow_id: str) -> list[dict[str, Any]]:
    """The models a hosted workflow needs, each with whether it is held (`needs.needed_models`)."""
    resources = app_state(request).resources
    described = await resources.workflows.describe(workflow_id, False, caller(request).owner)
    info = await resources.workflows.object_info.get()
    held = await held_models(resources)
    workflow = described.stored.workflow
    if len(workflow) >= BIG_WORKFLOW_NODES:  # its nodes are looked through off the event loop
        return await asyncio.to_thread(needed_models, workflow, info, resources.model_loaders, held)
    return needed_models(workflow, info, resources.model_loaders, held)


async def import_model(request: Request) -> Response:
    """POST /api/models `{"source", "folder", "name"?, "sha256"?, "pin"?}`: 202 `{"task_id"}`;
    `task`, `events` and `status` follow it (`serverless_progress` with `bytes_done`)."""
    owner = check_may_change(request)
    settings = app_state(request).resources.settings
    parsed = await read_json(request, MAX_BODY, settings.inputs.timeout)
    job = await _start(request, import_task(parsed), owner)
    return JSONResponse({"task_id": job.task_id}, status_code=202)


async def delete_model(request: Request) -> Response:
    """DELETE /api/models/{folder}/{name}: the placed name removed (its file when no other name
    holds it); 404 for a name the store does not hold, 409 while a running job uses it."""
    owner = check_may_change(request)
    folder, name = _path(request)
    data = await _run(request, {"op": "delete", "folder": folder, "name": name}, owner)
    return JSONResponse(data.get("deleted", {}))


async def pin_model(request: Request) -> Response:
    """PUT /api/models/{folder}/{name}/pin `{"pinned": bool}`: a pinned model is never evicted."""
    owner = check_may_change(request)
    folder, name = _path(request)
    settings = app_state(request).resources.settings
    body = await read_json(request, MAX_BODY, settings.inputs.timeout, empty={})
    pinned = body.get("pinned", True) if isinstance(body, dict) else None
    if not isinstance(pinned, bool):
        raise InvalidParams('the body must be {"pinned": true|false}')
    data = await _run(request, {"op": "pin", "folder": folder, "name": name, "pinned": pinned}, owner)
    return JSONResponse(data.get("model", {}))


def _path(request: Request) -> tuple[str, str]:
    return check_folder(request.path_params["folder"]), check_name(request.path_params["name"])


async def _start(request: Request, task: dict[str, Any], owner: str | None) -> RunningJob:
    state = app_state(request)
    task_id = f"model-{uuid.uuid4().hex}"
    spec = JobSpec(
        workflow={},
        mode="async",
        task_id=task_id,
        owner=owner,
        credentials=Credentials.resolve(request.headers, state.resources.settings.oss.credentials),
        model_task={**task, "task_id": task_id},
    )
    return await state.jobs.start(spec)


async def _run(request: Request, task: dict[str, Any], owner: str | None) -> dict[str, Any]:
    """A short model task, waited for: its result data, or its error raised."""
    job = await _start(request, task, owner)
    event = await job.finished()
    if event.error is not None:
        raise event.error
    payload: dict[str, Any] = json.loads(event.data)
    data: dict[str, Any] = payload.get("data", {})
    return data
