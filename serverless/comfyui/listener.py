"""The one websocket to ComfyUI, shared by every job of the instance (`Listener`).

ComfyUI sends a prompt's messages to the client id it was submitted with; every job submits with
ours, so one socket carries them all, and each message is routed by its `prompt_id` to the job
following that prompt. A message naming no prompt goes to the job ComfyUI is executing (it runs
one prompt at a time): a reconnect's bare `executing`, custom nodes' messages; except `status`,
ComfyUI's queue broadcast, which every following job gets. Each frame is parsed once and every job
gets the same `Message` (the same text object). Binary frames that are sampler previews
(`core.previews`) go, in order with the messages, to the job whose prompt they name (in the
legacy form, which names none: the prompt executing) when that job asked for them; the socket
declares `supports_preview_metadata` as it opens, so ComfyUI names the prompt.

A job takes its items with a callback (`Connection.follow(prompt_id, take)`), called in the
listener's task as each item comes while nothing waits in the job's inbox (so still in order):
a prompt's many messages cost no wake-up of the job each. The prompt's last message is handed
over so too (its readers, a `/ws` client waiting for it, have it without waiting for the job's
turn), and the job is woken through its inbox (`Ended`). What else must wake the job goes through
its inbox: a break and its recovery, the rest of a burst past BURST_TURN items read at once (the
job takes it with a turn for its readers every BURST_TURN), and whatever comes after them until
the job has taken them (the last message among them then comes through the inbox too). The listener itself never pauses
mid-burst: a pause there lets every stream write what it has, and with a hundred streams
following `status` broadcasts each then writes several times a burst.

The socket is opened at start and reopened whenever it breaks (with backoff, for the life of the
app). After a break every job that was following is recovered at once, before the new socket's
messages are routed: from its history if its prompt ended meanwhile, else it listens on.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp

from ..core.messages import Message, parse_message
from ..core.previews import PreviewFrame, parse_frame
from ..errors import ComfyUIUnavailable

if TYPE_CHECKING:
    from .client import HistoryEntry, QueueState

log = logging.getLogger(__name__)

RETRY_FIRST = 0.05
RETRY_MAX = 1.0
LOST_POLL = 0.1  # how often a job cut off from ComfyUI checks whether its ComfyUI is gone
BURST_TURN = 8  # messages of a burst a job takes before its readers get a turn


class Socket(Protocol):
    """What the listener needs of an open websocket (aiohttp's `ClientWebSocketResponse`)."""

    def __aiter__(self) -> AsyncIterator[aiohttp.WSMessage]: ...
    async def close(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Broken:
    """The socket broke at `at` (monotonic): the prompt's messages may have been missed."""

    at: float


@dataclass(frozen=True, slots=True)
class Recovered:
    """After a reconnection: the prompt's history entry if it ended meanwhile, None if ComfyUI
    still holds it (its messages come live again), or the error that it is lost."""

    entry: HistoryEntry | None
    error: ComfyUIUnavailable | None = None


@dataclass(frozen=True, slots=True)
class Ended:
    """The prompt's last message was handed to the job in the listener's task: its `follow` ends."""


ENDED = Ended()


@dataclass(frozen=True, slots=True)
class Failed:
    """The job's `take` raised in the listener's task: the error is raised in the job's."""

    error: Exception


Item = Message | PreviewFrame | Broken | Recovered | Failed | Ended
Take = Callable[[Message | PreviewFrame], None]


class Inbox:
    """The items routed to one job, in the order the socket delivered them. `status` broadcasts
    go only to a job that forwards them (`forward`), and straight to it while its inbox is empty
    (every earlier message taken, so still in order): no wake-up of the job per broadcast."""

    def __init__(
        self, prompt_id: str, forward: Callable[[Message], None] | None = None, previews: bool = False
    ) -> None:
        self.prompt_id = prompt_id
        self.forward = forward
        self.previews = previews  # the job takes preview frames
        self.items: asyncio.Queue[Item] = asyncio.Queue()
        self.broken = False  # a break not yet followed by a recovery
        self.in_a_row = 0  # items taken since the job last waited for one
        self.take: Take | None = None  # while the job follows: its items handed to it at once
        self.handed = 0  # items handed to the job in this turn of the loop

    def deliver(self, item: Message | PreviewFrame) -> None:
        """Hand `item` straight to the job when nothing waits before it and fewer than
        BURST_TURN were handed over in this turn of the loop, the job woken (`Ended`) when it is
        the prompt's last message; else queue it (the job takes the rest of a burst from its
        inbox, its readers getting a turn every BURST_TURN: `Listener.next_item`)."""
        take = self.take
        if take is None or self.handed >= BURST_TURN or not self.items.empty():
            self.items.put_nowait(item)
            return
        if not self.handed:
            asyncio.get_running_loop().call_soon(self._next_turn)
        self.handed += 1
        try:
            take(item)
        except Exception as exc:  # the job's failure, not the socket's: raised in the job's task
            self.take = None
            self.items.put_nowait(Failed(exc))
            return
        if isinstance(item, Message) and item.ends(self.prompt_id):
            self.take = None  # the prompt is over
            self.items.put_nowait(ENDED)

    def _next_turn(self) -> None:
        self.handed = 0


class Listener:
    """The shared socket: `run()` (a task the client owns) keeps it open and routes its messages."""

    def __init__(
        self,
        open_socket: Callable[[str], Awaitable[Socket]],
        history: Callable[[str], Awaitable[HistoryEntry | None]],
        queue: Callable[[], Awaitable[QueueState]],
        connect_timeout: float,
        reconnect_timeout: float,
    ) -> None:
        self.client_id = uuid.uuid4().hex
        self.latest_status: Message | None = None
        self.last_error: ComfyUIUnavailable | None = None
        self._open_socket = open_socket
        self._history = history
        self._queue = queue
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self._inboxes: dict[str, Inbox] = {}
        self._executing: str | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._attempt: asyncio.Future[ComfyUIUnavailable | None] = asyncio.get_running_loop().create_future()

    # -- for the jobs -----------------------------------------------------------------------------

    async def ready(self) -> None:
        """Return once the socket is open; ComfyUIUnavailable when the attempt to open it fails."""
        while not self._connected.is_set():
            self._wake.set()  # do not wait out a backoff: a job is waiting
            try:
                async with asyncio.timeout(self.connect_timeout):
                    error = await asyncio.shield(self._attempt)
            except TimeoutError:
                raise ComfyUIUnavailable("ComfyUI's websocket could not be opened in time") from None
            if error is not None:
                raise error

    def register(
        self, prompt_id: str, forward: Callable[[Message], None] | None = None, previews: bool = False
    ) -> Inbox:
        inbox = Inbox(prompt_id, forward, previews)
        self._inboxes[prompt_id] = inbox
        return inbox

    def unregister(self, inbox: Inbox) -> None:
        if self._inboxes.get(inbox.prompt_id) is inbox:
            del self._inboxes[inbox.prompt_id]

    async def next_item(self, inbox: Inbox, lost: Callable[[], bool], since: float | None) -> Item:
        """The inbox's next item. While cut off (`since` the break), ComfyUIUnavailable once
        `lost()` says ComfyUI is gone or no socket came back within the reconnect timeout."""
        if since is None:
            if inbox.items.empty():
                inbox.in_a_row = 0
                return await inbox.items.get()
            # A burst of messages is taken at once (the job's readers then take its events
            # together, one wake-up each, not one per message), with a turn for the rest of the
            # instance every BURST_TURN messages.
            inbox.in_a_row += 1
            if inbox.in_a_row % BURST_TURN == 0:
                await asyncio.sleep(0)
            return inbox.items.get_nowait()
        while True:
            if lost():
                raise ComfyUIUnavailable("ComfyUI exited mid-job; the job died with it")
            if time.monotonic() - since > self.reconnect_timeout:
                because = f": {self.last_error.message}" if self.last_error is not None else ""
                raise ComfyUIUnavailable(f"lost ComfyUI's websocket mid-job and could not reconnect{because}")
            try:
                async with asyncio.timeout(LOST_POLL):  # not wait_for: it may lose a cancellation (3.11)
                    return await inbox.items.get()
            except TimeoutError:
                continue

    # -- the socket -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the socket open and route its messages, until cancelled."""
        delay = RETRY_FIRST
        while True:
            try:
                ws = await self._open_socket(self.client_id)
            except ComfyUIUnavailable as exc:
                self._settle(exc)
                await self._pause(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            try:
                await self._recover_all()
                self._connected.set()
                self._settle(None)
                await self._read(ws)
            except Exception:  # a bug must not end the instance's only socket: treat it as a break
                log.exception("websocket listener failed: reconnecting")
            finally:
                self._connected.clear()
                await asyncio.shield(ws.close())
            self._on_break()

    def _settle(self, error: ComfyUIUnavailable | None) -> None:
        """Tell the jobs waiting in `ready` how the attempt went; the next one gets a new future."""
        self.last_error = error
        if not self._attempt.done():
            self._attempt.set_result(error)
        self._attempt = asyncio.get_running_loop().create_future()

    async def _pause(self, delay: float) -> None:
        self._wake.clear()
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _read(self, ws: Socket) -> None:
        try:
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.TEXT:
                    message = parse_message(frame.data)
                    if message is not None:
                        self._route(message)
                elif frame.type == aiohttp.WSMsgType.BINARY:
                    preview = parse_frame(frame.data)
                    if preview is not None:
                        self._route_preview(preview)
        except (aiohttp.ClientError, OSError):
            pass

    def _route(self, message: Message) -> None:
        if message.type == "feature_flags":
            return  # ComfyUI's answer to the flags we declared: the socket's, no job's
        if message.type == "status":
            # ComfyUI sends it to every client on each queue change: with N jobs waiting, N
            # broadcasts per job. Parsed once, the same message goes to the jobs that forward it.
            self.latest_status = message
            for each in self._inboxes.values():
                if each.forward is None:
                    continue
                if each.items.empty():
                    each.forward(message)
                else:
                    each.items.put_nowait(message)
            return
        prompt_id = message.prompt_id
        if prompt_id is None:
            prompt_id = self._executing
        elif message.type in ("execution_start", "executing"):
            # ComfyUI runs one prompt at a time: the one it names until it ends (`node: null`).
            ends = message.type == "executing" and message.data.get("node") is None
            self._executing = None if ends else prompt_id
            ended = self._inboxes.get(prompt_id) if ends else None
            if ended is not None:
                ended.forward = None  # its prompt is over: broadcasts from now on are no part of it
        inbox = self._inboxes.get(prompt_id) if prompt_id is not None else None
        if inbox is not None:
            inbox.deliver(message)

    def _route_preview(self, preview: PreviewFrame) -> None:
        prompt_id = preview.prompt_id or self._executing
        inbox = self._inboxes.get(prompt_id) if prompt_id is not None else None
        if inbox is not None and inbox.previews:
            inbox.deliver(preview)

    def _on_break(self) -> None:
        # A warning when it cuts jobs off; with none following it is also how every stop of a
        # ComfyUI we supervise ends (a crash is the supervisor's error to log), so only noted.
        level = logging.WARNING if self._inboxes else logging.INFO
        log.log(level, "websocket lost: reconnecting (%d jobs following)", len(self._inboxes))
        self._executing = None
        broken = Broken(time.monotonic())
        for inbox in self._inboxes.values():
            inbox.broken = True
            inbox.items.put_nowait(broken)

    async def _recover_all(self) -> None:
        """Once a new socket is open: each job cut off by the break gets its history entry if its
        prompt ended meanwhile, or None while ComfyUI holds it (history, then the queue, then
        history again: a prompt ending between the two reads is not taken for lost). The queue
        also names the prompt running now, which the new socket's bare `executing` is about."""
        inboxes = [inbox for inbox in self._inboxes.values() if inbox.broken]
        if not inboxes:
            return
        first = await asyncio.gather(*(self._entry(inbox.prompt_id) for inbox in inboxes))
        queue: QueueState | None = None
        queue_error: ComfyUIUnavailable | None = None
        try:
            queue = await self._queue()
        except ComfyUIUnavailable as exc:
            queue_error = exc
        if queue is not None and queue.running:
            self._executing = queue.running[0]

        async def recovered(inbox: Inbox, entry: HistoryEntry | None, error: ComfyUIUnavailable | None) -> Recovered:
            if entry is not None:
                return Recovered(entry)
            if queue is None:
                return Recovered(None, queue_error)
            if queue.holds(inbox.prompt_id):
                return Recovered(None)
            return await self._second_look(inbox.prompt_id, error)

        outcomes = await asyncio.gather(*(recovered(inbox, *pair) for inbox, pair in zip(inboxes, first, strict=True)))
        for inbox, outcome in zip(inboxes, outcomes, strict=True):
            inbox.broken = False
            inbox.items.put_nowait(outcome)

    async def _entry(self, prompt_id: str) -> tuple[HistoryEntry | None, ComfyUIUnavailable | None]:
        try:
            return await self._history(prompt_id), None
        except ComfyUIUnavailable as exc:  # ComfyUI answers, but not with a history
            return None, exc

    async def _second_look(self, prompt_id: str, history_error: ComfyUIUnavailable | None) -> Recovered:
        entry, error = await self._entry(prompt_id)
        if entry is not None:
            return Recovered(entry)
        error = error or history_error
        because = f" ({error.message})" if error is not None else ""
        return Recovered(None, ComfyUIUnavailable("the websocket broke and ComfyUI no longer knows the job" + because))


class Connection:
    """One job's view of the shared socket (see `ComfyUI.connect`): the client id to submit with,
    ComfyUI's latest `status` when the job began (`greeting`, None before any), and `follow`."""

    def __init__(self, listener: Listener, inbox: Inbox) -> None:
        self.listener = listener
        self.client_id = listener.client_id
        self.greeting = listener.latest_status
        self.complete = True  # every message of the prompt came live (no break while following)
        self._inbox = inbox

    async def close(self) -> None:
        """Stop routing messages to this job."""
        self.listener.unregister(self._inbox)

    async def follow(self, prompt_id: str, take: Take, lost: Callable[[], bool] = lambda: False) -> None:
        """Hand `take` the messages concerning `prompt_id` (its own, and broadcasts), in order,
        until ComfyUI ends the prompt. After a broken socket, the prompt is recovered: from its
        history when it ended meanwhile (those messages come with `live` false), else it is
        still queued and we listen on. `lost()` true means the ComfyUI that had the prompt is
        gone (a supervised restart). Preview frames come in order with the messages, for a job
        registered with `previews`. `complete` tells afterwards whether the socket delivered
        every message of the prompt. `take` is called in this task or, as a message comes while
        nothing waits for the job (see the module docstring), in the listener's, in this task's
        context either way; what it raises there is raised here."""
        inbox = self._inbox
        if prompt_id != inbox.prompt_id:
            raise ValueError(f"this connection follows prompt {inbox.prompt_id}, not {prompt_id}")
        cut_off: float | None = None  # since when the socket is broken, until recovered
        inbox.take = _in_context(contextvars.copy_context(), take)
        try:
            while True:
                item = await self.listener.next_item(inbox, lost, cut_off)
                if isinstance(item, Message):
                    take(item)
                    if item.ends(prompt_id):
                        return
                elif isinstance(item, PreviewFrame):
                    take(item)
                elif isinstance(item, Ended):
                    return
                elif isinstance(item, Failed):
                    raise item.error
                elif isinstance(item, Broken):
                    log.warning("websocket lost prompt_id=%s: waiting for it to be reopened", prompt_id)
                    self.complete = False
                    cut_off = item.at if cut_off is None else cut_off
                else:
                    cut_off = None
                    if item.error is not None:
                        raise item.error
                    if item.entry is not None:
                        log.info("prompt recovered from history prompt_id=%s", prompt_id)
                        for message in item.entry.messages:
                            take(message)
                        return
        finally:
            inbox.take = None


def _in_context(context: contextvars.Context, take: Take) -> Take:
    """`take`, run in `context` (the following job's: its log lines name it, its tasks inherit it)."""

    def taken(item: Message | PreviewFrame) -> None:
        context.run(take, item)

    return taken
