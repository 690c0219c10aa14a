"""HTTP endpoints of the hosted workflows (the run itself is `serverless.app.run`, through
`start_job`). Each is a few lines: the work is in `HostedWorkflows`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..core.request import query_flag
from ..state import app_state
from ..transports.http import read_body
from .conversion import convert_body
from .hosting import HostedWorkflows

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
    owner = request.scope.get("state", {}).get("owner")
    return owner if isinstance(owner, str) else None


async def list_workflows(request: Request) -> Response:
    """GET /api/workflows: id, title, parameter count and modification time of each."""
    return JSONResponse({"workflows": await _hosted(request).summaries(_refresh(request), caller(request))})


async def put_workflow(request: Request) -> Response:
    """PUT /api/workflows/{workflow_id}: validate against the running ComfyUI, then store;
    201 when new, 200 when replaced. With API keys it is the caller's: `?shared=true` lets other
    keys read and run it (only its owner replaces or deletes it)."""
    settings = app_state(request).resources.settings
    shared = query_flag(request.query_params, "shared")
    body = await read_body(request, settings.inputs.max_body_bytes, settings.inputs.timeout)
    workflow_id = request.path_params["workflow_id"]
    described, created = await _hosted(request).register(workflow_id, body, caller(request), shared)
    return await _answer(described.to_payload(), described.stored.size, 201 if created else 200)


async def get_workflow(request: Request) -> Response:
    """GET /api/workflows/{workflow_id}: the stored workflow and its parameter schema."""
    workflow_id = request.path_params["workflow_id"]
    text = await _hosted(request).describe_json(workflow_id, _refresh(request), caller(request))
    return Response(text, media_type="application/json")


async def delete_workflow(request: Request) -> Response:
    """DELETE /api/workflows/{workflow_id}."""
    workflow_id = request.path_params["workflow_id"]
    await _hosted(request).delete(workflow_id, caller(request))
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
