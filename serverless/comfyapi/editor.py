"""ComfyUI's own editor (PyPI `comfyui-frontend-package`, when installed) served by any instance
at `/comfyui/`: its calls go to `/comfyui/api/...` and `/comfyui/ws`, ComfyUI's API of `native`
and `relay` again; what only the editor asks (its user, settings, user data, extensions,
translations, templates, logs) is answered here as a single-user ComfyUI with nothing saved
answers it: settings live in the browser's session, nothing is written on the server."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

PREFIX = "/comfyui"


def static_dir() -> Path | None:
    """The editor's files, None when `comfyui-frontend-package` is not installed."""
    try:
        found = resources.files("comfyui_frontend_package") / "static"
    except ModuleNotFoundError:
        return None
    path = Path(str(found))
    return path if (path / "index.html").is_file() else None


def _answer(value: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        return JSONResponse(value)

    return endpoint


async def _ok(request: Request) -> Response:
    return Response(status_code=200)


async def _none(request: Request) -> Response:
    return Response(status_code=404)


async def _css(request: Request) -> Response:
    return Response("", media_type="text/css")


def routes() -> list[BaseRoute]:
    """The editor's pages and the routes only it calls (paths under PREFIX); none when it is not
    installed."""
    folder = static_dir()
    if folder is None:
        return []
    api = "/api"
    return [
        Route(f"{api}/users", _answer({"storage": "server", "migrated": True}), methods=["GET"]),
        Route(f"{api}/settings", _answer({}), methods=["GET"]),
        Route(f"{api}/settings", _ok, methods=["POST"]),
        Route(f"{api}/settings/{{setting}}", _ok, methods=["POST"]),
        Route(f"{api}/settings/{{setting}}", _none, methods=["GET"]),
        Route(f"{api}/userdata", _answer([]), methods=["GET"]),
        Route(f"{api}/userdata/{{file:path}}", _none, methods=["GET"]),
        Route(f"{api}/userdata/{{file:path}}", _ok, methods=["POST", "DELETE"]),
        Route(f"{api}/extensions", _answer([]), methods=["GET"]),
        Route(f"{api}/i18n", _answer({}), methods=["GET"]),
        Route(f"{api}/features", _answer({"supports_preview_metadata": False}), methods=["GET"]),
        Route(f"{api}/experiment/models", _answer([]), methods=["GET"]),
        Route(f"{api}/experiment/models/{{folder}}", _answer([]), methods=["GET"]),
        Route(f"{api}/workflow_templates", _answer({}), methods=["GET"]),
        Route("/internal/folder_paths", _answer({}), methods=["GET"]),
        Route("/internal/logs/raw", _answer({"entries": [], "size": {"cols": 80, "rows": 24}}), methods=["GET"]),
        Route("/internal/logs/subscribe", _ok, methods=["PATCH"]),
        Route("/user.css", _css, methods=["GET"]),
        Route("/templates/index.json", _answer([]), methods=["GET"]),
        Mount("/", StaticFiles(directory=folder, html=True), name="comfyui-editor"),
    ]
