"""The floors under section 1's goals for the sync path and for ComfyUI's own API (`bench/floor.py`):
a bare adapter in front of ComfyUI, on the adapter's stack (Starlette under uvicorn with uvloop
and httptools; aiohttp towards ComfyUI) and none of its code. No job, no log, no checks, no
queue: the least an adapter written this way can add.

- A pass-through proxy: `POST /prompt`, `GET /history/{id}` and `GET /view` are forwarded over one
  kept-open client session; `/ws?clientId=` opens ComfyUI's websocket for the same client id and
  relays its frames as they come. With `FLOOR_LOCAL=1` it answers `/history/{id}` from the
  `executed` messages it relayed and `/view` from ComfyUI's output folder, as the adapter does on
  one box (only `/prompt` and the websocket go through to ComfyUI).
- A bare sync adapter: `POST /api/serverless/run` queues the body's workflow on ComfyUI, waits on
  one shared websocket for the prompt's end, reads its images from ComfyUI's output folder (on the
  event loop: they are small) and answers their base64 in the shape `bench`'s sync client reads.
  With `?stream=true` it answers a `text/event-stream` instead, and `/api/serverless/ws` a
  websocket (the body its first message): each of ComfyUI's messages of the prompt passed on as it
  comes (what one turn of the loop brings in one write), then the same answer as the last event;
  the floor under the stream goals with ComfyUI's real messages. A `LoadImage` input given as
  base64 (W2's) is written to ComfyUI's input folder first, as the adapter stages it.

ComfyUI's address: `FLOOR_COMFYUI_URL`; its output folder: `FLOOR_OUTPUT_DIR`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

COMFYUI = os.environ.get("FLOOR_COMFYUI_URL", "http://127.0.0.1:8188")
OUTPUT = Path(os.environ.get("FLOOR_OUTPUT_DIR", "output"))
LOCAL = os.environ.get("FLOOR_LOCAL") == "1"
CLIENT_ID = uuid.uuid4().hex  # the bare sync adapter's one websocket
session: aiohttp.ClientSession | None = None


@dataclass
class Prompt:
    """What the shared websocket has told of one prompt: its images, its messages not yet passed
    on (a stream's), and whether it ended."""

    prompt_id: str = ""
    images: list[dict[str, Any]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    texts: list[str] = field(default_factory=list)
    more: asyncio.Event = field(default_factory=asyncio.Event)


prompts: dict[str, Prompt] = {}
relayed: dict[str, dict[str, Any]] = {}  # prompt id -> node id -> its output (FLOOR_LOCAL)


def upstream() -> aiohttp.ClientSession:
    assert session is not None, "the lifespan opens it"
    return session


async def forward(request: Request) -> Response:
    """The request as it came (method, path, query, body), ComfyUI's answer as it went."""
    url = COMFYUI + request.url.path + (f"?{request.url.query}" if request.url.query else "")
    headers = {"content-type": request.headers.get("content-type", "application/json")}
    async with upstream().request(request.method, url, data=await request.body(), headers=headers) as answer:
        body = await answer.read()
        kind = answer.headers.get("content-type", "application/octet-stream")
        return Response(body, status_code=answer.status, headers={"content-type": kind})


async def history(request: Request) -> Response:
    prompt_id = request.path_params["prompt_id"]
    if not LOCAL:
        return await forward(request)
    outputs = relayed.pop(prompt_id, {})
    return Response(json.dumps({prompt_id: {"outputs": outputs}}), media_type="application/json")


async def view(request: Request) -> Response:
    if not LOCAL:
        return await forward(request)
    query = request.query_params
    return Response((OUTPUT / query["subfolder"] / query["filename"]).read_bytes(), media_type="image/png")


def note(text: str) -> None:
    """FLOOR_LOCAL: an `executed` message's output, kept for `/history`."""
    if '"executed"' not in text:
        return
    message = json.loads(text)
    data = message.get("data") or {}
    if message.get("type") == "executed" and data.get("prompt_id"):
        relayed.setdefault(data["prompt_id"], {})[str(data["node"])] = data.get("output") or {}


async def relay(websocket: WebSocket) -> None:
    client_id = websocket.query_params.get("clientId", "")
    async with upstream().ws_connect(f"{COMFYUI}/ws?clientId={client_id}", max_msg_size=0) as comfyui:
        await websocket.accept()

        async def down() -> None:
            async for frame in comfyui:
                if frame.type == aiohttp.WSMsgType.TEXT:
                    if LOCAL:
                        note(frame.data)
                    await websocket.send_text(frame.data)
                elif frame.type == aiohttp.WSMsgType.BINARY:
                    await websocket.send_bytes(frame.data)

        sending = asyncio.create_task(down())
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is not None:
                    await comfyui.send_str(message["text"])
        except WebSocketDisconnect:
            pass
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending


def staged(workflow: dict[str, Any]) -> dict[str, Any]:
    """A `LoadImage` whose `image` is base64 (not a file name) reads a file written for it."""
    for node in workflow.values():
        image = node.get("inputs", {}).get("image") if node.get("class_type") == "LoadImage" else None
        if isinstance(image, str) and len(image) > 64 and "." not in image[-5:]:
            # In a subfolder, as the adapter's: ComfyUI lists its input folder's top level at each LoadImage.
            folder = OUTPUT.parent / "input" / "floor"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{uuid.uuid4().hex}.png"
            (folder / name).write_bytes(base64.b64decode(image))
            node["inputs"]["image"] = f"floor/{name}"
    return workflow


async def queue(body: bytes) -> Prompt:
    """The body's workflow queued on ComfyUI; the prompt the shared websocket follows."""
    workflow = staged(json.loads(body))
    async with upstream().post(COMFYUI + "/prompt", json={"prompt": workflow, "client_id": CLIENT_ID}) as answer:
        prompt_id = (await answer.json())["prompt_id"]
    return prompts.setdefault(prompt_id, Prompt(prompt_id=prompt_id))  # its messages may have come first


def answer(prompt: Prompt) -> str:
    results = []
    for image in prompt.images:
        data = (OUTPUT / image["subfolder"] / image["filename"]).read_bytes()
        results.append({"output": {"base64": {"content": base64.b64encode(data).decode()}}})
    return json.dumps({"type": "serverless_api", "data": {"results": results}})


async def passed_on(prompt: Prompt) -> AsyncIterator[list[str]]:
    """The prompt's messages as they come, what has come by then at once; its answer last."""
    try:
        while True:
            await prompt.more.wait()
            prompt.more.clear()
            texts, prompt.texts = prompt.texts, []
            if prompt.ended.is_set():
                yield [*texts, answer(prompt)]
                return
            yield texts
    finally:
        prompts.pop(prompt.prompt_id, None)


async def run(request: Request) -> Response:
    prompt = await queue(await request.body())
    if request.query_params.get("stream") == "true":
        return StreamingResponse(
            (b"".join(b"data: %s\n\n" % text.encode() for text in texts) async for texts in passed_on(prompt)),
            media_type="text/event-stream",
        )
    try:
        await prompt.ended.wait()
    finally:
        del prompts[prompt.prompt_id]
    return Response(answer(prompt), media_type="application/json")


async def run_websocket(websocket: WebSocket) -> None:
    await websocket.accept()
    prompt = await queue((await websocket.receive_text()).encode())
    async for texts in passed_on(prompt):
        for text in texts:
            await websocket.send_text(text)
    await websocket.close()


async def follow() -> None:
    """The shared websocket: each prompt's images (`executed`) and its end (`executing` with no node)."""
    async with upstream().ws_connect(f"{COMFYUI}/ws?clientId={CLIENT_ID}", max_msg_size=0) as comfyui:
        async for frame in comfyui:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            message = json.loads(frame.data)
            data = message.get("data") or {}
            prompt_id = data.get("prompt_id")
            if prompt_id is None:
                if message["type"] == "status":  # the queue's count, which a stream passes on too
                    for each in prompts.values():
                        each.texts.append(frame.data)
                        each.more.set()
                continue
            prompt = prompts.setdefault(prompt_id, Prompt(prompt_id=prompt_id))
            prompt.texts.append(frame.data)
            prompt.more.set()
            if message["type"] == "executed":
                images = (data.get("output") or {}).get("images") or []
                prompt.images += [i for i in images if i.get("type") == "output"]
            elif message["type"] in ("execution_error", "execution_interrupted") or (
                message["type"] == "executing" and data.get("node") is None
            ):
                prompt.ended.set()


async def ready(request: Request) -> Response:
    return Response("ready")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global session
    session = aiohttp.ClientSession()
    following = asyncio.create_task(follow())
    try:
        yield
    finally:
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        await session.close()


app = Starlette(
    routes=[
        Route("/ready", ready),
        Route("/api/serverless/run", run, methods=["POST"]),
        WebSocketRoute("/api/serverless/ws", run_websocket),
        Route("/prompt", forward, methods=["POST"]),
        Route("/history/{prompt_id}", history),
        Route("/view", view),
        WebSocketRoute("/ws", relay),
    ],
    lifespan=lifespan,
)
