"""The file store's task list (run in a thread): the folder's tasks, newest first, each known by
its first payload (when it was made, whose, of which hosted workflow), read once and remembered
(a first payload never changes)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import files
from .tasklist import SCAN_BUDGET, TaskPage, TaskQuery, TaskRow, before
from .tasklist import page as paged


@dataclass(frozen=True, slots=True)
class Made:
    """What a task's first payload tells the list."""

    created_ms: int
    owner: str | None
    workflow_id: str | None


class FileTaskIndex:
    """The tasks of a status folder, their first payloads remembered."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._made: dict[str, Made] = {}
        self._lock = threading.Lock()

    def page(self, query: TaskQuery, summary: Callable[[str], dict[str, Any] | None]) -> TaskPage:
        """A page of `query` (blocking: a thread's work); `summary` reads a task's summary."""
        rows: list[TaskRow] = []
        admitted, exhausted = 0, True
        for task_id, made in self._newest_first(query):
            if len(rows) >= SCAN_BUDGET:
                exhausted = False
                break
            found = summary(task_id)
            if found is None:
                continue
            row = TaskRow(task_id, made.created_ms, made.owner, made.workflow_id, found)
            rows.append(row)
            admitted += query.admits(row)
            if admitted >= query.limit:
                break
        return paged(rows, query, exhausted)

    def _newest_first(self, query: TaskQuery) -> list[tuple[str, Made]]:
        """The tasks the cheap filters (owner, workflow, cursor) leave, newest first."""
        known = self._scan()
        chosen = [
            (task_id, made)
            for task_id, made in known.items()
            if before(made.created_ms, task_id, query.after)
            and (query.owner is None or made.owner is None or made.owner == query.owner)
            and (query.workflow_id is None or made.workflow_id == query.workflow_id)
        ]
        chosen.sort(key=lambda item: (item[1].created_ms, item[0]), reverse=True)
        return chosen

    def _scan(self) -> dict[str, Made]:
        try:
            names = {files.task_of(entry.name) for entry in os.scandir(self.directory)}
        except FileNotFoundError:
            return {}
        with self._lock:
            known = {task_id: self._made[task_id] for task_id in names if task_id in self._made}
        for task_id in names - known.keys():
            made = self._first(task_id)
            if made is not None:
                known[task_id] = made
        with self._lock:
            self._made = known  # tasks pruned from the folder are forgotten here too
        return known

    def _first(self, task_id: str) -> Made | None:
        """What the task's first payload says; None while it is not written whole (or the name
        is not a task's log: a probe, a temporary file)."""
        for path in (files.attempt_path(self.directory, task_id, 1), self.directory / task_id):
            try:
                line = files.first_line(path)
            except (OSError, files.NotAFile):
                continue
            if line.endswith(b"\n"):
                return _made(line)
        return None


def _made(line: bytes) -> Made | None:
    try:
        event = json.loads(line)
        data = event["data"]
        created = float(data["at"])
    except (ValueError, KeyError, TypeError):
        return None
    owner, workflow_id = data.get("owner"), data.get("workflow_id")
    return Made(
        int(created * 1000),
        owner if isinstance(owner, str) else None,
        workflow_id if isinstance(workflow_id, str) else None,
    )
