"""One job: a workflow through ComfyUI, rendered as one event sequence (its `Feed`).

    prepare workflow -> resolve inputs -> follow on the shared socket -> submit -> outputs -> result

Every ComfyUI message of the job is published as received; the last event is always the terminal
one (a `Result` or a `ServerlessError`), whatever happens: a deadline, a cancelled caller, a bug.
A stop and the job's end meet in one place (`_decided`, called with no await before the terminal
is published): a stop asked before the terminal payload wins, whatever the run made meanwhile;
once the terminal is published, `stop` does nothing (job control answers 409).
The job speaks to ComfyUI only through `serverless.comfyui.client` and imports no network library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..comfyui.client import ComfyUI
from ..core import jsontext
from ..core.credentials import Credentials
from ..core.jsontext import Spliced
from ..core.messages import Message
from ..core.previews import PreviewFrame
from ..core.workflow import prepare_workflow
from ..delivery.outputs import OutputCollector, ReadyCallback, list_outputs
from ..errors import (
    ComfyUIUnavailable,
    ExecutionFailed,
    ExecutionInterrupted,
    InvalidParams,
    JobTimeout,
    OutOfMemory,
    OutputError,
    ServerlessError,
    as_serverless_error,
)
from .estimates import Estimates
from .feed import Event, Feed, HandedOff, Outcome, Result, terminal_body
from .previews import Preview, PreviewThrottle, preview_payload
from .progress import Progress, State, workflow_nodes
from .spec import JobSpec, OutputPolicy

log = logging.getLogger(__name__)

HISTORY_ATTEMPTS = 5
HISTORY_RETRY_DELAY = 0.2
CANCEL_TIMEOUT = 5.0
PROGRESS_INTERVAL = 0.25  # at most ~4 progress events a second, besides every change of state

Workflow = dict[str, Any]
# Asked at the job's end, before its terminal payload, when a cancel may have been acknowledged
# elsewhere (a fleet worker's queue): the error a cancel that came first ends it with, else None.
Settle = Callable[[Outcome], Awaitable[ServerlessError | None]]
# The same decision taken in the step that stores the job's last events (a fleet worker's status
# log: one round trip at the job's end, not two): given the outcome and the events that end the
# job with it (`Closing.events`), True when they are stored (it ends so), the error a cancel that
# came first ends it with (nothing stored), or False when it cannot (`Settle` is asked instead).
SettleRecorded = Callable[[Outcome, list[Event]], Awaitable[ServerlessError | bool]]
# A key's turn to run: entered with its owner id and `concurrency=` (`tenants.limits.KeyGates.slot`).
Gate = Callable[[str | None, int], contextlib.AbstractAsyncContextManager[None]]
InputResolver = Callable[[Workflow, Credentials | None], Awaitable[Workflow]]
OutputFactory = Callable[[OutputPolicy, Credentials | None, ReadyCallback], OutputCollector]
# Model references (`serverless.models`): the workflow naming placed models, `data.models`, and
# what releases them (they are in use, never evicted, until the job ends).
Release = Callable[[], None]
ModelResolver = Callable[[Workflow, Credentials | None], Awaitable[tuple[Workflow, list[dict[str, Any]], Release]]]
# A model task (import, delete, pin: `JobSpec.model_task`) run where the models live: its result data.
Publish = Callable[[dict[str, Any]], object]
ModelTasks = Callable[[dict[str, Any], Credentials | None, Publish], Awaitable[dict[str, Any]]]


def _nothing() -> None:
    return None


async def no_models(
    workflow: Workflow, credentials: Credentials | None
) -> tuple[Workflow, list[dict[str, Any]], Release]:
    """Without a model store: references are left to ComfyUI (which lists no such name)."""
    return workflow, [], _nothing


async def no_model_tasks(task: dict[str, Any], credentials: Credentials | None, publish: Publish) -> dict[str, Any]:
    raise InvalidParams("this instance has no model store (set MODELS_DIR)")


@dataclass(frozen=True, slots=True)
class Runtime:
    """What every job uses, built once by the lifespan (`serverless.resources`).

    `comfyui_ready` waits (bounded) until ComfyUI can take a prompt and returns the generation of
    the ComfyUI process; `comfyui_generation` changes when a supervised ComfyUI dies, taking the
    prompts submitted to it along."""

    comfy: ComfyUI
    resolve_inputs: InputResolver
    collect_outputs: OutputFactory
    comfyui_ready: Callable[[], Awaitable[int]]
    comfyui_generation: Callable[[], int]
    instance_id: str
    job_timeout: float
    max_result_bytes: int = 0  # base64 outputs a result may carry (0: any); a fleet's pass through Redis
    preview_max_fps: float = 4.0  # previews.MAX_FPS
    preview_in_status: bool = False  # PREVIEW_IN_STATUS: previews are published (and recorded), not shown
    estimates: Estimates = field(default_factory=Estimates)  # how long things took, for progress
    resolve_models: ModelResolver = no_models  # model references fetched into the store and placed
    model_tasks: ModelTasks = no_model_tasks  # imports, deletes and pins of the models API
    out_of_memory: Callable[[], None] = lambda: None  # counted: a job's ComfyUI ran out of GPU memory
    freed: Callable[[], None] = lambda: None  # counted: ComfyUI was asked to free its memory


@dataclass(slots=True)
class Clock:
    """Monotonic marks of a job's phases, for `data.timings`."""

    start: float = field(default_factory=time.monotonic)
    submitted: float | None = None
    started: float | None = None
    ended: float | None = None

    def timings(self) -> dict[str, float]:
        now = time.monotonic()
        submitted = self.submitted or self.start
        started = self.started or self.ended or now
        ended = self.ended or now
        return {
            "queued_s": round(max(0.0, started - submitted), 4),
            "execution_s": round(max(0.0, ended - started), 4),
            "outputs_s": round(max(0.0, now - ended), 4),
            "total_s": round(now - self.start, 4),
        }


