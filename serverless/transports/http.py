"""HTTP renderings of a job: one JSON answer (sync, or an async invocation FC holds), or a
server-sent event stream.

SSE: each event is an `id:` line (its sequence number) and one `data:` line (ComfyUI's text as
received, then the terminal payload), lines ending in a bare LF; `: ping` after
`stream_ping_interval` seconds of silence. Events are formatted by sse-starlette's
`ServerSentEvent`; the stream itself is ours, so that it shares the caller-watch of every other
transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import InvalidParams
from ..jobs.feed import ReaderTooSlow
from ..jobs.job import Job
from ..ops.metrics import Metrics, ReaderMeter
from ..settings import Settings
from .caller import watch

log = logging.getLogger(__name__)

SEP = "\n"


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused past `limit` bytes without reading the rest, or when it has not
    all arrived within `timeout` seconds (a slow drip must not hold a connection forever)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InvalidParams(f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise InvalidParams(f"the request body is larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise InvalidParams(f"the request body did not arrive within {timeout:g}s") from None
    return b"".join(chunks)


async def json_response(request: Request, job: Job, settings: Settings, held_async: bool = False) -> Response:
    """The terminal payload as one JSON answer, its HTTP status the error's. An async invocation
    held for FC answers 2xx unless a retry could help: FC retries only what answers 5xx."""

    async def caller_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def finished() -> None:
        await job.finished()

    await watch(job, finished, caller_gone, settings.cancel_on_disconnect)
    terminal = await job.finished()  # after a hang-up: the job was abandoned, or runs on
    error = terminal.error
    status = 200 if error is None or (held_async and not error.retryable) else error.status_code
    return Response(terminal.data, status_code=status, media_type="application/json")


class EventStream(Response):
    """A job's events as `text/event-stream` (see the module docstring)."""

    media_type = "text/event-stream"

    def __init__(self, job: Job, settings: Settings, metrics: Metrics | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        self.job = job
        self.settings = settings
        self.meter = ReaderMeter(metrics, "sse")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def deliver() -> None:
            async for chunk in self._chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def caller_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        with self.meter:
            await watch(self.job, deliver, caller_gone, self.settings.cancel_on_disconnect)

    async def _chunks(self) -> AsyncIterator[bytes]:
        job = self.job
        try:
            async for event in job.events(idle=self.settings.stream_ping_interval):
                if event is None:
                    yield ServerSentEvent(comment="ping", sep=SEP).encode()
                else:
                    yield ServerSentEvent(data=event.text, id=str(event.seq), sep=SEP).encode()
        except ReaderTooSlow as exc:
            # The job goes on (its status log still ends with the terminal payload); only this reader
            # is dropped. Compat clients ignore comments: this one tells a person where the rest is.
            log.warning("dropping a slow SSE reader of task_id=%s: %s", job.task_id, exc)
            self.meter.dropped()
            note = f"dropped: {exc}; the job goes on: GET /api/serverless/status?task_id={job.task_id}"
            yield ServerSentEvent(comment=note, sep=SEP).encode()
