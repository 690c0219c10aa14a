"""A box's newest outputs of ComfyUI's own API, kept in memory for a moment (`RecentFiles`).

A client of ComfyUI's API asks `/view` for each image right after `/history` names it. On one box
the job that made it has just read the file (its output collector: the result's size and type),
in a trip to a worker thread; `/view` then answers from those bytes, without a second trip (a
thread's turn is milliseconds on a loaded machine) nor a read of the disk. Only files up to
UP_TO bytes are kept, KEEP_SECONDS at most and MAX_BYTES in all (the oldest go first): a file not
kept (bigger, older, pushed out) is read from ComfyUI's folder as before. A `/view` that comes
while the job's read is under way waits for it rather than reading the file again. A fleet keeps
its workers' outputs in Redis instead (`Resources.stored_file`).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

FileKey = tuple[str, str, str]

UP_TO = 8 * 1024 * 1024  # bytes of one file kept (the size `/view` reads whole from our disk)
MAX_BYTES = 64 * 1024 * 1024  # bytes kept in all
KEEP_SECONDS = 60.0  # how long a file is kept after its job read it


class RecentFiles:
    """Outputs by their history item (`type`, `subfolder`, `filename`): bytes and content type,
    as `/view` serves them from ComfyUI's folder."""

    def __init__(self, max_bytes: int = MAX_BYTES, keep_seconds: float = KEEP_SECONDS) -> None:
        self.max_bytes = max_bytes
        self.keep_seconds = keep_seconds
        self.size = 0
        self._files: OrderedDict[FileKey, tuple[bytes, str, float]] = OrderedDict()
        self._reading: dict[FileKey, asyncio.Future[None]] = {}  # reads under way, settled when done

    def reading(self, item: Mapping[str, Any]) -> asyncio.Future[None]:
        """A job begins reading a file: `done_reading` settles what this returns."""
        future = asyncio.get_running_loop().create_future()
        self._reading[file_key(item)] = future
        return future

    def done_reading(
        self, item: Mapping[str, Any], future: asyncio.Future[None], read: tuple[bytes, str] | None
    ) -> None:
        """The read `future` stands for ended: its bytes and content type kept (`put`), None when
        it read nothing to keep; whoever waits for it goes on."""
        if read is not None:
            self.put(item, *read)
        key = file_key(item)
        if self._reading.get(key) is future:
            del self._reading[key]
        if not future.done():
            future.set_result(None)

    async def wait_get(self, item: Mapping[str, Any]) -> tuple[bytes, str] | None:
        """`get`, after the read of the file under way, if there is one."""
        found = self.get(item)
        future = self._reading.get(file_key(item)) if found is None else None
        if future is not None:
            await asyncio.shield(future)  # a caller that goes away does not end the job's read
            found = self.get(item)
        return found

    def put(self, item: Mapping[str, Any], content: bytes, content_type: str) -> None:
        """Keep a file a job read (not one over UP_TO bytes or MAX_BYTES)."""
        if len(content) > min(UP_TO, self.max_bytes):
            return
        key = file_key(item)
        self._drop(key)
        self._files[key] = (content, content_type, time.monotonic() + self.keep_seconds)
        self.size += len(content)
        while self.size > self.max_bytes:
            self._drop(next(iter(self._files)))

    def get(self, item: Mapping[str, Any]) -> tuple[bytes, str] | None:
        """The file's bytes and content type while it is kept; None otherwise."""
        now = time.monotonic()
        while self._files:  # the oldest first: those past their time leave
            oldest = next(iter(self._files))
            if self._files[oldest][2] > now:
                break
            self._drop(oldest)
        found = self._files.get(file_key(item))
        return (found[0], found[1]) if found is not None else None

    def _drop(self, key: FileKey) -> None:
        found = self._files.pop(key, None)
        if found is not None:
            self.size -= len(found[0])


def file_key(item: Mapping[str, Any]) -> FileKey:
    """A history item's place (`outputs.file_key`)."""
    return (str(item.get("type", "")), str(item.get("subfolder", "") or ""), str(item.get("filename", "")))
