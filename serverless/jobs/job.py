"""The job runner: one request through ComfyUI, rendered as one event sequence.

    request -> prepare workflow -> resolve inputs -> websocket + /prompt -> messages -> outputs -> result

Every ComfyUI message of the job is published to the job's `Feed` as received; the last event is
always the terminal payload (the result or an error object), whatever happens, including a
deadline, a cancelled caller or a bug.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ..comfyui.client import ComfyUI
from ..core.messages import Message, parse_message
from ..core.request import RunRequest
from ..core.workflow import prepare_workflow
from ..delivery.oss import Credentials
from ..delivery.outputs import OutputCollector, list_outputs
from ..errors import (
    ComfyUIUnavailable,
    ExecutionFailed,
    ExecutionInterrupted,
    JobTimeout,
    ServerlessError,
    Unclassified,
)
from ..resources import Services
from .feed import Event, Feed

log = logging.getLogger(__name__)

HISTORY_ATTEMPTS = 5
HISTORY_RETRY_DELAY = 0.2
CANCEL_TIMEOUT = 5.0


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
    """One run of one workflow. Create, then `await run()` (usually as a task owned by `Jobs`)."""

    def __init__(
        self, services: Services, request: RunRequest, feed: Feed, prompt_id: str, task_id: str,
        credentials: Credentials | None = None,
    ) -> None:
        self.services = services
        self.request = request
        self.credentials = credentials
        self.feed = feed
        self.prompt_id = prompt_id
        self.task_id = task_id
        self.client_id = uuid.uuid4().hex
        self.clock = Clock()
        self._failure: ServerlessError | None = None
        self._outputs_seen: dict[str, dict[str, Any]] = {}
        self.task: asyncio.Task[None] | None = None
        self._generation = 0
        self._history_error: ComfyUIUnavailable | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None  # this job's ComfyUI websocket
        self.recorder: asyncio.Task[None] | None = None

    async def finished(self) -> Event:
        """The terminal event; when the caller named the task (and so may poll its status), once
        it is also in the status log. A job whose task id is its fresh prompt id has no poller
        before its caller holds the result, so it does not wait for the disk."""
        terminal = await self.feed.wait()
        if self.recorder is not None and self.request.task_id is not None:
            await asyncio.shield(self.recorder)
        return terminal

    def abandon(self, reason: str) -> None:
        """The caller went away: cancel the job (and its ComfyUI prompt) unless it already ended."""
        if self.task is not None and not self.feed.done:
            log.info("caller gone task_id=%s prompt_id=%s: cancelling (%s)", self.task_id, self.prompt_id, reason)
            self.task.cancel()

    @property
    def comfy(self) -> ComfyUI:
        return self.services.comfy

    async def run(self) -> None:
        """Run to the end; always finishes the feed with the terminal payload."""
        log.info("job start task_id=%s prompt_id=%s", self.task_id, self.prompt_id)
        try:
            async with asyncio.timeout(self.services.settings.job_timeout):
                payload = await self._execute()
        except TimeoutError:
            await self._cancel_in_comfyui()
            payload = JobTimeout(
                f"the job passed its deadline of {self.services.settings.job_timeout:g}s and was cancelled"
            ).to_payload()
        except ServerlessError as exc:
            payload = exc.to_payload()
        except asyncio.CancelledError:
            try:
                await self._cancel_in_comfyui()
            finally:
                self._finish(ExecutionInterrupted("the job was cancelled before it ended").to_payload())
            raise
        except Exception as exc:  # a bug: the caller still gets a terminal payload
            log.exception("job failed unexpectedly task_id=%s prompt_id=%s", self.task_id, self.prompt_id)
            payload = Unclassified(f"internal error: {type(exc).__name__}: {exc}").to_payload()
        self._finish(payload)

    def _finish(self, payload: dict[str, Any]) -> None:
        outcome = payload.get("error_code", "ok")
        log.info(
            "job end task_id=%s prompt_id=%s outcome=%s duration=%.3fs",
            self.task_id, self.prompt_id, outcome, time.monotonic() - self.clock.start,
        )
        self.feed.finish(payload)

    async def _execute(self) -> dict[str, Any]:
        settings = self.services.settings
        await self.services.wait_for_comfyui()
        self._generation = self.services.comfyui_generation
        prepared = prepare_workflow(self.request.workflow, settings.instance_id)
        workflow = await self.services.resolve_inputs(prepared.workflow, self.credentials)
        collector = self.services.output_collector(self.request, self.credentials)
        try:
            node_errors = await self._submit_and_follow(workflow, collector)
            if self._failure is not None:
                raise self._failure
            # The websocket has nothing more to say: its close handshake overlaps the history read.
            outputs, _ = await asyncio.gather(self._final_outputs(), self._close_websocket())
            results = await collector.results(list_outputs(outputs), self.request.output_base64)
        finally:
            await self._close_websocket()
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
        return {"type": "serverless_api", "data": data}

    async def _submit_and_follow(self, workflow: dict[str, Any], collector: OutputCollector) -> dict[str, Any]:
        """Open our websocket first (so no message can be missed), submit, then follow. The
        socket stays open (in `_ws`) for the caller to close."""
        self._ws = await self._connect()
        self.clock.submitted = time.monotonic()
        node_errors = await self.comfy.submit(workflow, self.client_id, self.prompt_id, self.request.extra_data)
        await self._follow(collector)
        self.clock.ended = time.monotonic()
        return node_errors

    async def _close_websocket(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        """A websocket for our client id, once ComfyUI has registered it (its first `status`)."""
        settings = self.services.settings
        ws = await self.comfy.open_websocket(self.client_id, settings.connect_timeout)
        try:
            async with asyncio.timeout(settings.connect_timeout):
                first = await ws.receive()
        except (TimeoutError, aiohttp.ClientError) as exc:
            await ws.close()
            raise ComfyUIUnavailable("ComfyUI's websocket did not greet us") from exc
        if first.type != aiohttp.WSMsgType.TEXT:
            await ws.close()
            raise ComfyUIUnavailable(f"ComfyUI's websocket closed before greeting us ({first.type.name})")
        self._on_text(first.data, None)
        return ws

    async def _follow(self, collector: OutputCollector) -> None:
        """Forward this job's messages until ComfyUI ends it. A broken socket is reopened with
        the same client id and the job recovered from /history and /queue."""
        assert self._ws is not None
        while not await self._read_until_end(self._ws, collector):
            await self._ws.close()
            log.warning("websocket lost task_id=%s prompt_id=%s: reconnecting", self.task_id, self.prompt_id)
            self._ws = await self._reconnect()
            if await self._recover(collector):
                break

    async def _read_until_end(self, ws: aiohttp.ClientWebSocketResponse, collector: OutputCollector) -> bool:
        """True when the job ended; False when the socket closed or broke first."""
        try:
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.TEXT:
                    if self._on_text(frame.data, collector):
                        return True
                    # One network read can hold a burst of messages: let readers keep up with it.
                    await asyncio.sleep(0)
        except (aiohttp.ClientError, OSError):
            pass
        return False

    def _on_text(self, text: str, collector: OutputCollector | None) -> bool:
        """Publish and observe one message; True when it ends our job."""
        message = parse_message(text)
        if message is None or not message.concerns(self.prompt_id):
            return False
        self.feed.publish(text)
        self._observe(message, collector)
        return message.ends(self.prompt_id)

    def _observe(self, message: Message, collector: OutputCollector | None) -> None:
        if message.prompt_id != self.prompt_id:
            return
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

    async def _reconnect(self) -> aiohttp.ClientWebSocketResponse:
        settings = self.services.settings
        deadline = time.monotonic() + settings.reconnect_timeout
        delay = 0.05
        while True:
            if self.services.comfyui_generation != self._generation:
                raise ComfyUIUnavailable("ComfyUI exited mid-job; the job died with it")
            try:
                return await self._connect()
            except ComfyUIUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise ComfyUIUnavailable(
                        f"lost ComfyUI's websocket mid-job and could not reconnect: {exc.message}"
                    ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _recover(self, collector: OutputCollector) -> bool:
        """After a reconnect: True if the job already ended (history has it), False if ComfyUI
        still runs or queues it (keep listening). Anything else means the job is lost. A history
        that cannot be read is not proof of loss while the queue still holds the job."""
        if await self._recover_from_history():
            return True
        queue = await self.comfy.queue()
        queued = queue.get("queue_running", []) + queue.get("queue_pending", [])
        if any(isinstance(item, list) and len(item) > 1 and item[1] == self.prompt_id for item in queued):
            return False
        if await self._recover_from_history():
            return True
        raise ComfyUIUnavailable(
            "the websocket broke and ComfyUI no longer knows the job" + _because(self._history_error)
        )

    async def _recover_from_history(self) -> bool:
        try:
            entry = await self.comfy.history(self.prompt_id)
        except ComfyUIUnavailable as exc:  # ComfyUI answers, but not with a history: ask the queue
            self._history_error = exc
            return False
        if entry is None:
            return False
        for name, data in entry.get("status", {}).get("messages", []):
            if name == "execution_error":
                self._failure = execution_failed(data)
            elif name == "execution_interrupted":
                self._failure = interrupted(data)
        log.info("job recovered from history task_id=%s prompt_id=%s", self.task_id, self.prompt_id)
        return True

    async def _final_outputs(self) -> dict[str, Any]:
        """History's outputs (authoritative); ComfyUI writes them before its last message, but
        retry briefly, then fall back to what `executed` messages announced."""
        for attempt in range(HISTORY_ATTEMPTS):
            try:
                entry = await self.comfy.history(self.prompt_id)
            except ComfyUIUnavailable:
                entry = None
            if entry is not None and isinstance(entry.get("outputs"), dict):
                return dict(entry["outputs"])
            await asyncio.sleep(HISTORY_RETRY_DELAY * (attempt + 1))
        log.warning("no history for task_id=%s prompt_id=%s: using executed messages", self.task_id, self.prompt_id)
        return dict(self._outputs_seen)

    async def _cancel_in_comfyui(self) -> None:
        """Best effort, shielded: remove our prompt from ComfyUI's queue or interrupt it."""
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                await asyncio.shield(self.comfy.cancel(self.prompt_id))
        except (ServerlessError, TimeoutError):
            log.warning("could not cancel prompt_id=%s in ComfyUI", self.prompt_id)


def _because(error: ServerlessError | None) -> str:
    return f" ({error.message})" if error is not None else ""


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
