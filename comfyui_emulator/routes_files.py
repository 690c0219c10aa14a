"""File endpoints: `GET /view` (with `preview`/`channel` conversions) and `POST /upload/image`."""

from __future__ import annotations

import asyncio
import hashlib
import io
import mimetypes
import os
from pathlib import Path

from aiohttp import web
from PIL import Image

from .folders import Folders
from .state import EMULATOR

# Served as downloads rather than rendered, as ComfyUI does.
UNSAFE_TYPES = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}


async def view(request: web.Request) -> web.StreamResponse:
    """Serve a file from input/output/temp; 400 for `..` or a bad type, 404 when missing."""
    folders = request.app[EMULATOR].folders
    if request.app[EMULATOR].config.view_delay:  # fault knob (hooks.py)
        await asyncio.sleep(request.app[EMULATOR].config.view_delay)
    if request.app[EMULATOR].config.view_status:  # fault knob (hooks.py)
        return web.Response(status=int(request.app[EMULATOR].config.view_status))
    query = request.rel_url.query
    if "filename" not in query:
        return web.Response(status=404)
    name, folder = _annotated(folders, query["filename"])
    if not name or name[0] == "/" or ".." in name:
        return web.Response(status=400)
    folder = folder or folders.by_type(query.get("type", "output"))
    if folder is None:
        return web.Response(status=400)
    if "subfolder" in query:
        full = os.path.join(folder, query["subfolder"])
        if os.path.commonpath((os.path.abspath(full), folder)) != folder:
            return web.Response(status=403)
        folder = full
    name = os.path.basename(name)
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return web.Response(status=404)
    disposition = {"Content-Disposition": f'filename="{name}"'}
    if "preview" in query or query.get("channel") in ("rgb", "a"):
        body, content_type = _converted(path, query.get("preview"), query.get("channel", ""))
        return web.Response(body=body, content_type=content_type, headers=disposition)
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if content_type in UNSAFE_TYPES:
        content_type = "application/octet-stream"
    return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})


def _annotated(folders: Folders, name: str) -> tuple[str, str | None]:
    """Split ComfyUI's `name [output]` style suffix off a file name."""
    for type_name in ("output", "input", "temp"):
        suffix = f"[{type_name}]"
        if name.endswith(suffix):
            return name[: -len(suffix) - 1], folders.by_type(type_name)
    return name, None


def _converted(path: str, preview: str | None, channel: str) -> tuple[bytes, str]:
    """A webp/jpeg preview, or the PNG of the RGB or alpha channel."""
    buffer = io.BytesIO()
    with Image.open(path) as source:
        img: Image.Image = source
        if preview is not None:
            parts = preview.split(";")
            kind = parts[0] if parts[0] in ("webp", "jpeg") and "a" not in channel else "webp"
            quality = int(parts[-1]) if parts[-1].isdigit() else 90
            if kind == "jpeg" or channel == "rgb":
                img = img.convert("RGB")
            img.save(buffer, format=kind, quality=quality)
            return buffer.getvalue(), f"image/{kind}"
        if channel == "rgb":
            img.convert("RGB").save(buffer, format="PNG")
        else:
            alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
            only_alpha = Image.new("RGBA", img.size)
            only_alpha.putalpha(alpha)
            only_alpha.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


async def upload_image(request: web.Request) -> web.Response:
    """Store an uploaded image; a same-name file with other bytes gets a ` (1)` style suffix."""
    folders = request.app[EMULATOR].folders
    post = await request.post()
    image = post.get("image")
    if not isinstance(image, web.FileField) or not image.filename:
        return web.Response(status=400)
    upload_type = str(post.get("type") or "input")
    base = folders.by_type(upload_type)
    if base is None:
        raise web.HTTPInternalServerError()  # ComfyUI crashes on unknown types
    subfolder = str(post.get("subfolder", ""))
    folder = os.path.join(base, os.path.normpath(subfolder))
    filename = image.filename
    if not folders.inside(base, os.path.join(folder, filename)):
        return web.Response(status=400)
    os.makedirs(folder, exist_ok=True)
    overwrite = str(post.get("overwrite")) in ("true", "1")
    filename = _store(folder, filename, image.file.read(), overwrite)
    return web.json_response({"name": filename, "subfolder": subfolder, "type": upload_type})


def _store(folder: str, filename: str, data: bytes, overwrite: bool) -> str:
    """Write an upload unless the same bytes are already there; returns the name used."""
    if not overwrite:
        filename, duplicate = _free_name(folder, filename, data)
        if duplicate:
            return filename
    Path(folder, filename).write_bytes(data)
    return filename


def _free_name(folder: str, filename: str, data: bytes) -> tuple[str, bool]:
    """(name to use, True if a file with those very bytes already has it)."""
    stem, ext = os.path.splitext(filename)
    digest = hashlib.sha256(data).digest()
    candidate, counter = filename, 1
    while os.path.exists(os.path.join(folder, candidate)):
        if hashlib.sha256(Path(folder, candidate).read_bytes()).digest() == digest:
            return candidate, True
        candidate = f"{stem} ({counter}){ext}"
        counter += 1
    return candidate, False


ROUTES = [
    ("GET", "/view", view),
    ("POST", "/upload/image", upload_image),
]
