"""ComfyUI's file and information routes on our paths: `/view`, `/upload/image|mask`,
`/object_info`, `/system_stats`, `/embeddings`, `/models` (a worker's ComfyUI's answers: on a
fleet, what workers publish in Redis)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..core.conversion import NO_CONVERSION
from ..core.media import sniff
from ..delivery.convert import masked
from ..delivery.links import FileLink
from ..errors import InvalidParams, NotFound
from ..inputs import verify
from ..resources import Resources
from ..state import app_state
from ..transports.files import ViewStream, ranged
from ..transports.http import read_body
from .native import inputs
from .uploads import form_fields

log = logging.getLogger(__name__)

FORM_OVERHEAD = 64 * 1024
BIG_FORM = 256 * 1024
KEPT_WAIT = 3.0  # seconds a gateway's /view waits for an output a worker is about to keep


async def view(request: Request) -> Response:
    """GET /view?filename=&subfolder=&type=: where a fleet's worker kept it, else read through
    this instance's ComfyUI (a gateway has none: 404)."""
    resources = app_state(request).resources
    query = request.query_params
    filename = query.get("filename")
    if not filename:
        return Response(status_code=404)
    item = {"filename": filename, "subfolder": query.get("subfolder", ""), "type": query.get("type", "output")}
    if any(part in ("..", "") for part in filename.split("/")) or filename.startswith("/"):
        return Response(status_code=400)
    if item["type"] == "input" and not item["subfolder"]:  # an upload a fleet keeps apart from ComfyUI
        staged = await inputs(resources).read(filename)
        if staged is not None:
            return ranged(staged, sniffed_mime(staged), request.headers.get("range"))
    return await serve_file(resources, item, request.headers.get("range"), request.method == "HEAD")


def sniffed_mime(data: bytes) -> str:
    sniffed = sniff(data)
    return sniffed[1] if sniffed is not None else "application/octet-stream"


async def serve_file(
    resources: Resources, item: dict[str, str], range_header: str | None, head: bool = False
) -> Response:
    """An output (or input) file: where a fleet's worker kept it, else through this instance's
    ComfyUI (on one box, an output its job has just read: from memory); a gateway has none (404)."""
    kept = None if head else await resources.recent_output(item)  # a HEAD gets ComfyUI's own answer, as before
    if kept is None:
        kept = await resources.stored_file(item, NO_CONVERSION)
    if kept is None and resources.settings.fleet.role == "gateway":
        kept = await _kept_soon(resources, item)
    if kept is not None:
        return ranged(kept[0], kept[1], range_header)
    if resources.settings.fleet.role == "gateway":
        raise NotFound(f"{item['filename']} is not kept here (outputs are kept FILE_LINK_EXPIRES seconds)")
    return ViewStream(resources.comfy, FileLink(item, 0, NO_CONVERSION), range_header)


async def _kept_soon(resources: Resources, item: dict[str, str]) -> tuple[bytes, str] | None:
    """A worker keeps an output a moment after ComfyUI's `executed` message names it, which a
    client may ask `/view` for at once (ComfyUI's editor does: ComfyUI itself has saved the file
    by then): on a gateway, a file not kept yet is waited for, up to KEPT_WAIT seconds."""
    deadline = time.monotonic() + KEPT_WAIT
    pause = 0.01
    while time.monotonic() < deadline:
        await asyncio.sleep(pause)
        kept = await resources.stored_file(item, NO_CONVERSION)
        if kept is not None:
            return kept
        pause = min(pause * 2, 0.2)
    return None


async def upload(request: Request) -> Response:
    """POST /upload/image and /upload/mask: the multipart field `image`, staged under its content
    hash -> `{"name", "subfolder": "", "type": "input"}`. A mask with `original_ref` (a staged
    input) is that image with the mask's alpha, as ComfyUI makes it."""
    resources = app_state(request).resources
    settings = resources.settings
    limit = min(settings.inputs.max_body_bytes, 2 * settings.inputs.max_bytes + FORM_OVERHEAD)
    body = await read_body(request, limit, settings.inputs.timeout)
    content_type = request.headers.get("content-type", "")
    if len(body) < BIG_FORM:
        fields = form_fields(body, content_type)
    else:
        fields = await asyncio.to_thread(form_fields, body, content_type)
    data = fields.get("image")
    if not data:
        return Response(status_code=400)
    if request.url.path.endswith("/mask") and fields.get("original_ref"):
        original = await _original(resources, fields["original_ref"])
        data = await asyncio.to_thread(masked, original, data, verify.MAX_PIXELS)
    name = await inputs(resources).stage(data)
    log.info("ComfyUI upload staged as %s (%d bytes)", name, len(data))
    return JSONResponse({"name": name, "subfolder": "", "type": "input"})


async def _original(resources: Resources, ref: bytes) -> bytes:
    """The image a mask's `original_ref` names (`{"filename", "subfolder", "type"}`)."""
    try:
        item = json.loads(ref)
        filename = str(item["filename"])
    except (ValueError, KeyError, TypeError):
        raise InvalidParams("original_ref must be JSON naming the image: {filename, subfolder, type}") from None
    if "/" in filename or filename in (".", ".."):
        raise InvalidParams("original_ref names a file by its name only")
    staged = await inputs(resources).read(filename)
    if staged is not None:
        return staged
    if resources.settings.fleet.role == "gateway":
        raise NotFound(f"{filename} is not an input staged here")
    item = {
        "filename": filename,
        "subfolder": str(item.get("subfolder") or ""),
        "type": str(item.get("type") or "input"),
    }
    fetched = await resources.comfy.fetch(item, with_content=True)
    if fetched.content is None:
        raise NotFound(f"{filename} is not in ComfyUI's {item['type']} folder")
    return fetched.content


async def object_info(request: Request) -> Response:
    """GET /object_info[/{node_class}]: a worker's ComfyUI's (this instance's own on one box)."""
    info = await app_state(request).resources.workflows.object_info.get()
    node_class = request.path_params.get("node_class")
    if node_class is None:
        return JSONResponse(info)
    return JSONResponse({node_class: info[node_class]} if node_class in info else {})


async def comfyui_info(request: Request) -> Response:
    """GET /system_stats, /embeddings, /models, /models/{folder}: as a worker's ComfyUI answers."""
    resources = app_state(request).resources
    path = request.url.path.removeprefix(request.scope.get("root_path", "")).removeprefix("/api")
    return JSONResponse(await read_info(resources, path))


async def read_info(resources: Resources, path: str) -> Any:
    if resources.settings.fleet.role == "gateway" and resources.redis is not None:
        return await resources.redis.comfyui_info(path)
    return await resources.comfy.read_info(path)
