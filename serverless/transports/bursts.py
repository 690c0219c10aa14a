"""A job's events grouped into the writes the SSE stream and the websocket make.

ComfyUI sends a job's messages in bursts (a node starts, reports its progress, finishes, the next
starts...: a dozen messages a fraction of a millisecond apart). Written one by one, each wakes the
caller and costs a send on both sides, on the same cores the job runs on. Like Nagle's algorithm,
a write follows the one before it (or the stream's start) no sooner than `WINDOW` later: an event
after a quiet spell goes out at once, the rest of its burst waits for the window to pass and goes
out in one write. The terminal event never waits (nor what is held with it): a caller's answer is
not delayed.

Waiting out the window, the reader is woken by each event published meanwhile (to look whether
it is the terminal one or an urgent one). With an `alarm`, set by whoever sees an urgent or the
terminal event published (a tap on the job's feed: `Feed.tap`), it sleeps through the window
instead and takes the burst's events at its end, or when the alarm goes: the same writes, with
one wake-up a burst instead of one an event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from ..jobs.feed import Event
from ..jobs.runner import EventSource

WINDOW = 0.002  # seconds between two writes of one burst; an event waits at most this long


async def bursts(
    source: EventSource,
    after: int | None = None,
    idle: float | None = None,
    previews: bool = False,
    urgent: Callable[[Event], bool] | None = None,
    alarm: asyncio.Event | None = None,
) -> AsyncIterator[list[Event] | None]:
    """`source.events(after, idle, previews)`, each list one write; None for a keep-alive (after
    `idle` seconds without an event). A list that ends with the terminal event is the last. An
    event `urgent` picks goes out at once too, with what is held before it (ComfyUI's last
    message of a prompt, whose client then asks for its history). `alarm`: set once an urgent
    or the terminal event is published (see the module docstring)."""
    loop = asyncio.get_running_loop()
    written = loop.time()  # when the last write was made (the stream's first: its start)
    burst: list[Event] = []
    async for event in source.events(after, idle, previews):
        if event is None:
            yield None
            continue
        burst.append(event)
        if (
            event.terminal
            or (urgent is not None and urgent(event))
            or not await _more_after(source, event.seq, written + WINDOW - loop.time(), alarm)
        ):
            yield burst
            burst = []
            written = loop.time()


async def _more_after(source: EventSource, seq: int, within: float, alarm: asyncio.Event | None) -> bool:
    """Whether an event after `seq` may be read now or within `within` seconds: as the source
    tells, woken by each event published meanwhile; with an `alarm`, asleep until then (or until
    it goes) and asked once."""
    if alarm is None:
        return await source.more_after(seq, within)
    if within <= 0 or alarm.is_set():
        return await source.more_after(seq, 0)
    if await source.more_after(seq, 0):
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            await alarm.wait()
    return await source.more_after(seq, 0)
