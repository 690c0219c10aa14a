"""A task's summary (pure), built from its status log alone so that any instance can answer it:
the last `serverless_progress` event gives the state, percent and queue; their `at` times give
when the task was created, started and ended; the terminal payload gives the result or error."""

from __future__ import annotations

from typing import Any

from .body import TERMINAL_TYPES

ENDED = ("succeeded", "failed", "cancelled")


def summarise(task_id: str, payloads: list[Any]) -> dict[str, Any]:
    """The summary of a task whose current attempt logged `payloads` (in order)."""
    progress = [
        payload["data"]
        for payload in payloads
        if isinstance(payload, dict)
        and payload.get("type") == "serverless_progress"
        and isinstance(payload.get("data"), dict)
    ]
    last: dict[str, Any] = progress[-1] if progress else {}
    terminal = payloads[-1] if payloads and _is_terminal(payloads[-1]) else None
    state = _state(terminal) if terminal is not None else str(last.get("state", "queued"))
    summary: dict[str, Any] = {
        "task_id": task_id,
        "state": state,
        "percent": 100.0 if state == "succeeded" else last.get("percent", 0.0),
        "queue_position": None if state in ENDED else last.get("queue_position"),
        "queue_size": last.get("queue_size"),
        "created_at": _first_at(progress, ("queued", "running", *ENDED)),
        "started_at": _first_at(progress, ("running",)),  # None for a job that ended before it ran
        "ended_at": _first_at(progress, ENDED),
    }
    if terminal is not None:
        summary["result" if terminal["type"] == "serverless_api" else "error"] = terminal
    return summary


def _is_terminal(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("type") in TERMINAL_TYPES


def _state(terminal: dict[str, Any]) -> str:
    """The end a terminal payload tells; a log whose owner was lost reads as failed."""
    if terminal["type"] == "serverless_api":
        return "succeeded"
    return "cancelled" if terminal.get("error_code") == "EXECUTION_INTERRUPTED" else "failed"


def _first_at(progress: list[dict[str, Any]], states: tuple[str, ...]) -> float | None:
    """When the first event in one of `states` was published."""
    return next((data.get("at") for data in progress if data.get("state") in states), None)
