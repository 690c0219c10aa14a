"""HTTP renderings of a job: one JSON answer (sync, or an async invocation FC holds), or a
server-sent event stream.

SSE: each event is an `id:` line (its sequence number) and one `data:` line (ComfyUI's text as
received, then the terminal payload), lines ending in a bare LF; `: ping` after
`PING_INTERVAL` seconds of silence. Events are formatted by sse-starlette's
`ServerSentEvent`; the stream itself is ours, so that it shares the caller-watch of every other
transport. Both renderers read an `EventSource`: the job itself, or a task followed through its
status log (`serverless.transports.events.TaskEvents`: resumed streams, attached callers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..core.request import BIG_BODY, decode_json
from ..errors import InvalidParams
from ..jobs.feed import Event, ReaderTooSlow
from ..jobs.runner import EventSource, RunningJob
from ..ops.metrics import Metrics, ReaderMeter
from ..settings import Settings
from . import caller
from .bursts import bursts
from .caller import CallerStalled, bounded, watch

log = logging.getLogger(__name__)

SEP = "\n"


PING_INTERVAL = 15.0  # seconds of silence before a stream's `: ping` (the contract's 15 s)
PING = ServerSentEvent(comment="ping", sep=SEP).encode()
# The last write of a stream carries its end when it is at most this big. A bigger one goes out
# alone, then the end, whose send waits for the caller to read it: a stalled caller is noticed
# (and its connection dropped) instead of holding the unsent rest in memory for ever.
SMALL_END = 64 * 1024


def sse_event(event: Event) -> bytes:
    """One event of the stream: its `id:` line and its payload as one `data:` line (ComfyUI's
    text and our JSON hold no line breaks; one that does is split as sse-starlette does). A
    preview has no `id:`: it is not in the task's log, and a resumed stream does not replay it."""
    data = event.data
    if event.preview:
        return b"".join((b"data: ", data, b"\n\n"))
    if b"\n" in data or b"\r" in data:
        return ServerSentEvent(data=event.text, id=str(event.seq), sep=SEP).encode()
    return b"".join((b"id: %d\ndata: " % event.seq, data, b"\n\n"))


Abandon = Callable[[str], None]
"""What a caller hanging up does to its job (`RunningJob.abandon`); None: the job goes on."""


def hang_up(job: RunningJob, settings: Settings, keep: bool = False) -> Abandon | None:
    """What the hang-up of the caller that started `job` does: cancel it wherever it runs, with
    CANCEL_ON_DISCONNECT on and unless told to `keep` it (a caller that may come back). A caller
    that only follows a task never cancels it."""
    if keep or not settings.stream.cancel_on_disconnect:
        return None
    return job.abandon


