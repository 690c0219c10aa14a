"""Test and fault hooks under `/emulator/` (not part of ComfyUI; never under `/api`).

`POST /emulator/drop_websockets` aborts every websocket's TCP connection (no close frame), as a
network failure would. `POST /emulator/config` with `{"step_delay": s, "node_delay": s}` (either
key) changes the delays at run time, and the fault knobs `history_delay` (seconds),
`history_garbage` (non-zero: /history/{id} answers non-JSON), `view_status` (non-zero: /view
answers that status) and `view_delay` (seconds before /view answers), and the previews'
`previews` (0: none, as ComfyUI's `--preview-method none`) and `preview_size`; it answers the
resulting settings. `POST /emulator/release_node` ends the
`node_delay` of the node sleeping it (or of the next one to sleep it): with a long `node_delay`, a
test moves a prompt on one node at a time. `GET /emulator/sent?client_id=X` returns
the exact texts sent to that client's sockets, in order (the last 5000), so tests can compare
what the adapter forwarded byte for byte; with `&times=1` each is `[t, text]`, `t` being
`time.monotonic()` just before the emulator wrote it (comparable across processes on one machine;
used by `python -m bench` to measure event latency).
"""

from __future__ import annotations

from aiohttp import web

from .state import EMULATOR

SETTINGS = (
    "step_delay",
    "node_delay",
    "history_delay",
    "history_garbage",
    "view_status",
    "view_delay",
    "previews",
    "preview_size",
    "model_load_delay",
    "model_bytes",
    "vram_total",
    "oom_next",
    "leak_bytes",
)


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


async def release_node(request: web.Request) -> web.Response:
    request.app[EMULATOR].runtime.gate.release()
    return web.json_response({"released": 1})


async def sent(request: web.Request) -> web.Response:
    client_id = request.rel_url.query.get("client_id", "")
    hub = request.app[EMULATOR].hub
    texts = list(hub.sent.get(client_id, ()))
    if request.rel_url.query.get("times"):
        return web.json_response([list(pair) for pair in zip(hub.sent_at.get(client_id, ()), texts, strict=False)])
    return web.json_response(texts)


ROUTES = [
    ("POST", "/emulator/drop_websockets", drop_websockets),
    ("POST", "/emulator/config", configure),
    ("POST", "/emulator/release_node", release_node),
    ("GET", "/emulator/sent", sent),
]
