"""A task's events followed from any instance, numbered as in its original stream: an
`EventSource` for `EventStream` and `json_response`.

An event's number is its place in the attempt's status log (the feed's seq: the status log
records every event the feed publishes, in order). Where the job runs here, its feed serves the
events live; where the feed no longer holds the ones asked for, or the job runs elsewhere, the
log is read again every POLL seconds until its terminal payload (the "instance lost" error the
log adds when the owner went silent counts as one).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from ..errors import error_from_payload
from ..jobs.feed import Event, ReaderTooSlow
from ..jobs.job import Job
from ..status.log import StatusLog

log = logging.getLogger(__name__)

POLL = 0.25  # seconds between reads of a log another instance writes
BIG_PAYLOAD = 256 * 1024  # terminal payloads from this size on are decoded in a thread


class TaskEvents:
    """The events of task `task_id`; `job` is its job when it runs on this instance."""

    def __init__(self, task_id: str, status: StatusLog, job: Job | None, poll: float = POLL) -> None:
        self.task_id = task_id
        self.status = status
        self.job = job
        self.poll = poll

    async def events(self, after: int | None = None, idle: float | None = None) -> AsyncIterator[Event | None]:
        """Every event after number `after` until the terminal one; None after `idle` seconds
        without one (for keep-alives)."""
        cursor = after or 0
        if self.job is not None:
            try:
                async for event in self.job.events(cursor, idle):
                    if event is not None:
                        cursor = event.seq
                    yield event
                return
            except ReaderTooSlow as exc:  # the feed forgot them: the log has them all
                log.info("task_id=%s: reading its status log from event %d (%s)", self.task_id, cursor + 1, exc)
        async for event in self._tail(cursor, idle):
            yield event

    def more_ready(self, seq: int) -> bool:
        """Each event is sent as it comes (a log is read in batches already)."""
        return False

    async def finished(self) -> Event:
        """The terminal event (its `error` set for an error object)."""
        if self.job is not None:
            return await self.job.finished()
        async for event in self._tail(0, None):
            if event is not None and event.terminal:
                return event
        raise AssertionError("a status log's tail ends only with its terminal payload")

    async def _tail(self, cursor: int, idle: float | None) -> AsyncIterator[Event | None]:
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while True:
            lines, ended = await self.status.tail(self.task_id, cursor)
            for index, line in enumerate(lines, start=1):
                cursor += 1
                if ended and index == len(lines):
                    yield await _terminal(cursor, line)
                    return
                yield Event(cursor, line)
            if ended:
                return  # resumed after the terminal payload: nothing more to say
            if lines:
                quiet_since = loop.time()
            elif idle is not None and loop.time() - quiet_since >= idle:
                quiet_since = loop.time()
                yield None
            await asyncio.sleep(self.poll)


async def _terminal(seq: int, line: bytes) -> Event:
    payload = await asyncio.to_thread(json.loads, line) if len(line) >= BIG_PAYLOAD else json.loads(line)
    error = error_from_payload(payload) if payload.get("type") == "error" else None
    return Event(seq, line, terminal=True, error=error)
