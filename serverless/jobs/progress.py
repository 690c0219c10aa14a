"""How far a job has come (pure): fed with the job's ComfyUI messages and queue answers, it gives
the `serverless_progress` payload (state, percent, queue position, running node, ETA).

    percent = 100 * (nodes finished + running node's progress value/max) / nodes ComfyUI will run

where the nodes ComfyUI will run are the prompt's nodes less those it reports cached. The percent
never goes backwards and reaches 100 only when the job succeeded. No I/O, no clock of its own:
callers pass the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..core.messages import Message

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES: tuple[State, ...] = ("succeeded", "failed", "cancelled")
ETA_AFTER = 0.02  # a fraction done from which the step rate is worth an estimate


@dataclass(slots=True)
class Progress:
    """The progress of one prompt. `observe` and `queued_at` return True when what a caller would
    see changed."""

    task_id: str
    prompt_id: str
    nodes: dict[str, dict[str, Any]]  # node id -> {"class_type", "title"} of the submitted workflow
    created: float
    state: State = "queued"
    percent: float = 0.0
    queue_position: int | None = None
    queue_size: int | None = None
    started: float | None = None
    ended: float | None = None
    node: str | None = None
    _cached: set[str] = field(default_factory=set)
    _done: set[str] = field(default_factory=set)
    _fraction: float = 0.0

    def observe(self, message: Message, now: float) -> bool:
        """Learn from one message of ComfyUI (ours, or a broadcast)."""
        if message.prompt_id != self.prompt_id:
            return False
        before = self._view()
        data, kind = message.data, message.type
        if kind == "execution_start":
            self._start(now)
        elif kind == "execution_cached":
            self._start(now)
            self._cached.update(str(node) for node in data.get("nodes") or [])
        elif kind == "executing":
            self._start(now)
            self._finish_running()
            self.node = None if data.get("node") is None else str(data["node"])
        elif kind == "progress":
            self._start(now)
            value, maximum = _number(data.get("value")), _number(data.get("max"))
            if value is not None and maximum is not None and maximum > 0:
                self.node = str(data.get("node") or self.node or "") or None
                self._fraction = min(1.0, max(0.0, value / maximum))
        elif kind == "executed":
            self._done.add(str(data.get("node")))
            self._fraction = 0.0
        self._recompute()
        return self._view() != before

    def queued_at(self, position: int | None, size: int) -> bool:
        """ComfyUI's queue: our place in it (1 = next; 0 = running; None = not in it) and its length."""
        before = self._view()
        if self.state == "queued":
            self.queue_position, self.queue_size = position, size
        return self._view() != before

    def end(self, state: State, now: float) -> None:
        """The job's outcome is known."""
        self.state, self.ended, self.node = state, now, None
        self._fraction = 0.0
        self.queue_position = None
        if state == "succeeded":
            self.percent = 100.0

    def payload(self, now: float, at: float) -> dict[str, Any]:
        """The `serverless_progress` event at monotonic time `now`; `at` is the same moment as Unix
        time (the task summary reads when a task was created, started and ended from it)."""
        node = None
        if self.node is not None:
            info = self.nodes.get(self.node, {})
            node = {"id": self.node, "class_type": info.get("class_type"), "title": info.get("title")}
        return {
            "type": "serverless_progress",
            "data": {
                "task_id": self.task_id,
                "state": self.state,
                "percent": round(self.percent, 1),
                "queue_position": self.queue_position,
                "queue_size": self.queue_size,
                "node": node,
                "eta_s": self._eta(now),
                "elapsed_s": round((self.ended or now) - self.created, 3),
                "at": round(at, 3),
            },
        }

    # -- internals ------------------------------------------------------------------------------

    def _start(self, now: float) -> None:
        if self.state == "queued":
            self.state, self.started = "running", now
            self.queue_position = 0

    def _finish_running(self) -> None:
        if self.node is not None:
            self._done.add(self.node)
        self._fraction = 0.0

    def _recompute(self) -> None:
        if self.state in TERMINAL_STATES:
            return
        to_run = [node for node in self.nodes if node not in self._cached] or list(self.nodes)
        done = sum(1 for node in to_run if node in self._done)
        running = self._fraction if self.node is not None and self.node not in self._done else 0.0
        fraction = (done + running) / len(to_run) if to_run else 0.0
        # 100 belongs to the end: until then the last node may still be saving.
        self.percent = max(self.percent, min(99.0, 100.0 * fraction))

    def _eta(self, now: float) -> float | None:
        if self.state != "running" or self.started is None or self.percent / 100 < ETA_AFTER:
            return None
        spent = now - self.started
        return round(spent * (100.0 - self.percent) / self.percent, 1)

    def _view(self) -> tuple[Any, ...]:
        """What a caller sees, except time: a change here is worth an event."""
        return (self.state, round(self.percent, 1), self.queue_position, self.queue_size, self.node)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def workflow_nodes(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Node id -> class and title, for the progress of a submitted workflow."""
    nodes = {}
    for node_id, node in workflow.items():
        meta = node.get("_meta") if isinstance(node.get("_meta"), dict) else {}
        nodes[str(node_id)] = {"class_type": node.get("class_type"), "title": meta.get("title")}
    return nodes
