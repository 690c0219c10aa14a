"""A gateway's jobs: submitted to the Redis queue and followed through the Redis status store.

`RemoteJobs` is the gateway's `JobRunner` and `RemoteJob` its `RunningJob`
(`serverless.jobs.runner`): the transports call the same `start`, `events`, `finished` and
`abandon` as on one box, so the JSON, SSE and websocket renderings are those of a local job.
Admission is the queue's: at most MAX_QUEUED_JOBS wait in it, all gateways together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ..core import jsontext
from ..errors import Busy, InvalidParams, ServerlessError, Unavailable, error_from_payload
from ..jobs.feed import Event
from ..jobs.job import Job
from ..jobs.registry import BUSY_RETRY_AFTER, Jobs
from ..jobs.spec import JobSpec
from ..ops.metrics import Metrics
from ..status.redis import RedisStatus, translated
from .heartbeat import WorkerView, live_workers, missing
from .needs import Needs, needs_of_spec
from .queue import RedisQueue

log = logging.getLogger(__name__)

STRANDED_CHECK = 1.0  # seconds between a waiting follower's looks at its job's place in the queue
# Readings a job's admission uses, renewed off its way: one older than *_FRESH is read again in
# the background (the job goes on with it), one older than *_STALE, or one that would refuse the
# job, is read again first.
WORKERS_FRESH = 1.0  # seconds the workers' heartbeats are trusted by the check of what a job needs
WORKERS_STALE = 5.0
DEPTH_FRESH = 0.1  # seconds a reading of the queue's depth is trusted by admission (plus what we added since)
DEPTH_ROOMY = 0.5  # DEPTH_FRESH while the queue is under half full (the limit is not near: fewer reads)
DEPTH_STALE = 1.0
HELD_MAX = 60.0  # seconds a job's log stays registered with the status watch for a follower that does not come


class RemoteJob:
    """A job that runs on some worker, seen through its status stream."""

    def __init__(
        self,
        spec: JobSpec,
        task_id: str,
        attempt: int | None,
        status: RedisStatus,
        runner: RemoteJobs,
        held: tuple[str, asyncio.Event] | None = None,
    ) -> None:
        self.spec = spec
        self.task_id = task_id
        self.prompt_id = task_id  # the worker's prompt id is in the result
        self.attempt = attempt
        self.status = status
        self.runner = runner
        self._terminal: Event | None = None
        self._lock = asyncio.Lock()
        self._more = False  # the read that brought the last event holds more (`Entry.more`)
        # Queued a moment ago as a new attempt (not attached to an earlier request's): its log was
        # empty then, and the first follower's first read is the gateway's watch's (`follow`).
        self._unbegun = attempt is not None
        # Its log registered with the status watch before it was queued (`RedisQueue.submit`),
        # until its follower has registered itself (at most HELD_MAX seconds).
        self._held = held
        self._held_until = None if held is None else asyncio.get_running_loop().call_later(HELD_MAX, self._let_held_go)

    def events(
        self, after: int | None = None, idle: float | None = None, previews: bool = False
    ) -> AsyncIterator[Event | None]:
        """The job's events as its worker stores them (None after `idle` seconds of silence),
        with `previews` the newest of the previews it keeps beside them.
        While no worker has begun it, the queue is asked now and then whether it still can be
        (QUEUE_TTL, a queue that lost its data): a caller never waits for ever."""
        return self._follow(after, idle, previews)

    async def _follow(
        self, after: int | None, idle: float | None, previews: bool, last_only: bool = False
    ) -> AsyncIterator[Event | None]:
        """`events`; with `last_only`, the last event of each read alone (`finished`)."""
        loop = asyncio.get_running_loop()
        begun, quiet_since, seq = bool(after), loop.time(), after or 0
        look_every = min(idle or STRANDED_CHECK, STRANDED_CHECK)
        unbegun, self._unbegun = self._unbegun and not after, False
        try:
            with self.runner.following():
                follow = self.status.follow(
                    self.task_id, after or 0, self.attempt, look_every, previews, unbegun, last_only
                )
                async for entry in follow:
                    if self._held is not None:  # the follow has registered the log itself
                        self._let_held_go()
                    if self.runner.letting_go.is_set():  # this gateway stops: the job goes on without it
                        yield self._let_go(seq + 1)
                        return
                    if entry is None:
                        if not begun:
                            await self.runner.end_if_stranded(self.task_id, submitted=True)
                        if idle is not None and loop.time() - quiet_since >= idle:
                            quiet_since = loop.time()
                            yield None
                        continue
                    self._more = entry.more
                    if entry.preview:
                        begun, quiet_since = True, loop.time()
                        yield Event(entry.seq, entry.data, preview=True)
                        continue
                    begun, quiet_since, seq = True, loop.time(), entry.seq
                    event = await _event(entry.seq, entry.data) if entry.terminal else Event(entry.seq, entry.data)
                    if event.terminal and self._terminal is None:
                        self._terminal = event
                        self.runner.ended(self, event.error)
                    yield event
        finally:
            self._let_held_go()  # when the follow ended before its first entry

    def _let_held_go(self) -> None:
        if self._held is not None:
            self.status.watch.release(*self._held)
            self._held = None
        if self._held_until is not None:
            self._held_until.cancel()
            self._held_until = None

    def _let_go(self, seq: int) -> Event:
        """The terminal payload of this caller alone when its gateway stops before the job ends:
        the job runs on, and its result waits in the status store."""
        error = Unavailable(
            f"this gateway is shutting down; the job goes on: follow it on another gateway "
            f"(GET /api/serverless/status?task_id={self.task_id})",
            raw={"task_id": self.task_id, "state": "running"},
        )
        self._terminal = Event(seq, jsontext.dumps(error.to_payload()), True, error)
        return self._terminal

    async def more_after(self, seq: int, within: float) -> bool:
        """Whether the read of the status stream that brought event `seq` holds more: Redis hands
        a burst over in one read (there is no waiting for more here)."""
        return self._more

    async def finished(self) -> Event:
        """The terminal event (followed once; later calls return it at once)."""
        async with self._lock:
            if self._terminal is None:
                async for _ in self._follow(None, None, False, last_only=True):  # the events before it unread
                    pass
        assert self._terminal is not None
        return self._terminal

    async def terminal_recorded(self) -> bytes:
        """The terminal payload: read from the status store, so stored there already."""
        return (await self.finished()).data

    def abandon(self, reason: str) -> None:
        """The caller went away: cancel the job wherever it is."""
        self.runner.cancel_later(self.task_id, reason)

    def published_now(self, after: int = 0) -> list[Event] | None:
        """None: its events are in the status store, not here (`events` reads them)."""
        return None

    def tap(self, call: Callable[[Event], None], previews: bool = False) -> Callable[[], None] | None:
        """None: its events are published where it runs."""
        return None


def _lacking(needs: Needs, workers: list[WorkerView], lane: str) -> dict[str, list[str]] | None:
    """`missing`, at once when one worker of the lane has it all (the union of every worker's
    node classes, hundreds each with a real ComfyUI, is made only for a job none can run alone)."""
    if any(view.lane == lane and view.able(needs) for view in workers):
        return None
    return missing(needs, workers, lane)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


async def _event(seq: int, data: bytes) -> Event:
    """A terminal event, with its error when it is one."""
    error = None
    if b'"serverless_api"' not in data[:64]:
        payload = await _decoded(data)
        if payload.get("type") == "error":
            error = error_from_payload(payload)
    return Event(seq, data, True, error)


async def _decoded(data: bytes) -> dict[str, Any]:
    if len(data) < 256 * 1024:
        return dict(jsontext.loads(data))
    return dict(await asyncio.to_thread(jsontext.loads, data))


class RemoteJobs:
    """A gateway's `JobRunner`: starting a job enqueues it."""

    def __init__(
        self,
        queue: RedisQueue,
        status: RedisStatus,
        local: Jobs | None = None,
        max_queued: int = 1000,
        metrics: Metrics | None = None,
        queue_ttl: float = 3600.0,
        caller_credentials_upload: bool = True,
    ) -> None:
        self.queue = queue
        self.status = status
        self.local = local  # this instance's own worker's jobs (ROLE=all|worker), drained with it
        self.max_queued = max_queued
        self.queue_ttl = queue_ttl
        self.caller_credentials_upload = caller_credentials_upload  # OSS uploads with a request's own keys
        self.metrics = metrics or Metrics()
        self.accepting = True
        self._cancels: set[asyncio.Task[None]] = set()
        self._followers = 0  # callers following a job through this gateway now
        self._no_followers = asyncio.Event()
        self._no_followers.set()
        self.letting_go = asyncio.Event()  # set when a drain's time is up: followers end at once
        self._depth: tuple[float, int] | None = None  # (when read, jobs waiting then)
        self._added = 0  # jobs this gateway queued since that reading
        self._reading: asyncio.Future[None] | None = None  # the reading of the depth under way
        self._workers: tuple[float, list[WorkerView]] | None = None  # (when read, live workers then)
        self._reading_workers: asyncio.Future[None] | None = None  # the reading of the workers under way

    @property
    def running(self) -> int:
        """Jobs this instance runs itself (as a worker)."""
        return self.local.running if self.local is not None else 0

    @property
    def admitted(self) -> int:
        """Jobs waiting in the queue (all gateways), as last read."""
        return self._depth[1] + self._added if self._depth is not None else 0

    async def _waiting(self, fresh: bool = False) -> int:
        """Jobs waiting in the queue: read from Redis at most every DEPTH_FRESH seconds (DEPTH_ROOMY
        while under half of MAX_QUEUED_JOBS wait; one read at a time: the callers that find the
        reading stale meanwhile share it; waited for only when older than DEPTH_STALE, or
        `fresh`), plus those this gateway queued since (so that a burst does not slip past the
        limit)."""
        age = time.monotonic() - self._depth[0] if self._depth is not None else None
        roomy = self._depth is not None and 2 * (self._depth[1] + self._added) < self.max_queued
        if age is None or age > (DEPTH_ROOMY if roomy else DEPTH_FRESH):
            if self._reading is None:
                self._reading = asyncio.ensure_future(self._read_depth())
                self._reading.add_done_callback(_retrieved)  # a failure its callers all left is no warning
            if age is None or age > DEPTH_STALE or fresh:
                await asyncio.shield(self._reading)
        assert self._depth is not None
        return self._depth[1] + self._added

    async def _read_depth(self) -> None:
        try:
            self._depth, self._added = (time.monotonic(), await self.queue.depth()), 0
        finally:
            self._reading = None

    async def check_room(self) -> None:
        """BUSY (with `Retry-After`) while MAX_QUEUED_JOBS jobs wait in the queue."""
        if not self.max_queued or await self._waiting() < self.max_queued:
            return
        if self._depth is not None and time.monotonic() - self._depth[0] > DEPTH_FRESH:
            await self._waiting(fresh=True)  # a refusal is judged by a fresh reading
        if self.admitted >= self.max_queued:
            self.metrics.jobs_refused_busy.inc()
            raise Busy(
                f"the queue is full: {self.admitted} job(s) wait for a worker (MAX_QUEUED_JOBS="
                f"{self.max_queued}); retry in {BUSY_RETRY_AFTER}s",
                BUSY_RETRY_AFTER,
                raw={"queued": self.admitted, "max_queued_jobs": self.max_queued},
            )

    async def refusal(self) -> str | None:
        """Only this gateway's own state: a full queue (or Redis down) is every gateway's, and
        taking them all out of a load balancer would answer callers with its bare 503 instead
        of the API's BUSY (or UNAVAILABLE) and stop their status polls too."""
        if not self.accepting:
            return "this gateway is draining and takes no new jobs"
        return None

    def limits(self) -> dict[str, Any]:
        full = bool(self.max_queued) and self.admitted >= self.max_queued
        return {"jobs": self.running, "queued": self.admitted, "max_queued_jobs": self.max_queued, "queue_full": full}

    def get(self, task_id: str) -> Job | None:
        """A task's job when it runs on this instance (a worker that is also a gateway)."""
        return self.local.get(task_id) if self.local is not None else None

    async def start(self, spec: JobSpec, prompt_id: str | None = None) -> RemoteJob:
        if not self.accepting:
            raise Unavailable("this gateway is shutting down and takes no new jobs")
        caller_keys = spec.credentials is not None and spec.credentials.from_caller
        if spec.outputs.oss and caller_keys and self.caller_credentials_upload:
            raise InvalidParams(
                "output_oss with the request's own x-fc-access-key-* credentials cannot go through a fleet's "
                "queue (credentials never enter Redis): workers upload with their own ALIBABA_CLOUD_* "
                "credentials; send the request without those headers"
            )
        await self.check_room()
        await self._check_able(spec)
        followed = spec.mode != "async"  # its caller follows it from now on
        submitted = await self.queue.submit(spec, spec.priority, spec.idempotency_key, followed)
        self._added += 1
        self.metrics.job_started(spec.mode)
        return RemoteJob(spec, submitted.task_id, submitted.attempt, self.status, self, submitted.held)

    async def _check_able(self, spec: JobSpec) -> None:
        """INVALID_PARAMS with `raw.missing` for a job needing node classes or model files no
        live worker of its lane has (heartbeats, read at most every WORKERS_FRESH seconds; see
        WORKERS_STALE)."""
        needs = await needs_of_spec(spec.workflow, spec.big)
        lacking = _lacking(needs, await self._live_workers(), spec.lane)
        if lacking is not None and self._workers is not None and time.monotonic() - self._workers[0] > WORKERS_FRESH:
            lacking = _lacking(needs, await self._live_workers(fresh=True), spec.lane)  # refused by a fresh reading
        if lacking is not None:
            lane = f"lane {spec.lane!r}" if spec.lane else "the default lane"
            what = ", ".join(lacking["nodes"] + lacking["models"])
            raise InvalidParams(
                f"no worker of {lane} can run this workflow: it lacks {what}",
                raw={"missing": lacking, "lane": spec.lane},
            )

    async def _live_workers(self, fresh: bool = False) -> list[WorkerView]:
        """The live workers as last read: read again in the background when older than
        WORKERS_FRESH, first when older than WORKERS_STALE (or `fresh`); one read at a time."""
        age = time.monotonic() - self._workers[0] if self._workers is not None else None
        if age is None or age > WORKERS_FRESH:
            if self._reading_workers is None:
                self._reading_workers = asyncio.ensure_future(self._read_workers())
                self._reading_workers.add_done_callback(_retrieved)
            if age is None or age > WORKERS_STALE or fresh:
                await asyncio.shield(self._reading_workers)
        assert self._workers is not None
        return self._workers[1]

    async def _read_workers(self) -> None:
        try:
            with translated():
                self._workers = (time.monotonic(), await live_workers(self.queue.client))
        finally:
            self._reading_workers = None

    async def measure(self) -> None:
        """The queue's depth, jobs taken and workers, into this gateway's metrics (the last
        reading stays while Redis does not answer: the scrape itself still answers)."""
        try:
            groups = await self.queue.groups()
        except ServerlessError as exc:
            log.warning("the queue's figures could not be read for /metrics: %s", exc.message)
            return
        for priority, group in groups.items():
            self.metrics.queue_read(priority, group.lag, group.pending)
        self.metrics.queue_consumers.set(max((group.consumers for group in groups.values()), default=0))

    def ended(self, job: RemoteJob, error: ServerlessError | None) -> None:
        """A job this gateway queued was seen ending (counted as one box counts its own)."""
        self.metrics.job_ended(job.spec.mode, error, {})

    async def cancel(self, task_id: str) -> str:
        """Through the queue: removed while queued, else its worker stops it."""
        return await self.queue.cancel(task_id)

    async def end_if_stranded(self, task_id: str, submitted: bool = False) -> None:
        """End a task no worker began that can no longer run (QUEUE_TTL; the queue lost a task
        this gateway `submitted`)."""
        try:
            await self.queue.end_if_stranded(task_id, self.queue_ttl, submitted)
        except ServerlessError as exc:  # Redis down: its follower learns that on its own
            log.debug("task_id=%s: the queue could not be asked (%s)", task_id, exc.message)

    async def queue_position(self, task_id: str) -> int | None:
        return await self.queue.position(task_id)

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

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        """Count a caller following a job here while it does."""
        self._followers += 1
        self._no_followers.clear()
        try:
            yield
        finally:
            self._followers -= 1
            if not self._followers:
                self._no_followers.set()

    async def _followers_gone(self, within: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(within, 0.0)):
                await self._no_followers.wait()
        return self._no_followers.is_set()

    async def drain(self, timeout: float) -> None:
        """Stop taking jobs (the queued ones stay queued for other workers); wait up to `timeout`
        for the callers following jobs here, then answer each with a terminal error payload (its
        job goes on); this instance's own worker finishes its job within `timeout` too."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._cancels:
            await asyncio.wait(self._cancels, timeout=timeout)
        if not await self._followers_gone(deadline - loop.time()):
            log.info("letting %d caller(s) go: their jobs go on without this gateway", self._followers)
            self.letting_go.set()
            await self._followers_gone(2 * STRANDED_CHECK)  # each notices within a look
        if self.local is not None:
            await self.local.drain(max(0.0, deadline - loop.time()))
