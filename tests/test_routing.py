"""The app's router looks its static paths up instead of scanning the table: it must choose the
route Starlette's scan chooses (a full match first, else the first partial one, a 405), for every
path, method and kind of request, and still answer the paths it does not index."""

from __future__ import annotations

from pathlib import Path

from starlette.routing import BaseRoute, Match
from starlette.testclient import TestClient

from serverless.app import create_app
from serverless.settings import Settings
from serverless.transports.routing import IndexedRouter, candidates


def _scanned(routes: list[BaseRoute], scope: dict[str, object]) -> BaseRoute | None:
    """Starlette's own choice: every route in turn."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial


def test_each_static_path_is_tried_against_the_routes_starlettes_scan_would_choose(tmp_path: Path) -> None:
    app = create_app(Settings.from_env({"STATUS_DIR": str(tmp_path / "status")}))
    assert isinstance(app.router, IndexedRouter)
    routes = list(app.routes)
    by_path = candidates(routes)
    assert {"/prompt", "/history", "/view", "/ws", "/api/serverless/run"} <= by_path.keys()
    assert len(by_path["/view"]) < len(routes) // 10, "a handful of routes, not the table"
    for path, among in by_path.items():
        for kind, method in [("http", m) for m in ("GET", "POST", "PUT", "DELETE", "HEAD")] + [("websocket", "")]:
            scope = {"type": kind, "path": path, "root_path": "", "method": method}
            assert _scanned(among, scope) is _scanned(routes, scope), (path, kind, method)


def test_indexed_and_other_paths_answer_as_before(tmp_path: Path) -> None:
    app = create_app(Settings.from_env({"STATUS_DIR": str(tmp_path / "status")}))
    with TestClient(app) as client:
        assert client.get("/api/openapi.json").json()["openapi"]  # a static path
        assert client.put("/prompt").status_code == 405  # a static path, another method: its 405
        assert client.get("/history/no-such-prompt").json() == {}  # a path with a parameter: scanned
        assert client.get("/no/such/path").status_code == 404
