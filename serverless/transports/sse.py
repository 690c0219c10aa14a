"""Server-sent events: a job's event sequence rendered as `text/event-stream`.

Each event is one `data:` line (ComfyUI's text as received, then the terminal payload) with an
`id:` line (its sequence number); `: ping` after `stream_ping_interval` seconds of silence. If the
client goes away, the job is cancelled in ComfyUI (unless CANCEL_ON_DISCONNECT is off).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent

from ..jobs.feed import ReaderTooSlow
from ..jobs.job import Job
from ..settings import Settings

log = logging.getLogger(__name__)
# sse-starlette logs every chunk at DEBUG; results carry signed OSS URLs, which must never be logged.
logging.getLogger("sse_starlette").setLevel(logging.INFO)

# Lines end with a bare LF. The response's `sep` only applies to what sse-starlette formats itself;
# a ServerSentEvent we build carries its own separator (CRLF unless told), so each event gets it too.
SEP = "\n"


async def sse_events(job: Job, ping_interval: float, cancel_on_disconnect: bool) -> AsyncIterator[ServerSentEvent]:
    """The events of `job`; cancelling this generator (client gone) abandons the job."""
    dropped = False
    try:
        async for event in job.feed.follow(idle=ping_interval):
            if event is None:
                yield ServerSentEvent(comment="ping", sep=SEP)
                continue
            if event.terminal:
                await job.finished()  # in the status log first: a poller told "done" finds it there
            yield ServerSentEvent(data=event.text, id=str(event.seq), sep=SEP)
    except ReaderTooSlow as exc:
        # The job goes on (its status log still ends with the terminal payload); only this reader
        # is dropped. Compat clients ignore comments: this one tells a person where the rest is.
        log.warning("dropping a slow SSE reader of task_id=%s: %s", job.task_id, exc)
        dropped = True
        note = f"dropped: {exc}; the job goes on: GET /api/serverless/status?task_id={job.task_id}"
        yield ServerSentEvent(comment=note, sep=SEP)
    finally:
        if cancel_on_disconnect and not dropped:
            job.abandon("SSE client disconnected")


def sse_response(job: Job, settings: Settings) -> EventSourceResponse:
    return EventSourceResponse(
        sse_events(job, settings.stream_ping_interval, settings.cancel_on_disconnect),
        ping=0,  # our own keep-alive: only after silence, see sse_events
        sep=SEP,
        headers={"Cache-Control": "no-store"},
        # On server shutdown let the stream run to its terminal payload (jobs are drained first).
        shutdown_grace_period=settings.drain_timeout + 30,
    )
