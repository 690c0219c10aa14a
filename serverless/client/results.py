"""What the API answers, as typed objects (pure): a run's `Result` with its `Output`s, the events
of a stream (`Event`, with `Progress` for our `serverless_progress`), and the incremental parser
of `text/event-stream` bytes."""

from __future__ import annotations

import base64
import binascii
import io
import json
import mimetypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ClientError, NotServerless, ProtocolError, from_payload

if TYPE_CHECKING:
    from PIL.Image import Image

TERMINAL_TYPES = ("serverless_api", "error")
# Statuses the API answers with its error object on every route it has: without one, the route is
# not there, so the server is another program.
NOT_OURS_STATUSES = (404, 405)

# The extension a file of each type is saved with where `mimetypes` would pick a rarer one.
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp", "image/gif": ".gif"}


def _fast_decoder() -> Callable[[str], bytes] | None:
    try:
        import pybase64
    except ImportError:  # the client alone (requirements-client.txt) need not have it
        return None
    return partial(pybase64.b64decode, validate=True)


_FAST_DECODE = _fast_decoder()


def decode_content(text: str) -> bytes:
    """An output's base64 (`base64.b64decode(text, validate=True)`, the same bytes and the same
    refusals), through pybase64 when it is installed (the server's requirements have it): a 4 MB
    output in ~0.2 ms, where the standard library takes ~14 ms. Text pybase64 refuses is left to
    the standard library, whose checks are laxer (it accepts extra padding)."""
    if _FAST_DECODE is not None:
        try:
            return _FAST_DECODE(text)
        except ValueError:
            pass
    return base64.b64decode(text, validate=True)


@dataclass(frozen=True, slots=True)
class Output:
    """One output file of a run (`data.results[i]`). `content` holds its bytes when the run asked
    for `output_base64`; `oss` and `url` say where else it is."""

    node_id: str
    batch_id: int
    type: str
    filename: str
    mime: str | None
    size: int | None
    content: bytes | None
    oss: dict[str, Any] | None
    url: str | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        """The file name to save it under: ComfyUI's, its extension matching what the bytes are
        (`mime`): a PNG converted with `output_format=jpeg` is `ComfyUI_00001_.jpg`."""
        name = Path(self.filename).name
        if not self.mime or not name or mimetypes.guess_type(name)[0] == self.mime:
            return name
        extension = EXTENSIONS.get(self.mime) or mimetypes.guess_extension(self.mime)
        return Path(name).stem + extension if extension else name

    def save(self, path: str | Path) -> Path:
        """Write the bytes to `path` (a folder: `name` inside it); returns the file."""
        if self.content is None:
            raise ValueError(f"output {self.filename} has no bytes: run with output_base64=True")
        target = Path(path)
        if target.is_dir():
            target = target / self.name
        target.write_bytes(self.content)
        return target

    def image(self) -> Image:
        """The bytes as a Pillow image (Pillow must be installed)."""
        from PIL import Image as PILImage  # optional: only callers of image() need Pillow

        if self.content is None:
            raise ValueError(f"output {self.filename} has no bytes: run with output_base64=True")
        picture = PILImage.open(io.BytesIO(self.content))
        picture.load()
        return picture


@dataclass(frozen=True, slots=True)
class Result:
    """A finished run (`{"type": "serverless_api", "data": {...}}`)."""

    prompt_id: str
    task_id: str | None
    workflow_id: str | None
    execution_time: float | None
    seeds: dict[str, dict[str, int]]
    timings: dict[str, float]
    outputs: list[Output]
    node_errors: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False)
    workflow_version: int | None = None  # which version of the hosted workflow ran


@dataclass(frozen=True, slots=True)
class Progress:
    """Our `serverless_progress` event's data."""

    state: str
    percent: float
    queue_position: int | None
    queue_size: int | None
    node_id: str | None
    node_class: str | None
    node_title: str | None
    eta_s: float | None
    elapsed_s: float | None


