"""The jobs an app instance runs: started as tasks it owns, counted for health, drained on stop.

Each job has two tasks: its run (the pipeline) and its recorder (the status log, a pinned reader
of its feed). They are kept in two sets: a drain cancels runs, never recorders, which end by
themselves once their feed ends with the terminal payload.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from typing import Any

from ..errors import ComfyUIUnavailable, InvalidParams, ServerlessError
from ..status.store import StatusStore
from .feed import Feed
from .job import Job, Runtime
from .spec import JobSpec

log = logging.getLogger(__name__)


class Jobs:
    """Owns every running job's tasks; no job outlives the app without being waited for."""

    def __init__(self, runtime: Runtime, status: StatusStore[Any], buffer_events: int, max_event_bytes: int) -> None:
        self.runtime = runtime
        self.status = status
        self.buffer_events = buffer_events
        self.max_event_bytes = max_event_bytes
        self.accepting = True
        self._runs: set[asyncio.Task[None]] = set()
        self._recorders: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        """Jobs under way on this instance."""
        return len(self._runs)

    async def start(self, spec: JobSpec) -> Job:
        """Start a job in the background and return it; follow `job.events()` for its events,
        which are also recorded as a new attempt in the task's status log."""
        if not self.accepting:
            raise ComfyUIUnavailable("this instance is shutting down and takes no new jobs")
        prompt_id = str(uuid.uuid4())
        task_id = spec.task_id or prompt_id
        try:
            attempt = await self.status.begin(task_id)  # the task is known from now on, on every instance
        except InvalidParams:
            raise  # something squats the task's name: this task cannot be recorded
        except ServerlessError as exc:  # the status folder cannot be used
            if spec.mode == "async":
                raise ComfyUIUnavailable(f"async jobs are refused while {exc.message}") from exc
            log.error("task_id=%s runs without a status log: %s", task_id, exc.message)
            attempt = None
        feed = Feed(self.buffer_events, max_bytes=self.max_event_bytes)
        recorder = None
        if attempt is not None:
            recorder = _own(self._recorders, self.status.record(attempt, feed), f"status {task_id}")
        job = Job(spec, self.runtime, feed, prompt_id, task_id, recorder)
        _own(self._runs, job.run(), f"job {task_id}")
        return job

    async def drain(self, timeout: float) -> None:
        """Stop taking jobs, wait up to `timeout` for running ones, then cancel the rest (their
        feeds still end with a terminal payload, which their recorders write)."""
        self.accepting = False
        if not self._runs and not self._recorders:
            return
        log.info("draining %d running job(s), up to %.0fs", self.running, timeout)
        _, pending = await asyncio.wait(self._runs | self._recorders, timeout=timeout)
        for task in pending & self._runs:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _own(tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    task = asyncio.create_task(coro, name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
