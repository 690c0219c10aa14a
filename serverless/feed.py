"""A job's event sequence, kept in memory for the transports that render it.

The runner publishes; the JSON response, the SSE stream, the websocket and the status log each
follow with their own cursor. Publishing never waits for a reader, so a slow reader cannot stall
a job: the feed keeps a bounded window of events, and a reader that falls out of it is told so
(`ReaderTooSlow`) and dropped. The terminal event is always kept.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    """One payload of a job: `text` is what is sent (ComfyUI's text as received, or the
    terminal payload serialised once); `seq` counts from 1."""

    seq: int
    text: str
    terminal: bool = False
    payload: dict[str, Any] | None = None


class ReaderTooSlow(Exception):
    """A reader fell so far behind that the events it needs are no longer kept."""


class Feed:
    """Events of one job; `publish` from the runner, `follow` from any number of readers."""

    def __init__(self, limit: int = 10000, first_seq: int = 1) -> None:
        self._events: deque[Event] = deque(maxlen=limit)
        self.first_seq = first_seq
        self._next_seq = first_seq
        self._changed = asyncio.Event()
        self.terminal: Event | None = None

    @property
    def last_seq(self) -> int:
        """The seq of the newest event (first_seq - 1 before any)."""
        return self._next_seq - 1

    @property
    def done(self) -> bool:
        return self.terminal is not None

    def publish(self, text: str) -> None:
        """Append a ComfyUI message text. Never waits: it cannot be stalled or interrupted."""
        self._append(Event(self._next_seq, text))

    def finish(self, payload: dict[str, Any]) -> Event:
        """Append the terminal payload (once; later events are ignored) and return it."""
        if self.terminal is None:
            self._append(Event(self._next_seq, json.dumps(payload, ensure_ascii=False), True, payload))
        assert self.terminal is not None
        return self.terminal

    def _append(self, event: Event) -> None:
        if self.terminal is not None:
            return
        self._next_seq += 1
        self._events.append(event)
        if event.terminal:
            self.terminal = event
        # Wake every waiting reader, and give later waiters a fresh event to wait on.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(self, after: int | None = None, idle: float | None = None) -> AsyncIterator[Event | None]:
        """Yield every event with seq > `after` (default: from the first), waiting for new ones,
        until the terminal one. With `idle`, yield None whenever that many seconds pass without
        an event (for keep-alives)."""
        cursor = self.first_seq - 1 if after is None else after
        while True:
            if self._next_seq - 1 <= cursor:
                try:
                    await asyncio.wait_for(self._changed.wait(), idle)
                except TimeoutError:
                    yield None
                continue
            while cursor < self._next_seq - 1:
                oldest = self._events[0].seq
                if cursor + 1 < oldest:
                    raise ReaderTooSlow(f"events {cursor + 1}..{oldest - 1} were dropped")
                # Readers are usually near the newest end, where deque indexing is cheap.
                event = self._events[cursor + 1 - oldest]
                cursor = event.seq
                yield event
                if event.terminal:
                    return

    async def wait(self) -> Event:
        """The terminal event, once there is one."""
        while self.terminal is None:
            await self._changed.wait()
        return self.terminal
