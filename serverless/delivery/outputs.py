"""Outputs: what a job produced, read from ComfyUI (converted, handed to OSS) as soon as it is known.

`list_outputs` is pure: history outputs into references, in history order. `OutputCollector`
starts reading a file when ComfyUI reports it (`executed`), overlapping the rest of the job, reads
each file once, at most N at a time, tells the job of each as it is done (its early
`serverless_output` event) and renders the contract's `results` entries at the end.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pybase64

from ..comfyui.client import ComfyUI, Fetched
from ..core.conversion import NO_CONVERSION, Conversion
from ..core.jsontext import Spliced
from ..core.media import mime_for_name, sniff
from ..errors import OutputError, ServerlessError
from .convert import Converter
from .recent import UP_TO, RecentFiles
from .storage import Source

CONCURRENCY = 8  # a job's outputs read (and uploaded) at once
INLINE_ENCODE_BYTES = 64 * 1024  # encoded in the event loop up to this size (less than a thread trip)

FileKey = tuple[str, str, str]
# Told of each output as soon as it is read (and uploaded): its result item, base64 left out.
ReadyCallback = Callable[[dict[str, Any]], None]
# The signed download link of an output (a history item).
Linker = Callable[[Mapping[str, Any]], str]
# Uploads an output (its bytes, or its file on our disk streamed; size, file name, mime) and
# returns the contract's `oss` object.
Uploader = Callable[[Source, int, str, str], Awaitable[dict[str, Any]]]
# Keeps a linked output's bytes (as served: converted) where every gateway of a fleet reads them.
Keeper = Callable[[Mapping[str, Any], bytes, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class OutputRef:
    """One file of one node's output list, as history (or `executed`) names it."""

    node_id: str
    kind: str
    batch_id: int
    item: Mapping[str, Any]

    @property
    def key(self) -> FileKey:
        return file_key(self.item)


@dataclass(frozen=True, slots=True)
class OutputFile:
    """A file read from ComfyUI: its type and size (the bytes themselves are not kept), its
    base64 when the caller asked for it, and where it went in OSS if it was uploaded."""

    fetched: Fetched
    oss: dict[str, Any] | None
    mime: str
    encoded: bytes | None = None  # base64, as ASCII bytes


def file_key(item: Mapping[str, Any]) -> FileKey:
    return (str(item.get("type", "")), str(item.get("subfolder", "") or ""), str(item.get("filename", "")))


def filepath(item: Mapping[str, Any]) -> str:
    """`type/subfolder/filename`, or `type/filename` without subfolder (compat `raw.filepath`)."""
    kind, subfolder, name = file_key(item)
    return "/".join(part for part in (kind or "output", subfolder, name) if part)


def list_outputs(outputs: Mapping[str, Any]) -> list[OutputRef]:
    """Every file entry (a dict with a `filename`) of every node and output key, in order."""
    refs = []
    for node_id, node_output in outputs.items():
        if not isinstance(node_output, dict):
            continue
        for kind, items in node_output.items():
            if not isinstance(items, list):
                continue
            for index, item in enumerate(items):
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    refs.append(OutputRef(str(node_id), str(kind), index, item))
    return refs


