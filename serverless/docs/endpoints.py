"""The pages for people: the whole API's OpenAPI document, its interactive reference (Swagger UI
from the `swagger-ui-bundle-v2` package's files: no CDN, works offline) and the playground (our
static files). `routes()` is what the app's route table adds.

Swagger UI 5 is the first to render OpenAPI 3.1 (`swagger-ui-bundle` is stuck at 4.15, which
refuses it); `swagger-ui-bundle-v2` ships 5.x as plain files."""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..state import app_state
from .openapi import build_document

STATIC = Path(__file__).parent / "static"


# The pages load only this app's own scripts; Swagger UI sets inline styles; outputs shown may be
# OSS (https) URLs, data: or blob: images. No framing (clickjacking), no MIME sniffing.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob: https:; media-src 'self' data: blob: https:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's files inside the installed package."""
    return Path(str(swagger_ui_bundle.swagger_ui_path))


async def openapi_json(request: Request) -> Response:
    """GET /api/openapi.json: every route, linking the hosted workflows' own documents."""
    owner = request.scope.get("state", {}).get("owner")
    stored = await app_state(request).resources.workflows.visible(owner if isinstance(owner, str) else None)
    server_url = str(request.base_url).rstrip("/")
    return JSONResponse(build_document(server_url, [item.workflow_id for item in stored]))


async def reference(request: Request) -> Response:
    """GET /docs: Swagger UI over /api/openapi.json (and each hosted workflow's document)."""
    return FileResponse(STATIC / "docs.html", headers=PAGE_HEADERS)


async def playground(request: Request) -> Response:
    """GET /: the playground page."""
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


def routes() -> list[BaseRoute]:
    return [
        Route("/api/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", reference, methods=["GET"]),
        Route("/", playground, methods=["GET"]),
        Mount("/docs/assets", StaticFiles(directory=swagger_ui_dir()), name="swagger-ui"),
        Mount("/playground", StaticFiles(directory=STATIC), name="playground"),
    ]
