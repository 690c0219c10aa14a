"""The hosted workflows' folder on the shared disk: one `<workflow_id>.json` per workflow.

Every instance reads the folder itself, on each call (no cache), so a workflow written by one
instance is seen by all at once; files dropped in by hand are served the same way. A write goes
to a temporary file that is synced and then renamed over the old one, so a reader sees the old
workflow or the new, never half of one. File I/O runs in a thread (the folder is on NAS).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..core.request import TASK_ID_RE, is_wrapper
from ..errors import InvalidParams, NotFound

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

    @property
    def modified_iso(self) -> str:
        return datetime.fromtimestamp(self.modified, UTC).isoformat().replace("+00:00", "Z")


class WorkflowStore:
    """The folder (`WORKFLOWS_DIR`); created on the first write."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, workflow_id: str) -> Path:
        return self.folder / (validate_workflow_id(workflow_id) + SUFFIX)

    async def read(self, workflow_id: str) -> Stored:
        """The stored workflow; NotFound when there is none (or the file is not a workflow)."""
        return await asyncio.to_thread(self._read, self._path(workflow_id), workflow_id)

    async def write(self, workflow_id: str, workflow: dict[str, Any]) -> bool:
        """Store (atomically); True when it was new, False when it replaced one."""
        return await asyncio.to_thread(self._write, self._path(workflow_id), workflow)

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
                found.append(self._read(self.folder / name, workflow_id))
            except NotFound:
                continue  # removed meanwhile, or not a workflow
        return found

    @staticmethod
    def _read(path: Path, workflow_id: str) -> Stored:
        try:
            with open(path, "rb") as f:
                modified = os.fstat(f.fileno()).st_mtime
                document = json.loads(f.read())
        except FileNotFoundError:
            raise NotFound(f"no hosted workflow {workflow_id!r}") from None
        except (ValueError, UnicodeDecodeError):
            raise NotFound(f"the hosted workflow {workflow_id!r} is not valid JSON; register it again") from None
        if isinstance(document, dict) and is_wrapper(document):
            document = document["prompt"]  # a file dropped in by hand may keep the wrapper
        if not isinstance(document, dict):
            raise NotFound(f"the hosted workflow {workflow_id!r} is not a workflow object; register it again")
        return Stored(workflow_id, document, modified)

    def _write(self, path: Path, workflow: dict[str, Any]) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = json.dumps(workflow, ensure_ascii=False, indent=2).encode()
        fd, temp = tempfile.mkstemp(dir=self.folder, prefix="." + path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            created = not path.exists()
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
