"""ComfyUI's websocket, `/ws?clientId=`, from any instance: the greeting ComfyUI sends, then the
messages of every prompt queued for that client id (on any gateway, run on any worker), each
text byte for byte as its ComfyUI sent it, followed through the status store (`TaskEvents`), and
its sampler previews as ComfyUI's binary frames, as the job shows them (the newest, at most
`jobs.previews.MAX_FPS` a second).

A prompt's last message, `executing` with no node, is held until the task's terminal payload is
stored: a client that asks `/history` and `/view` as soon as it reads it (ComfyUI's example
does), maybe of another gateway, then finds them. On one box, whose prompts only its process
answers for, the end of a job running here is passed on as it comes, and `/history` answers
from ComfyUI's messages as ComfyUI's own does (`native.history_payloads`; its `/view` reads
ComfyUI's folder). There a prompt's messages are written in the step that publishes them (a tap
of the job's feed, called as ComfyUI's messages reach the listener): what one turn of the loop
publishes in one write, its last message at once (`_relay_here`). A job that ended before its
ComfyUI could say so (refused by the worker's ComfyUI, timed out, lost) gets the end ComfyUI
would have sent (`history.closing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..auth import may_see
from ..errors import ServerlessError
from ..jobs.feed import Event
from ..jobs.runner import RunningJob
from ..state import AppState, app_state
from ..transports.bursts import bursts
from ..transports.events import TaskEvents
from ..transports.frames import Frames, Message
from . import history
from .native import live, owner_of, prompts, published_payloads

log = logging.getLogger(__name__)

LOOK_EVERY = 1.0  # seconds between looks for a client's new prompts when nothing woke its follower


class Outbox:
    """A `/ws` client's messages, a burst at a time in one write (`transports.frames`), each its
    own frame as ComfyUI frames it: texts, and previews as binary frames. One prompt's burst is
    not interleaved with another's."""

    def __init__(self, frames: Frames) -> None:
        self._frames = frames
        self._sending = asyncio.Lock()

    async def send(self, messages: list[Message]) -> None:
        async with self._sending:
            await self._frames.send(messages)

    def send_now(self, messages: list[Message]) -> bool:
        """Send `messages` without waiting when nothing is being sent and the socket has room:
        True when sent, False (nothing sent) when `send` must do it."""
        return not self._sending.locked() and self._frames.send_now(messages)


def text(message: str) -> Message:
    return Message(message.encode())


class _Gone(Exception):
    """The client went away."""


async def websocket(ws: WebSocket) -> None:
    state = app_state(ws)
    client_id = ws.query_params.get("clientId") or uuid.uuid4().hex
    owner = owner_of(ws)
    await ws.accept()
    cursor = await prompts(state).client_cursor(client_id)  # its prompts from now on
    outbox = Outbox(Frames(ws))
    found = await live(state, owner)
    await outbox.send([text(history.greeting(client_id, len(found)))])
    try:
        async with asyncio.TaskGroup() as group:
            for entry, status in found:  # a client back mid-run: its prompts from here on, as ComfyUI
                if entry.client_id == client_id:
                    group.create_task(_resume(state, entry.task_id, status == "running", outbox))
            group.create_task(_follow_client(state, client_id, cursor, owner, outbox, group))
            await _until_gone(ws, outbox, state.resources.settings.inputs.max_bytes)
            raise _Gone
    except* _Gone:
        pass
    except* (WebSocketDisconnect, RuntimeError, OSError) as exc:  # a send after it went away
        log.debug("ComfyUI websocket %s closed: %s", client_id, exc.exceptions[0])


async def _until_gone(ws: WebSocket, outbox: Outbox, max_upload: int) -> None:
    """Until the client goes; its `feature_flags` are answered with ours, as ComfyUI answers
    them (previews come as plain image frames: no preview metadata)."""
    while (message := await ws.receive())["type"] != "websocket.disconnect":
        if history.is_feature_flags(message.get("text")):
            flags = {"supports_preview_metadata": False, "max_upload_size": max_upload}
            await outbox.send([text(json.dumps({"type": "feature_flags", "data": flags}))])


