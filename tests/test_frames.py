"""A burst of websocket messages (`serverless.transports.frames`): under uvicorn one write, under
any other server one ASGI send a message; either way each message its own frame, in order, text
and binary as sent, the close after the last (in the same write under uvicorn), and a send after
the close refused as a disconnect."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from serverless.transports.frames import Frames, Message
from tests.servers import free_port

BURST = [Message(b"first"), Message(b"\x00\x01\xff", binary=True), Message("ünïcode {}".encode()), Message(b"")]


def make_app(after_close: list[str]) -> Starlette:
    async def burst(websocket: WebSocket) -> None:
        await websocket.accept()
        frames = Frames(websocket)
        await frames.send([Message(f"direct={frames.direct}".encode())])
        await frames.send(BURST[:2])
        await frames.close(BURST[2:])  # the last messages and the close in one write
        try:
            await frames.send([Message(b"too late")])
        except WebSocketDisconnect:
            after_close.append("refused")
        else:
            after_close.append("sent")

    return Starlette(routes=[WebSocketRoute("/burst", burst)])


def expected() -> list[str | bytes]:
    return [m.data if m.binary else m.data.decode() for m in BURST]


@pytest.fixture
def served() -> Iterator[tuple[str, list[str]]]:
    """The app under uvicorn (its default websocket protocol), in a thread."""
    after_close: list[str] = []
    port = free_port()
    config = uvicorn.Config(make_app(after_close), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{port}/burst", after_close
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_burst_under_uvicorn_is_one_write_of_separate_frames(served: tuple[str, list[str]]) -> None:
    url, after_close = served

    async def read() -> tuple[list[str | bytes], int | None]:
        got: list[str | bytes] = []
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            async for frame in ws:
                got.append(frame.data)
            return got, ws.close_code

    got, code = asyncio.run(read())
    assert got[0] == "direct=True"  # uvicorn's websockets-sansio protocol: one write a burst
    assert got[1:] == expected()
    assert code == 1000
    assert after_close == ["refused"]


def test_a_burst_under_another_server_is_one_send_a_message() -> None:
    after_close: list[str] = []
    with TestClient(make_app(after_close)) as client, client.websocket_connect("/burst") as ws:
        assert ws.receive_text() == "direct=False"
        got: list[str | bytes] = []
        for want in expected():
            got.append(ws.receive_bytes() if isinstance(want, bytes) else ws.receive_text())
        assert got == expected()
        assert ws.receive()["type"] == "websocket.close"
    assert after_close == ["refused"]
