"""A job's event sequence, kept in memory for the transports that render it.

The job publishes; the JSON response, the SSE stream, the websocket and the status log each
follow with their own cursor. The last event is the terminal one: the job's outcome, a `Result`
or a `ServerlessError`, rendered once as the contract's payload. Publishing never waits for a
reader, so a slow reader cannot stall a job: a live reader more than `limit` events behind the
newest is told so (`ReaderTooSlow`) and dropped. A *pinned* reader (the status log, which must
record everything) keeps the events it has not read yet, up to `PINNED_FACTOR * limit`. The
terminal event is always kept.

Sampler previews are *shown*, not published (`show`): one slot holds the newest, numbered with
the seq of the event before it and never recorded; a reader that follows with `previews` gets
the newest one it has not seen, in its place among the events, so a slow reader skips stale
frames instead of queueing behind them, and a job's memory does not grow with its previews.

A reader that must tell events apart as they are published, without a turn of the loop for
each, *taps* the feed (`tap`): it is called with each event in the step that publishes it
(ComfyUI's `/ws` relay on one box is woken by a prompt's last message only, not by each message
of a burst: `transports.bursts`). A tap never waits and never raises into the publisher (what it
raises is logged and the tap dropped).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..core import jsontext
from ..errors import ServerlessError, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Result:
    """A job that succeeded: its `serverless_api` payload."""

    payload: dict[str, Any]


class HandedOff(Unavailable):
    """How an attempt ends that gives its job back to the queue instead of ending it (a fleet
    worker whose drain ran out of time, or whose ComfyUI died under the job): its feed ends with
    it, but it is nobody's terminal payload. The status log keeps a `retrying` event in its place
    (`RedisStatus.record`), no webhook is sent, and another worker runs the job again."""


Outcome = Result | ServerlessError


@dataclass(frozen=True, slots=True)
class Event:
    """One payload of a job, `seq` counting from 1. `body` is what is sent: ComfyUI's text as
    received, or our payload as UTF-8 JSON bytes (serialised once; big results are not copied
    again). The terminal event has `terminal` set and, for a failed job, its `error`."""

    seq: int
    body: str | bytes
    terminal: bool = False
    error: ServerlessError | None = None
    preview: bool = False  # shown, not published: `seq` is the event's before it, never recorded

    @property
    def text(self) -> str:
        return self.body if isinstance(self.body, str) else self.body.decode()

    @property
    def data(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else self.body.encode()


def terminal_body(outcome: Outcome) -> bytes:
    """The terminal payload of an outcome, as a feed publishes it."""
    return jsontext.dumps(outcome.payload if isinstance(outcome, Result) else outcome.to_payload())


class ReaderTooSlow(Exception):
    """A reader fell so far behind that the events it needs are no longer kept."""


READER_LAG = 10000  # events a live reader may fall behind before it is dropped
MAX_JOB_BYTES = 64 * 1024 * 1024  # bytes of events one job may publish (the terminal payload always is)
PINNED_FACTOR = 10


class Feed:
    """Events of one job; `publish` from the runner, `follow` from any number of readers."""

    def __init__(self, limit: int = READER_LAG, first_seq: int = 1, max_bytes: int | None = None) -> None:
        self._events: deque[Event] = deque()
        self.limit = limit
        self.max_bytes = max_bytes
        self.published_bytes = 0
        self.dropped = 0  # events not published because the job passed `max_bytes`
        self._pins: dict[int, int] = {}  # pinned reader -> its cursor
        self.first_seq = first_seq
        self._next_seq = first_seq
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()
        self.terminal: Event | None = None
        self._preview: Event | None = None
        self.previews_shown = 0
        # The seq through which a status log holds the events (its recorder's, or a write of the
        # job's last events with its end: `Job.settle_recorded`); the recorder skips what it holds.
        self.recorded = first_seq - 1
        self._sealed = False  # the job's last events are being stored: nothing else is published
        self._taps: list[Callable[[Event], None]] = []  # called with each event as it is published
        self._preview_taps: list[Callable[[Event], None]] = []  # ... and with each preview shown

    @property
    def last_seq(self) -> int:
        """The seq of the newest event (first_seq - 1 before any)."""
        return self._next_seq - 1

    @property
    def done(self) -> bool:
        return self.terminal is not None

    def publish(self, text: str) -> bool:
        """Append a ComfyUI message text. Never waits: it cannot be stalled or interrupted. False
        when the job has already published `max_bytes` (its events are then dropped, so that no
        job holds unbounded memory and disk, e.g. a workflow of thousands of nodes whose
        `progress_state` messages grow with their number); the terminal event is always kept."""
        return not self._sealed and self._within_budget(len(text)) and self._append(Event(self._next_seq, text))

    def publish_payload(self, payload: dict[str, Any]) -> bool:
        """Append one of our own payloads (e.g. `serverless_progress`), within the same budget."""
        return not self._sealed and self.publish_encoded(jsontext.dumps(payload))

    def seal(self) -> None:
        """Publish nothing more but `publish_encoded` and `finish`: the job's last events, made
        beforehand with the seqs they take, are being stored (`Job.settle_recorded`)."""
        self._sealed = True

    @property
    def sealed(self) -> bool:
        """The job's last events are being stored with its end (`seal`)."""
        return self._sealed

    def publish_encoded(self, body: bytes) -> bool:
        """Append one of our own payloads encoded already (one of the job's last events)."""
        return self._within_budget(len(body)) and self._append(Event(self._next_seq, body))

    def events_after(self, seq: int) -> list[Event] | None:
        """The events published after `seq`, None when some of them are no longer kept."""
        if seq >= self.last_seq:
            return []
        if not self._events or self._events[0].seq > seq + 1:
            return None
        return list(self._events)[seq + 1 - self._events[0].seq :]

    def show(self, payload: dict[str, Any]) -> None:
        """Show a preview: it replaces the one shown before (see the module docstring). Nothing
        after the terminal event."""
        if self.terminal is not None:
            return
        self._preview = preview = Event(self.last_seq, jsontext.dumps(payload), preview=True)
        self.previews_shown += 1
        for tap in self._preview_taps[:] if self._preview_taps else ():
            self._call(tap, preview)
        self._wake()

    def _within_budget(self, size: int) -> bool:
        if self.max_bytes is not None and self.published_bytes + size > self.max_bytes:
            self.dropped += 1
            return False
        self.published_bytes += size
        return True

    def finish(self, outcome: Outcome, body: bytes | None = None) -> Event:
        """Append the terminal payload (once; later events are ignored) and return it; `body`:
        the payload encoded already (`terminal_body`)."""
        if self.terminal is None:
            body = terminal_body(outcome) if body is None else body
            self._append(Event(self._next_seq, body, True, None if isinstance(outcome, Result) else outcome))
        assert self.terminal is not None
        return self.terminal

    def _append(self, event: Event) -> bool:
        if self.terminal is not None:
            return False
        self._next_seq += 1
        self._events.append(event)
        if event.terminal:
            self.terminal = event
            self._ended.set()
        self._trim()
        for tap in self._taps[:] if self._taps else ():
            self._call(tap, event)
        self._wake()
        return True

    def tap(self, call: Callable[[Event], None], previews: bool = False) -> Callable[[], None]:
        """Call `call` with every event published from now on, in the step that publishes it,
        and with `previews`, with every preview shown too (in the step that shows it); returns
        what ends the tap."""
        self._taps.append(call)
        if previews:
            self._preview_taps.append(call)

        return lambda: self._drop(call)

    def _drop(self, tap: Callable[[Event], None]) -> None:
        for taps in (self._taps, self._preview_taps):
            if tap in taps:
                taps.remove(tap)

    def _call(self, tap: Callable[[Event], None], event: Event) -> None:
        try:
            tap(event)
        except Exception:  # a reader's bug must not stop the job's publishing
            log.exception("a tap of the job's events failed; it is dropped")
            self._drop(tap)

    async def changed(self) -> None:
        """Wait for the next event published or preview shown."""
        await self._changed.wait()

    def _wake(self) -> None:
        # Wake every waiting reader, and give later waiters a fresh event to wait on.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _trim(self) -> None:
        """Forget events every reader that must see them has seen: keep the last `limit` for live
        readers, and what pinned readers have not read yet (bounded)."""
        floor = min(self._pins.values(), default=self.last_seq)
        while len(self._events) > self.limit and not self._events[0].terminal:
            if self._events[0].seq > floor and len(self._events) <= self.limit * PINNED_FACTOR:
                break
            self._events.popleft()

    async def follow(
        self, after: int | None = None, idle: float | None = None, pinned: bool = False, previews: bool = False
    ) -> AsyncIterator[Event | None]:
        """Yield every event with seq > `after` (default: from the first), waiting for new ones,
        until the terminal one. With `idle`, yield None whenever that many seconds pass without
        an event (for keep-alives). A `pinned` reader is never dropped for being behind unless
        it falls `PINNED_FACTOR * limit` events back. With `previews`, the newest preview not
        yet seen comes too, after the event it followed."""
        cursor = self.first_seq - 1 if after is None else after
        pin = object()
        seen = 0  # previews shown when this reader last took one
        if pinned:
            self._pins[id(pin)] = cursor
        try:
            while True:
                preview = self._preview
                if previews and preview is not None and self.previews_shown > seen and preview.seq <= cursor:
                    seen = self.previews_shown
                    yield preview
                    continue
                if self.last_seq <= cursor and self.terminal is not None:
                    return  # resumed after the terminal event: nothing more will come
                if self.last_seq <= cursor:
                    # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a
                    # cancellation that arrives as the event is set, and a caller's hang-up would
                    # then go unnoticed until the job ended.
                    try:
                        async with asyncio.timeout(idle):
                            await self._changed.wait()
                    except TimeoutError:
                        yield None
                    continue
                while cursor < self.last_seq:
                    preview = self._preview
                    if previews and preview is not None and self.previews_shown > seen and preview.seq <= cursor:
                        break  # its turn, before the events published after it
                    event = self._next_after(cursor, pinned)
                    cursor = event.seq
                    if pinned:
                        self._pins[id(pin)] = cursor
                    yield event
                    if event.terminal:
                        return
        finally:
            self._pins.pop(id(pin), None)

    def _next_after(self, cursor: int, pinned: bool) -> Event:
        oldest = self._events[0].seq
        if cursor + 1 < oldest:
            raise ReaderTooSlow(f"events {cursor + 1}..{oldest - 1} were dropped")
        if not pinned and self.last_seq - cursor > self.limit and not self._events[-1].terminal:
            raise ReaderTooSlow(f"{self.last_seq - cursor} events behind (more than {self.limit})")
        # Readers are usually near the newest end, where deque indexing is cheap.
        return self._events[cursor + 1 - oldest]

    async def wait(self) -> Event:
        """The terminal event, once there is one."""
        await self._ended.wait()
        assert self.terminal is not None
        return self.terminal