class BodyRefused(InvalidParams):
    """A body refused before it was read whole (too big, too slow): its answer closes the
    connection, whose unread rest would otherwise keep it (and a slow drip) open."""

    @property
    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused past `limit` bytes without reading the rest, or when it has not
    all arrived within `timeout` seconds (a slow drip must not hold a connection forever)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and len(declared) < 20 and int(declared) > limit:
        raise BodyRefused(f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyRefused(f"the request body is larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyRefused(f"the request body did not arrive within {timeout:g}s") from None
    return b"".join(chunks)


async def read_json(request: Request, limit: int, timeout: float, empty: Any = None) -> Any:
    """The request body's JSON value (`read_body`, then `json_value`)."""
    return await json_value(await read_body(request, limit, timeout), empty)


async def json_value(body: bytes, empty: Any = None) -> Any:
    """A request body's JSON value (`core.request.decode_json`: InvalidParams for what is not
    JSON, too many items or too deep a nesting, never a 500), decoded in a worker thread when
    big; `empty` for a body of nothing but whitespace."""
    if not body.strip():
        return empty
    return decode_json(body) if len(body) < BIG_BODY else await asyncio.to_thread(decode_json, body)


def abort_connection(receive: Receive | None) -> None:
    """Drop the caller's connection at once, with what it has not read: uvicorn's `close()` keeps
    the unsent answer in memory until the caller reads it, which a stalled caller never does.
    (The transport is uvicorn's, reached through its `receive`; another server: nothing done.)"""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if callable(abort):
        abort()


async def json_response(
    request: Request, job: EventSource, settings: Settings, held_async: bool = False, abandon: Abandon | None = None
) -> Response:
    """The terminal payload as one JSON answer, its HTTP status the error's. An async invocation
    held for FC answers 2xx unless a retry could help: FC retries only what answers 5xx."""

    # The answer waits for the job's end in this task, whatever the caller does: a hang-up only
    # abandons the job (when it should), at once, from a task of its own. Not the caller-watch's
    # race of two tasks, whose winner is known a turn of the loop (or two) after the job's end.
    gone = asyncio.create_task(_abandon_on_hang_up(request, job.task_id, abandon))
    try:
        terminal = await job.finished()  # after a hang-up: the job was abandoned, or runs on
    finally:
        gone.cancel()  # it ends at the loop's next turn, without holding the answer back
    error = terminal.error
    status = 200 if error is None or (held_async and not error.retryable) else error.status_code
    return JsonBody(terminal.data, status, caller.WRITE_TIMEOUT)


async def _abandon_on_hang_up(request: Request, task_id: str, abandon: Abandon | None) -> None:
    """Wait for the caller to hang up, then abandon its job (None: the job goes on)."""
    try:
        await caller_left(request.receive)
    except OSError as exc:  # as the caller-watch: a connection that failed is a caller gone
        log.debug("task_id=%s: receiving failed (%r): the caller is gone", task_id, exc)
    log.debug("task_id=%s: caller_gone first", task_id)
    if abandon is not None:
        abandon("caller disconnected")


async def caller_left(receive: Receive) -> None:
    """Until the HTTP caller hangs up (what else it sends, a body's rest, is dropped)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class JsonBody(Response):
    """A JSON answer sent in chunks, each send bounded by the write timeout (results with base64
    outputs can be tens of megabytes): a caller that stops reading has its connection closed."""

    media_type = "application/json"
    CHUNK = 1024 * 1024

    def __init__(self, body: bytes, status_code: int, write_timeout: float) -> None:
        super().__init__(body, status_code=status_code)
        self.write_timeout = write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        # Slices of the body, not copies: a copy of each megabyte cost the event loop ~0.5 ms of
        # page faults (uvicorn writes any bytes-like body to its transport as it is).
        view = memoryview(self.body)
        try:
            for start in range(0, max(len(view), 1), self.CHUNK):
                chunk = self.body if len(view) <= self.CHUNK else view[start : start + self.CHUNK]
                more = start + self.CHUNK < len(view)
                await bounded(
                    send({"type": "http.response.body", "body": chunk, "more_body": more}), self.write_timeout
                )
        except (CallerStalled, OSError) as exc:
            log.info("%s %s: %s; its connection is closed", scope.get("method"), scope.get("path"), exc)
            abort_connection(receive)


class EventStream(Response):
    """A job's events as `text/event-stream` (see the module docstring), those after event
    `after` when given."""

    media_type = "text/event-stream"

    def __init__(
        self,
        job: EventSource,
        settings: Settings,
        after: int | None = None,
        abandon: Abandon | None = None,
        metrics: Metrics | None = None,
        previews: bool = False,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        self.job = job
        self.settings = settings
        self.after = after
        self.abandon = abandon
        self.previews = previews
        self.meter = ReaderMeter(metrics, "sse")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout = caller.WRITE_TIMEOUT

        async def deliver() -> None:
            # Not under TCP_CORK: a corked socket whose reader had filled its window went on only at
            # the kernel's next zero-window probe (seconds later, backing off) once the reader read.
            ended = False  # the body's last chunk is sent: it went with the terminal event
            try:
                head = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                await bounded(send(head), timeout)
                async for chunk, last in self._chunks():
                    if not ended:
                        body = {"type": "http.response.body", "body": chunk, "more_body": not last}
                        await bounded(send(body), timeout)
                        ended = last
                if not ended:
                    await bounded(send({"type": "http.response.body", "body": b"", "more_body": False}), timeout)
            except CallerStalled:
                abort_connection(receive)
                raise

        with self.meter:
            await watch(self.job.task_id, deliver, lambda: caller_left(receive), self.abandon)

    async def _chunks(self) -> AsyncIterator[tuple[bytes, bool]]:
        """The stream's bytes, a burst of events in one write (`bursts`), each with whether the
        stream's end goes with it: after the terminal event, when that write is small (`SMALL_END`)."""
        job = self.job
        try:
            async for burst in bursts(job, self.after, PING_INTERVAL, self.previews):
                if burst is None:
                    yield PING, False
                else:
                    chunk = b"".join(map(sse_event, burst))
                    yield chunk, burst[-1].terminal and len(chunk) <= SMALL_END
        except ReaderTooSlow as exc:
            # The job goes on (its status log still ends with the terminal payload); only this reader
            # is dropped. Compat clients ignore comments: this one tells a person where the rest is.
            log.warning("dropping a slow SSE reader of task_id=%s: %s", job.task_id, exc)
            self.meter.dropped()
            note = f"dropped: {exc}; the job goes on: GET /api/serverless/status?task_id={job.task_id}"
            yield ServerSentEvent(comment=note, sep=SEP).encode(), False