async def _follow_client(
    state: AppState, client_id: str, cursor: str, owner: str | None, outbox: Outbox, group: asyncio.TaskGroup
) -> None:
    index = prompts(state)
    # Woken the moment a prompt for the client is queued: here by the bell /prompt rings, on
    # another gateway through Redis (the client's task stream, followed by the instance's watch).
    async with index.news(client_id, cursor) as rung:
        while True:
            rung.clear()  # before the look: a prompt queued after it rings again
            tasks, cursor = await index.client_tasks(client_id, cursor)
            for task_id in tasks:
                entry = await index.get(task_id)
                if entry is not None and may_see(owner, entry.owner):
                    group.create_task(_relay(state, task_id, outbox), name=f"ws relay {task_id}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LOOK_EVERY):  # a safety net: nothing is missed without it
                    await rung.wait()


async def _resume(state: AppState, task_id: str, running: bool, outbox: Outbox) -> None:
    """A prompt under way when its client (re)connects: as ComfyUI, `executing` of the node it
    runs (without its prompt id), then its messages from now on (a job running here: as it has
    published them, which its log may not hold yet)."""
    job = state.jobs.get(task_id)
    payloads = await published_payloads(job, ended=False) if job is not None else None
    if payloads is None:
        payloads = json.loads(await state.resources.status.read(task_id))
    node = history.current_node(task_id, payloads)
    running = running or (job is not None and node is not None)
    if running and node is not None:
        await outbox.send([text(json.dumps({"type": "executing", "data": {"node": node}}))])
    await _relay(state, task_id, outbox, len(payloads))


async def _relay(state: AppState, task_id: str, outbox: Outbox, after: int = 0) -> None:
    """One prompt's messages (after the first `after`), its end held until the task's terminal
    payload is stored."""
    try:
        await _relay_events(state, task_id, outbox, after)
    except ServerlessError as exc:  # the status store is down: this prompt's messages end here
        log.warning("task_id=%s: its messages stop on /ws (%s)", task_id, exc.message)


async def _relay_events(state: AppState, task_id: str, outbox: Outbox, after: int) -> None:
    jobs = state.jobs
    job = jobs.get(task_id)
    # A job running here, whose prompts only this process answers for: its end is passed on as
    # it comes (its `/history` answers as ComfyUI's own does then: `native.history_payloads`).
    passed_on = job is not None and not prompts(state).shared
    if passed_on and job is not None and await _relay_here(job, task_id, outbox, after):
        return
    source = TaskEvents(task_id, state.resources.status, job, jobs.end_if_stranded)
    # A burst of messages in one write; ComfyUI's last one passed on at once (its client asks for
    # the prompt's history as soon as it reads it).
    urgent = (lambda event: history.ends_prompt(event.text, task_id)) if passed_on else None
    # Its bursts wait out their window asleep, woken by its end (or last message) only.
    alarm = asyncio.Event() if passed_on else None
    untap = job.tap(_ringing(alarm, task_id)) if job is not None and alarm is not None else None
    try:
        relayed = bursts(source, after, idle=1.0, previews=True, urgent=urgent, alarm=alarm)
        await _relay_bursts(relayed, task_id, passed_on, outbox)
    finally:
        if untap is not None:
            untap()


def _ringing(alarm: asyncio.Event, task_id: str) -> Callable[[Event], None]:
    """A tap of a job's events that sets `alarm` at the prompt's end or its last message."""

    def tap(event: Event) -> None:
        # ComfyUI's messages are published as the text it sent; ours (previews too) as bytes
        if event.terminal or (isinstance(event.body, str) and history.ends_prompt(event.body, task_id)):
            alarm.set()

    return tap


async def _relay_bursts(
    source: AsyncIterator[list[Event] | None], task_id: str, passed_on: bool, outbox: Outbox
) -> None:
    held: str | None = None
    placed = _PreviewPlace()
    async for burst in source:
        if burst is None:
            continue
        messages: list[Message] = []
        ended = False
        for event in burst:
            if not placed.allows(event):
                continue
            if event.terminal:
                ends = [held] if held is not None else history.closing(task_id, json.loads(event.text))
                messages += map(text, ends)
                ended = True
                break
            message, last = _relayed(event.text, task_id)
            if last and not passed_on:
                held = event.text  # until the task's terminal payload is stored
                continue
            if message is not None:
                messages.append(message)
            if last:
                ended = True
                break
        if messages:
            await outbox.send(messages)
        if ended:
            return


async def _relay_here(job: RunningJob, task_id: str, outbox: Outbox, after: int) -> bool:
    """A prompt of a job running on this box: its messages written in the step that publishes
    them (a tap of the job's feed, called as ComfyUI's messages reach the listener), what one turn
    of the loop publishes in one write; not a turn later, by a reader woken for them. False, with
    nothing sent, when its events cannot be read at once (`RunningJob.published_now`)."""
    here = _Here(task_id, outbox)
    backlog = job.published_now(after)
    # No turn of the loop between: nothing is missed. Previews come as the job shows them.
    untap = job.tap(here.take, previews=True) if backlog is not None else None
    if backlog is None or untap is None:
        return False
    try:
        for event in backlog:
            here.take(event)
        await here.relayed()
    finally:
        untap()
    return True


class _Here:
    """What `_relay_here` has taken of a prompt's events and not yet sent."""

    def __init__(self, task_id: str, outbox: Outbox) -> None:
        self.task_id = task_id
        self.outbox = outbox
        self.pending: list[Message] = []
        self.over = False  # the prompt's last message (or its end) is taken
        self.due = False  # a write at the end of this turn is due
        self.wake = asyncio.Event()  # what the turn's write could not send, or the end, is there
        self.placed = _PreviewPlace()

    def take(self, event: Event) -> None:
        """A tap of the job's feed (it never raises into the publisher)."""
        if self.over or not self.placed.allows(event):
            return
        try:
            if event.terminal:  # the job ended before ComfyUI said so: the end ComfyUI would send
                self.pending += map(text, history.closing(self.task_id, json.loads(event.text)))
                self.over = True
            else:
                message, self.over = _relayed(event.text, self.task_id)
                if message is not None and event.preview:  # the newest: one not yet sent is stale
                    self.pending = [pending for pending in self.pending if not pending.binary]
                if message is not None:
                    self.pending.append(message)
        except Exception:  # a message we cannot relay: this prompt's messages end here
            log.exception("task_id=%s: its messages stop on /ws", self.task_id)
            self.pending, self.over = [], True
        if self.over:  # its client asks for the prompt's history as soon as it reads it: at once
            self._write()
        elif not self.due:
            self.due = True
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        self.due = False
        if self.pending and self.outbox.send_now(self.pending):
            self.pending = []
        if self.pending or self.over:
            self.wake.set()

    async def relayed(self) -> None:
        """Until the prompt's last message is sent: what could not be sent at once is sent in
        turn (another prompt's burst under way, no room in the socket, the client gone)."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.pending:  # taken, and the outbox's lock with it, in one step: order is kept
                burst, self.pending = self.pending, []
                await self.outbox.send(burst)
            if self.over and not self.pending:
                return


class _PreviewPlace:
    """Where a sampler preview may go: after a step's `progress`, before the next node starts or a
    node's output comes, where ComfyUI sends it to its `/ws` clients. A preview read later (on a
    fleet previews come through a stream of their own, read beside the log) would show on the node
    running by then: it is left out, as a stale one is."""

    def __init__(self) -> None:
        self.sampling = False

    def allows(self, event: Event) -> bool:
        if event.preview:
            return self.sampling
        kind = history.message_type(event.text)  # ComfyUI's text as a box publishes it, or a log's bytes
        if kind == "progress":
            self.sampling = True
        elif kind in ("executing", "executed") or (kind or "").startswith("execution_"):
            self.sampling = False
        return True


def _relayed(logged: str, task_id: str) -> tuple[Message | None, bool]:
    """What a `/ws` client gets of one logged event of a prompt (None: nothing), and whether it
    is the prompt's last message (`executing` with no node)."""
    if history.relayed_as_is(logged):
        return text(logged), False
    preview = history.preview_frame(logged)
    if preview is not None:
        return Message(preview, binary=True), False
    message = history.relayed(logged)
    if message is None:
        return None, False
    return text(logged), history.is_end(message, task_id)