class Job:
    """One run of one workflow, complete when built; `Jobs.start` runs `run()` as a task it owns."""

    def __init__(
        self,
        spec: JobSpec,
        runtime: Runtime,
        feed: Feed,
        prompt_id: str,
        task_id: str,
        recorder: asyncio.Task[None] | None = None,
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.feed = feed
        self.prompt_id = prompt_id
        self.task_id = task_id
        self.recorder = recorder
        self.clock = Clock()
        self._failure: ServerlessError | None = None
        self._release_models: Release = _nothing
        self._outputs_seen: dict[str, dict[str, Any]] = {}
        self._succeeded = False  # ComfyUI said `execution_success` for the prompt
        self._task: asyncio.Task[Any] | None = None
        self._stop: ServerlessError | None = None
        self.progress = Progress(
            task_id,
            prompt_id,
            workflow_nodes(spec.workflow),
            created=time.monotonic(),
            learned=runtime.estimates.learned(spec.workflow_id),
        )
        self._progress_sent: tuple[tuple[State, int | None], float] | None = None
        self._progress_due: asyncio.TimerHandle | None = None  # a new place in the queue, told soon
        self._watcher: asyncio.Task[None] | None = None  # asks our place in the queue (`_start_watching`)
        self._previews = PreviewThrottle(runtime.preview_max_fps, self._show_preview) if spec.previews else None
        # Set once the task is known to the status store (a task no one named is claimed beside
        # its run): its events reach callers only then, so any instance can answer for it.
        self.known: asyncio.Event | None = None
        # Set by a fleet worker as soon as `Jobs.start` returns (before the run's first step).
        self.settle: Settle | None = None
        self.settle_recorded: SettleRecorded | None = None  # set with `settle` when the worker can
        # Set by a fleet worker when another worker may run the job again (this run is not a
        # retry): a drain that runs out of time, or a ComfyUI that dies under the job, then gives
        # it back to the queue (`HandedOff`) rather than ending it, unless it made outputs already.
        self.may_hand_off = False
        # Set by a fleet worker: called once the job's prompt is in ComfyUI's queue (or the job
        # ended without one), when the worker may queue its next job behind it.
        self.on_queued: Callable[[], None] | None = None
        # Set once its inputs are staged (or it ended before): a stream's log is claimed from
        # then on (`Jobs`), not while the loop stages them.
        self.staged = asyncio.Event()
        self.models_downloaded = 0  # model references fetched for this job (not from the cache)
        # Set by `Jobs`: waits while its key runs its `concurrency=` of jobs (`tenants.limits`).
        self.gate: Gate | None = None

    # -- for the transports ---------------------------------------------------------------------

    async def events(
        self, after: int | None = None, idle: float | None = None, previews: bool = False
    ) -> AsyncIterator[Event | None]:
        """The job's events (None after `idle` seconds of silence), its previews too when asked.
        The terminal one comes only once it is in the status log when the caller named the
        task: a poller told "done" by a stream must find the result there."""
        async for event in self.feed.follow(after, idle, previews=previews):
            if event is not None:
                await self._ready_for(event)
            yield event

    async def finished(self) -> Event:
        """The terminal event, under the same rule as `events`."""
        terminal = await self.feed.wait()
        await self._ready_for(terminal)
        return terminal

    async def more_after(self, seq: int, within: float) -> bool:
        """Whether an event after `seq` is published and may be read at once (`_ready_for`), now
        or within `within` seconds."""
        if self._readable_after(seq) or within <= 0:
            return self._readable_after(seq)
        try:
            async with asyncio.timeout(within):
                while not self._readable_after(seq):
                    await self.feed.changed()
        except TimeoutError:
            return False
        return True

    def published_now(self, after: int = 0) -> list[Event] | None:
        """The events published after the first `after` so far (previews left out), when every
        one may reach a caller at once (`_ready_for`); None when not (the task is not known to
        the status store yet, its terminal payload waits for the log, or the feed no longer
        holds them: `events` then tells)."""
        if self.known is not None and not self.known.is_set():
            return None
        events = self.feed.events_after(after)
        if events is None or (events and self._waits_for_record(events[-1])):
            return None
        if len(events) > self.feed.limit and not events[-1].terminal:
            return None  # as far behind as a live reader may be (`Feed.follow`)
        return events

    def tap(self, call: Callable[[Event], None], previews: bool = False) -> Callable[[], None] | None:
        """`call` with each event as the feed publishes it, and each preview shown with
        `previews` (`Feed.tap`)."""
        return self.feed.tap(call, previews)

    def _readable_after(self, seq: int) -> bool:
        feed = self.feed
        if feed.last_seq <= seq or (self.known is not None and not self.known.is_set()):
            return False
        if feed.last_seq - 1 > seq or feed.terminal is None:
            return True  # an event before the terminal one
        return not self._waits_for_record(feed.terminal)

    def _waits_for_record(self, event: Event) -> bool:
        """A named task's terminal payload reaches callers once its status log holds it."""
        recorder = self.recorder
        return (
            event.terminal and recorder is not None and self.spec.named and not self.spec.native and not recorder.done()
        )

    async def _ready_for(self, event: Event) -> None:
        """Wait until `event` may reach a caller: the task is known to the status store, and a
        named task's terminal payload is in its log. Not for a prompt of ComfyUI's own API: its
        callers read `/history`, which answers from the job itself until its log holds the end
        (one box's log is on disk: its fsync is not waited for)."""
        if self.known is not None and not self.known.is_set():
            await self.known.wait()
        if self._waits_for_record(event):
            assert self.recorder is not None
            await asyncio.shield(self.recorder)

    async def terminal_recorded(self) -> bytes:
        """The terminal payload, once it is also in the status log (a webhook receiver that polls
        the status is then sure to find it there)."""
        terminal = await self.feed.wait()
        if self.recorder is not None:
            await asyncio.wait({self.recorder})  # ends by itself; a failed recorder is its own to log
        return terminal.data

    async def terminal_to_deliver(self) -> bytes | None:
        """`terminal_recorded`, or None when the job was handed to another worker (whose own run
        delivers its webhook)."""
        data = await self.terminal_recorded()
        return None if self.handed_off else data

    @property
    def handed_off(self) -> bool:
        """The run ended by giving the job back to the queue (`HandedOff`): it has no terminal payload."""
        terminal = self.feed.terminal
        return terminal is not None and isinstance(terminal.error, HandedOff)

    def _may_hand_off(self) -> bool:
        """Another worker may run it again: a fleet worker allows it, and no output was made (a
        GPU is not charged twice)."""
        return self.may_hand_off and not self._outputs_seen

    def drain_stop(self) -> None:
        """The instance stops before the job ended: give it back to the queue when another worker
        may run it, else cancel it (it ends EXECUTION_INTERRUPTED)."""
        if self._may_hand_off():
            self.stop(HandedOff("its worker stopped before the job ended: another worker runs it"), "handed back")
        elif self._task is not None and not self.feed.done:
            self._task.cancel()

    def abandon(self, reason: str) -> None:
        """The caller went away: cancel the job (and its ComfyUI prompt) unless it already ended."""
        self.stop(ExecutionInterrupted("the job was cancelled before it ended"), reason)

    def stop(self, error: ServerlessError, reason: str) -> None:
        """End the job with `error` as its terminal payload (its ComfyUI prompt is cancelled),
        unless its terminal payload is already published: asked before, it ends with `error`
        whatever the run makes meanwhile (`_decided`)."""
        if self.feed.done or self._stop is not None:
            return
        log.info("stopping task_id=%s prompt_id=%s (%s)", self.task_id, self.prompt_id, reason)
        self._stop = error
        if self._task is not None:
            self._task.cancel()

    # -- the pipeline ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Run to the end; always finishes the feed with the terminal payload."""
        self._task = asyncio.current_task()
        log.debug("job start task_id=%s prompt_id=%s", self.task_id, self.prompt_id)
        now = time.monotonic()
        first = self.progress.payload(now, time.time())  # the job's first event: queued, and whose it is
        if self.spec.owner is not None:
            first["data"]["owner"] = self.spec.owner
        if self.spec.workflow_id is not None:  # the task list finds a hosted workflow's tasks by it
            first["data"]["workflow_id"] = self.spec.workflow_id
        self._progress_sent = ((self.progress.state, self.progress.queue_position), now)
        self.feed.publish_payload(first)
        outcome: Outcome
        try:
            if self._stop is not None:
                raise asyncio.CancelledError
            async with self._admitted(), asyncio.timeout(self.runtime.job_timeout):
                outcome = Result(await self._execute_or_retry())
        except TimeoutError:
            outcome = JobTimeout(f"the job passed its deadline of {self.runtime.job_timeout:g}s and was cancelled")
            try:
                await self._cancel_in_comfyui()
            except asyncio.CancelledError:  # stopped meanwhile: the terminal payload is still published
                self._finish(outcome)
                raise
        except asyncio.CancelledError:
            try:
                await self._cancel_in_comfyui()
            finally:
                self._finish(self._stop or ExecutionInterrupted("the job was cancelled before it ended"))
            raise
        except Exception as exc:  # a ServerlessError, or a bug: the caller still gets a terminal payload
            outcome = as_serverless_error(exc, f"task_id={self.task_id} prompt_id={self.prompt_id}")
        if isinstance(outcome, ComfyUIUnavailable) and self._stop is None and self._may_hand_off():
            log.warning("task_id=%s: %s; handing the job back to the queue", self.task_id, outcome.message)
            outcome = HandedOff(f"its worker's ComfyUI failed ({outcome.message}): another worker runs it")
            try:
                await self._cancel_in_comfyui()  # a ComfyUI only unreachable must not go on with it
            except asyncio.CancelledError:
                self._finish(self._stop or outcome)
                raise
        if self.settle is not None and self._stop is None and not isinstance(outcome, HandedOff):
            try:
                if await self._settled_and_stored(outcome):
                    return
                self._stop = self._stop or await self.settle(outcome)
            except asyncio.CancelledError:
                self._finish(self._stop or ExecutionInterrupted("the job was cancelled before it ended"))
                raise
        self._finish(outcome)

    async def _settled_and_stored(self, outcome: Outcome) -> bool:
        """Decide the job's end and store its last events in one step (`settle_recorded`): True
        when they are stored and published; else the job ends as `_finish` ends it (a cancel that
        came first is `_stop` then)."""
        if self.settle_recorded is None or self.settle is None:
            return False
        sent = self._progress_sent
        closing = self._closing(outcome)
        self.feed.seal()  # their seqs are taken: nothing else is published meanwhile
        answer = await self.settle_recorded(outcome, closing.events(self.feed.last_seq + 1))
        if answer is not True:
            # A cancel came first (nothing stored), or the step could not be taken: decided
            # alone (`settle`), then stored as any event is.
            self._stop = answer if isinstance(answer, ServerlessError) else await self.settle(outcome)
        if self._stop is not None:  # it ends as the cancel says: its last events made anew
            self._progress_sent = sent
            closing = self._closing(outcome)
        self._publish(closing)
        return True

    def _admitted(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Its key's turn (the deadline counts from then on: waiting behind its own is not running)."""
        if self.gate is None or not self.spec.concurrency:
            return contextlib.nullcontext()
        return self.gate(self.spec.owner, self.spec.concurrency)

    def _queued(self) -> None:
        self.staged.set()
        queued, self.on_queued = self.on_queued, None
        if queued is not None:
            queued()

    def _finish(self, outcome: Outcome) -> None:
        self._publish(self._closing(outcome))

    def _closing(self, outcome: Outcome) -> Closing:
        """The job's end, as its last events will publish it (its final progress, its terminal
        payload); the job's parts stop (models released, timers and previews closed)."""
        self._queued()
        outcome = self._decided(outcome)
        release, self._release_models = self._release_models, _nothing
        release()
        if self._progress_due is not None:
            self._progress_due.cancel()
            self._progress_due = None
        if self._previews is not None:
            self._previews.close()
        if isinstance(outcome, HandedOff):  # not an end: no final state (its log says `retrying` instead)
            return Closing(outcome, None, terminal_body(outcome))
        self.progress.end(_state_of(outcome), time.monotonic())
        if isinstance(outcome, Result):
            self._learn()
        progress = self._progress_payload()
        return Closing(outcome, None if progress is None else jsontext.dumps(progress), terminal_body(outcome))

    def _publish(self, closing: Closing) -> None:
        outcome = closing.outcome
        duration = time.monotonic() - self.clock.start
        if closing.progress is not None:
            self.feed.publish_encoded(closing.progress)
        self.feed.finish(outcome, closing.terminal)
        # Logged once the readers the terminal payload woke have had their turn (a sync caller's
        # answer is written in it): a log record is tens of microseconds the answer need not wait.
        asyncio.get_running_loop().call_soon(
            log.info,
            "job end task_id=%s prompt_id=%s outcome=%s duration=%.3fs",
            self.task_id,
            self.prompt_id,
            "handed_back"
            if isinstance(outcome, HandedOff)
            else outcome.code
            if isinstance(outcome, ServerlessError)
            else "ok",
            duration,
        )

    def _learn(self) -> None:
        """A succeeded run teaches the next one's progress (`Estimates`)."""
        progress = self.progress
        step_time, tail, costs = progress.lesson()
        duration = (progress.ended or time.monotonic()) - progress.created
        self.runtime.estimates.learn(self.spec.workflow_id, duration, step_time, tail, costs)

    def _decided(self, outcome: Outcome) -> Outcome:
        """The terminal outcome: a stop asked before this point wins over how the run ended (its
        caller was told "cancelling"); the outputs a successful run made are listed in its `raw`
        (`results`, base64 content left out), marked `made_before_stop`."""
        stop = self._stop
        if stop is None or outcome is stop:
            return outcome
        if not isinstance(outcome, Result):
            return stop
        results = [_without_base64(item) for item in outcome.payload.get("data", {}).get("results", [])]
        if not results:
            return stop
        raw = dict(stop.raw) if isinstance(stop.raw, dict) else {}
        decided = type(stop).__new__(type(stop))
        ServerlessError.__init__(decided, stop.message, {**raw, "results": results, "made_before_stop": True})
        return decided

    def _publish_progress(self, changed: bool = True) -> None:
        """A `serverless_progress` event on every change of state, else (a new place in the queue,
        new percent) at most every PROGRESS_INTERVAL seconds: with N jobs waiting, each job's
        place changes N times."""
        if not changed:
            return
        payload = self._progress_payload()
        if payload is not None:
            self.feed.publish_payload(payload)

    def _progress_payload(self) -> dict[str, Any] | None:
        """The progress event `_publish_progress` publishes now (None: none now, perhaps one soon)."""
        now = time.monotonic()
        place = self._place()
        if self._progress_sent is not None:
            last_place, last_time = self._progress_sent
            if place[0] == last_place[0] and now - last_time < PROGRESS_INTERVAL:
                if place != last_place and self._progress_due is None:  # a new place is told late, not never
                    wait = last_time + PROGRESS_INTERVAL - now
                    self._progress_due = asyncio.get_running_loop().call_later(wait, self._publish_due)
                return None
        self._progress_sent = (place, now)
        return self.progress.payload(now, time.time())

    def _progress_may_go(self, now: float) -> bool:
        """Whether a progress event of the same state could be published now (`_publish_progress`)."""
        sent = self._progress_sent
        return sent is None or now - sent[1] >= PROGRESS_INTERVAL

    def _publish_due(self) -> None:
        self._progress_due = None
        sent = self._progress_sent
        if not self.feed.done and sent is not None and sent[0] != self._place():
            self._publish_progress()

    def _place(self) -> tuple[State, int | None]:
        """What a progress event is sent for at once (a state) or soon (a place in the queue)."""
        return self.progress.state, self.progress.queue_position

    def _start_watching(self) -> None:
        """PROGRESS_INTERVAL after submitting: still queued, so watch our place (a short job has
        no watcher task at all)."""
        if self.progress.state == "queued":
            self._watcher = asyncio.create_task(self._watch_queue(), name=f"queue {self.task_id}")

    async def _watch_queue(self) -> None:
        """Our place in ComfyUI's queue, asked every PROGRESS_INTERVAL while we wait in it."""
        while self.progress.state == "queued":
            with contextlib.suppress(ServerlessError):  # ComfyUI is slow to answer: next round
                await self._ask_queue()
            await asyncio.sleep(PROGRESS_INTERVAL)

    async def _stop_watching(self, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def _ask_queue(self) -> None:
        """Our place in ComfyUI's queue, while we wait in it (one `/queue` read shared by every
        job asking within 0.1 s)."""
        if self.progress.state != "queued":
            return
        queue = await self.runtime.comfy.recent_queue()
        self._publish_progress(self.progress.queued_at(queue.position(self.prompt_id), queue.size))

    async def _execute_or_retry(self) -> dict[str, Any]:
        """`_execute`, once more after ComfyUI frees its memory when its GPU ran out of it (as a
        new ComfyUI prompt: a prompt id is its one run; a native prompt's id is its caller's, so
        that one is not run again)."""
        try:
            return await self._execute()
        except OutOfMemory as exc:
            self.runtime.out_of_memory()
            if self.spec.native or self._stop is not None:
                raise
            log.warning(
                "task_id=%s ran out of GPU memory (%s): freeing ComfyUI's memory, then once more",
                self.task_id,
                exc.message,
            )
            await self.runtime.comfy.free()
            self.runtime.freed()
            self._failure, self._succeeded, self._outputs_seen = None, False, {}
            self.prompt_id = str(uuid.uuid4())
            return await self._execute()

    async def _execute(self) -> dict[str, Any]:
        runtime, spec = self.runtime, self.spec
        if spec.model_task is not None:  # the models API's import, delete or pin: no ComfyUI run
            done = await runtime.model_tasks(spec.model_task, spec.credentials, self.feed.publish_payload)
            return {"type": "serverless_api", "data": {"task_id": self.task_id, **done}}
        generation = await runtime.comfyui_ready()
        instance = None if spec.native else runtime.instance_id  # ComfyUI's API keeps its prefixes
        if spec.big:
            prepared = await asyncio.to_thread(prepare_workflow, spec.workflow, instance)
        else:
            prepared = prepare_workflow(spec.workflow, instance)
        workflow = await runtime.resolve_inputs(prepared.workflow, spec.credentials)
        self.staged.set()
        workflow, models, self._release_models = await runtime.resolve_models(workflow, spec.credentials)
        self.models_downloaded = sum(1 for model in models if not model.get("cached"))  # its key's usage
        collector = runtime.collect_outputs(spec.outputs, spec.credentials, self._output_ready)
        try:
            # ComfyUI's `status` broadcasts (one per queue change, to every client: ~3N per job
            # with N waiting) are published by the listener as they come (`ComfyUI.connect`), for
            # a job someone may watch; a sync job nobody named leaves them out of its log.
            forward = self._forward if spec.observed else None
            async with runtime.comfy.connect(self.prompt_id, forward, spec.previews) as connection:
                # ComfyUI's latest `status`, for a caller that joins now; not for a prompt of
                # ComfyUI's own API, whose clients get ComfyUI's messages as ComfyUI sends them.
                if connection.greeting is not None and forward is not None and not spec.native:
                    forward(connection.greeting)
                self.clock.submitted = time.monotonic()
                node_errors = await runtime.comfy.submit(
                    workflow, connection.client_id, self.prompt_id, spec.extra_data, big=spec.big
                )
                self._queued()
                lost = lambda: runtime.comfyui_generation() != generation  # noqa: E731
                timer = asyncio.get_running_loop().call_later(PROGRESS_INTERVAL, self._start_watching)

                # A preview with its metadata comes before its step's `progress`; ComfyUI sends
                # the legacy form, its `/ws` clients', after it: held until the next message.
                held: list[PreviewFrame] = []

                def take(message: Message | PreviewFrame) -> None:
                    if isinstance(message, PreviewFrame):
                        if held:
                            self._preview(held.pop())
                        if message.prompt_id is None:
                            self._preview(message)
                        else:
                            held.append(message)
                        return
                    self._observe(message, collector)
                    if held:
                        self._preview(held.pop())

                try:
                    await connection.follow(self.prompt_id, take, lost)
                finally:
                    await self._stop_watching(timer)
                self.clock.ended = time.monotonic()
                if self._failure is not None:
                    raise self._failure
                await connection.close()
                outputs = await self._final_outputs(connection.complete)
            results = await collector.results(list_outputs(outputs), spec.outputs.base64)
            if spec.outputs.base64 and runtime.max_result_bytes:
                _check_travels(results, runtime.max_result_bytes)
        finally:
            await collector.aclose()
        data: dict[str, Any] = {
            "prompt_id": self.prompt_id,
            "task_id": self.task_id,
            "execution_time": round(time.monotonic() - self.clock.start, 4),
            "seeds": prepared.seeds,
            "timings": self.clock.timings(),
            "results": results,
        }
        if node_errors:
            data["node_errors"] = node_errors
        if models:
            data["models"] = models
        if spec.workflow_id is not None:
            data["workflow_id"] = spec.workflow_id
            if spec.workflow_version is not None:
                data["workflow_version"] = spec.workflow_version
        return {"type": "serverless_api", "data": data}

    def _output_ready(self, item: dict[str, Any]) -> None:
        """An output is read (and uploaded): a client may show it while the rest still renders."""
        self.feed.publish_payload({"type": "serverless_output", "data": item})

    def _preview(self, frame: PreviewFrame) -> None:
        """A sampler preview: shown (rate-limited) with the node and step it came at."""
        if self._previews is not None and self.progress.state == "running":
            node = frame.node or self.progress.node
            self._previews.offer(Preview(frame, node, self.progress.step_of(node)))

    def _show_preview(self, preview: Preview) -> None:
        payload = preview_payload(self.task_id, preview)
        if self.runtime.preview_in_status:
            self.feed.publish_payload(payload)
        else:
            self.feed.show(payload)

    def _forward(self, message: Message) -> None:
        """A broadcast for the job's caller (no prompt of ours to learn about)."""
        self._observe(message, None)

    def _observe(self, message: Message, collector: OutputCollector | None) -> None:
        """Publish a live message as received; learn from those of our prompt how it goes."""
        if message.live and not self.feed.publish(message.text) and self.feed.dropped == 1:
            log.warning(
                "task_id=%s passed %s bytes of events: further ComfyUI messages are not forwarded or logged",
                self.task_id,
                self.feed.max_bytes,
            )
        if message.prompt_id != self.prompt_id:
            return
        now = time.monotonic()
        if self.progress.note(message, now) or self._progress_may_go(now):
            # The estimate is weighed only when an event may go: at most every PROGRESS_INTERVAL
            # (a change of state at once), however many messages a short job sends.
            self._publish_progress(self.progress.refresh(now))
        if message.type == "execution_start":
            self.clock.started = time.monotonic()
        elif message.type == "execution_success":
            self._succeeded = True
        elif message.type == "execution_error":
            self._failure = execution_failed(message.data)
        elif message.type == "execution_interrupted":
            self._failure = interrupted(message.data)
        elif message.output is not None:
            node = str(message.data.get("node"))
            self._outputs_seen[node] = message.output
            if collector is not None:
                collector.prefetch(message.output, node)

    async def _final_outputs(self, complete: bool) -> dict[str, Any]:
        """The prompt's outputs. When the socket delivered every message of a prompt that ended
        with `execution_success`, its `executed` messages name them all: ComfyUI sends one for
        every node with UI output, cached nodes included, and builds the history entry from the
        same outputs. Otherwise history's (ComfyUI writes them before its last message, but
        retry briefly), then what `executed` messages announced."""
        if complete and self._succeeded:
            return dict(self._outputs_seen)
        for attempt in range(HISTORY_ATTEMPTS):
            try:
                entry = await self.runtime.comfy.history(self.prompt_id)
            except ComfyUIUnavailable:
                entry = None
            if entry is not None and entry.outputs is not None:
                return entry.outputs
            await asyncio.sleep(HISTORY_RETRY_DELAY * (attempt + 1))
        log.warning("no history for task_id=%s prompt_id=%s: using executed messages", self.task_id, self.prompt_id)
        return dict(self._outputs_seen)

    async def _cancel_in_comfyui(self) -> None:
        """Best effort, shielded: remove our prompt from ComfyUI's queue or interrupt it."""
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                await asyncio.shield(self.runtime.comfy.cancel(self.prompt_id))
        except (ServerlessError, TimeoutError):
            log.warning("could not cancel task_id=%s prompt_id=%s in ComfyUI", self.task_id, self.prompt_id)


@dataclass(frozen=True, slots=True)
class Closing:
    """A job's last events, made before they are published (`Job._closing`): its outcome (as
    decided), its final progress event (None: none due) and its terminal payload, encoded."""

    outcome: Outcome
    progress: bytes | None
    terminal: bytes

    def events(self, first_seq: int) -> list[Event]:
        """The events, numbered from `first_seq` as the feed will number them."""
        bodies = [] if self.progress is None else [self.progress]
        error = self.outcome if isinstance(self.outcome, ServerlessError) else None
        events = [Event(first_seq + index, body) for index, body in enumerate(bodies)]
        return [*events, Event(first_seq + len(bodies), self.terminal, True, error)]


def _check_travels(results: list[dict[str, Any]], limit: int) -> None:
    """OutputError when the base64 outputs are more than a fleet passes back through Redis."""
    size = 0
    for result in results:
        content = result["output"]["base64"].get("content")
        size += len(content.data) if isinstance(content, Spliced) else 0
    if size > limit:
        raise OutputError(
            f"the job's base64 outputs ({size} bytes) are more than a fleet passes back through Redis "
            f"(RESULT_INLINE_MAX_BYTES={limit}): ask for output_oss or output_url instead, or raise the setting",
            raw={"bytes": size, "limit": limit},
        )


def _without_base64(item: dict[str, Any]) -> dict[str, Any]:
    """A result item as an interrupted job lists it: where its file is, not its content."""
    output = item.get("output")
    if not isinstance(output, dict) or not isinstance(output.get("base64"), dict):
        return item
    return {**item, "output": {**output, "base64": {"content": None}}}


def _state_of(outcome: Outcome) -> State:
    if isinstance(outcome, Result):
        return "succeeded"
    return "cancelled" if isinstance(outcome, ExecutionInterrupted) else "failed"


OOM_TYPES = ("torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError", "OutOfMemoryError")


def execution_failed(data: dict[str, Any]) -> ExecutionFailed:
    kind = OutOfMemory if data.get("exception_type") in OOM_TYPES else ExecutionFailed
    return kind(
        f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
        f"{data.get('exception_type')}: {str(data.get('exception_message', '')).strip()}",
        raw=data,
    )


def interrupted(data: dict[str, Any]) -> ExecutionInterrupted:
    return ExecutionInterrupted(
        f"the job was interrupted at node {data.get('node_id')} ({data.get('node_type')})", raw=data
    )
