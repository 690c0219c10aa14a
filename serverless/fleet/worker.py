"""A worker's consumer: one per ComfyUI this instance owns, taking one job at a time.

    loop: a dead worker's job (XAUTOCLAIM, idle past REDIS_CLAIM_IDLE), else the next queued one
          (XREADGROUP, streams read high -> normal -> low), else wait for one (XREAD BLOCK)
          -> take it (SET NX run:<task>:<entry>; "cancelled" means a gateway removed it first)
          -> `Jobs.start(spec)` (the unchanged pipeline; its recorder writes to Redis)
          -> while it runs: keep the entry ours (XCLAIM, resetting its idle time), watch the
             cancel key -> XACK once the terminal payload is stored.

A job claimed from a dead worker runs once more (a new attempt, its terminal marked `"retried":
true`) unless the dead attempt already stored outputs, or was itself a retry: then it ends
WORKER_LOST (a GPU is not charged twice, and a job that kills its workers does not take the fleet
down one by one). Redis down: the loop waits with backoff and goes on when it is back, without a
restart; the running job goes on too (its recorder keeps its events until they are stored).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from ..delivery.oss import Credentials
from ..errors import ComfyUIUnavailable, ServerlessError, Unavailable, WorkerLost
from ..jobs.job import Job
from ..jobs.registry import Jobs
from ..settings import Settings
from ..status import keys
from ..status.redis import BACKOFF_MAX, BLOCK_SECONDS, DOWN, RedisStatus
from .queue import CANCELLED, cancelled_by_request
from .wire import GROUP, PRIORITIES, decode_spec, stream

log = logging.getLogger(__name__)

CANCEL_POLL = 0.25  # seconds between looks at a running job's cancel key
IDLE_WAIT = 30.0  # longest wait for our ComfyUI to be idle before taking a job
STREAMS = tuple(stream(priority) for priority in PRIORITIES)


@dataclass(frozen=True, slots=True)
class Taken:
    """A queue entry this consumer holds."""

    stream: str
    entry: str
    task_id: str
    spec: bytes
    reclaimed: bool


class Consumer:
    """Takes jobs for one ComfyUI (see the module docstring)."""

    def __init__(self, client: aioredis.Redis, status: RedisStatus, jobs: Jobs, settings: Settings, name: str) -> None:
        self.client = client
        self.status = status
        self.jobs = jobs
        self.settings = settings
        self.name = name
        self.claim_idle_ms = int(settings.redis_claim_idle * 1000)
        self.taken = 0
        self.busy = False
        self._next_claim = 0.0

    async def run_forever(self) -> None:
        """Take and run jobs until the instance drains; outlive Redis outages."""
        delay = 0.1
        await self._groups()
        while self.jobs.accepting:
            if not await self._comfyui_idle():
                continue
            try:
                taken = await self._claim_when_due() or await self._next()
                if taken is not None:
                    await self._handle(taken)
                delay = 0.1
            except (*DOWN, ComfyUIUnavailable, Unavailable) as exc:  # the entry stays ours: claimed again later
                log.warning("consumer %s: Redis is down (%s); again in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
            except rexc.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("consumer %s: the queue's group is gone (Redis lost its data?): creating it", self.name)
                await self._groups()

    async def _comfyui_idle(self) -> bool:
        """Wait (bounded) until our ComfyUI runs nothing and holds nothing: a job stopped a moment
        ago may still be finishing there, and the next one must not queue behind it, nor meet its
        interrupt. False when ComfyUI did not answer (after a pause)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + IDLE_WAIT
        try:
            while True:
                queue = await self.jobs.runtime.comfy.queue()
                if not queue.running and not queue.pending:
                    return True
                if loop.time() > deadline:
                    log.warning(
                        "consumer %s: ComfyUI still holds %d prompt(s); taking a job anyway",
                        self.name,
                        len(queue.running) + len(queue.pending),
                    )
                    return True
                await asyncio.sleep(0.005)  # a finished prompt leaves ComfyUI's queue within milliseconds
        except ServerlessError as exc:
            log.warning("consumer %s: ComfyUI does not answer (%s); no job taken", self.name, exc.message)
            await asyncio.sleep(1.0)
            return False

    async def _groups(self) -> None:
        """The consumer group on every queue stream (from the start: jobs queued before the first
        worker came are taken too)."""
        delay = 0.1
        while True:
            try:
                for name in STREAMS:
                    try:
                        await self.client.xgroup_create(name, GROUP, id="0", mkstream=True)
                    except rexc.ResponseError as exc:
                        if "BUSYGROUP" not in str(exc):
                            raise
                return
            except DOWN as exc:
                log.warning("consumer %s: Redis is down (%s); again in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    # -- taking ------------------------------------------------------------------------------

    async def _claim_when_due(self) -> Taken | None:
        """Look for dead workers' jobs every half idle threshold, not before every job: three
        round trips fewer per job on a busy queue."""
        now = asyncio.get_running_loop().time()
        if now < self._next_claim:
            return None
        self._next_claim = now + self.settings.redis_claim_idle / 2
        return await self._claim()

    async def _claim(self) -> Taken | None:
        """A job whose consumer has been silent past the idle threshold (it died)."""
        for name in STREAMS:
            claimed: Any = await self.client.xautoclaim(
                name, GROUP, self.name, self.claim_idle_ms, start_id="0-0", count=1
            )
            _, entries, deleted = claimed
            if deleted:
                await self.client.xack(name, GROUP, *deleted)
            for entry, fields in entries:
                if fields:
                    return _taken(name, entry, fields, reclaimed=True)
                await self.client.xack(name, GROUP, entry)
        return None

    async def _next(self) -> Taken | None:
        """The next queued job, highest priority first; waits up to BLOCK_SECONDS for one."""
        for name in STREAMS:
            answer: Any = await self.client.xreadgroup(GROUP, self.name, {name: ">"}, count=1)
            for _, entries in answer or []:
                for entry, fields in entries:
                    return _taken(name, entry, fields, reclaimed=False)
        await self._wait_for_news()
        return None

    async def _wait_for_news(self) -> None:
        """Block until an entry no consumer has been given arrives in any stream: XREAD from each
        group's last delivered id wakes at once if one arrived since the look above."""
        async with self.client.pipeline(transaction=False) as pipe:
            for name in STREAMS:
                pipe.xinfo_groups(name)
            answers = await pipe.execute()
        since = {}
        for name, groups in zip(STREAMS, answers, strict=True):
            ours = [g for g in groups if g["name"] in (GROUP, GROUP.encode())]
            since[name] = ours[0]["last-delivered-id"] if ours else "0-0"
        await self.client.xread(since, count=1, block=int(BLOCK_SECONDS * 1000))  # type: ignore[arg-type]

    # -- running -----------------------------------------------------------------------------

    async def _handle(self, taken: Taken) -> None:
        owner_key = keys.run_claim(taken.task_id, taken.entry)
        if not await self.client.set(owner_key, self.name, nx=True, ex=self.status.ttl):
            found: Any = await self.client.get(owner_key)
            owner = (found or b"").decode()
            if owner == CANCELLED or not taken.reclaimed:
                await self._ack(taken)  # removed by a cancel before anyone ran it
                return
            await self.client.set(owner_key, self.name, ex=self.status.ttl)
        dead = await self.status.current(taken.task_id) if taken.reclaimed else 0
        if dead and await self._lost_for_good(taken, dead):
            await self._ack(taken)
            return
        if await self.client.exists(keys.queue_cancel(taken.task_id, taken.entry)):
            attempt = await self.status.begin(taken.task_id)
            await self.status.append_terminal(taken.task_id, attempt.number, cancelled_by_request())
            await self._ack(taken)
            return
        credentials = Credentials.resolve({}, self.settings.cloud_credentials)
        # Run as an async job: `Jobs.start` then refuses it (and we retry) rather than run it
        # without a status log, which is the only way its caller hears of it.
        spec = replace(decode_spec(taken.spec, credentials), mode="async")
        job = await self.jobs.start(spec)
        if dead:  # its owner is gone: readers of that attempt are told at once (the new one is begun)
            await self.client.delete(keys.alive(taken.task_id, dead))
        self.taken += 1
        self.busy = True
        try:
            await self._watch(job, taken)
        finally:
            self.busy = False
        await self._ack(taken)

    async def _lost_for_good(self, taken: Taken, number: int) -> bool:
        """A dead worker's job, whose attempt `number` it began: end it WORKER_LOST (True) when
        that attempt stored outputs or was a retry already; False to run it once more. An attempt
        that ended (its worker died between storing the terminal payload and XACK) is done: True."""
        if await self.status.ended(taken.task_id, number):
            log.info("task_id=%s: its worker died after it ended; acknowledging it", taken.task_id)
            return True
        error: ServerlessError | None = None
        if number >= 2:
            error = WorkerLost(
                f"the job's worker died on attempt {number} too: it is not run again", raw={"attempt": number}
            )
        elif await self.status.has_outputs(taken.task_id, number):
            error = WorkerLost(
                "the job's worker died after its outputs were made: it is not run again, "
                "so that a GPU is not charged twice",
                raw={"attempt": number},
            )
        if error is None:
            log.warning("task_id=%s: its worker died; running it again here (%s)", taken.task_id, self.name)
            return False
        log.warning("task_id=%s: %s", taken.task_id, error.message)
        await self.status.append_terminal(taken.task_id, number, error)
        return True

    async def _watch(self, job: Job, taken: Taken) -> None:
        """Until the job's terminal payload is stored: keep its entry ours and stop it if asked."""
        refresh_every = max(self.settings.redis_claim_idle / 3, CANCEL_POLL)
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        finished = asyncio.ensure_future(job.finished())
        try:
            while not finished.done():
                await asyncio.wait([finished], timeout=CANCEL_POLL)
                try:
                    if await self.client.exists(keys.queue_cancel(taken.task_id, taken.entry)):
                        job.stop(cancelled_by_request(), "cancelled by request")
                    if loop.time() - refreshed >= refresh_every:
                        await self.client.xclaim(taken.stream, GROUP, self.name, 0, [taken.entry], justid=True)
                        refreshed = loop.time()
                except DOWN:
                    pass  # the job goes on; its recorder keeps its events until Redis is back
        finally:
            if not finished.done():
                finished.cancel()

    async def _ack(self, taken: Taken) -> None:
        """XACK, retried until Redis answers: an unacknowledged job would run again."""
        delay = 0.1
        while True:
            try:
                await self.client.xack(taken.stream, GROUP, taken.entry)
                return
            except DOWN as exc:
                log.warning("task_id=%s: could not acknowledge (%s); again in %.1fs", taken.task_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)


def _taken(name: str, entry: bytes | str, fields: dict[bytes, bytes], reclaimed: bool) -> Taken:
    entry_id = entry.decode() if isinstance(entry, bytes) else entry
    return Taken(name, entry_id, fields[b"task_id"].decode(), fields[b"spec"], reclaimed)
