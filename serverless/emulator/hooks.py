"""Test and fault hooks under `/emulator/` (not part of ComfyUI; never under `/api`).

`POST /emulator/drop_websockets` aborts every websocket's TCP connection (no close frame), as a
network failure would. `POST /emulator/config` with `{"step_delay": s, "node_delay": s}` (either
key) changes the delays at run time; it answers the resulting settings.
"""

from __future__ import annotations

from aiohttp import web

from .state import EMULATOR

SETTINGS = ("step_delay", "node_delay")


async def drop_websockets(request: web.Request) -> web.Response:
    dropped = request.app[EMULATOR].hub.drop_all()
    return web.json_response({"dropped": dropped})


async def configure(request: web.Request) -> web.Response:
    config = request.app[EMULATOR].config
    body = await request.json()
    if not isinstance(body, dict) or any(k not in SETTINGS for k in body):
        raise web.HTTPBadRequest(text=f"expected a JSON object with keys among {SETTINGS}")
    for key, value in body.items():
        setattr(config, key, float(value))
    return web.json_response({key: getattr(config, key) for key in SETTINGS})


ROUTES = [
    ("POST", "/emulator/drop_websockets", drop_websockets),
    ("POST", "/emulator/config", configure),
]
