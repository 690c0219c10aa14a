"""A job as the worker running it watches it: a cancel stops it the moment a gateway stores one
(XREAD BLOCK on its `cancel:` stream, no polling; from TOLD_AFTER into the run: a short job ends
unwatched), its queue entry stays the worker's (XCLAIM every third of REDIS_CLAIM_IDLE), and its
end is decided in Redis against a cancel (`queue.END`), before its terminal payload is stored, or
in the step that stores it (`status.redis.APPEND_END`, when the worker began its attempt): a
cancel answered "cancelling" always wins, one answered 409 never.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from ..errors import ExecutionInterrupted, ServerlessError
from ..jobs.feed import Event, Feed, Outcome, Result
from ..jobs.job import Job, Settle, SettleRecorded
from ..status import keys
from ..status.redis import BACKOFF_MAX, BLOCK_SECONDS, DOWN, Ending, RedisAttempt, RedisStatus
from .queue import cancelled_by_request
from .wire import GROUP

log = logging.getLogger(__name__)

# Seconds into a run before its cancel stream is read: a job that ends sooner costs no read (its
# end still decides against a cancel in Redis); one cancelled sooner stops this much later.
TOLD_AFTER = 0.010


def state_of(outcome: Outcome) -> str:
    """How a job ended, as job control names it."""
    if isinstance(outcome, Result):
        return "succeeded"
    return "cancelled" if isinstance(outcome, ExecutionInterrupted) else "failed"


class Watch:
    """One taken submission (`entry` of `stream`) of a task, as its consumer watches it."""

    def __init__(
        self, client: aioredis.Redis, end: AsyncScript, stream: str, entry: str, task_id: str, consumer: str, ttl: int
    ) -> None:
        self.client = client
        self.end = end
        self.stream = stream
        self.entry = entry
        self.task_id = task_id
        self.consumer = consumer
        self.ttl = ttl
        self.cancel_key = keys.queue_cancel(task_id, entry)
        self.ended_key = keys.queue_ended(task_id, entry)
        self.settled = asyncio.Event()  # its end is recorded in `ended:`
        self.acknowledged = False  # its entry was acknowledged with its last events (`settler_recorded`)
        self.newest_handoff: str | None = None  # the consumer's hand-off stream's newest id then ("": none)
        self._reading = False  # the read of `cancel:` and `ended:` has begun (`_told`)

    async def settle(self, state: str) -> bool:
        """Record in Redis how the job ends (`queue.END`): False when a cancel was acknowledged
        first (it then ends cancelled). Retried while Redis is down: its terminal payload could
        not be stored before then either."""
        delay = 0.1
        while True:
            try:
                won = bool(int(await self.end(keys=[self.cancel_key, self.ended_key], args=[state, self.ttl])))
                self.settled.set()
                return won
            except DOWN as exc:
                log.warning("task_id=%s: Redis is down (%s); its end is decided in %.1fs", self.task_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def settler(self) -> Settle:
        """What the job asks at its end (`Job.settle`): the error a cancel that came first ends it with."""

        async def settle(outcome: Outcome) -> ServerlessError | None:
            return None if await self.settle(state_of(outcome)) else cancelled_by_request()

        return settle

    def settler_recorded(self, status: RedisStatus, attempt: RedisAttempt, feed: Feed) -> SettleRecorded:
        """`settler` in the step that stores the job's last events in its status log
        (`Job.settle_recorded`, `RedisStatus.write_settled`), which acknowledges its entry too:
        one round trip at the job's end. `acknowledged` says so after it (the hand-off stream's
        newest id then in `newest_handoff`)."""

        async def settle(outcome: Outcome, last: list[Event]) -> ServerlessError | bool:
            handoff = keys.handoff(self.consumer)
            ending = Ending(
                self.cancel_key, self.ended_key, state_of(outcome), self.ttl, self.stream, GROUP, self.entry, handoff
            )
            stored = await status.write_settled(attempt, feed, last, ending)
            if stored is None:
                return False
            self.settled.set()
            if stored:
                self.acknowledged, self.newest_handoff = True, ending.newest_handoff
            return True if stored else cancelled_by_request()

        return settle

    async def follow(self, job: Job, refresh_every: float) -> None:
        """Until the job's terminal payload is stored: keep its entry ours, and stop the job the
        moment a cancel is acknowledged for it."""
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        finished = asyncio.ensure_future(job.terminal_recorded())
        told = asyncio.ensure_future(self._told())
        try:
            while not finished.done():
                waiting = [finished] if told.done() else [finished, told]
                timeout = max(refreshed + refresh_every - loop.time(), 0)
                await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if told in waiting and told.done() and _result(told) == "cancel":
                    job.stop(cancelled_by_request(), "cancelled by request")
                    await self.settle("cancelled")  # decided: a later cancel answers 409
                if loop.time() - refreshed >= refresh_every:
                    try:
                        await self.client.xclaim(self.stream, GROUP, self.consumer, 0, [self.entry], justid=True)
                    except DOWN:
                        pass  # the job goes on; its recorder keeps its events until Redis is back
                    refreshed = loop.time()
            if self.settled.is_set() and self._reading and not told.done():  # its `ended:` entry wakes the XREAD
                await asyncio.wait([told], timeout=BLOCK_SECONDS)
        finally:
            for task in (finished, told):
                task.cancel()
            await asyncio.gather(finished, told, return_exceptions=True)

    async def _told(self) -> str:
        """Block until the job's `cancel:` or `ended:` stream holds an entry: "cancel" or "ended"
        (waits out Redis outages), from TOLD_AFTER on."""
        await asyncio.sleep(TOLD_AFTER)
        self._reading = True
        delay = 0.1
        while True:
            try:
                answer: Any = await self.client.xread(
                    {self.cancel_key: "0-0", self.ended_key: "0-0"}, count=1, block=int(BLOCK_SECONDS * 1000)
                )
            except DOWN:
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            for key, _ in answer or []:
                return "cancel" if key in (self.cancel_key, self.cancel_key.encode()) else "ended"


def _result(task: asyncio.Future[str]) -> str | None:
    """What a finished watch said; None when it failed (logged: the job's end still settles)."""
    if task.cancelled():
        return None
    if task.exception() is not None:
        log.error("watching for cancels failed: %r", task.exception())
        return None
    return task.result()
