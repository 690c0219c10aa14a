"""A box's newest outputs of ComfyUI's API kept in memory for `/view` (`delivery.recent`): what is
kept, for how long, how much in all, and a `/view` that comes while its job still reads the file."""

from __future__ import annotations

import asyncio

from serverless.delivery import recent
from serverless.delivery.recent import RecentFiles


def item(name: str, subfolder: str = "sub", kind: str = "output") -> dict[str, str]:
    return {"filename": name, "subfolder": subfolder, "type": kind}


def test_a_kept_file_is_found_by_its_place_only():
    files = RecentFiles()
    files.put(item("a.png"), b"png", "image/png")
    assert files.get(item("a.png")) == (b"png", "image/png")
    assert files.get(item("a.png", subfolder="")) is None
    assert files.get(item("a.png", kind="temp")) is None
    assert files.get(item("b.png")) is None


def test_the_oldest_files_go_first_past_the_bytes_kept_in_all():
    files = RecentFiles(max_bytes=10)
    files.put(item("a"), b"aaaa", "x/a")
    files.put(item("b"), b"bbbb", "x/b")
    files.put(item("c"), b"cccc", "x/c")  # 12 bytes: the oldest leaves
    assert files.get(item("a")) is None
    assert files.get(item("b")) == (b"bbbb", "x/b") and files.get(item("c")) == (b"cccc", "x/c")
    assert files.size == 8
    files.put(item("b"), b"bb", "x/b")  # the same place again: replaced, counted once
    assert files.size == 6 and files.get(item("b")) == (b"bb", "x/b")


def test_a_file_over_the_limit_is_not_kept(monkeypatch):
    monkeypatch.setattr(recent, "UP_TO", 3)
    files = RecentFiles()
    files.put(item("big"), b"four", "x/y")
    assert files.get(item("big")) is None and files.size == 0


def test_a_file_is_kept_for_a_while_only(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(recent.time, "monotonic", lambda: now[0])
    files = RecentFiles(keep_seconds=60)
    files.put(item("a"), b"a", "x/a")
    now[0] += 59
    assert files.get(item("a")) == (b"a", "x/a")
    now[0] += 2
    assert files.get(item("a")) is None and files.size == 0


def test_a_view_during_the_jobs_read_waits_for_it_and_a_failed_read_lets_it_go_on():
    async def main() -> None:
        files = RecentFiles()
        reading = files.reading(item("a"))
        waiter = asyncio.create_task(files.wait_get(item("a")))
        await asyncio.sleep(0)
        assert not waiter.done()
        files.done_reading(item("a"), reading, (b"bytes", "image/png"))
        assert await waiter == (b"bytes", "image/png")

        failed = files.reading(item("b"))
        waiter = asyncio.create_task(files.wait_get(item("b")))
        await asyncio.sleep(0)
        files.done_reading(item("b"), failed, None)  # nothing to keep (too big, gone): `/view` reads the folder
        assert await waiter is None
        assert await files.wait_get(item("c")) is None  # nothing under way: at once

        cancelled = files.reading(item("d"))
        waiter = asyncio.create_task(files.wait_get(item("d")))
        await asyncio.sleep(0)
        waiter.cancel()  # its caller went away: the job's read goes on
        await asyncio.gather(waiter, return_exceptions=True)
        assert not cancelled.done()
        files.done_reading(item("d"), cancelled, (b"d", "x/d"))
        assert files.get(item("d")) == (b"d", "x/d")

    asyncio.run(main())