@dataclass(frozen=True, slots=True)
class Preview:
    """Our `serverless_preview` event's data: a sampler's picture of the image forming."""

    node_id: str | None
    mime: str
    content: bytes
    step: int | None

    @property
    def extension(self) -> str:
        return {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}.get(self.mime, "bin")


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a stream or status log: `type` and `data` of the payload, its `id` when the
    server numbered it, and `text` as received (ComfyUI's messages byte for byte)."""

    type: str
    data: Any
    text: str
    id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    @property
    def progress(self) -> Progress | None:
        return parse_progress(self.data) if self.type == "serverless_progress" else None

    @property
    def output(self) -> Output | None:
        return parse_output(self.data) if self.type == "serverless_output" else None

    @property
    def preview(self) -> Preview | None:
        if self.type != "serverless_preview" or not isinstance(self.data, dict):
            return None
        data = self.data
        step = data.get("step")
        return Preview(
            None if data.get("node") is None else str(data["node"]),
            str(data.get("mime") or "image/jpeg"),
            base64.b64decode(str(data.get("base64") or "")),
            step if isinstance(step, int) else None,
        )

    def outcome(self) -> Result:
        """The terminal payload's result; its error raised."""
        return outcome(json_object(self.text))


def parse_output(item: dict[str, Any]) -> Output:
    output = item.get("output") or {}
    raw = output.get("raw") or {}
    encoded = (output.get("base64") or {}).get("content")
    try:
        content = decode_content(encoded) if encoded else None
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"output {raw.get('filename')}: base64 content does not decode") from exc
    return Output(
        node_id=str(item.get("node_id")),
        batch_id=int(item.get("batch_id") or 0),
        type=str(output.get("type")),
        filename=str(raw.get("filename") or ""),
        mime=output.get("mime"),
        size=output.get("bytes"),
        content=content,
        oss=output.get("oss"),
        url=output.get("url"),
        raw=raw,
    )


def parse_result(payload: dict[str, Any]) -> Result:
    data = payload.get("data") or {}
    return Result(
        prompt_id=str(data.get("prompt_id")),
        task_id=data.get("task_id"),
        workflow_id=data.get("workflow_id"),
        execution_time=data.get("execution_time"),
        seeds=data.get("seeds") or {},
        timings=data.get("timings") or {},
        outputs=[parse_output(item) for item in data.get("results") or []],
        node_errors=data.get("node_errors"),
        raw=payload,
        workflow_version=data.get("workflow_version"),
    )


def parse_progress(data: dict[str, Any]) -> Progress:
    node = data.get("node") or {}
    return Progress(
        state=str(data.get("state")),
        percent=float(data.get("percent") or 0),
        queue_position=data.get("queue_position"),
        queue_size=data.get("queue_size"),
        node_id=node.get("id"),
        node_class=node.get("class_type"),
        node_title=node.get("title"),
        eta_s=data.get("eta_s"),
        elapsed_s=data.get("elapsed_s"),
    )


def json_object(text: str | bytes) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"the server answered something that is not JSON: {str(text)[:80]!r}") from exc
    if not isinstance(value, dict):
        raise ProtocolError("the server answered JSON that is not an object")
    return value


def outcome(payload: dict[str, Any], status: int | None = None) -> Result:
    """A terminal payload as a `Result`, or its error raised."""
    if payload.get("type") == "error":
        raise from_payload(payload, status)
    if payload.get("type") != "serverless_api":
        raise ProtocolError(f"not a terminal payload: type {payload.get('type')!r}")
    return parse_result(payload)


def error_of(status: int, body: bytes, where: str = "") -> ClientError:
    """The exception for an HTTP error answer to the request `where` ("GET http://…/path")."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    ours = isinstance(payload, dict) and "error_code" in payload
    if not ours and status in NOT_OURS_STATUSES:
        return NotServerless(
            f"{where or 'the server'} answered HTTP {status} without the API's error object: "
            "this is not a ComfyUI Serverless API (check the URL: --url, COMFY_SERVERLESS_URL)"
        )
    if not isinstance(payload, dict):
        payload = {"error_message": body.decode(errors="replace")[:200] or f"HTTP {status}"}
    return from_payload(payload, status)


def event_of(text: str, event_id: str | None = None) -> Event:
    payload = json_object(text)
    return Event(str(payload.get("type")), payload.get("data"), text, event_id)


@dataclass(slots=True)
class SSEParser:
    """`text/event-stream` bytes in, events out: `id:` and `data:` lines, a blank line ends an
    event; comments (`: ping`) and other fields are skipped."""

    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None
    last_id: str | None = None

    def feed(self, chunk: bytes) -> Iterator[Event]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw_line in lines:
            line = raw_line.decode().rstrip("\r")
            if not line:
                if self._data:
                    event = event_of("\n".join(self._data), self._id)
                    self.last_id = self._id or self.last_id
                    self._data, self._id = [], None
                    yield event
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                self._data.append(value)
            elif name == "id":
                self._id = value
