"""The hosted workflows' folder on the shared disk: one `<workflow_id>.json` per workflow.

Every instance reads the folder itself, on each call (no cache), so a workflow written by one
instance is seen by all at once; files dropped in by hand are served the same way. A workflow
is stored as `{"owner": <key digest> | null, "shared": bool, "version": n, "prompt": {...}}`, its
newest version; every version is kept beside it, immutable (`serverless.workflows.versions`). A
workflow registered with an API key is that key's (`Stored.visible_to`, `Stored.writable_by`); one
without an owner (registered without keys, or dropped in by hand) is everyone's to read and run,
and nobody's to change through a key. A write goes to a temporary file that is synced and then
renamed over the old one, so a reader sees the old workflow or the new, never half of one. File
I/O runs in a thread (the folder is on NAS).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..core.request import TASK_ID_RE, is_wrapper
from ..errors import Conflict, InvalidParams, NotFound
from .atomic import write_file
from .versions import Version, VersionFolder, registered_by

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
    number: int | None = None  # its version number (None: a file dropped in by hand, never registered since)
    by: str | None = None  # audit: the label of the API key that registered or changed it last
    lane: str = ""  # the fleet's lane its runs queue on (`?lane=` at registration; "": the default)
    at: float | None = None  # audit: when (Unix time)

    @property
    def ref(self) -> str:
        """What names this very version: `<id>@<n>` (the bare id when it has no number)."""
        return self.workflow_id if self.number is None else f"{self.workflow_id}@{self.number}"

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
        self.versions = VersionFolder(folder)
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
        lane: str = "",
    ) -> tuple[bool, int]:
        """Store as a new version (atomically), as `owner`'s; (True when the workflow was new,
        its version number). `new`: only if there is none yet (Conflict when another write came
        first). `by`: the label of the key writing it, kept with the time (audit). `lane`: the
        fleet's lane its runs queue on."""
        return await asyncio.to_thread(
            self._register, validate_workflow_id(workflow_id), workflow, owner, shared, new, by, lane
        )

    async def read_version(self, head: Stored, number: int) -> Stored:
        """Version `number` of the workflow whose newest is `head`; NotFound when there is none."""
        if number == head.number:
            return head
        stored = await asyncio.to_thread(
            self._read_kept, self.versions.path(head.workflow_id, number), head.workflow_id
        )
        return replace(stored, owner=head.owner, shared=head.shared, number=number, lane=head.lane)

    async def alias(self, workflow_id: str, name: str) -> int | None:
        """The version alias `name` of the workflow names (None: no such alias)."""
        return await asyncio.to_thread(self.versions.alias, workflow_id, name)

    async def history(self, workflow_id: str) -> tuple[list[Version], dict[str, int]]:
        """Its versions, oldest first, and its aliases."""

        def listed() -> tuple[list[Version], dict[str, int]]:
            found = []
            for number in self.versions.numbers(workflow_id):
                try:
                    found.append(self.versions.describe(workflow_id, number))
                except NotFound:
                    continue  # deleted meanwhile
            return found, self.versions.aliases(workflow_id)

        return await asyncio.to_thread(listed)

    async def set_alias(self, head: Stored, name: str, number: int, owner: str | None) -> None:
        """Point alias `name` at version `number` (NotFound when there is no such version)."""

        def moved() -> None:
            if number not in self.versions.numbers(head.workflow_id):
                raise NotFound(f"workflow {head.workflow_id!r} has no version {number}")
            self.versions.set_alias(head.workflow_id, name, number, registered_by(owner))

        await asyncio.to_thread(moved)

    async def delete_alias(self, workflow_id: str, name: str) -> None:
        await asyncio.to_thread(self.versions.remove_alias, workflow_id, name)

    async def delete_version(self, head: Stored, number: int) -> None:
        """Remove one version: refused (Conflict) while an alias names it or when it is the only one."""
        await asyncio.to_thread(self._delete_version, head, number)

    async def delete(self, workflow_id: str) -> None:
        """Remove it, every version and alias with it; NotFound when there is none."""
        path = self._path(workflow_id)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            raise NotFound(f"no hosted workflow {workflow_id!r}") from None
        await asyncio.to_thread(self.versions.remove_all, workflow_id)

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
        owner, shared, number, by, at, lane = None, False, None, None, None, ""
        if isinstance(document, dict) and is_wrapper(document):
            owner = document.get("owner") if isinstance(document.get("owner"), str) else None
            shared = document.get("shared") is True
            number = document.get("version") if _is_number(document.get("version")) else None
            by = document.get("by") if isinstance(document.get("by"), str) else None
            lane = document["lane"] if isinstance(document.get("lane"), str) else ""
            at = document.get("at") if isinstance(document.get("at"), int | float) else None
            document = document["prompt"]  # a file dropped in by hand may keep the wrapper
        if not isinstance(document, dict):
            raise NotFound(f"the hosted workflow {workflow_id!r} is not a workflow object; register it again")
        version = (found.st_ino, found.st_mtime_ns, found.st_size)
        size = found.st_size
        return Stored(workflow_id, document, modified, owner, shared, size, version, number, by=by, at=at, lane=lane)

    def _register(
        self,
        workflow_id: str,
        prompt: dict[str, Any],
        owner: str | None,
        shared: bool,
        new: bool,
        by: str | None,
        lane: str = "",
    ) -> tuple[bool, int]:
        path = self._path(workflow_id)
        if not new and not self.versions.numbers(workflow_id):
            try:  # registered before versions were kept (or dropped in by hand): its version 1
                before = self._read(path, workflow_id)
                self.versions.add(workflow_id, before.workflow, registered_by(before.owner), before.modified)
            except NotFound:
                pass
        number = self.versions.add(workflow_id, prompt, registered_by(owner, by))
        try:
            created = self._write(path, self._head(prompt, owner, shared, number, by, lane), new)
        except Conflict:
            self.versions.path(workflow_id, number).unlink(missing_ok=True)  # the other registration won
            raise
        self._newest_as_head(workflow_id, number, owner, shared, lane)
        return created, number

    def _newest_as_head(self, workflow_id: str, written: int, owner: str | None, shared: bool, lane: str) -> None:
        """When an instance registered a newer version while this one wrote its own, the head
        file ends holding the newest: each writer looks once more after its write."""
        while (newest := max(self.versions.numbers(workflow_id), default=written)) > written:
            try:
                stored = self._read(self.versions.path(workflow_id, newest), workflow_id)
            except NotFound:
                return  # deleted meanwhile: that deletion rewrote the head
            head = self._head(stored.workflow, owner, shared, newest, lane=lane)
            self._write(self._path(workflow_id), head, False)
            written = newest

    @staticmethod
    def _head(
        prompt: dict[str, Any], owner: str | None, shared: bool, number: int, by: str | None = None, lane: str = ""
    ) -> dict[str, Any]:
        head: dict[str, Any] = {"owner": owner, "shared": shared, "version": number, "prompt": prompt}
        if lane:
            head["lane"] = lane
        return head if by is None else {**head, "by": by, "at": time.time()}

    def _delete_version(self, head: Stored, number: int) -> None:
        workflow_id = head.workflow_id
        numbers = self.versions.numbers(workflow_id)
        if number not in numbers:
            raise NotFound(f"workflow {workflow_id!r} has no version {number}")
        pointing = sorted(name for name, named in self.versions.aliases(workflow_id).items() if named == number)
        if pointing:
            raise Conflict(
                f"version {number} of {workflow_id!r} is named by alias(es) {', '.join(pointing)}: move them first",
                raw={"workflow_id": workflow_id, "version": number, "aliases": pointing},
            )
        if numbers == [number]:
            raise Conflict(
                f"version {number} is the only version of {workflow_id!r}: delete the workflow instead",
                raw={"workflow_id": workflow_id, "version": number},
            )
        self.versions.remove(workflow_id, number)
        if head.number == number:  # the newest went: the one before is the newest now
            self._newest_as_head(workflow_id, 0, head.owner, head.shared, head.lane)

    def _write(self, path: Path, workflow: dict[str, Any], new: bool) -> bool:
        try:
            return write_file(path, workflow, exclusive=new)
        except FileExistsError:
            raise Conflict(f"workflow id {path.stem!r} is taken: name another workflow") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
