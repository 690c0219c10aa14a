"""The app's router looks its static paths up instead of scanning the table: it must choose the
route Starlette's scan chooses (a full match first, else the first partial one, a 405), for every
path, method and kind of request, and still answer the paths it does not index."""

from __future__ import annotations

import re
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


def test_each_path_is_tried_against_the_routes_starlettes_scan_would_choose(tmp_path: Path) -> None:
    app = create_app(Settings.from_env({"STATUS_DIR": str(tmp_path / "status")}))
    router = app.router
    assert isinstance(router, IndexedRouter)
    routes = list(app.routes)
    static = candidates(routes)
    assert {"/prompt", "/history", "/view", "/ws", "/api/serverless/run"} <= static.keys()
    assert len(static["/view"]) < len(routes) // 10, "a handful of routes, not the table"
    # Every route's own path (its parameters filled in), below a mount, and paths no route has.
    paths = {re.sub(r"{[^}]*}", "x1", route.path) for route in routes if hasattr(route, "path")}
    paths |= {path + "/deeper" for path in list(paths)} | {"/", "", "/nothing", "/nothing/x", "/history/", "/api"}
    looked_up = 0
    for path in sorted(paths):
        among = router._routes_for(path)
        if among is None:
            continue  # scanned as Starlette scans
        looked_up += 1
        for kind, method in [("http", m) for m in ("GET", "POST", "PUT", "DELETE", "HEAD")] + [("websocket", "")]:
            scope = {"type": kind, "path": path, "root_path": "", "method": method}
            assert _scanned(among, scope) is _scanned(routes, scope), (path, kind, method)
    assert looked_up > len(paths) // 2
    assert len(router._routes_for("/history/some-prompt") or routes) < 10


def test_indexed_and_other_paths_answer_as_before(tmp_path: Path) -> None:
    app = create_app(Settings.from_env({"STATUS_DIR": str(tmp_path / "status")}))
    with TestClient(app) as client:
        assert client.get("/api/openapi.json").json()["openapi"]  # a static path
        assert client.put("/prompt").status_code == 405  # a static path, another method: its 405
        assert client.get("/history/no-such-prompt").json() == {}  # a path with a parameter: scanned
        assert client.get("/no/such/path").status_code == 404
