"""How far a job has come (pure): fed with the job's ComfyUI messages and queue answers, it gives
the `serverless_progress` payload (state, percent, queue position, running node, ETA).

The estimate is in seconds. What is left to run is weighed node by node: a sampling node (one
with `steps`, or one that reports `progress`) by its steps left times the step time, every other
node by its cost (the mean of this job's finished plain nodes, else what this instance learned
of its class, else one step); cached and finished nodes count as done.

    eta_s   = the time left to run (None until a step time is known: observed in this job, or
              learned from an earlier run of the same hosted workflow, `Learned`)
    percent = 100 * elapsed / (elapsed + eta_s)

so both speak of the same clock, and percent tracks the fraction of the job's time gone by.
Before any step time, percent counts work units (a plain node one, a sampling step STEP_UNITS:
sampling is where a GPU's time goes), so that it does not run ahead of the time-based estimate
that takes over at the first step (percent never goes back, so a head start would stay wrong). The step
time is measured between `progress` messages (the first step's own time, which holds a sampler's
set-up, only until a second step is seen). The percent never goes backwards, stays below 100
while the job runs (its outputs are still to be read) and is 100 only when it succeeded. No I/O,
no clock of its own: callers pass the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..core.messages import Message

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES: tuple[State, ...] = ("succeeded", "failed", "cancelled")
RUNNING_CAP = 99.0
STEP_UNITS = 5.0  # a sampling step's weight against a plain node's, before any step is timed


@dataclass(frozen=True, slots=True)
class Learned:
    """What earlier runs of the same hosted workflow taught (`Estimates.learned`): seconds from
    submission to the end, seconds per sampling step, seconds from ComfyUI's end to ours."""

    duration: float | None = None
    step_time: float | None = None
    tail: float = 0.0
    node_costs: dict[str, float] = field(default_factory=dict)  # class_type -> seconds


