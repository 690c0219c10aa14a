"""The load: one job through ComfyUI's native protocol, and through the adapter (sync and SSE).

`DirectClient` is ComfyUI's own `script_examples/websockets_api_example.py` made async: one
websocket per client id, kept open; per job `POST /prompt` with that client id, read the socket
until `executing` with `node: null` for the prompt, `GET /history/{id}`, then `GET /view` for every
image. The adapter's clients ask for `output_base64`, so both end holding the image bytes.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pybase64

RUN = "/api/serverless/run"
NO_LIMIT = aiohttp.ClientTimeout(total=None)


def small_workflow(prefix: str, color: int = 0, size: int = 64) -> dict[str, Any]:
    """EmptyImage size x size -> SaveImage: ComfyUI's cheapest job with an output file. Vary
    `color` from job to job, or ComfyUI answers from its cache without running anything."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": color % 0xFFFFFF},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def noise_workflow(prefix: str, side: int = 2600) -> dict[str, Any]:
    """A picture of noise (does not compress): side 2600 makes a ~20 MB PNG."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": side, "height": side, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": 1, "strength": 1.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def long_workflow(steps: int, seed: int = 1, ckpt: str = "sd-v1-5-inpainting.ckpt") -> dict[str, Any]:
    """The emulator's model-free text-to-image chain: one `progress` message per step."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 8,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bench/long/img"}},
    }


def png(width: int, height: int, pixels: bytes, level: int = 6) -> bytes:
    """An 8-bit RGB PNG of `pixels` (width * height * 3 bytes), written by hand (no Pillow in the
    load generator's timing)."""
    row = width * 3
    raw = b"".join(b"\0" + pixels[y * row : (y + 1) * row] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, level)) + chunk(b"IEND", b"")
    )


def tiny_png(serial: int, side: int = 16) -> bytes:
    """A fresh small PNG per job (its colour from `serial`): W2's input, never in ComfyUI's cache."""
    color = (serial % 0xFFFFFF).to_bytes(3, "big")
    return png(side, side, color * (side * side))


def noise_png(side: int) -> bytes:
    """A PNG of random pixels (does not compress): side 580 is ~1 MB, W3's input."""
    return png(side, side, os.urandom(side * side * 3), level=1)


