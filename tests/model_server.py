"""A model file server on loopback for the model store's tests: real HTTP from its own thread,
files from memory, `Range: bytes=N-` honoured (206), every GET counted per path; a file may be
served slowly (to make concurrent callers overlap) or broken off once after some bytes (to make
a download resume)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading
from collections import Counter
from typing import Any

from aiohttp import web

CHUNK = 64 * 1024


def safetensors(size: int, seed: int = 0) -> bytes:
    """A valid safetensors file of about `size` bytes: one uint8 tensor of pseudo-random bytes."""
    data = (seed.to_bytes(4, "little") + os.urandom(16)) * (size // 20 + 1)
    data = data[:size]
    header = json.dumps({"weights": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


class ModelServer:
    """`add(name, data)` gives the file's URL; `gets[path]` counts the GETs of it; `ranges` lists
    the Range headers received."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.gets: Counter[str] = Counter()
        self.ranges: list[str] = []
        self.authorizations: list[str | None] = []  # the Authorization header of each GET
        self.delay = 0.0  # seconds slept per chunk
        self.break_after: dict[str, int] = {}  # name -> bytes sent before hanging up (once)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="model server", daemon=True)
        self._thread.start()
        self._runner: web.AppRunner = self._call(self._start())

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.url}/m/{name}"

    def stop(self) -> None:
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/m/{name}", self._file)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        await runner.setup()
        await web.SockSite(runner, self._sock).start()
        return runner

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if request.method == "GET":
            self.gets[name] += 1
            self.authorizations.append(request.headers.get("Authorization"))
        if name not in self.files:
            raise web.HTTPNotFound()
        data = self.files[name]
        start, status = 0, 200
        spec = request.headers.get("Range", "")
        if spec:
            self.ranges.append(spec)
            start, status = int(spec.removeprefix("bytes=").split("-")[0]), 206
            if start >= len(data):
                raise web.HTTPRequestRangeNotSatisfiable()
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(data) - start
        await response.prepare(request)
        cut = self.break_after.pop(name, None)
        sent = start
        try:
            while sent < len(data):
                if cut is not None and sent >= cut:
                    request.transport.close() if request.transport else None
                    return response
                chunk = data[sent : sent + CHUNK]
                await response.write(chunk)
                sent += len(chunk)
                if self.delay:
                    await asyncio.sleep(self.delay)
            await response.write_eof()
        except ConnectionError:
            pass
        return response
