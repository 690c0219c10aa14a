"""The task list (`GET /api/tasks`), pure: what is asked (`TaskQuery`), the cursor that pages
through it, and one task's row built from its summary. Both status stores walk their tasks newest
first (the file store over its folder, Redis over a sorted set per owner) and use these.

A cursor names the last row of a page (`<created ms>.<task id>`): the next page begins after it,
so tasks made meanwhile never shift a page (they are newer than any cursor).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from ..auth import may_see
from ..errors import InvalidParams
from .summary import ENDED

STATES = ("queued", "running", *ENDED)
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
SCAN_BUDGET = 2000  # tasks a page looks at before it answers short (with a cursor to go on)


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """One page of the list: the caller (`owner`, None when API keys are off), its filters,
    how many rows and after which (`after`: (created ms, task id) of the previous page's last)."""

    owner: str | None
    state: str | None = None
    workflow_id: str | None = None
    limit: int = DEFAULT_LIMIT
    after: tuple[int, str] | None = None

    @classmethod
    def parse(cls, owner: str | None, query: Any) -> TaskQuery:
        """From a request's query (`state`, `workflow_id`, `limit`, `cursor`); InvalidParams for
        a value outside their rules."""
        state = query.get("state") or None
        if state is not None and state not in STATES:
            raise InvalidParams(f"state must be one of {', '.join(STATES)}", raw={"state": state})
        raw_limit = query.get("limit") or str(DEFAULT_LIMIT)
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise InvalidParams(f"limit must be a whole number from 1 to {MAX_LIMIT}", raw={"limit": raw_limit})
        cursor = query.get("cursor") or None
        return cls(owner, state, query.get("workflow_id") or None, int(raw_limit), decode_cursor(cursor))

    def admits(self, row: TaskRow) -> bool:
        """Whether a task belongs on this caller's page."""
        return (
            may_see(self.owner, row.owner)
            and (self.workflow_id is None or row.workflow_id == self.workflow_id)
            and (self.state is None or row.summary["state"] == self.state)
        )


@dataclass(frozen=True, slots=True)
class TaskRow:
    """A task as the list sees it: when it was made (ms), whose and of which hosted workflow it
    is, and its summary (`summary.summarise`)."""

    task_id: str
    created_ms: int
    owner: str | None
    workflow_id: str | None
    summary: dict[str, Any]

    def shown(self) -> dict[str, Any]:
        """The row as the API answers it: the summary without the result's outputs (a task's
        own endpoint gives them), with its workflow and error code."""
        shown = {key: value for key, value in self.summary.items() if key not in ("result", "error")}
        shown["workflow_id"] = self.workflow_id
        error = self.summary.get("error")
        if isinstance(error, dict):
            shown["error_code"] = error.get("error_code")
            shown["error_message"] = error.get("error_message")
        shown["created_at"] = self.created_ms / 1000  # when it was queued (the list's order)
        return shown


@dataclass(frozen=True, slots=True)
class TaskPage:
    rows: list[TaskRow]
    next_cursor: str | None

    def shown(self) -> dict[str, Any]:
        return {"tasks": [row.shown() for row in self.rows], "next_cursor": self.next_cursor}


def encode_cursor(created_ms: int, task_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_ms}.{task_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[int, str] | None:
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, task_id = text.partition(".")
        if not task_id:
            raise ValueError(text)
        return int(created), task_id
    except ValueError as exc:
        raise InvalidParams("cursor is not one this API gave", raw={"cursor": cursor[:100]}) from exc


def before(created_ms: int, task_id: str, after: tuple[int, str] | None) -> bool:
    """Whether a task comes after the cursor in the newest-first order."""
    return after is None or (created_ms, task_id) < after


def page(rows: list[TaskRow], query: TaskQuery, exhausted: bool) -> TaskPage:
    """The page of admitted `rows` (walked newest first); a cursor when more may follow: the
    walk stopped at `limit` rows, or ran out of budget before the list ended (`exhausted` False)."""
    admitted = [row for row in rows if query.admits(row)][: query.limit]
    if len(admitted) == query.limit:
        last = admitted[-1]
        return TaskPage(admitted, encode_cursor(last.created_ms, last.task_id))
    if not exhausted and rows:
        last = rows[-1]
        return TaskPage(admitted, encode_cursor(last.created_ms, last.task_id))
    return TaskPage(admitted, None)
