"""The jobs an app instance runs: started as tasks it owns, counted for health, drained on stop."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from typing import Any

from ..core.request import RunRequest
from ..delivery.oss import Credentials
from ..errors import ComfyUIUnavailable
from ..resources import Services
from .feed import Feed
from .job import Job

log = logging.getLogger(__name__)


class Jobs:
    """Owns every running job's task; no job outlives the app without being waited for."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.accepting = True
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        """Jobs under way on this instance."""
        return sum(1 for task in self._tasks if task.get_name().startswith("job "))

    async def start(self, request: RunRequest, credentials: Credentials | None = None) -> Job:
        """Start a job in the background and return it; follow `job.feed` for its events, which
        are also recorded as a new attempt in the task's status log."""
        if not self.accepting:
            raise ComfyUIUnavailable("this instance is shutting down and takes no new jobs")
        prompt_id = str(uuid.uuid4())
        task_id = request.task_id or prompt_id
        status = self.services.status
        attempt = await status.begin(task_id)
        feed = Feed(self.services.settings.stream_buffer_events, first_seq=1)
        job = Job(self.services, request, feed, prompt_id, task_id, credentials)
        job.recorder = self._own(status.record(attempt, feed), f"status {task_id}")
        job.task = self._own(job.run(), f"job {task_id}")
        return job

    def _own(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout: float) -> None:
        """Stop taking jobs, wait up to `timeout` for running ones, then cancel the rest (their
        feeds still end with a terminal payload)."""
        self.accepting = False
        if not self._tasks:
            return
        log.info("draining %d running job(s), up to %.0fs", self.running, timeout)
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            if task.get_name().startswith("job "):
                task.cancel()  # its feed still ends with a terminal payload, which its recorder writes
        if pending:
            await asyncio.wait(pending)
