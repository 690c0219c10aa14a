"""A bare Starlette app answering one job's worth of canned bytes three ways (`bench/floor.py`):
`POST /json` (the terminal payload as JSON), `POST /sse` (the job's 20 events as one
`text/event-stream` write), `WS /ws` (one message in, the 20 events out, each a frame, then a
close). Served by uvicorn as the adapter is (uvloop, httptools, websockets-sansio)."""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

PROMPT_ID = "3cf0babe-72c6-41a3-808d-c80026a5ec4a"
STATE = {"value": 1.0, "max": 1.0, "state": "finished", "node_id": "1", "prompt_id": PROMPT_ID}
MESSAGES = [
    json.dumps({"type": "progress_state", "data": {"prompt_id": PROMPT_ID, "nodes": {"1": STATE}}}) for _ in range(19)
]
TERMINAL = json.dumps({"type": "serverless_api", "data": {"task_id": PROMPT_ID, "base64": "A" * 600}})
EVENTS = [*MESSAGES, TERMINAL]
SSE = b"".join(b"id: %d\ndata: %s\n\n" % (seq, text.encode()) for seq, text in enumerate(EVENTS, 1))


async def as_json(request: Request) -> Response:
    await request.body()
    return Response(TERMINAL, media_type="application/json")


async def as_sse(request: Request) -> Response:
    await request.body()
    return Response(SSE, media_type="text/event-stream")


async def as_websocket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.receive_text()
    for text in EVENTS:
        await websocket.send_text(text)
    await websocket.close()


async def ready(request: Request) -> Response:
    return Response("ready")


app = Starlette(
    routes=[
        Route("/ready", ready),
        Route("/json", as_json, methods=["POST"]),
        Route("/sse", as_sse, methods=["POST"]),
        WebSocketRoute("/ws", as_websocket),
    ]
)
