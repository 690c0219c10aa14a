"""`GET /ws`: the websocket every client listens on.

On connect the client gets `status` with its `sid` (its `clientId`, or a new hex id), then, if it
is reconnecting while its own prompt runs, `executing` with the current node. A first message of
type `feature_flags` is answered with the server's flags; anything else from clients is ignored.
"""

from __future__ import annotations

import json
import logging
import uuid

from aiohttp import WSMsgType, web

from .hub import Client, Hub
from .state import EMULATOR, SERVER_FEATURES

log = logging.getLogger(__name__)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    emu = request.app[EMULATOR]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    sid = request.rel_url.query.get("clientId", "") or uuid.uuid4().hex
    client = Client(sid=sid, ws=ws, transport=request.transport)
    emu.hub.register(client)  # replaces an older socket with the same clientId
    try:
        await emu.hub.send_to(client, "status", {"status": emu.queue_info(), "sid": sid})
        runtime = emu.runtime
        last_node = runtime.last_node_id
        if runtime.client_id == sid and last_node is not None:
            await emu.hub.send_to(client, "executing", {"node": last_node})
        first = True
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                first = await _on_text(emu.hub, client, msg.data, first)
            elif msg.type == WSMsgType.ERROR:
                log.warning("ws connection closed with exception %s", ws.exception())
    finally:
        emu.hub.unregister(client)
    return ws


async def _on_text(hub: Hub, client: Client, text: str, first: bool) -> bool:
    """Handle one client message; returns whether the next one is still the first."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        log.warning("Invalid JSON received from client %s: %s", client.sid, text)
        return first
    if first and isinstance(data, dict) and data.get("type") == "feature_flags":
        client.feature_flags = data.get("data", {})
        await hub.send_to(client, "feature_flags", SERVER_FEATURES)
    return False


ROUTES = [("GET", "/ws", websocket)]