@dataclass(slots=True)
class Progress:
    """The progress of one prompt. `observe` and `queued_at` return True when what a caller would
    see changed."""

    task_id: str
    prompt_id: str
    nodes: dict[str, dict[str, Any]]  # node id -> {"class_type", "title", "steps"} (`workflow_nodes`)
    created: float
    learned: Learned = field(default_factory=Learned)
    state: State = "queued"
    percent: float = 0.0
    queue_position: int | None = None
    queue_size: int | None = None
    started: float | None = None
    ended: float | None = None
    node: str | None = None
    eta: float | None = None
    _cached: set[str] = field(default_factory=set)
    _done: set[str] = field(default_factory=set)
    _node_since: float | None = None
    _values: dict[str, tuple[float, float]] = field(default_factory=dict)  # node -> (value, max) reported
    _last_step: tuple[str, float, float] | None = None  # node, value, time of the last `progress`
    _step_sum: tuple[float, float] = (0.0, 0.0)  # seconds, steps between `progress` messages
    _first_step: tuple[float, float] = (0.0, 0.0)  # the same for a node's first step (set-up included)
    _plain: dict[str, float] = field(default_factory=dict)  # finished plain node -> its seconds
    _finished_at: float | None = None  # when ComfyUI's last node ended
    _refreshed: tuple[Any, ...] | None = None  # the view last weighed (`refresh`, `payload`)

    def observe(self, message: Message, now: float) -> bool:
        """Learn from one message of ComfyUI (ours, or a broadcast)."""
        if message.prompt_id != self.prompt_id:
            return False
        before = self._view()
        self.note(message, now)
        self._recompute(now)
        return self._view() != before

    def note(self, message: Message, now: float) -> bool:
        """Learn from one message without weighing the estimate again (`refresh` does, when an
        event is due: a short job's messages come far faster than its events may go). True when
        the job's state changed (an event is due at once)."""
        if message.prompt_id != self.prompt_id:
            return False
        state = self.state
        data, kind = message.data, message.type
        if kind in ("execution_start", "execution_cached", "executing", "progress", "progress_state"):
            self._start(now)
        if kind == "execution_cached":
            self._cached.update(str(node) for node in data.get("nodes") or [])
        elif kind == "executing":
            self._finish_running(now)
            self.node = None if data.get("node") is None else str(data["node"])
            self._node_since = now
            if self.node is None:
                self._finished_at = now
        elif kind == "progress":
            self._step(data, now)
        elif kind == "progress_state":
            self._states(data)
        elif kind == "executed":
            self._done.add(str(data.get("node")))
        return self.state != state

    def refresh(self, now: float) -> bool:
        """Weigh the estimate at `now`: True when what a caller sees changed since it was last
        weighed (`refresh`, `payload`): `note` then `refresh` is `observe`, weighed when asked."""
        self._recompute(now)
        view = self._view()
        changed, self._refreshed = view != self._refreshed, view
        return changed

    def queued_at(self, position: int | None, size: int) -> bool:
        """ComfyUI's queue: our place in it (1 = next; 0 = running; None = not in it) and its length."""
        before = self._view()
        if self.state == "queued":
            self.queue_position, self.queue_size = position, size
        return self._view() != before

    def end(self, state: State, now: float) -> None:
        """The job's outcome is known."""
        self.state, self.ended, self.node, self.eta = state, now, None, None
        self.queue_position = None
        if state == "succeeded":
            self.percent = 100.0

    def step_of(self, node: str | None) -> int | None:
        """The last step `node` reported (for a preview frame), None before any."""
        reported = self._values.get(node) if node is not None else None
        return int(reported[0]) if reported is not None else None

    def step_time(self) -> float | None:
        """Seconds per sampling step seen in this job."""
        seconds, steps = self._step_sum if self._step_sum[1] else self._first_step
        return seconds / steps if steps else None

    def lesson(self) -> tuple[float | None, float, dict[str, float]]:
        """What this (succeeded) run teaches: its step time, the seconds from ComfyUI's end to
        ours, and its plain nodes' seconds by class."""
        tail = max(0.0, self.ended - self._finished_at) if self.ended and self._finished_at else 0.0
        costs: dict[str, float] = {}
        for node, seconds in self._plain.items():
            class_type = self.nodes.get(node, {}).get("class_type")
            if isinstance(class_type, str):
                costs[class_type] = max(costs.get(class_type, 0.0), seconds)
        return self.step_time(), tail, costs

    def payload(self, now: float, at: float) -> dict[str, Any]:
        """The `serverless_progress` event at monotonic time `now`; `at` is the same moment as Unix
        time (the task summary reads when a task was created, started and ended from it)."""
        self._recompute(now)
        self._refreshed = self._view()
        node = None
        if self.node is not None:
            info = self.nodes.get(self.node, {})
            node = {"id": self.node, "class_type": info.get("class_type"), "title": info.get("title")}
        data: dict[str, Any] = {
            "task_id": self.task_id,
            "state": self.state,
            "percent": round(self.percent, 1),
            "queue_position": self.queue_position,
            "queue_size": self.queue_size,
            "node": node,
            "elapsed_s": round((self.ended or now) - self.created, 3),
            "at": round(at, 3),
        }
        if self.eta is not None and self.state == "running":
            data["eta_s"] = round(self.eta, 1)
        return {"type": "serverless_progress", "data": data}

    # -- internals ------------------------------------------------------------------------------

    def _start(self, now: float) -> None:
        if self.state == "queued":
            self.state, self.started = "running", now
            self.queue_position = 0

    def _finish_running(self, now: float) -> None:
        node = self.node
        if node is None:
            return
        if node not in self._done and not self._steps(node) and self._node_since is not None:
            self._plain[node] = now - self._node_since
        self._done.add(node)

    def _step(self, data: dict[str, Any], now: float) -> None:
        value, maximum = _number(data.get("value")), _number(data.get("max"))
        if value is None or maximum is None or maximum <= 0:
            return
        node = str(data.get("node") or self.node or "") or None
        if node is None:
            return
        self.node = node
        self._values[node] = (min(value, maximum), maximum)
        last = self._last_step
        if last is not None and last[0] == node and value > last[1]:
            seconds, steps = self._step_sum
            self._step_sum = (seconds + now - last[2], steps + value - last[1])
        elif (last is None or last[0] != node) and self._node_since is not None and value > 0:
            seconds, steps = self._first_step
            self._first_step = (seconds + now - self._node_since, steps + value)
        self._last_step = (node, value, now)

    def _states(self, data: dict[str, Any]) -> None:
        """`progress_state`: the steps of nodes, reported before a preview of the same step."""
        nodes = data.get("nodes")
        if not isinstance(nodes, dict):
            return
        for node, state in nodes.items():
            if not isinstance(state, dict):
                continue
            value, maximum = _number(state.get("value")), _number(state.get("max"))
            if value is not None and maximum is not None and maximum > 1 and state.get("state") == "running":
                self._values[str(node)] = (min(value, maximum), maximum)

    def _steps(self, node: str) -> float | None:
        """A sampling node's steps: as it reports them, else as its inputs say."""
        reported = self._values.get(node)
        if reported is not None:
            return reported[1]
        steps = self.nodes.get(node, {}).get("steps")
        return float(steps) if isinstance(steps, int | float) and steps > 0 else None

    def _to_run(self) -> list[str]:
        return [node for node in self.nodes if node not in self._cached and node not in self._done]

    def _recompute(self, now: float) -> None:
        if self.state in TERMINAL_STATES or self.state == "queued":
            return
        self.eta = self._remaining(now)
        if self.eta is not None:
            elapsed = now - self.created
            fraction = elapsed / (elapsed + self.eta) if elapsed + self.eta > 0 else 0.0
        else:
            fraction = self._unit_fraction()
        # 100 belongs to the end: until then the last node may still be saving.
        self.percent = max(self.percent, min(RUNNING_CAP, 100.0 * fraction))

    def _remaining(self, now: float) -> float | None:
        """Seconds of work left (see the module docstring); None without a step time."""
        step = self.step_time() or self.learned.step_time
        if step is None:
            if self.learned.duration is None:
                return None
            return max(0.0, self.learned.duration - (now - self.created))
        since = now - self._node_since if self._node_since is not None else 0.0
        left = self.learned.tail
        for node in self._to_run():
            steps = self._steps(node)
            running = node == self.node
            if steps is not None:
                done = self._values.get(node, (0.0, steps))[0] if running else 0.0
                left += max(0.0, steps - done) * step
            else:
                cost = self._cost(node, step)
                left += max(0.0, cost - since) if running else cost
        return left

    def _cost(self, node: str, step: float) -> float:
        if self._plain:
            return sum(self._plain.values()) / len(self._plain)
        learned = self.learned.node_costs.get(str(self.nodes.get(node, {}).get("class_type")))
        return learned if learned is not None else step

    def _unit_fraction(self) -> float:
        """Work done in units (see STEP_UNITS), before there is a time to weigh by."""
        total = done = 0.0
        for node in self.nodes:
            steps = self._steps(node)
            units = STEP_UNITS * steps if steps is not None else 1.0
            total += units
            if node in self._cached or node in self._done:
                done += units
            elif node == self.node and node in self._values:
                done += STEP_UNITS * self._values[node][0]
        return done / total if total else 0.0

    def _view(self) -> tuple[Any, ...]:
        """What a caller sees, except time: a change here is worth an event."""
        eta = None if self.eta is None else round(self.eta, 1)
        return (self.state, round(self.percent, 1), self.queue_position, self.queue_size, self.node, eta)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def workflow_nodes(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Node id -> class, title and sampling steps (None for a node that does not sample), for the
    progress of a submitted workflow."""
    nodes = {}
    for node_id, node in workflow.items():
        meta = node.get("_meta") if isinstance(node.get("_meta"), dict) else {}
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
        nodes[str(node_id)] = {
            "class_type": node.get("class_type"),
            "title": meta.get("title"),
            "steps": _steps(inputs),
        }
    return nodes


def _steps(inputs: dict[str, Any]) -> int | None:
    """`steps` (KSampler), narrowed by `start_at_step`/`end_at_step` (KSamplerAdvanced)."""
    steps = inputs.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        return None
    start, end = inputs.get("start_at_step"), inputs.get("end_at_step")
    first = start if isinstance(start, int) and not isinstance(start, bool) else 0
    last = end if isinstance(end, int) and not isinstance(end, bool) else steps
    return max(1, min(steps, last) - max(0, first))
