"""One job: a workflow through ComfyUI, rendered as one event sequence (its `Feed`).

    prepare workflow -> resolve inputs -> connect -> submit -> follow -> outputs -> result

Every ComfyUI message of the job is published as received; the last event is always the terminal
one (a `Result` or a `ServerlessError`), whatever happens: a deadline, a cancelled caller, a bug.
The job speaks to ComfyUI only through `serverless.comfyui.client` and imports no network library.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..comfyui.client import ComfyUI
from ..core.messages import Message
from ..core.workflow import prepare_workflow
from ..delivery.oss import Credentials
from ..delivery.outputs import OutputCollector, list_outputs
from ..errors import (
    ComfyUIUnavailable,
    ExecutionFailed,
    ExecutionInterrupted,
    JobTimeout,
    ServerlessError,
    as_serverless_error,
)
from .feed import Event, Feed, Outcome, Result
from .progress import Progress, State, workflow_nodes
from .spec import JobSpec, OutputPolicy

log = logging.getLogger(__name__)

HISTORY_ATTEMPTS = 5
HISTORY_RETRY_DELAY = 0.2
CANCEL_TIMEOUT = 5.0
PROGRESS_INTERVAL = 0.25  # at most ~4 progress events a second, besides every change of state

Workflow = dict[str, Any]
InputResolver = Callable[[Workflow, Credentials | None], Awaitable[Workflow]]
OutputFactory = Callable[[OutputPolicy, Credentials | None], OutputCollector]


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
        self.client_id = uuid.uuid4().hex
        self.clock = Clock()
        self._failure: ServerlessError | None = None
        self._outputs_seen: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[Any] | None = None
        self._stop: ServerlessError | None = None
        self.created_at = time.time()
        self.progress = Progress(task_id, prompt_id, workflow_nodes(spec.workflow), created=time.monotonic())
        self._progress_sent: tuple[State, float] | None = None

    # -- for the transports ---------------------------------------------------------------------

    async def events(self, after: int | None = None, idle: float | None = None) -> AsyncIterator[Event | None]:
        """The job's events (None after `idle` seconds of silence). The terminal one comes only
        once it is in the status log when the caller named the task: a poller told "done" by a
        stream must find the result there."""
        async for event in self.feed.follow(after, idle):
            if event is not None and event.terminal:
                await self._recorded()
            yield event

    async def finished(self) -> Event:
        """The terminal event, under the same rule as `events`."""
        terminal = await self.feed.wait()
        await self._recorded()
        return terminal

    async def _recorded(self) -> None:
        if self.recorder is not None and self.spec.named:
            await asyncio.shield(self.recorder)

    def abandon(self, reason: str) -> None:
        """The caller went away: cancel the job (and its ComfyUI prompt) unless it already ended."""
        self.stop(ExecutionInterrupted("the job was cancelled before it ended"), reason)

    def stop(self, error: ServerlessError, reason: str) -> None:
        """End the job with `error` as its terminal payload (its ComfyUI prompt is cancelled)."""
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
        log.info("job start task_id=%s prompt_id=%s", self.task_id, self.prompt_id)
        self._publish_progress()  # the job's first event: queued
        outcome: Outcome
        try:
            if self._stop is not None:
                raise asyncio.CancelledError
            async with asyncio.timeout(self.runtime.job_timeout):
                outcome = Result(await self._execute())
        except TimeoutError:
            await self._cancel_in_comfyui()
            outcome = JobTimeout(f"the job passed its deadline of {self.runtime.job_timeout:g}s and was cancelled")
        except asyncio.CancelledError:
            try:
                await self._cancel_in_comfyui()
            finally:
                self._finish(self._stop or ExecutionInterrupted("the job was cancelled before it ended"))
            raise
        except Exception as exc:  # a ServerlessError, or a bug: the caller still gets a terminal payload
            outcome = as_serverless_error(exc, f"task_id={self.task_id} prompt_id={self.prompt_id}")
        self._finish(outcome)

    def _finish(self, outcome: Outcome) -> None:
        log.info(
            "job end task_id=%s prompt_id=%s outcome=%s duration=%.3fs",
            self.task_id,
            self.prompt_id,
            outcome.code if isinstance(outcome, ServerlessError) else "ok",
            time.monotonic() - self.clock.start,
        )
        self.progress.end(_state_of(outcome), time.monotonic())
        self._publish_progress()
        self.feed.finish(outcome)

    def _publish_progress(self, changed: bool = True) -> None:
        """A `serverless_progress` event on every change of state, else at most every
        PROGRESS_INTERVAL seconds."""
        if not changed:
            return
        now = time.monotonic()
        state = self.progress.state
        if self._progress_sent is not None:
            last_state, last_time = self._progress_sent
            if state == last_state and now - last_time < PROGRESS_INTERVAL:
                return
        self._progress_sent = (state, now)
        self.feed.publish_payload(self.progress.payload(now))

    async def _ask_queue(self, remaining: int | None = None) -> None:
        """Our place in ComfyUI's queue, while we wait in it. A `status` broadcast's count of
        prompts left tells when there is nothing to ask (we are alone)."""
        if self.progress.state != "queued":
            return
        if remaining is not None and remaining <= 1:
            changed = self.progress.queued_at(1 if remaining == 1 else None, remaining)
        else:
            queue = await self.runtime.comfy.recent_queue()
            changed = self.progress.queued_at(queue.position(self.prompt_id), queue.size)
        self._publish_progress(changed)

    async def _execute(self) -> dict[str, Any]:
        runtime, spec = self.runtime, self.spec
        generation = await runtime.comfyui_ready()
        if spec.big:
            prepared = await asyncio.to_thread(prepare_workflow, spec.workflow, runtime.instance_id)
        else:
            prepared = prepare_workflow(spec.workflow, runtime.instance_id)
        workflow = await runtime.resolve_inputs(prepared.workflow, spec.credentials)
        collector = runtime.collect_outputs(spec.outputs, spec.credentials)
        try:
            async with runtime.comfy.connect(self.client_id) as connection:
                if connection.greeting is not None:
                    self._observe(connection.greeting, None)
                self.clock.submitted = time.monotonic()
                node_errors = await runtime.comfy.submit(
                    workflow, self.client_id, self.prompt_id, spec.extra_data, big=spec.big
                )
                lost = lambda: runtime.comfyui_generation() != generation  # noqa: E731
                async for message in connection.follow(self.prompt_id, lost):
                    self._observe(message, collector)
                    if message.type == "status" and self.progress.state == "queued":
                        await self._ask_queue(_queue_remaining(message))
                self.clock.ended = time.monotonic()
                if self._failure is not None:
                    raise self._failure
                # The websocket has nothing more to say: its close handshake overlaps the history read.
                outputs, _ = await asyncio.gather(self._final_outputs(), connection.close())
            results = await collector.results(list_outputs(outputs), spec.outputs.base64)
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
        if spec.workflow_id is not None:
            data["workflow_id"] = spec.workflow_id
        return {"type": "serverless_api", "data": data}

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
        self._publish_progress(self.progress.observe(message, time.monotonic()))
        if message.type == "execution_start":
            self.clock.started = time.monotonic()
        elif message.type == "execution_error":
            self._failure = execution_failed(message.data)
        elif message.type == "execution_interrupted":
            self._failure = interrupted(message.data)
        elif message.output is not None:
            node = str(message.data.get("node"))
            self._outputs_seen[node] = message.output
            if collector is not None:
                collector.prefetch(message.output, node)

    async def _final_outputs(self) -> dict[str, Any]:
        """History's outputs (authoritative); ComfyUI writes them before its last message, but
        retry briefly, then fall back to what `executed` messages announced."""
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


def _state_of(outcome: Outcome) -> State:
    if isinstance(outcome, Result):
        return "succeeded"
    return "cancelled" if isinstance(outcome, ExecutionInterrupted) else "failed"


def _queue_remaining(message: Message) -> int | None:
    """`status` broadcasts carry how many prompts ComfyUI holds (running and waiting)."""
    status = message.data.get("status")
    info = status.get("exec_info") if isinstance(status, dict) else None
    remaining = info.get("queue_remaining") if isinstance(info, dict) else None
    return remaining if isinstance(remaining, int) and not isinstance(remaining, bool) else None


def execution_failed(data: dict[str, Any]) -> ExecutionFailed:
    return ExecutionFailed(
        f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
        f"{data.get('exception_type')}: {str(data.get('exception_message', '')).strip()}",
        raw=data,
    )


def interrupted(data: dict[str, Any]) -> ExecutionInterrupted:
    return ExecutionInterrupted(
        f"the job was interrupted at node {data.get('node_id')} ({data.get('node_type')})", raw=data
    )
