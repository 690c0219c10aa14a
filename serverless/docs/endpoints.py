"""The pages for people: the whole API's OpenAPI document, its interactive reference (Swagger UI
from the `swagger-ui-bundle` package's files: no CDN, works offline) and the playground (our
static files). `routes()` is what the app's route table adds.

Swagger UI comes from `drf-spectacular-sidecar`, which ships the current swagger-ui-dist (5.x, the
first to render OpenAPI 3.1; `swagger-ui-bundle` is stuck at 4.15). Its files are located without
importing the package (its `__init__` imports Django, which we never load)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .openapi import build_document

STATIC = Path(__file__).parent / "static"


def swagger_ui_dir() -> Path:
    """The folder of swagger-ui-dist's files inside the installed sidecar package."""
    spec = importlib.util.find_spec("drf_spectacular_sidecar")  # a top-level package: not imported
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("drf-spectacular-sidecar is not installed (it ships Swagger UI for /docs)")
    return Path(next(iter(spec.submodule_search_locations))) / "static" / "drf_spectacular_sidecar" / "swagger-ui-dist"


async def openapi_json(request: Request) -> Response:
    """GET /api/openapi.json: every route, linking the hosted workflows' own documents."""
    stored = await request.app.state.resources.workflows.store.all()
    server_url = str(request.base_url).rstrip("/")
    return JSONResponse(build_document(server_url, [item.workflow_id for item in stored]))


async def reference(request: Request) -> Response:
    """GET /docs: Swagger UI over /api/openapi.json (and each hosted workflow's document)."""
    return FileResponse(STATIC / "docs.html")


async def playground(request: Request) -> Response:
    """GET /: the playground page."""
    return FileResponse(STATIC / "index.html")


def routes() -> list[BaseRoute]:
    return [
        Route("/api/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", reference, methods=["GET"]),
        Route("/", playground, methods=["GET"]),
        Mount("/docs/assets", StaticFiles(directory=swagger_ui_dir()), name="swagger-ui"),
        Mount("/playground", StaticFiles(directory=STATIC), name="playground"),
    ]
