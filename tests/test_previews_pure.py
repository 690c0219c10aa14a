"""Previews without servers: ComfyUI's binary frames as recorded, the throttle, the feed's slot."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

from serverless.core.previews import PreviewFrame, parse_frame
from serverless.jobs.feed import Feed, Result
from serverless.jobs.previews import Preview, PreviewThrottle

TRACES = Path(__file__).parent / "fixtures" / "traces"
JPEG = bytes.fromhex("ffd8ffe000104a46") + b"rest of a jpeg"


def recorded_previews() -> list[dict]:
    events = json.loads((TRACES / "p_progress_custom_node.json").read_text())["events"]
    return [e for e in events if e.get("kind") == "binary" and e["event_name"].startswith("PREVIEW")]


def framed(event: dict) -> bytes:
    """A recorded frame rebuilt from the trace's description of it (its header as recorded)."""
    if event["event_type"] == 1:
        return bytes.fromhex(event["first8_hex"]) + JPEG
    meta = json.dumps(event["metadata"]).encode()
    assert len(meta) == event["metadata_len"], "ComfyUI's json.dumps, default separators"
    frame = struct.pack(">II", 4, len(meta)) + meta + JPEG
    assert frame[:8].hex() == event["first8_hex"]
    return frame


def test_recorded_preview_frames_parse_in_both_forms() -> None:
    recorded = recorded_previews()
    assert {e["event_type"] for e in recorded} == {1, 4}
    for event in recorded:
        preview = parse_frame(framed(event))
        assert preview is not None and preview.image == JPEG and preview.mime == "image/jpeg"
        if event["event_type"] == 4:
            assert preview.prompt_id == event["metadata"]["prompt_id"] and preview.node == "2"
        else:
            assert preview.prompt_id is None and preview.node is None


def test_progress_text_and_broken_frames_are_not_previews() -> None:
    text = struct.pack(">II", 3, 1) + b"2" + b"starting"  # event 3, as trace p records it
    assert parse_frame(text) is None
    assert parse_frame(b"\x00\x00") is None
    assert parse_frame(struct.pack(">II", 4, 1000) + b"{}") is None  # says more metadata than it has
    assert parse_frame(struct.pack(">II", 4, 2) + b"[]" + JPEG) is None
    assert parse_frame(struct.pack(">II", 1, 9) + JPEG) is None  # no such image type
    png = parse_frame(struct.pack(">II", 1, 2) + b"\x89PNG")
    assert png == PreviewFrame(b"\x89PNG", "image/png")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def preview(step: int) -> Preview:
    return Preview(PreviewFrame(JPEG, "image/jpeg"), "3", step)


async def test_the_throttle_shows_at_most_fps_and_the_newest_wins() -> None:
    clock, shown = FakeClock(), []
    throttle = PreviewThrottle(4.0, lambda p: shown.append(p.step), clock)
    for step in range(1, 11):  # ten frames in 0.09 s
        throttle.offer(preview(step))
        clock.now += 0.01
    assert shown == [1], "the first at once, the others wait"
    clock.now = 0.25
    await asyncio.sleep(0.3)  # the timer fires: the newest waiting one, not the second
    assert shown == [1, 10]
    throttle.offer(preview(11))
    throttle.close()  # the job ended: a frame still waiting is dropped
    await asyncio.sleep(0.3)
    assert shown == [1, 10] and throttle.offered == 11


async def test_a_slow_reader_gets_the_newest_preview_not_a_backlog() -> None:
    feed = Feed()
    feed.publish('{"type": "execution_start"}')
    for step in range(1, 21):
        feed.show({"type": "serverless_preview", "data": {"step": step}})
        if step % 5 == 0:
            feed.publish(f'{{"type": "progress", "data": {{"value": {step}}}}}')
    feed.finish(Result({"type": "serverless_api", "data": {}}))
    seen = [event async for event in feed.follow(previews=True) if event is not None]
    previews = [json.loads(e.data)["data"]["step"] for e in seen if e.preview]
    assert previews == [20], "one frame: the newest, in its place (after the event shown before it)"
    assert seen[-1].terminal and seen[-3].preview and seen[-3].seq == seen[-4].seq == 4
    without = [event async for event in feed.follow() if event is not None]
    assert not any(e.preview for e in without) and len(without) == len(seen) - 1


async def test_a_live_reader_gets_each_preview_in_order_with_the_events() -> None:
    feed = Feed()
    got: list[str] = []

    async def read() -> None:
        async for event in feed.follow(previews=True):
            if event is not None:
                got.append("preview" if event.preview else event.text)

    reader = asyncio.create_task(read())
    for step in range(3):
        feed.publish(f"m{step}")
        await asyncio.sleep(0.01)
        feed.show({"step": step})
        await asyncio.sleep(0.01)
    feed.finish(Result({}))
    await reader
    assert got[:6] == ["m0", "preview", "m1", "preview", "m2", "preview"]
    assert feed.published_bytes == 6, "previews are not published: no budget, no log"
