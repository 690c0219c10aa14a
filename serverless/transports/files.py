"""GET /api/files/{token}: an output through a signed download link (`serverless.delivery.links`).

Any instance with the same FILE_LINK_SECRET serves any link, reading the file through ComfyUI's
`/view` (on FC every instance's ComfyUI sees the shared output folder on NAS), or, on a fleet,
from Redis, where the worker that made it kept it (as served: converted) for FILE_LINK_EXPIRES seconds; nothing a caller
sends names a path: the place comes only out of the signed token. A link signed with a conversion
serves the converted file (made once, in a bounded worker thread, and kept until the link
expires: `serverless.delivery.converted`; the same bytes the job reported); one without streams
ComfyUI's answer as it comes, its `Range` forwarded, so a video seeks (206), or reads a file of
ComfyUI's folder on our disk up to LOCAL_WHOLE bytes straight from there (`ViewStream`).
"""

from __future__ import annotations

import re
import time
from functools import partial

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..comfyui.client import ComfyUI
from ..core.conversion import NO_CONVERSION
from ..delivery.links import FileLink, verify
from ..errors import ComfyUIUnavailable, NotFound, OutputError
from ..resources import Resources
from ..state import app_state

RANGE = re.compile(r"bytes=(\d*)-(\d*)")
MAX_CONVERTED_SOURCE = 512 * 1024 * 1024  # a file converted on the fly is read whole: bound it


async def download(request: Request) -> Response:
    """The file a valid link grants; 403 for a tampered or expired link, 404 when it is gone."""
    resources = app_state(request).resources
    secret = resources.settings.security.file_link_secret
    if not secret:
        raise NotFound("download links are not enabled on this instance (FILE_LINK_SECRET is not set)")
    link = verify(secret.encode(), request.path_params["token"], time.time(), request.query_params)
    range_header = request.headers.get("range")
    kept = await resources.stored_file(link.item, link.conversion)  # a fleet's worker kept it in Redis
    if kept is not None:
        return ranged(kept[0], kept[1], range_header)
    if link.conversion.active:  # converted once, bounded, kept for the link's life (`converted`)
        body, content_type = await resources.converted.get(link, partial(_source, resources))
        return ranged(body, content_type, range_header)
    if resources.settings.fleet.role == "gateway":  # no ComfyUI to read it from
        raise _gone(link)
    return ViewStream(resources.comfy, link, range_header)


async def _source(resources: Resources, link: FileLink) -> tuple[bytes, str]:
    """The linked file, read whole (bounded) for its conversion: the original a fleet's worker
    kept (GenStudio asks conversions after the job), else ComfyUI's."""
    original = await resources.stored_file(link.item, NO_CONVERSION)
    if original is not None:
        return original
    if resources.settings.fleet.role == "gateway":
        raise _gone(link)
    comfy = resources.comfy
    chunks: list[bytes] = []
    size = 0
    async with comfy.view(link.item) as view:
        _check(view.status, link)
        content_type = view.headers.get("Content-Type", "application/octet-stream")
        async for chunk in view.chunks:
            size += len(chunk)
            if size > MAX_CONVERTED_SOURCE:
                raise OutputError(f"{link.item['filename']} is too big to convert on the fly")
            chunks.append(chunk)
    return b"".join(chunks), content_type


def _gone(link: FileLink) -> NotFound:
    return NotFound(f"output {link.item['filename']} is no longer kept (kept FILE_LINK_EXPIRES seconds)")


def _check(status: int, link: FileLink) -> None:
    if status == 404:
        raise NotFound(f"output {link.item['filename']} is no longer there")
    if status >= 500:
        raise ComfyUIUnavailable(f"ComfyUI answered HTTP {status} for output {link.item['filename']}")
    if status not in (200, 206, 416):
        raise OutputError(f"ComfyUI answered HTTP {status} for output {link.item['filename']}")


def ranged(body: bytes, content_type: str, range_header: str | None) -> Response:
    """`body` whole (200), or the one byte range asked (206), or 416 for a range past its end."""
    headers = {"Accept-Ranges": "bytes"}
    match = RANGE.fullmatch(range_header.strip()) if range_header else None
    if match is None or not (match[1] or match[2]):
        return Response(body, media_type=content_type, headers=headers)  # no range, or several: all of it
    size = len(body)
    if match[1]:
        start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
    else:
        start, end = max(0, size - int(match[2])), size - 1
    if start >= size or start > end:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return Response(body[start : end + 1], status_code=206, media_type=content_type, headers=headers)


LOCAL_WHOLE = 8 * 1024 * 1024  # a file on our disk up to this size is read whole, not fetched through `/view`


class ViewStream(Response):
    """ComfyUI's `/view` answer passed on as it streams (status, type, length, range); a file in
    ComfyUI's folder on our disk (co-located, as on FC) up to LOCAL_WHOLE bytes is read from
    there instead, as `/view` would serve it, without a round trip through ComfyUI."""

    def __init__(self, comfy: ComfyUI, link: FileLink, range_header: str | None) -> None:
        self.comfy = comfy
        self.link = link
        self.range_header = range_header
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "HEAD":
            local = await self.comfy.read_local(self.link.item, LOCAL_WHOLE)
            if local is not None and local.content is not None:
                content_type = local.content_type or "application/octet-stream"
                await ranged(local.content, content_type, self.range_header)(scope, receive, send)
                return
        # Raised before the response starts, an error is still answered by the app's handlers.
        async with self.comfy.view(self.link.item, self.range_header) as view:
            _check(view.status, self.link)
            headers = [(key.lower().encode(), value.encode()) for key, value in view.headers.items()]
            await send({"type": "http.response.start", "status": view.status, "headers": headers})
            if scope.get("method") != "HEAD":
                async for chunk in view.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
