"""Events grouped into writes (`serverless.transports.bursts`): a burst goes out together, a write
follows the one before it no sooner than the window, the terminal event never waits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from serverless.jobs.feed import Event, Feed, Result
from serverless.transports import bursts as bursts_module
from serverless.transports.bursts import bursts


class FeedSource:
    """An event source over a feed, telling what is published as a job on this box does."""

    task_id = "bursts"

    def __init__(self, feed: Feed, tells: bool = True) -> None:
        self.feed, self.tells = feed, tells

    def events(
        self, after: int | None = None, idle: float | None = None, previews: bool = False
    ) -> AsyncIterator[Event | None]:
        return self.feed.follow(after, idle, previews=previews)

    async def finished(self) -> Event:
        return await self.feed.wait()

    async def more_after(self, seq: int, within: float) -> bool:
        if not self.tells:
            return False
        if within > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    while self.feed.last_seq <= seq:
                        await self.feed.changed()
        return self.feed.last_seq > seq


async def writes(source: FeedSource) -> list[list[int]]:
    return [[event.seq for event in burst] async for burst in bursts(source) if burst is not None]


def message(n: int) -> str:
    return f'{{"type": "progress", "data": {{"value": {n}}}}}'


async def test_a_burst_published_at_once_is_one_write_and_the_terminal_does_not_wait_for_the_window(monkeypatch):
    monkeypatch.setattr(bursts_module, "WINDOW", 30.0)
    feed = Feed()
    for n in range(3):
        feed.publish(message(n))
    feed.finish(Result({"type": "serverless_api"}))
    async with asyncio.timeout(10):  # nowhere near the 30 s window
        assert await writes(FeedSource(feed)) == [[1, 2, 3, 4]]


async def test_events_after_a_write_wait_for_the_window_and_go_out_together(monkeypatch):
    monkeypatch.setattr(bursts_module, "WINDOW", 0.3)
    feed = Feed()
    source = FeedSource(feed)
    written: list[list[int]] = []
    first_written = asyncio.Event()

    async def read() -> None:
        async for burst in bursts(source):
            if burst is not None:
                written.append([event.seq for event in burst])
                first_written.set()

    reader = asyncio.create_task(read())
    feed.publish(message(1))  # alone: the window from the stream's start passes without more
    await first_written.wait()
    feed.publish(message(2))  # a burst right after a write: held for the window, then together
    await asyncio.sleep(0)
    feed.publish(message(3))
    await asyncio.sleep(0.05)
    assert written == [[1]], "nothing written within the window"
    await asyncio.sleep(0.5)
    assert written == [[1], [2, 3]]
    feed.publish(message(4))
    feed.finish(Result({"type": "serverless_api"}))  # the terminal event goes at once, with what waits
    async with asyncio.timeout(10):
        await reader
    assert written == [[1], [2, 3], [4, 5]]


async def test_a_source_that_cannot_tell_has_each_event_written_as_it_comes(monkeypatch):
    monkeypatch.setattr(bursts_module, "WINDOW", 30.0)
    feed = Feed()
    for n in range(3):
        feed.publish(message(n))
    feed.finish(Result({"type": "serverless_api"}))
    async with asyncio.timeout(10):
        assert await writes(FeedSource(feed, tells=False)) == [[1], [2], [3], [4]]


async def test_silence_is_told_as_a_keep_alive_between_bursts():
    feed, idle = Feed(), 0.05
    seen: list[object] = []

    async def read() -> None:
        async for burst in bursts(FeedSource(feed), idle=idle):
            seen.append(None if burst is None else [event.seq for event in burst])
            if burst is not None and burst[-1].terminal:
                return

    reader = asyncio.create_task(read())
    await asyncio.sleep(idle * 4)
    feed.finish(Result({"type": "serverless_api"}))
    async with asyncio.timeout(10):
        await reader
    assert None in seen and seen[-1] == [1]


async def test_with_an_alarm_a_burst_waits_asleep_and_its_urgent_event_sends_it_at_once(monkeypatch):
    monkeypatch.setattr(bursts_module, "WINDOW", 30.0)
    feed = Feed()
    last = '{"type": "executing", "data": {"node": null, "prompt_id": "p"}}'
    alarm = asyncio.Event()
    feed.tap(lambda event: alarm.set() if event.terminal or event.text == last else None)
    source = FeedSource(feed)
    waits: list[float] = []  # the source asked to wait for more (woken by each event then)
    more_after = source.more_after

    async def counted(seq: int, within: float) -> bool:
        waits.extend([within] if within > 0 else [])
        return await more_after(seq, within)

    source.more_after = counted  # type: ignore[method-assign]
    written: list[list[int]] = []

    async def read() -> None:
        async for burst in bursts(source, urgent=lambda event: event.text == last, alarm=alarm):
            if burst is not None:
                written.append([event.seq for event in burst])
                return

    reader = asyncio.create_task(read())
    for n in range(3):
        feed.publish(message(n))
        await asyncio.sleep(0.01)
    assert written == [], "held for the window"
    feed.publish(last)
    async with asyncio.timeout(10):  # nowhere near the 30 s window
        await reader
    assert written == [[1, 2, 3, 4]], "the burst and its urgent event in one write"
    assert waits == [], "asleep through the window: not woken by each event"
