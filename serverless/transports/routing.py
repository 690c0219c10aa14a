"""Starlette's router with its static paths looked up instead of scanned (`IndexedRouter`).

Starlette tries a request against each route in turn: with about a hundred routes, a path near the
end of the table (ComfyUI's `/prompt`, `/history`, `/view`, `/ws`, which every native client asks
for each prompt) costs some fifty regular-expression matches, 50-60 µs a request. Here a request
whose path is one of the table's static paths is tried only against the routes whose pattern can
match that path at all, in the table's order: which route answers (a full match first, else the
first partial one: a 405) is what Starlette's scan decides. A path with parameters (ComfyUI's
`/history/{prompt_id}`) is tried against the routes that may match a path of its first segment
(a route's literal start must agree with it); a first segment no route has is scanned as before.
"""

from __future__ import annotations

from typing import Any

from starlette._utils import get_route_path  # the path routes see, as Starlette's own router computes it
from starlette.routing import BaseRoute, Match, Mount, Route, Router, WebSocketRoute
from starlette.types import Receive, Scope, Send

PATH_ROUTES = (Route, WebSocketRoute, Mount)  # routes chosen by their path alone (then method, type)


class IndexedRouter(Router):
    """A `Router` whose static paths each have the short list of routes that may match them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._indexed: list[BaseRoute] | None = None  # the table the index was built from
        self._by_path: dict[str, list[BaseRoute]] = {}
        self._by_segment: dict[str, list[BaseRoute]] = {}

    def _routes_for(self, path: str) -> list[BaseRoute] | None:
        """The routes that may match `path`, in order; None: scan them all."""
        if self._indexed is None or len(self._indexed) != len(self.routes):  # again once a route is added
            self._indexed = list(self.routes)
            self._by_path = candidates(self._indexed)
            self._by_segment = by_first_segment(self._indexed)
        found = self._by_path.get(path)
        return found if found is not None else self._by_segment.get(first_segment(path))

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("router", self)
            routes = self._routes_for(get_route_path(scope))
            if routes is not None and await _dispatch(routes, scope, receive, send):
                return
        await super().app(scope, receive, send)  # another path, or nothing matched (404, redirect)


def candidates(routes: list[BaseRoute]) -> dict[str, list[BaseRoute]]:
    """For each static path of the table, the routes (in order) that may match it: those whose
    pattern matches it, and every route not chosen by path."""
    static = [
        route.path for route in routes if isinstance(route, Route | WebSocketRoute) and not route.param_convertors
    ]
    return {
        path: [route for route in routes if not isinstance(route, PATH_ROUTES) or route.path_regex.match(path)]
        for path in static
    }


def first_segment(path: str) -> str:
    return path.split("/", 2)[1] if path.startswith("/") else path


def literal_start(route: BaseRoute) -> str | None:
    """What every path a route matches starts with (None: not a route chosen by path)."""
    if not isinstance(route, PATH_ROUTES):
        return None
    path = route.path + "/" if isinstance(route, Mount) else route.path  # a mount matches below its path
    return path.split("{", 1)[0]


def may_match(start: str | None, segment: str) -> bool:
    """Whether a route whose paths start with `start` may match a path of first segment
    `segment` (`/<segment>` or `/<segment>/...`): one of the two starts with the other."""
    head = f"/{segment}/"
    return start is None or head.startswith(start) or start.startswith(head)


def by_first_segment(routes: list[BaseRoute]) -> dict[str, list[BaseRoute]]:
    """For each first segment of the table's paths, the routes (in order) that may match a path
    of that first segment."""
    segments = {first_segment(start) for route in routes if (start := literal_start(route)) is not None}
    return {segment: [route for route in routes if may_match(literal_start(route), segment)] for segment in segments}


async def _dispatch(routes: list[BaseRoute], scope: Scope, receive: Receive, send: Send) -> bool:
    """Starlette's choice among `routes`: the first full match, else the first partial one;
    False when none matches."""
    partial: tuple[BaseRoute, Scope] | None = None
    for route in routes:
        match, child_scope = route.matches(scope)
        if match is Match.FULL:
            partial = (route, child_scope)
            break
        if match is Match.PARTIAL and partial is None:
            partial = (route, child_scope)
    if partial is None:
        return False
    route, child_scope = partial
    scope["route"] = route
    scope.update(child_scope)
    await route.handle(scope, receive, send)
    return True
