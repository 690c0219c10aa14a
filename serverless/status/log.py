"""The status log on the shared disk: `<STATUS_DIR>/<task_id>`, one JSON payload per line.

Any instance may write a task's log and any may read it. Appends are single `write` calls on a file
opened with O_APPEND, followed by fsync; a process killed mid-write can leave at most one torn
line, which readers skip and the next writer first terminates. All file I/O runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..core.request import validate_task_id
from ..errors import ComfyUIUnavailable, InvalidParams
from ..jobs.feed import Feed

log = logging.getLogger(__name__)

TERMINAL_TYPES = ("serverless_api", "error")
BATCH_INTERVAL = 0.05  # seconds between durable appends of one job's events
BIG_LINE = 1 << 20  # lines from this size on are written without being copied into a batch


class StatusLog:
    """The folder of status logs."""

    def __init__(self, directory: Path, stale_after: float) -> None:
        self.directory = directory
        self.stale_after = stale_after

    def path(self, task_id: str) -> Path:
        """The log of a task; the id is validated, and the path must stay inside the folder."""
        validate_task_id(task_id)
        path = self.directory / task_id
        if path.parent != self.directory:
            raise InvalidParams("task id does not name a file in the status folder")
        return path

    # -- writing -----------------------------------------------------------------------------

    def _append(self, path: Path, lines: list[bytes]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            small = bytearray()
            if os.fstat(fd).st_size and not _ends_with_newline(path):
                small += b"\n"  # a killed writer left a torn line: close it off first
            for data in lines:
                if len(data) < BIG_LINE:
                    small += data + b"\n"
                    continue
                # A big result (base64 outputs) is written as it is, not copied into a batch.
                _write_all(fd, small)
                small.clear()
                _write_all(fd, data)
                small += b"\n"
            _write_all(fd, small)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _touch(self, path: Path) -> None:
        try:
            os.utime(path)
        except FileNotFoundError:
            pass

    def _count(self, path: Path) -> int:
        return len(self._read(path))

    async def count(self, task_id: str) -> int:
        """How many payloads the log holds (earlier attempts of the same task)."""
        return await asyncio.to_thread(self._count, self.path(task_id))

    async def record(self, task_id: str, feed: Feed) -> None:
        """Append every event of `feed` until its terminal payload, at most one durable append per
        BATCH_INTERVAL (the terminal payload at once); refresh the file's time while the job is
        silent so readers know its owner lives. Whatever fails, the terminal payload is tried."""
        path = self.path(task_id)
        heartbeat = max(self.stale_after / 4, 0.05)
        pending: list[bytes] = []
        loop = asyncio.get_running_loop()
        next_write = loop.time() + BATCH_INTERVAL  # a short job is then one append, its terminal included
        try:
            async for event in feed.follow(idle=heartbeat, pinned=True):
                if event is None:
                    await asyncio.to_thread(self._touch, path)
                    continue
                pending.append(event.data)
                if event.seq != feed.last_seq:
                    continue  # more is ready: take it into this batch
                if not event.terminal and loop.time() < next_write:
                    with contextlib.suppress(TimeoutError):  # gather more, but never hold back the end
                        await asyncio.wait_for(feed.wait(), next_write - loop.time())
                    if feed.last_seq != event.seq:
                        continue
                await asyncio.to_thread(self._append, path, pending)
                pending = []
                next_write = loop.time() + BATCH_INTERVAL
        except Exception as exc:  # disk trouble or a bug: the log must still end with its terminal
            log.error("status log of task_id=%s could not follow the job (%s); writing its terminal payload",
                      task_id, exc)
            terminal = await feed.wait()
            try:
                await asyncio.to_thread(self._append, path, [terminal.data])
            except OSError as again:
                log.error("status log of task_id=%s could not be written: %s", task_id, again)

    # -- reading -----------------------------------------------------------------------------

    def _read(self, path: Path) -> list[Any]:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        items = []
        for line in raw.split(b"\n"):
            try:
                items.append(json.loads(line))
            except ValueError:
                continue  # a torn line (a writer killed mid-append) or an empty one
        return items

    def _read_with_liveness(self, path: Path, after: int) -> list[Any]:
        items = self._read(path)
        if items and not _is_terminal(items[-1]):
            try:
                silent_for = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                silent_for = 0.0
            if silent_for > self.stale_after:
                lost = ComfyUIUnavailable(
                    f"instance lost: the job's log has had no news for {silent_for:.0f}s and no result",
                    raw={"silent_s": round(silent_for, 1)},
                )
                items.append(lost.to_payload())
        return items[after:]

    async def read(self, task_id: str, after: int = 0) -> list[Any]:
        """The payloads after the first `after`; `[]` for an unknown task. A log without a
        terminal payload whose owner has been silent past `stale_after` ends with an error."""
        return await asyncio.to_thread(self._read_with_liveness, self.path(task_id), after)

    # -- retention ---------------------------------------------------------------------------

    def _remove_older_than(self, seconds: float) -> int:
        cutoff, removed = time.time() - seconds, 0
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    async def prune_forever(self, retention_days: float, every: float = 3600.0) -> None:
        """Remove logs older than the retention, now and then every `every` seconds."""
        while True:
            removed = await asyncio.to_thread(self._remove_older_than, retention_days * 86400)
            if removed:
                log.info("removed %d status log(s) older than %g days", removed, retention_days)
            await asyncio.sleep(every)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _is_terminal(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") in TERMINAL_TYPES



def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
