"""The job feed: readers see every event in order and always the terminal one."""

from __future__ import annotations

import asyncio
import json

import pytest

from serverless.jobs.feed import Feed, ReaderTooSlow, Result


async def collect(feed: Feed, after: int = 0) -> list:
    return [event async for event in feed.follow(after) if event is not None]


async def test_readers_get_all_events_then_the_terminal_one():
    feed = Feed()
    readers = [asyncio.create_task(collect(feed)) for _ in range(3)]
    await asyncio.sleep(0)
    for i in range(5):
        feed.publish(f'{{"n": {i}}}')
        await asyncio.sleep(0)
    feed.finish(Result({"type": "serverless_api"}))
    for events in await asyncio.gather(*readers):
        assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
        assert events[-1].terminal and json.loads(events[-1].data) == {"type": "serverless_api"}


async def test_a_late_reader_still_gets_everything_and_after_skips():
    feed = Feed()
    feed.publish("a")
    feed.publish("b")
    feed.finish(Result({"type": "error"}))
    assert [e.text for e in await collect(feed)] == ["a", "b", '{"type": "error"}']
    assert [e.seq for e in await collect(feed, after=2)] == [3]


async def test_nothing_is_added_after_the_terminal_event():
    feed = Feed()
    feed.finish(Result({"type": "error"}))
    feed.publish("late")
    feed.finish(Result({"type": "serverless_api"}))
    events = await collect(feed)
    assert len(events) == 1 and json.loads(events[0].data) == {"type": "error"}


async def test_a_reader_that_falls_out_of_the_window_is_told():
    feed = Feed(limit=10)
    for i in range(30):
        feed.publish(str(i))
    with pytest.raises(ReaderTooSlow):
        await collect(feed)
    feed.finish(Result({"type": "serverless_api"}))
    # a reader that starts near the end is fine: the terminal event is always kept
    assert (await collect(feed, after=25))[-1].terminal


async def test_idle_readers_get_keepalive_markers_between_events():
    feed = Feed()
    seen: list = []

    async def read() -> None:
        async for event in feed.follow(idle=0.01):
            seen.append(event)
            if event is None and len(seen) == 1:
                feed.finish(Result({"type": "serverless_api"}))

    await asyncio.wait_for(read(), 5)
    assert seen[0] is None and seen[-1].terminal


async def test_a_pinned_reader_keeps_what_it_has_not_read_while_live_readers_are_bounded():
    feed = Feed(limit=10)
    feed.publish("first")
    pinned = feed.follow(pinned=True)
    first = await anext(pinned)  # registered, at event 1
    for i in range(49):
        feed.publish(str(i))
    with pytest.raises(ReaderTooSlow):
        await collect(feed)  # a live reader 50 behind is dropped
    feed.finish(Result({"type": "serverless_api"}))
    rest = [e async for e in pinned if e is not None]
    assert [first.seq] + [e.seq for e in rest] == list(range(1, 52))
    assert rest[-1].terminal


async def test_a_reader_cancelled_as_an_event_arrives_is_cancelled():
    """A caller that hangs up while an event is published must stop following (asyncio.wait_for in
    Python 3.11 could swallow that cancellation, and the hang-up went unnoticed till the job ended)."""
    feed = Feed()

    async def follow() -> None:
        async for _ in feed.follow(idle=30):
            pass

    for turns in range(4):  # cancelled 0, 1, 2 or 3 turns of the loop after the event
        reader = asyncio.create_task(follow())
        await asyncio.sleep(0)  # the reader waits for the next event
        feed.publish("x")  # wakes it...
        for _ in range(turns):
            await asyncio.sleep(0)
        reader.cancel()  # ...and it is cancelled before it has taken the event
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(reader, 5)


async def test_a_reader_resuming_after_the_terminal_event_ends_at_once():
    feed = Feed()
    feed.publish("a")
    feed.finish(Result({"type": "serverless_api"}))
    assert await asyncio.wait_for(collect(feed, after=2), 5) == []
    assert await asyncio.wait_for(collect(feed, after=17), 5) == []


async def test_a_tap_sees_each_event_as_it_is_published_until_untapped_and_a_failing_one_is_dropped():
    feed = Feed()
    seen: list[int] = []
    untap = feed.tap(lambda event: seen.append(event.seq))

    def broken(event: object) -> None:
        raise RuntimeError("a reader's bug")

    feed.tap(broken)
    feed.publish('{"n": 1}')
    assert seen == [1], "in the step that publishes it"
    feed.publish('{"n": 2}')  # the broken tap is gone: publishing goes on
    untap()
    feed.publish('{"n": 3}')
    feed.finish(Result({"type": "serverless_api"}))
    assert seen == [1, 2]
    assert [event.seq for event in await collect(feed)] == [1, 2, 3, 4], "readers get every event still"


async def test_a_tap_that_asks_for_previews_sees_each_one_shown_in_its_place_among_the_events():
    feed = Feed()
    with_previews: list[tuple[int, bool]] = []
    without: list[tuple[int, bool]] = []
    untap = feed.tap(lambda event: with_previews.append((event.seq, event.preview)), previews=True)
    feed.tap(lambda event: without.append((event.seq, event.preview)))
    feed.publish('{"n": 1}')
    feed.show({"type": "serverless_preview", "data": {"step": 1}})
    feed.publish('{"n": 2}')
    feed.show({"type": "serverless_preview", "data": {"step": 2}})
    assert with_previews == [(1, False), (1, True), (2, False), (2, True)], "each preview after the event it followed"
    assert without == [(1, False), (2, False)]
    untap()
    feed.show({"type": "serverless_preview", "data": {"step": 3}})
    feed.publish('{"n": 3}')
    assert with_previews[-1] == (2, True), "untapped: neither events nor previews"
