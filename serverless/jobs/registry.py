"""The jobs an app instance runs: admitted (at most one running and `max_pending` waiting, else
BUSY), started as tasks it owns, counted for health and metrics, drained on stop.

Each job has two tasks: its run (the pipeline) and its recorder (the status log, a pinned reader
of its feed). They are kept in two sets: a drain cancels runs, never recorders, which end by
themselves once their feed ends with the terminal payload.

Running jobs are also indexed by task id, for job control: a cancel asked here stops the job at
once; one asked through another instance is a request beside the job's log (a file, or a Redis
key), which `watch_cancels` looks for every CANCEL_POLL seconds (one stat, or one round trip).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from ..delivery.webhooks import Webhooks
from ..errors import Busy, Conflict, ExecutionInterrupted, InvalidParams, NotFound, ServerlessError, Unavailable
from ..ops.logs import bind_job
from ..ops.metrics import Metrics
from ..status.store import StatusStore
from ..status.summary import ENDED
from ..tenants.service import Tenants
from ..tenants.usage import job_usage
from .feed import Feed
from .job import Job, Runtime
from .spec import JobSpec

log = logging.getLogger(__name__)

CANCEL_POLL = 0.5  # seconds between looks for cancel requests left by other instances
BUSY_RETRY_AFTER = 5  # seconds a refused caller is told to wait; FC retries elsewhere meanwhile
CLAIM_AFTER = 0.02  # seconds a stream's log claim waits for its inputs to be staged (`_begin_and_record`)


class Jobs:
    """Owns every running job's tasks; no job outlives the app without being waited for."""

    def __init__(
        self,
        runtime: Runtime,
        status: StatusStore[Any],
        buffer_events: int,
        max_event_bytes: int,
        max_pending: int = 256,
        metrics: Metrics | None = None,
        webhooks: Webhooks | None = None,
        tenants: Tenants | None = None,
    ) -> None:
        self.runtime = runtime
        self.status = status
        self.buffer_events = buffer_events
        self.max_event_bytes = max_event_bytes
        self.max_pending = max_pending
        self.metrics = metrics or Metrics()
        self.webhooks = webhooks
        self.tenants = tenants or Tenants()
        self.metrics.count_jobs(lambda: self.admitted)
        self.accepting = True
        self._admitted = 0  # from admission (before the first await of `start`) to the run's end
        self._runs: set[asyncio.Task[None]] = set()
        self._recorders: set[asyncio.Task[None]] = set()
        self._index: dict[str, tuple[Job, Any]] = {}  # task id -> its running job and its attempt (or None)

    @property
    def running(self) -> int:
        """Jobs under way on this instance."""
        return len(self._runs)

    @property
    def admitted(self) -> int:
        """Jobs admitted and not ended: the one ComfyUI runs, those waiting, those starting."""
        return self._admitted

    @property
    def full(self) -> bool:
        """True when a new job would be refused with BUSY."""
        return self._admitted > self.max_pending

    async def check_room(self) -> None:
        """Refuse (BUSY) when this instance holds all the jobs it admits: before a body is read."""
        self._admit_or_refuse()

    async def refusal(self) -> str | None:
        """Why a new job would be refused now; None when it would be admitted."""
        if not self.accepting:
            return "this instance is draining and takes no new jobs"
        if self.full:
            return (
                f"this instance is full: {self._admitted} job(s) admitted, at most 1 running and "
                f"{self.max_pending} waiting (MAX_PENDING_JOBS)"
            )
        return None

    def limits(self) -> dict[str, Any]:
        return {"jobs": self._admitted, "max_pending_jobs": self.max_pending}

    def _admit_or_refuse(self) -> None:
        if self.full:
            self.metrics.jobs_refused_busy.inc()
            raise Busy(
                f"this instance is busy: {self._admitted} job(s) admitted, at most 1 running and "
                f"{self.max_pending} waiting (MAX_PENDING_JOBS); retry in {BUSY_RETRY_AFTER}s",
                BUSY_RETRY_AFTER,
                raw={"admitted": self._admitted, "max_pending_jobs": self.max_pending},
            )

    def get(self, task_id: str) -> Job | None:
        """The task's job when it runs on this instance."""
        found = self._index.get(task_id)
        return found[0] if found is not None else None

    async def start(self, spec: JobSpec, prompt_id: str | None = None, attempt: Any = None) -> Job:
        """Start a job in the background and return it; follow `job.events()` for its events,
        which are also recorded as a new attempt in the task's status log. BUSY past
        MAX_PENDING_JOBS. `prompt_id` is one chosen beforehand (an idempotency claim names the
        task before it starts); the caller's context names the job in log lines from now on.
        `attempt`: the attempt its caller began in the status store already (a fleet's worker,
        in the round trip that takes the job), recorded instead of a new one."""
        if not self.accepting:
            raise Unavailable("this instance is shutting down and takes no new jobs")
        self._admit_or_refuse()
        self._admitted += 1  # before any await: concurrent starts cannot all pass the check
        try:
            native_id = spec.task_id if spec.native else None  # ComfyUI's API: the prompt id is the task id
            job, claimed = await self._start(spec, prompt_id or native_id or str(uuid.uuid4()), attempt)
        except BaseException:
            self._admitted -= 1
            raise
        self.metrics.job_started(spec.mode)
        if claimed is not None:  # from here on its run counts it: a refusal stops the run instead
            await self._claimed(job, claimed)
        if spec.callback_url is not None and self.webhooks is not None:
            self.webhooks.start(job, job.task_id, spec.callback_url, job.terminal_to_deliver())
        return job

    async def _start(self, spec: JobSpec, prompt_id: str, begun: Any = None) -> tuple[Job, asyncio.Future[None] | None]:
        """The job and its tasks; with the claim of its log still under way (a future, settled
        once it is made or failed) for a prompt of ComfyUI's API."""
        task_id = spec.task_id or prompt_id
        bind_job(task_id, prompt_id)  # the job's tasks, created below, inherit it
        feed = Feed(self.buffer_events, max_bytes=self.max_event_bytes)
        known: asyncio.Event | None = None
        claimed: asyncio.Future[None] | None = None
        recorder: Coroutine[Any, Any, None] | None
        if begun is not None:
            # An attempt its caller began (a fleet worker, in the step that took the job from the
            # queue): the task is known to every instance already; its log records this run.
            attempt, recorder = begun, self.status.record(begun, feed)
        elif spec.native and not spec.named:
            # A prompt of ComfyUI's API whose id was made here: nobody knows it before the answer
            # names it, so its log is claimed with its first append (`record_new`), as a sync
            # job's nobody named. Until then this instance answers for it from the job itself
            # (`/history`, `/queue`, `/interrupt`, the task's summary, its events, a cancel):
            # the answer and ComfyUI's messages wait for no thread's trip (milliseconds on a
            # loaded machine), and one trip a prompt is saved.
            attempt, recorder = None, self.status.record_new(task_id, feed, self._claimed_attempt(task_id))
        elif spec.native:
            # ComfyUI's API, a prompt id its client chose (it may ask about it before the answer):
            # its client waits for ComfyUI's messages more than for the answer, so the prompt goes
            # to ComfyUI while its log is claimed; the answer waits for the claim (`start`), and
            # so do its events (Job.known).
            attempt, known, claimed = None, asyncio.Event(), asyncio.get_running_loop().create_future()
            recorder = self._begin_and_record(spec, task_id, feed, known, claimed)
        elif spec.named or spec.mode == "async":
            # Its caller may poll the status at once (on any instance): known before we answer.
            attempt = await self._begin(spec, task_id)
            recorder = None if attempt is None else self.status.record(attempt, feed)
        elif not spec.observed:
            # No one knows this id before the answer: the log is claimed with its first append.
            attempt, recorder = None, self.status.record_new(task_id, feed, self._claimed_attempt(task_id))
        else:
            # A stream's caller learns the id from its first event: the log is claimed beside
            # the run, off the caller's path, and the events wait for the claim (Job.known).
            attempt, known = None, asyncio.Event()
            recorder = None
        job = Job(spec, self.runtime, feed, prompt_id, task_id)
        if recorder is None and known is not None:
            recorder = self._begin_and_record(spec, task_id, feed, known, after=job.staged)
        job.known = known
        job.gate = self.tenants.gates.slot  # over its key's concurrency, it waits behind its own
        # The run's task first: its prompt goes to ComfyUI before the log's claim takes its turn.
        run = _own(self._runs, self._run(job), f"job {task_id}")
        recorder_task = None if recorder is None else _own(self._recorders, recorder, f"status {task_id}")
        job.recorder = recorder_task
        self._index[task_id] = (job, attempt)
        # Indexed until its terminal payload is in the log too: a cancel asked meanwhile must find
        # the job here (ended: 409), not read a log without its end and ask for a cancel (202).
        tasks = [run] if recorder_task is None else [run, recorder_task]

        def forget(_: object) -> None:
            if all(task.done() for task in tasks):
                self._forget(task_id, job)

        for task in tasks:
            task.add_done_callback(forget)
        return job, claimed

    async def _claimed(self, job: Job, claimed: asyncio.Future[None]) -> None:
        """Wait for the claim of a started job's log; when it fails (or its caller goes), the
        job is stopped (its ComfyUI prompt cancelled) and the claim's error raised."""
        try:
            await claimed
        except ServerlessError as exc:
            job.stop(exc, "its status log could not be claimed")
            raise
        except BaseException:
            job.stop(ExecutionInterrupted("the job was cancelled before it ended"), "its caller went away")
            raise

    async def _begin(self, spec: JobSpec, task_id: str) -> Any:
        """The task's new attempt in the status log; None when the log cannot be used and the job
        may run without one (not an async job: its caller would poll a status that never comes)."""
        try:
            return await self.status.begin(task_id)  # the task is known from now on, on every instance
        except InvalidParams:
            raise  # something squats the task's name: this task cannot be recorded
        except ServerlessError as exc:  # the status folder cannot be used
            if spec.mode == "async":
                raise Unavailable(f"async jobs are refused while {exc.message}") from exc
            log.error("task_id=%s runs without a status log: %s", task_id, exc.message)
            return None

    async def _begin_and_record(
        self,
        spec: JobSpec,
        task_id: str,
        feed: Feed,
        known: asyncio.Event,
        claimed: asyncio.Future[None] | None = None,
        after: asyncio.Event | None = None,
    ) -> None:
        """Claim the log beside the run, then record the job. With `claimed`, a failed claim is
        its waiter's to answer (it stops the job) rather than a job run without a log. With
        `after` (the job's inputs are staged), the claim waits for it, CLAIM_AFTER seconds at most:
        the claim's thread takes the GIL back after each of its system calls, from the loop that
        is staging the inputs just then (a job without any is staged at once)."""
        if after is not None and not after.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLAIM_AFTER):
                    await after.wait()
        try:
            attempt = await self._begin(spec, task_id)
        except ServerlessError as exc:
            if claimed is not None:
                if not claimed.done():
                    claimed.set_exception(exc)
                return
            if not isinstance(exc, InvalidParams):
                raise
            log.error("task_id=%s runs without a status log: %s", task_id, exc.message)
            return
        finally:
            known.set()
        if claimed is not None and not claimed.done():
            claimed.set_result(None)
        if attempt is None:
            return
        self._claimed_attempt(task_id)(attempt)
        await self.status.record(attempt, feed)

    def _claimed_attempt(self, task_id: str) -> Callable[[Any], None]:
        """What a recorder tells the attempt it claimed for a job started without one: cancel
        requests left beside it by other instances are watched from then on."""

        def claimed(attempt: Any) -> None:
            found = self._index.get(task_id)
            if found is not None and found[1] is None:
                self._index[task_id] = (found[0], attempt)

        return claimed

    async def _run(self, job: Job) -> None:
        """The job's run, counted until its end (cancelled included)."""
        try:
            await job.run()
        finally:
            self._admitted -= 1
            # Counted once the job's caller has had its turn: its answer waits for no metric.
            asyncio.get_running_loop().call_soon(self._count_end, job)

    def _count_end(self, job: Job) -> None:
        """An ended job in the metrics and its key's usage."""
        terminal = job.feed.terminal
        self.metrics.job_ended(job.spec.mode, terminal.error if terminal else None, job.clock.timings())
        size = len(terminal.data) if terminal is not None else 0  # its key's usage (`tenants.usage`)
        usage = job_usage(job.progress.state, job.clock.timings(), size)
        if job.models_downloaded:
            usage["models_downloaded"] = job.models_downloaded
        self.tenants.usage.add(job.spec.owner, usage)

    async def cancel(self, task_id: str) -> str:
        """Stop task `task_id`: here at once; where another instance runs it, through a request
        beside its log, which that instance looks for every CANCEL_POLL seconds."""
        job = self.get(task_id)
        if job is not None:
            if job.feed.done:
                raise ended(task_id, job.progress.state)
            job.stop(cancelled(), "cancel requested")
            return "cancelling"
        summary = await self.status.summary(task_id)
        if summary is None:
            raise unknown_task(task_id)
        if summary["state"] in ENDED:
            raise ended(task_id, summary["state"])
        attempt = await self.status.request_cancel(task_id)
        log.info("task_id=%s: cancel of attempt %s requested for the instance running it", task_id, attempt)
        return "cancelling"

    async def end_if_stranded(self, task_id: str) -> None:
        """Nothing waits here where it could be stranded: ComfyUI's queue is watched by its jobs."""

    async def measure(self) -> None:
        """Nothing kept elsewhere: every metric of this runner is counted as it happens."""

    async def queue_position(self, task_id: str) -> int | None:
        """No queue before ComfyUI's here: a job's progress events tell its place in ComfyUI's."""
        return None

    def _forget(self, task_id: str, job: Job) -> None:
        if task_id in self._index and self._index[task_id][0] is job:  # not a later job of the same task
            del self._index[task_id]

    async def watch_cancels(self, every: float = CANCEL_POLL) -> None:
        """Stop the running jobs whose cancel was asked through another instance (a request beside
        their attempt's log); runs for the life of the app (not on the Redis tier, whose workers
        watch a cancel key of the queue instead: serverless.fleet.worker)."""
        while True:
            await asyncio.sleep(every)
            running = {attempt: job for job, attempt in self._index.values() if attempt is not None}
            if not running:
                continue
            try:
                asked = await self.status.cancels_asked(list(running))
            except (OSError, ServerlessError) as exc:
                log.warning("cancel requests could not be read: %s", exc)
                continue
            for attempt in asked:
                running[attempt].stop(cancelled(), "cancel requested through another instance")

    async def drain(self, timeout: float) -> None:
        """Stop taking jobs, wait up to `timeout` for running ones, then stop the rest: a fleet
        worker's job is given back to the queue when another worker may run it (`Job.drain_stop`),
        any other is cancelled (their feeds still end with a terminal payload, which their
        recorders write)."""
        self.accepting = False
        if not self._runs and not self._recorders:
            return
        log.info("draining %d running job(s), up to %.0fs", self.running, timeout)
        _, pending = await asyncio.wait(self._runs | self._recorders, timeout=timeout)
        for job, _ in list(self._index.values()):
            job.drain_stop()
        for task in pending & self._runs:
            if not task.cancelling():
                task.cancel()
        if pending:
            await asyncio.wait(pending)


def unknown_task(task_id: str) -> NotFound:
    """A task no instance has taken in (or another key's, which answers the same)."""
    return NotFound(f"no task {task_id} on the status folder", raw={"task_id": task_id, "state": "unknown"})


def ended(task_id: str, state: str) -> Conflict:
    """A cancel of a task that has already ended."""
    return Conflict(f"task {task_id} has already ended ({state})", raw={"task_id": task_id, "state": state})


def cancelled() -> ExecutionInterrupted:
    """The terminal payload of a job cancelled through `POST /api/serverless/cancel`."""
    return ExecutionInterrupted("cancelled by request")


def _own(tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    task = asyncio.create_task(coro, name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
