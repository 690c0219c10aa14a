"""What this instance learned of how long things take, for the progress of the next job
(`Progress.learned`): per hosted workflow, its duration, step time and tail; per node class, its
cost. Kept in memory (a restarted instance learns again from its first job); each figure moves
halfway toward every new observation, so a changed machine or workflow is learned in a few runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .progress import Learned

WEIGHT = 0.5  # how far a new observation moves a learned figure
MAX_WORKFLOWS = 1024  # the oldest learned workflow is forgotten past this many


def _moved(old: float | None, new: float) -> float:
    return new if old is None else old + WEIGHT * (new - old)


@dataclass(slots=True)
class Estimates:
    """The book (see the module docstring); one per app, shared by its jobs."""

    _workflows: dict[str, Learned] = field(default_factory=dict)
    _costs: dict[str, float] = field(default_factory=dict)

    def learned(self, workflow_id: str | None) -> Learned:
        """What a new job of `workflow_id` (None: an ad-hoc workflow) starts from."""
        known = self._workflows.get(workflow_id) if workflow_id is not None else None
        if known is None:
            return Learned(node_costs=dict(self._costs))
        return Learned(known.duration, known.step_time, known.tail, dict(self._costs))

    def learn(
        self,
        workflow_id: str | None,
        duration: float,
        step_time: float | None,
        tail: float,
        costs: dict[str, float],
    ) -> None:
        """A job succeeded: `duration` seconds from its submission to its result."""
        for class_type, seconds in costs.items():
            self._costs[class_type] = _moved(self._costs.get(class_type), seconds)
        if workflow_id is None:
            return
        old = self._workflows.pop(workflow_id, None) or Learned()
        step = step_time if old.step_time is None or step_time is None else _moved(old.step_time, step_time)
        self._workflows[workflow_id] = Learned(_moved(old.duration, duration), step, _moved(old.tail, tail))
        while len(self._workflows) > MAX_WORKFLOWS:
            del self._workflows[next(iter(self._workflows))]
