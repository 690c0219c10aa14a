"""HTTP endpoints of the hosted workflows (the run itself is `serverless.app.run`, through
`start_job`). Each is a few lines: the work is in `HostedWorkflows`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..core.request import query_flag
from ..state import app_state
from ..transports.http import read_body
from .conversion import convert_body
from .hosting import HostedWorkflows


def _hosted(request: Request) -> HostedWorkflows:
    hosted: HostedWorkflows = app_state(request).resources.workflows
    return hosted


def _refresh(request: Request) -> bool:
    return query_flag(request.query_params, "refresh")


async def list_workflows(request: Request) -> Response:
    """GET /api/workflows: id, title, parameter count and modification time of each."""
    return JSONResponse({"workflows": await _hosted(request).summaries(_refresh(request))})


async def put_workflow(request: Request) -> Response:
    """PUT /api/workflows/{workflow_id}: validate against the running ComfyUI, then store;
    201 when new, 200 when replaced."""
    settings = app_state(request).resources.settings
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout)
    described, created = await _hosted(request).register(request.path_params["workflow_id"], body)
    return JSONResponse(described.to_payload(), status_code=201 if created else 200)


async def get_workflow(request: Request) -> Response:
    """GET /api/workflows/{workflow_id}: the stored workflow and its parameter schema."""
    described = await _hosted(request).describe(request.path_params["workflow_id"], _refresh(request))
    return JSONResponse(described.to_payload())


async def delete_workflow(request: Request) -> Response:
    """DELETE /api/workflows/{workflow_id}."""
    workflow_id = request.path_params["workflow_id"]
    await _hosted(request).delete(workflow_id)
    return JSONResponse({"workflow_id": workflow_id, "deleted": True})


async def openapi_json(request: Request) -> Response:
    """GET /api/workflows/{workflow_id}/openapi.json: the workflow's own OpenAPI 3.1 document."""
    server_url = str(request.base_url).rstrip("/")
    document = await _hosted(request).openapi(request.path_params["workflow_id"], server_url, _refresh(request))
    return JSONResponse(document)


async def convert_workflow(request: Request) -> Response:
    """POST /api/workflows/convert: a UI-format workflow in, `{"prompt", "notes"}` out."""
    settings = app_state(request).resources.settings
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout)
    converted = await convert_body(_hosted(request).object_info, body)
    return JSONResponse(converted.to_payload())