def invert_workflow(image: str, prefix: str) -> dict[str, Any]:
    """W2: LoadImage -> ImageInvert -> SaveImage; `image` is a file name in ComfyUI's input folder
    (the native client uploads it first) or the image itself as base64 (the adapter's inputs)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def big_workflow(image: str, prefix: str, seed: int, side: int = 1024) -> dict[str, Any]:
    """W3: a ~1 MB input scaled to side x side and covered in noise (a PNG of ~3 MB that does not
    compress): LoadImage -> ImageScale -> ImageAddNoise -> SaveImage, all ComfyUI core nodes."""
    scale = {"image": ["1", 0], "upscale_method": "nearest-exact", "width": side, "height": side, "crop": "disabled"}
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageScale", "inputs": scale},
        "3": {"class_type": "ImageAddNoise", "inputs": {"image": ["2", 0], "seed": seed, "strength": 1.0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


class JobFailed(Exception):
    """A benchmark job did not end with a result."""


@dataclass
class Received:
    """What one SSE job delivered: each `data:` text with the monotonic time it was read."""

    events: list[tuple[float, str]] = field(default_factory=list)

    @property
    def terminal(self) -> dict[str, Any]:
        if not self.events:
            raise JobFailed("the stream ended without any event")
        payload = json.loads(self.events[-1][1])
        return payload if isinstance(payload, dict) else {}


class DirectClient:
    """ComfyUI's native protocol, one client id and one open websocket per client."""

    def __init__(self, session: aiohttp.ClientSession, comfyui_url: str) -> None:
        self.session = session
        self.url = comfyui_url
        self.client_id = uuid.uuid4().hex
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def __aenter__(self) -> DirectClient:
        self.ws = await self.session.ws_connect(f"{self.url}/ws?clientId={self.client_id}", max_msg_size=0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def upload(self, data: bytes, name: str) -> str:
        """POST /upload/image (as ComfyUI's frontend does before queueing a LoadImage); the name to use."""
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type="image/png")
        form.add_field("overwrite", "true")
        async with self.session.post(self.url + "/upload/image", data=form) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise JobFailed(f"/upload/image answered {resp.status}: {answer}")
        return str(answer["name"])

    async def run(self, workflow: dict[str, Any], received: Received | None = None) -> list[bytes]:
        """One job; returns the images' bytes. With `received`, every text is kept with its time."""
        assert self.ws is not None
        async with self.session.post(
            self.url + "/prompt", json={"prompt": workflow, "client_id": self.client_id}
        ) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise JobFailed(f"/prompt answered {resp.status}: {answer}")
        prompt_id = answer["prompt_id"]
        async for frame in self.ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    raise JobFailed("ComfyUI closed the websocket")
                continue  # previews are binary
            if received is not None:
                received.events.append((time.monotonic(), frame.data))
            message = json.loads(frame.data)
            data = message.get("data") or {}
            if message.get("type") == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
        async with self.session.get(f"{self.url}/history/{prompt_id}") as resp:
            history = (await resp.json())[prompt_id]
        images = []
        for node_output in history["outputs"].values():
            for image in node_output.get("images", []):
                params = {"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]}
                async with self.session.get(self.url + "/view", params=params) as resp:
                    images.append(await resp.read())
        return images


def request_body(workflow: dict[str, Any]) -> bytes:
    """A request's JSON as the project's client writes it (`serverless.client.calls.body_json`:
    orjson; W3's 1.3 MB body in ~0.05 ms, where `json.dumps` takes ~4 ms)."""
    return orjson.dumps(workflow)


def b64encode(data: bytes) -> str:
    """An input's base64 for a workflow, as a client that minds its time makes it (pybase64: a
    megabyte in ~0.1 ms, where the standard library's `base64` takes ~1 ms)."""
    return pybase64.b64encode(data).decode()


def b64decode(text: str) -> bytes:
    """An output's base64 decoded and checked as the project's client decodes it
    (`serverless.client.results`: pybase64, validating): the standard library's decoder takes
    ~14 ms for W3's 4 MB on this machine, ~20 times pybase64's, and a client need not pay that."""
    return pybase64.b64decode(text, validate=True)


def _images_of(payload: dict[str, Any]) -> list[bytes]:
    if payload.get("type") != "serverless_api":
        raise JobFailed(f"{payload.get('error_code')}: {payload.get('error_message')}")
    return [b64decode(r["output"]["base64"]["content"]) for r in payload["data"]["results"]]


async def run_sync(
    session: aiohttp.ClientSession,
    app_url: str,
    workflow: dict[str, Any],
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> list[bytes]:
    """POST /api/serverless/run?output_base64=true (and `params`); returns the images' bytes."""
    async with session.post(
        app_url + RUN,
        params={"output_base64": "true", **(params or {})},
        data=request_body(workflow),
        headers=headers or {},
        timeout=NO_LIMIT,
    ) as resp:
        body = await resp.read()
    return _images_of(json.loads(body))


async def run_url(session: aiohttp.ClientSession, app_url: str, workflow: dict[str, Any]) -> list[bytes]:
    """POST /api/serverless/run?output_url=true, then GET each result's link; the images' bytes."""
    async with session.post(
        app_url + RUN, params={"output_url": "true"}, data=request_body(workflow), timeout=NO_LIMIT
    ) as resp:
        payload = json.loads(await resp.read())
    if payload.get("type") != "serverless_api":
        raise JobFailed(f"{payload.get('error_code')}: {payload.get('error_message')}")
    images = []
    for result in payload["data"]["results"]:
        async with session.get(result["output"]["url"], timeout=NO_LIMIT) as resp:
            if resp.status != 200:
                raise JobFailed(f"the link answered {resp.status}")
            images.append(await resp.read())
    return images


async def run_sse(
    session: aiohttp.ClientSession, app_url: str, workflow: dict[str, Any], received: Received | None = None
) -> list[bytes]:
    """POST /api/serverless/run?stream=true&output_base64=true, read to the end of the stream."""
    received = received if received is not None else Received()
    params = {"stream": "true", "output_base64": "true"}
    async with session.post(app_url + RUN, params=params, data=request_body(workflow), timeout=NO_LIMIT) as resp:
        if resp.status != 200:
            raise JobFailed(f"stream answered {resp.status}: {(await resp.read())[:300]!r}")
        async for line in resp.content:
            if line.startswith(b"data: "):
                received.events.append((time.monotonic(), line[6:].rstrip(b"\r\n").decode()))
    return _images_of(received.terminal)


async def run_ws(session: aiohttp.ClientSession, app_url: str, workflow: dict[str, Any]) -> list[bytes]:
    """The body over /api/serverless/ws?output_base64=true, read until the socket closes; the
    last message is the terminal payload."""
    last = None
    async with session.ws_connect(app_url + "/api/serverless/ws?output_base64=true", max_msg_size=0) as ws:
        await ws.send_str(request_body(workflow).decode())
        async for frame in ws:
            if frame.type == aiohttp.WSMsgType.TEXT:
                last = frame.data
    if last is None:
        raise JobFailed("the websocket closed without a message")
    payload = json.loads(last)
    return _images_of(payload if isinstance(payload, dict) else {})


async def open_stream(session: aiohttp.ClientSession, app_url: str, workflow: dict[str, Any]) -> aiohttp.ClientResponse:
    """Start an SSE job and return once its first event arrived; the caller closes the response."""
    resp = await session.post(app_url + RUN, params={"stream": "true"}, data=request_body(workflow), timeout=NO_LIMIT)
    if resp.status != 200:
        raise JobFailed(f"stream answered {resp.status}")
    while not (await resp.content.readline()).startswith(b"data: "):
        pass
    return resp


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]
