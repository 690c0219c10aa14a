"""The live progress bar of a run (rich, on stderr): percent, the running node, the queue
position and the ETA, from our `serverless_progress` events."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from ..client import Event


def _status(state: str, node: str | None, queue_position: int | None, eta_s: float | None) -> str:
    if state == "queued":
        return f"queued, position {queue_position}" if queue_position else "queued"
    parts = [node or state]
    if eta_s is not None:
        parts.append(f"ETA {eta_s:.0f}s")
    return " · ".join(parts)


class RunProgress:
    """A context manager; `update(event)` with every event of the run."""

    def __init__(self, label: str, console: Console | None = None) -> None:
        console = console or Console(stderr=True)
        # Drawn on a terminal only: piped, stderr keeps just the one-line error of a failure.
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=not console.is_terminal,
        )
        self._label = label
        self._task: TaskID | None = None

    def __enter__(self) -> RunProgress:
        self._bar.start()
        self._task = self._bar.add_task(self._label, total=100, status="submitted")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._bar.stop()

    def update(self, event: Event) -> None:
        progress = event.progress
        if progress is None or self._task is None:
            return
        node = progress.node_title or progress.node_class
        node = f"{node} (#{progress.node_id})" if node and progress.node_id else node
        status = _status(progress.state, node, progress.queue_position, progress.eta_s)
        self._bar.update(self._task, completed=progress.percent, status=status)


class BatchProgress:
    """The bar of a batch: items ended of the total, with the counts and the ETA; `update(data)`
    with each `batch_progress` / `batch_end` event's data."""

    def __init__(self, label: str, total: int, console: Console | None = None) -> None:
        console = console or Console(stderr=True)
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=not console.is_terminal,
        )
        self._label, self._total = label, total
        self._task: TaskID | None = None

    def __enter__(self) -> BatchProgress:
        self._bar.start()
        self._task = self._bar.add_task(self._label, total=self._total, status="submitted")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._bar.stop()

    def update(self, data: dict[str, Any]) -> None:
        counts = data.get("counts")
        if not isinstance(counts, dict) or self._task is None:
            return
        done = sum(int(counts.get(state) or 0) for state in ("succeeded", "failed", "cancelled"))
        parts = [f"{counts.get(state)} {state}" for state in ("running", "failed") if counts.get(state)]
        if isinstance(data.get("eta_s"), int | float):
            parts.append(f"ETA {data['eta_s']:.0f}s")
        self._bar.update(self._task, completed=done, status=" · ".join(parts))
