"""HTTP endpoints of the hosted workflows (the run itself is `serverless.app.run`, through
`start_job`). Each is a few lines: the work is in `HostedWorkflows`."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import auth
from ..core.request import query_flag
from ..models.endpoints import workflow_models
from ..state import app_state
from ..transports.http import read_body
from ..transports.start import job_lane
from .conversion import convert_body
from .hosting import HostedWorkflows
from .refs import parse_version

log = logging.getLogger(__name__)

BIG_ANSWER = 256 * 1024  # from this workflow size on, its answer is rendered off the event loop


async def _answer(payload: Any, size: int, status_code: int = 200) -> Response:
    """JSONResponse's rendering, in a thread when the workflow is big (a 4 MB one's OpenAPI
    document takes a third of a second to write)."""
    if size < BIG_ANSWER:
        return JSONResponse(payload, status_code=status_code)
    text = await asyncio.to_thread(
        lambda: json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    )
    return Response(text, status_code=status_code, media_type="application/json")


def _hosted(request: Request) -> HostedWorkflows:
    hosted: HostedWorkflows = app_state(request).resources.workflows
    return hosted


def _refresh(request: Request) -> bool:
    return query_flag(request.query_params, "refresh")


def caller(request: Request) -> str | None:
    """The caller's API key digest (serverless.auth); None when keys are off."""
    return auth.caller(request).owner


def _by(who: auth.Caller) -> str | None:
    """Who, as the audit keeps it: the key's label (None when keys are off)."""
    return who.label if who.owner is not None else None


async def list_workflows(request: Request) -> Response:
    """GET /api/workflows: id, title, parameter count and modification time of each."""
    return JSONResponse({"workflows": await _hosted(request).summaries(_refresh(request), caller(request))})


async def put_workflow(request: Request) -> Response:
    """PUT /api/workflows/{workflow_id}: validate against the running ComfyUI, then store;
    201 when new, 200 when replaced. With API keys it is the caller's: `?shared=true` lets other
    keys read and run it (only its owner replaces or deletes it); `?lane=` queues its runs on
    that lane of a fleet (a run's own `?lane=` wins)."""
    who = auth.caller(request)
    auth.require_admin(who, "register workflows")
    settings = app_state(request).resources.settings
    shared = query_flag(request.query_params, "shared")
    body = await read_body(request, settings.inputs.max_body_bytes, settings.inputs.timeout)
    workflow_id = request.path_params["workflow_id"]
    lane = job_lane(request.query_params)  # `?lane=`: the fleet's lane its runs queue on
    described, created = await _hosted(request).register(workflow_id, body, who.owner, shared, by=_by(who), lane=lane)
    log.info("workflow %s %s by key %s", workflow_id, "registered" if created else "changed", _by(who) or "-")
    return await _answer(described.to_payload(), described.stored.size, 201 if created else 200)


async def get_workflow(request: Request) -> Response:
    """GET /api/workflows/{workflow_id}: the stored workflow, its parameter schema, and the models
    it needs (`models`: each with whether it is held)."""
    workflow_id = request.path_params["workflow_id"]
    text = await _hosted(request).describe_json(workflow_id, _refresh(request), caller(request))
    models = json.dumps(await workflow_models(request, workflow_id)).encode()
    if len(text) >= BIG_ANSWER:  # a 4 MB answer is copied off the event loop
        text = await asyncio.to_thread(b"".join, (text[:-1], b',"models":', models, b"}"))
    else:
        text = text[:-1] + b',"models":' + models + b"}"
    return Response(text, media_type="application/json")


async def delete_workflow(request: Request) -> Response:
    """DELETE /api/workflows/{workflow_id}."""
    who = auth.caller(request)
    auth.require_admin(who, "delete workflows")
    workflow_id = request.path_params["workflow_id"]
    await _hosted(request).delete(workflow_id, who.owner)
    log.info("workflow %s deleted by key %s", workflow_id, _by(who) or "-")
    return JSONResponse({"workflow_id": workflow_id, "deleted": True})


async def openapi_json(request: Request) -> Response:
    """GET /api/workflows/{workflow_id}/openapi.json: the workflow's own OpenAPI 3.1 document."""
    server_url = str(request.base_url).rstrip("/")
    workflow_id = request.path_params["workflow_id"]
    text = await _hosted(request).openapi_json(workflow_id, server_url, _refresh(request), caller(request))
    return Response(text, media_type="application/json")


async def convert_workflow(request: Request) -> Response:
    """POST /api/workflows/convert: a UI-format workflow in, `{"prompt", "notes"}` out."""
    settings = app_state(request).resources.settings
    body = await read_body(request, settings.inputs.max_body_bytes, settings.inputs.timeout)
    converted = await convert_body(_hosted(request).object_info, body)
    return JSONResponse(converted.to_payload())


async def list_versions(request: Request) -> Response:
    """GET /api/workflows/{workflow_id}/versions: each version (number, created, created_by, the
    aliases naming it) and the aliases."""
    workflow_id = request.path_params["workflow_id"]
    return JSONResponse(await _hosted(request).versions(workflow_id, caller(request)))


async def delete_version(request: Request) -> Response:
    """DELETE /api/workflows/{workflow_id}/versions/{version}: refused (CONFLICT) while an alias
    names it."""
    workflow_id = request.path_params["workflow_id"]
    number = parse_version(request.path_params["version"])
    await _hosted(request).delete_version(workflow_id, number, caller(request))
    return JSONResponse({"workflow_id": workflow_id, "version": number, "deleted": True})


async def put_alias(request: Request) -> Response:
    """PUT /api/workflows/{workflow_id}/aliases/{alias} `{"version": n}`: make or move an alias
    (promotion, rollback); `<id>@<alias>` runs the version it names, and the `default` alias
    the bare id."""
    settings = app_state(request).resources.settings
    body = await read_body(request, settings.inputs.max_body_bytes, settings.inputs.timeout)
    workflow_id, alias = request.path_params["workflow_id"], request.path_params["alias"]
    return JSONResponse(await _hosted(request).set_alias(workflow_id, alias, body, caller(request)))


async def delete_alias(request: Request) -> Response:
    """DELETE /api/workflows/{workflow_id}/aliases/{alias}."""
    workflow_id, alias = request.path_params["workflow_id"], request.path_params["alias"]
    await _hosted(request).delete_alias(workflow_id, alias, caller(request))
    return JSONResponse({"workflow_id": workflow_id, "alias": alias, "deleted": True})