class OutputCollector:
    """Reads (converts, uploads) a job's outputs concurrently, each file once; tells `on_ready`
    of each as soon as it is done (the result item, without its base64 content)."""

    def __init__(
        self,
        comfy: ComfyUI,
        *,
        with_content: bool,
        uploader: Uploader | None,
        concurrency: int = CONCURRENCY,
        empty_oss: dict[str, Any],
        conversion: Conversion = NO_CONVERSION,
        on_ready: ReadyCallback | None = None,
        link: Linker | None = None,
        keep: Keeper | None = None,
        converter: Converter | None = None,
        recent: RecentFiles | None = None,
    ) -> None:
        self._comfy = comfy
        self._converter = converter or Converter()
        # An upload alone needs no bytes in memory when the file is on our disk: it is streamed.
        self._needs_content = with_content or conversion.active or keep is not None
        self._with_content = self._needs_content or uploader is not None
        self._base64 = with_content
        self._uploader = uploader
        self._limit = asyncio.Semaphore(concurrency)
        self._tasks: dict[FileKey, asyncio.Task[OutputFile]] = {}
        self._empty_oss = empty_oss
        self._conversion = conversion
        self._on_ready = on_ready
        self._link = link
        self._keep = keep
        # A box's outputs of ComfyUI's API: read whole (up to UP_TO bytes) in the trip that
        # tells their size, and kept a moment for the client's `/view` (`recent`).
        self._recent = recent if not self._with_content and not conversion.active else None

    def prefetch(self, output: Mapping[str, Any], node_id: str) -> None:
        """Start reading the files of an `executed` message's output."""
        for ref in list_outputs({node_id: output}):
            self._start(ref)

    def _start(self, ref: OutputRef) -> asyncio.Task[OutputFile]:
        task = self._tasks.get(ref.key)
        if task is None:
            task = asyncio.create_task(self._process(ref))
            self._tasks[ref.key] = task
        return task

    async def _process(self, ref: OutputRef) -> OutputFile:
        async with self._limit:
            file = await self._read(ref.item)
        if self._on_ready is not None:
            self._on_ready(self._render(ref, file, self._base64, early=True))
        return file

    async def _read(self, item: Mapping[str, Any]) -> OutputFile:
        if self._uploader is not None and not self._needs_content:
            # Uploaded from disk: ComfyUI's own file when it is on this machine, else a copy of
            # /view spooled to a temporary file (the bucket client streams it, in parts).
            name = str(item.get("filename", "")) or "output"
            local = await self._comfy.local_output(item)
            if local is not None:
                return await self._stream(local, name)
            async with self._comfy.spooled_output(item) as spooled:
                return await self._stream(spooled, name)
        name = str(item.get("filename", "")) or "output"
        if self._recent is not None:
            reading, read = self._recent.reading(item), None
            try:
                read = await self._comfy.read_local(item, UP_TO)
            finally:
                content = read.content if read is not None else None
                kept = (
                    (content, read.content_type or "application/octet-stream") if read and content is not None else None
                )
                self._recent.done_reading(item, reading, kept)
            if read is not None and read.content is not None:
                mime = _mime(Fetched(None, read.content_type, read.size), name)  # as a read of its size tells it
                return OutputFile(Fetched(None, None, read.size), None, mime)
        # The base64 of a file read from our disk is made in the thread that read it (one trip);
        # a converted file's, once it is converted.
        encode = pybase64.b64encode if self._base64 and not self._conversion.active else None
        fetched = await self._comfy.fetch(item, self._with_content, encode)
        content, mime, size, encoded = fetched.content, _mime(fetched, name), fetched.size, fetched.encoded
        del fetched  # the original is dropped as soon as it is converted
        if content is not None:
            converted = await self._converter.convert(content, self._conversion)
            if converted is not None:
                # `raw` keeps ComfyUI's name; mime, size and the OSS object's extension follow the new file.
                content, mime = converted.content, converted.mime
                name = str(PurePosixPath(name).with_suffix("." + converted.extension))
        if self._keep is not None and content is not None:
            await self._keep(item, content, mime)
        oss = None
        if self._uploader is not None and content is not None:
            oss = await self._uploader(content, len(content), name, mime)
        if self._base64 and content is not None and encoded is None:
            # pybase64 (SIMD, the GIL released while it encodes): megabytes in a fraction of a
            # millisecond, where binascii took milliseconds holding the GIL; still off the loop.
            small = len(content) <= INLINE_ENCODE_BYTES
            encoded = pybase64.b64encode(content) if small else await asyncio.to_thread(pybase64.b64encode, content)
        size = len(content) if content is not None else size
        # Keep only the base64 (spliced into the JSON later, never copied into a str): a big
        # output is held at most twice at once, while it is being encoded.
        return OutputFile(Fetched(None, None, size), oss, mime, encoded)

    async def _stream(self, path: Path, name: str) -> OutputFile:
        """Upload a file from ComfyUI's folder without reading it whole: its type from its first
        bytes, its size from the disk; the storage streams it (in parts when big)."""
        assert self._uploader is not None
        try:
            head, size = await asyncio.to_thread(_head, path)
        except OSError as exc:
            raise OutputError(f"output {name} could not be read: {exc.strerror}") from exc
        sniffed = sniff(head)
        mime = sniffed[1] if sniffed else mime_for_name(name)
        oss = await self._uploader(path, size, name, mime)
        return OutputFile(Fetched(None, None, size), oss, mime)

    async def results(self, refs: list[OutputRef], want_base64: bool) -> list[dict[str, Any]]:
        """The contract's `results` for `refs`, waiting for every file; OutputError on failure,
        with the results that did succeed in `raw`."""
        tasks = [self._start(ref) for ref in refs]
        if not all(task.done() for task in tasks):  # read meanwhile (`prefetch`): no turn of the loop
            await asyncio.wait(tasks)
        results, failures = [], []
        for ref, task in zip(refs, tasks, strict=True):
            error = task.exception()
            if error is not None:
                failures.append(error)
                continue
            results.append(self._render(ref, task.result(), want_base64))
        if failures:
            first = failures[0]
            message = first.message if isinstance(first, ServerlessError) else repr(first)
            raise OutputError(f"{len(failures)} of {len(refs)} outputs failed: {message}", raw={"results": results})
        return results

    def _render(self, ref: OutputRef, file: OutputFile, want_base64: bool, early: bool = False) -> dict[str, Any]:
        """One `results` entry; `early` (a `serverless_output` event) leaves the base64 content
        to the terminal payload, which carries it once."""
        content: dict[str, Any] = {"content": None}
        if want_base64 and file.encoded is not None:
            content = {"content": None, "in_result": True} if early else {"content": Spliced(file.encoded)}
        output: dict[str, Any] = {
            "type": ref.kind,
            "raw": {**ref.item, "filepath": filepath(ref.item)},
            "base64": content,
            "oss": file.oss or dict(self._empty_oss),
            "mime": file.mime,
            "bytes": file.fetched.size,
        }
        if self._link is not None:
            output["url"] = self._link(ref.item)
        return {"node_id": ref.node_id, "batch_id": ref.batch_id, "index": ref.batch_id, "output": output}

    async def aclose(self) -> None:
        """Cancel whatever is still running (a failed or cancelled job)."""
        pending = [task for task in self._tasks.values() if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            return
        for task in self._tasks.values():  # all done (a job's usual end): their errors are seen here
            if not task.cancelled():
                task.exception()


def _head(path: Path) -> tuple[bytes, int]:
    """A file's first bytes (enough to sniff its type) and its size (blocking)."""
    with open(path, "rb") as f:
        return f.read(64), os.fstat(f.fileno()).st_size


def _mime(fetched: Fetched, name: str) -> str:
    sniffed = sniff(fetched.content) if fetched.content else None
    if sniffed:
        return sniffed[1]
    if fetched.content_type and fetched.content_type != "application/octet-stream":
        return fetched.content_type.split(";")[0].strip()
    return mime_for_name(name)
