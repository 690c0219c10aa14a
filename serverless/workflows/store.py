"""The hosted workflows' folder on the shared disk: one `<workflow_id>.json` per workflow.

Every instance reads the folder itself, on each call (no cache), so a workflow written by one
instance is seen by all at once; files dropped in by hand are served the same way. A workflow
registered with an API key is stored as `{"owner": <key digest>, "shared": bool, "prompt": {...}}`:
it is that key's (`Stored.visible_to`, `Stored.writable_by`); one without an owner (registered
without keys, or dropped in by hand) is everyone's to read and run, and nobody's to change
through a key. A write goes
to a temporary file that is synced and then renamed over the old one, so a reader sees the old
workflow or the new, never half of one. File I/O runs in a thread (the folder is on NAS).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..core.request import TASK_ID_RE, is_wrapper
from ..errors import Conflict, InvalidParams, NotFound

SUFFIX = ".json"


def validate_workflow_id(workflow_id: str) -> str:
    """A workflow id names a file: the task id rule, so it can never escape the folder."""
    if not TASK_ID_RE.fullmatch(workflow_id) or workflow_id in (".", ".."):
        raise InvalidParams(
            "workflow id must be 1-128 characters of letters, digits, '.', '_' or '-' (and not '.' or '..')",
            raw={"workflow_id": workflow_id[:200]},
        )
    return workflow_id


@dataclass(frozen=True, slots=True)
class Stored:
    """A workflow as read from the folder."""

    workflow_id: str
    workflow: dict[str, Any]
    modified: float
    owner: str | None = None  # the registering API key's digest (serverless.auth); None: nobody's
    shared: bool = False  # other keys may read and run it too
    size: int = 0  # bytes of its file
    version: tuple[int, int, int] = (0, 0, 0)  # the file's (inode, mtime_ns, size): changes with each write
    by: str | None = None  # audit: the label of the API key that registered or changed it last
    at: float | None = None  # audit: when (Unix time)

    def visible_to(self, caller: str | None) -> bool:
        """Whether `caller` (None: keys are off) may read and run it."""
        return caller is None or self.owner is None or self.shared or hmac.compare_digest(self.owner, caller)

    def writable_by(self, caller: str | None) -> bool:
        """Whether `caller` may replace or delete it: its owner only (anyone, keys off)."""
        return caller is None or (self.owner is not None and hmac.compare_digest(self.owner, caller))

    @property
    def modified_iso(self) -> str:
        return datetime.fromtimestamp(self.modified, UTC).isoformat().replace("+00:00", "Z")


PARSED_KEPT = 32  # parsed workflows kept, by file version: a big one is not parsed again per call


class WorkflowStore:
    """The folder (`WORKFLOWS_DIR`); created on the first write. What a file held is kept parsed
    for as long as the file is unchanged (same inode, mtime and size): readers share it, and
    never change it (a run merges its overrides into a copy)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._parsed: dict[Path, Stored] = {}
        self._lock = threading.Lock()  # the reading threads share it

    def _path(self, workflow_id: str) -> Path:
        return self.folder / (validate_workflow_id(workflow_id) + SUFFIX)

    async def read(self, workflow_id: str) -> Stored:
        """The stored workflow; NotFound when there is none (or the file is not a workflow)."""
        return await asyncio.to_thread(self._read_kept, self._path(workflow_id), workflow_id)

    async def write(
        self,
        workflow_id: str,
        workflow: dict[str, Any],
        owner: str | None = None,
        shared: bool = False,
        new: bool = False,
        by: str | None = None,
    ) -> bool:
        """Store (atomically), as `owner`'s when given; True when it was new, False when it
        replaced one. `new`: only if there is none yet (Conflict when another write came first).
        `by`: the label of the key writing it, kept with the time (audit)."""
        document: dict[str, Any] = workflow
        if owner is not None:
            document = {"owner": owner, "shared": shared, "prompt": workflow}
        if by is not None:
            document = {**(document if document is not workflow else {"prompt": workflow}), "by": by, "at": time.time()}
        return await asyncio.to_thread(self._write, self._path(workflow_id), document, new)

    async def delete(self, workflow_id: str) -> None:
        """Remove it; NotFound when there is none."""
        path = self._path(workflow_id)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            raise NotFound(f"no hosted workflow {workflow_id!r}") from None

    async def all(self) -> list[Stored]:
        """Every readable workflow in the folder, by id; files that are not workflows are skipped."""
        return await asyncio.to_thread(self._all)

    def _all(self) -> list[Stored]:
        try:
            names = sorted(entry.name for entry in os.scandir(self.folder) if entry.name.endswith(SUFFIX))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            workflow_id = name[: -len(SUFFIX)]
            if not TASK_ID_RE.fullmatch(workflow_id) or workflow_id in (".", ".."):
                continue
            try:
                found.append(self._read_kept(self.folder / name, workflow_id))
            except NotFound:
                continue  # removed meanwhile, or not a workflow
        return found

    def _read_kept(self, path: Path, workflow_id: str) -> Stored:
        try:
            found = os.stat(path)
        except FileNotFoundError:
            raise NotFound(f"no hosted workflow {workflow_id!r}") from None
        with self._lock:
            kept = self._parsed.get(path)
        if kept is not None and kept.version == (found.st_ino, found.st_mtime_ns, found.st_size):
            return kept
        stored = self._read(path, workflow_id)
        with self._lock:
            self._parsed.pop(path, None)
            while len(self._parsed) >= PARSED_KEPT:
                self._parsed.pop(next(iter(self._parsed)))
            self._parsed[path] = stored
        return stored

    @staticmethod
    def _read(path: Path, workflow_id: str) -> Stored:
        try:
            with open(path, "rb") as f:
                found = os.fstat(f.fileno())
                modified = found.st_mtime
                document = json.loads(f.read())
        except FileNotFoundError:
            raise NotFound(f"no hosted workflow {workflow_id!r}") from None
        except (ValueError, UnicodeDecodeError):
            raise NotFound(f"the hosted workflow {workflow_id!r} is not valid JSON; register it again") from None
        owner, shared, by, at = None, False, None, None
        if isinstance(document, dict) and is_wrapper(document):
            owner = document.get("owner") if isinstance(document.get("owner"), str) else None
            shared = document.get("shared") is True
            by = document.get("by") if isinstance(document.get("by"), str) else None
            at = document.get("at") if isinstance(document.get("at"), int | float) else None
            document = document["prompt"]  # a file dropped in by hand may keep the wrapper
        if not isinstance(document, dict):
            raise NotFound(f"the hosted workflow {workflow_id!r} is not a workflow object; register it again")
        version = (found.st_ino, found.st_mtime_ns, found.st_size)
        return Stored(workflow_id, document, modified, owner, shared, found.st_size, version, by, at)

    def _write(self, path: Path, workflow: dict[str, Any], new: bool) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = json.dumps(workflow, ensure_ascii=False, indent=2).encode()
        fd, temp = tempfile.mkstemp(dir=self.folder, prefix="." + path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            created = not path.exists()
            if new:
                try:
                    os.link(temp, path)  # create-exclusive: two first registrations cannot both win
                except FileExistsError:
                    raise Conflict(f"workflow id {path.stem!r} is taken: name another workflow") from None
                os.unlink(temp)
            else:
                os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        _sync_folder(self.folder)
        return created


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
