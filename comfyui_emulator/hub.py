"""Websocket clients and message delivery.

Every message goes through one outbox drained by one task, so each socket receives messages in the
order they were produced, whichever thread produced them (ComfyUI's `send_sync` + `publish_loop`).

Sampler previews are binary frames, framed as ComfyUI 0.3.64 frames them (`server.py`
`send_image` / `send_image_with_metadata`): a client that declared `supports_preview_metadata`
in its first message gets event 4 (PREVIEW_IMAGE_WITH_METADATA: a 4-byte big-endian length, that
many bytes of JSON, the image); any other gets event 1 (PREVIEW_IMAGE: image type 1 = JPEG, the
image). Each client gets one form only, never both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

Message = tuple[str, Any, "str | None"]
SENT_KEPT = 5000  # texts kept per client id for GET /emulator/sent
PREVIEW = "\x00preview"  # an outbox item holding a `Preview` (no text message has this name)
PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes
PREVIEW_IMAGE_WITH_METADATA = 4
JPEG = 1  # the legacy frame's image type (2 = PNG)


@dataclass(frozen=True)
class Preview:
    """One sampler preview: the JPEG and whose it is. `metadata` picks the clients it goes to
    (those that declared `supports_preview_metadata`, or the others)."""

    jpeg: bytes
    prompt_id: str
    node_id: str
    metadata: bool

    def frame(self) -> bytes:
        if not self.metadata:
            return struct.pack(">II", PREVIEW_IMAGE, JPEG) + self.jpeg
        meta = json.dumps(
            {
                "node_id": self.node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": self.node_id,
                "parent_node_id": None,
                "real_node_id": self.node_id,
                "image_type": "image/jpeg",
            }
        ).encode()
        return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + self.jpeg


@dataclass(eq=False)
class Client:
    """One open websocket, keyed by its client id (`sid`)."""

    sid: str
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    feature_flags: dict[str, Any] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Hub:
    """Registry of websocket clients plus the ordered outbox that feeds them."""

    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.sent: dict[str, deque[str]] = defaultdict(lambda: deque(maxlen=SENT_KEPT))
        # When each of those texts was handed to its socket (time.monotonic(), a clock every process
        # on the machine shares), for the benchmark of event latency.
        self.sent_at: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=SENT_KEPT))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the server's event loop; called once at startup."""
        self._loop = loop

    def register(self, client: Client) -> None:
        self.clients[client.sid] = client

    def unregister(self, client: Client) -> None:
        """Forget `client`, unless a newer socket already took over its sid."""
        if self.clients.get(client.sid) is client:
            del self.clients[client.sid]

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        """Queue a message from any thread: to client `sid`, or to every client when sid is None."""
        if self._loop is None or self._loop.is_closed():
            return  # not started, or shut down while the worker was finishing a prompt
        try:
            self._loop.call_soon_threadsafe(self._outbox.put_nowait, (event, data, sid))
        except RuntimeError:  # the loop closed in between
            log.debug("dropped %s message after shutdown", event)

    async def publish_loop(self) -> None:
        """Deliver queued messages forever, one at a time (keeps per-socket order)."""
        while True:
            event, data, sid = await self._outbox.get()
            await self.send(event, data, sid)

    async def send(self, event: str, data: Any, sid: str | None = None) -> None:
        """Send now: to `sid` if it is connected, to everyone when sid is None."""
        if sid is None:
            targets = list(self.clients.values())
        elif sid in self.clients:
            targets = [self.clients[sid]]
        else:
            return
        if event == PREVIEW:
            preview: Preview = data
            for client in targets:
                if bool(client.feature_flags.get("supports_preview_metadata")) == preview.metadata:
                    await self.send_bytes(client, preview.frame())
            return
        text = json.dumps({"type": event, "data": data})
        for client in targets:
            await self.send_text(client, text)

    async def send_to(self, client: Client, event: str, data: Any) -> None:
        await self.send_text(client, json.dumps({"type": event, "data": data}))

    async def send_text(self, client: Client, text: str) -> None:
        """Write one frame; a vanished peer is logged, as ComfyUI does, never raised."""
        async with client.lock:
            try:
                stamp = time.monotonic()
                await client.ws.send_str(text)
                self.sent[client.sid].append(text)
                self.sent_at[client.sid].append(stamp)
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as err:
                log.warning("send error: %s", err)

    async def send_bytes(self, client: Client, frame: bytes) -> None:
        """Write one binary frame (not kept for /emulator/sent, which lists texts)."""
        async with client.lock:
            try:
                await client.ws.send_bytes(frame)
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as err:
                log.warning("send error: %s", err)

    def drop_all(self) -> int:
        """Abort every socket's TCP connection without a close frame; returns how many."""
        dropped = 0
        for client in list(self.clients.values()):
            if client.transport is not None and not client.transport.is_closing():
                client.transport.abort()
                dropped += 1
        return dropped

    async def close_all(self) -> None:
        """Close every socket politely (server shutdown)."""
        for client in list(self.clients.values()):
            await client.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"Server shutdown")
