"""A task's events followed from any instance, numbered as in its original stream: an
`EventSource` for `EventStream` and `json_response`.

An event's number is its place in the attempt's status log (the feed's seq: the status log
records every event the feed publishes, in order). Where the job runs here, its feed serves the
events live; where the feed no longer holds the ones asked for, or the job runs elsewhere, the
store follows the log until its terminal payload (the "instance lost" error added when the owner
went silent counts as one): the NAS folder is read again every `log.POLL` seconds, Redis
answers as events are stored (XREAD BLOCK).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..errors import error_from_payload
from ..jobs.feed import Event, ReaderTooSlow
from ..jobs.runner import RunningJob
from ..status.store import TaskLogs
from ..status.summary import summarise

log = logging.getLogger(__name__)

BIG_PAYLOAD = 256 * 1024  # terminal payloads from this size on are decoded in a thread
RECORD_WAIT = 10.0  # seconds a read of a task's log waits for an ended job's end to be in it


class TaskEvents:
    """The events of task `task_id`; `job` is its job when it runs on this instance."""

    def __init__(
        self,
        task_id: str,
        status: TaskLogs,
        job: RunningJob | None,
        strand_check: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.task_id = task_id
        self.status = status
        self.job = job
        self.strand_check = strand_check  # `JobRunner.end_if_stranded`, asked while the log is silent
        self._more: bool | None = None  # following the log: its last read holds more (`Entry.more`)

    async def events(
        self, after: int | None = None, idle: float | None = None, previews: bool = False
    ) -> AsyncIterator[Event | None]:
        """Every event after number `after` until the terminal one; None after `idle` seconds
        without one (for keep-alives); with `previews`, the newest previews too."""
        cursor = after or 0
        if self.job is not None:
            try:
                async for event in self.job.events(cursor, idle, previews):
                    if event is not None:
                        cursor = event.seq
                    yield event
                return
            except ReaderTooSlow as exc:  # the feed forgot them: the log has them all
                log.info("task_id=%s: reading its status log from event %d (%s)", self.task_id, cursor + 1, exc)
        async for event in self._tail(cursor, idle, previews):
            yield event

    async def more_after(self, seq: int, within: float) -> bool:
        """The job's answer while its feed serves the events; following the log, whether the read
        that brought event `seq` holds more (there is no waiting for more)."""
        if self._more is None and self.job is not None:
            return await self.job.more_after(seq, within)
        return bool(self._more)

    async def finished(self) -> Event:
        """The terminal event (its `error` set for an error object)."""
        if self.job is not None:
            return await self.job.finished()
        async for event in self._tail(0, None):
            if event is not None and event.terminal:
                return event
        raise AssertionError("a status log's tail ends only with its terminal payload")

    async def _tail(self, cursor: int, idle: float | None, previews: bool = False) -> AsyncIterator[Event | None]:
        self._more = False
        async for entry in self.status.follow(self.task_id, cursor, idle=idle, previews=previews):
            if entry is None:
                if self.strand_check is not None:
                    await self.strand_check(self.task_id)
                yield None
            elif entry.terminal:
                yield await _terminal(entry.seq, entry.data)
            else:
                self._more = entry.more
                yield Event(entry.seq, entry.data, preview=entry.preview)


async def published_events(job: RunningJob, after: int = 0) -> list[Event] | None:
    """The events (previews left out) a job running here has published after the first `after`,
    so far; None when its feed no longer holds them all (its log has them then). Read at once
    where they may be (`RunningJob.published_now`), else through its events."""
    ready = job.published_now(after)
    if ready is not None:
        return ready
    events: list[Event] = []
    try:
        async for event in job.events(after, idle=0.0):
            if event is None:  # nothing more published yet: it runs
                return events
            if not event.preview:
                events.append(event)
            if event.terminal:
                return events
    except ReaderTooSlow:
        return None
    return events


async def job_summary(job: RunningJob) -> dict[str, Any] | None:
    """The summary (`status.summary`) of a job running here, from what it has published (a
    prompt of ComfyUI's API is answered before its status log is claimed); None when its feed
    no longer holds every event (its log has them then)."""
    events = await published_events(job)
    return None if events is None else summarise(job.task_id, [json.loads(event.data) for event in events])


async def _terminal(seq: int, line: bytes) -> Event:
    payload = await asyncio.to_thread(json.loads, line) if len(line) >= BIG_PAYLOAD else json.loads(line)
    error = error_from_payload(payload) if payload.get("type") == "error" else None
    return Event(seq, line, terminal=True, error=error)


async def ended_now(job: RunningJob) -> bool:
    """Whether a job running here has published its end (as `RunningJob.finished` gives it), told
    without waiting."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0):
            await job.finished()  # at once once it ended: nothing to wait for
            return True
    return False


async def recorded_if_ended(job: RunningJob) -> None:
    """Once a job running here has published its end, its log holds it (at most RECORD_WAIT
    seconds), so that a caller who had the end from this instance (a stream's, an answer's: a task
    nobody named is not held back for its log) finds it in the log it reads next. At once for a
    job not ended: its log is read as it stands."""
    if not await ended_now(job):
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(RECORD_WAIT):
            await job.terminal_recorded()
