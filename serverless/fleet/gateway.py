"""A gateway's jobs: submitted to the Redis queue and followed through the Redis status store.

`RemoteJobs` takes the place of `serverless.jobs.registry.Jobs` on a gateway, and `RemoteJob`
of `serverless.jobs.job.Job`: the transports call the same `start`, `events`, `finished` and
`abandon`, so the JSON, SSE and websocket renderings are those of a local job, unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from ..errors import ComfyUIUnavailable
from ..jobs.feed import Event
from ..jobs.job import Job
from ..jobs.registry import Jobs
from ..jobs.spec import JobSpec
from ..status.redis import RedisStatus
from .queue import RedisQueue
from .wire import error_from_payload

log = logging.getLogger(__name__)


class RemoteJob:
    """A job that runs on some worker, seen through its status stream."""

    def __init__(
        self, spec: JobSpec, task_id: str, attempt: int | None, status: RedisStatus, owner: RemoteJobs
    ) -> None:
        self.spec = spec
        self.task_id = task_id
        self.prompt_id = task_id  # the worker's prompt id is in the result
        self.attempt = attempt
        self.status = status
        self.owner = owner
        self._terminal: Event | None = None
        self._lock = asyncio.Lock()

    async def events(self, after: int | None = None, idle: float | None = None) -> AsyncIterator[Event | None]:
        """The job's events as its worker stores them (None after `idle` seconds of silence)."""
        async for entry in self.status.follow(self.task_id, after or 0, self.attempt, idle):
            if entry is None:
                yield None
                continue
            event = _event(entry.seq, entry.data, entry.terminal)
            if event.terminal:
                self._terminal = event
            yield event

    def more_ready(self, seq: int) -> bool:
        """Each event is sent as it comes (Redis hands them over in batches already)."""
        return False

    async def finished(self) -> Event:
        """The terminal event (followed once; later calls return it at once)."""
        async with self._lock:
            if self._terminal is None:
                async for _ in self.events():
                    pass
        assert self._terminal is not None
        return self._terminal

    def abandon(self, reason: str) -> None:
        """The caller went away: cancel the job wherever it is."""
        self.owner.cancel_later(self.task_id, reason)


def _event(seq: int, data: bytes, terminal: bool) -> Event:
    error = None
    if terminal:
        payload = json.loads(data)
        if payload.get("type") == "error":
            error = error_from_payload(payload)
    return Event(seq, data, terminal, error)


class RemoteJobs:
    """A gateway's stand-in for `Jobs`: starting a job enqueues it."""

    def __init__(self, queue: RedisQueue, status: RedisStatus, local: Jobs | None = None) -> None:
        self.queue = queue
        self.status = status
        self.local = local  # this instance's own worker's jobs (ROLE=all|worker), drained with it
        self.accepting = True
        self._cancels: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        """Jobs this instance runs itself (as a worker)."""
        return self.local.running if self.local is not None else 0

    @property
    def admitted(self) -> int:
        """Admission is the queue's: the workers take jobs as their ComfyUI frees up."""
        return self.local.admitted if self.local is not None else 0

    @property
    def full(self) -> bool:
        return False

    def check_room(self) -> None:
        """Never BUSY here: the queue holds what the workers have not taken yet."""

    def get(self, task_id: str) -> Job | None:
        """A task's job when it runs on this instance (a worker that is also a gateway)."""
        return self.local.get(task_id) if self.local is not None else None

    async def start(self, spec: JobSpec, prompt_id: str | None = None) -> RemoteJob:
        if not self.accepting:
            raise ComfyUIUnavailable("this gateway is shutting down and takes no new jobs")
        submitted = await self.queue.submit(spec, spec.priority, spec.idempotency_key)
        return RemoteJob(spec, submitted.task_id, submitted.attempt, self.status, self)

    def cancel_later(self, task_id: str, reason: str) -> None:
        async def cancel() -> None:
            try:
                await self.queue.cancel(task_id)
                log.info("task_id=%s cancelled (%s)", task_id, reason)
            except Exception as exc:  # ended meanwhile, or Redis down: nothing more to do
                log.info("task_id=%s: not cancelled (%s): %s", task_id, reason, exc)

        task = asyncio.create_task(cancel(), name=f"cancel {task_id}")
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def drain(self, timeout: float) -> None:
        """Stop taking jobs (the queued ones stay queued for other workers); this instance's own
        worker finishes its job within `timeout`, as `Jobs.drain` does."""
        self.accepting = False
        if self._cancels:
            await asyncio.wait(self._cancels, timeout=timeout)
        if self.local is not None:
            await self.local.drain(timeout)
