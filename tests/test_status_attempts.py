"""Attempts of one task kept apart on a temp folder: a retry starts a new log that `status` reads,
concurrent deliveries never share a file, and the name always points at the newest attempt."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time

import pytest

from serverless.jobs.feed import Feed, Result
from serverless.status import files
from serverless.status.log import StatusLog


async def read(status: StatusLog, task_id: str, after: int = 0, attempt: int | None = None) -> list:
    return json.loads(await status.read(task_id, after, attempt))


async def run_attempt(status: StatusLog, task_id: str, *payloads: dict) -> int:
    """A whole delivery: begin, a queued event, `payloads` (the last is the terminal)."""
    attempt = await status.begin(task_id)
    feed = Feed(first_seq=1)
    recorder = asyncio.create_task(status.record(attempt, feed))
    feed.publish(json.dumps({"type": "serverless_progress", "data": {"state": "queued", "attempt": attempt.number}}))
    for payload in payloads[:-1]:
        feed.publish(json.dumps(payload))
    feed.finish(Result(payloads[-1]))
    await recorder
    return attempt.number


async def test_a_second_delivery_starts_a_new_log_and_the_old_one_stays_readable(tmp_path):
    status = StatusLog(tmp_path, stale_after=60)
    first = await run_attempt(status, "retry", {"type": "error", "error_code": "EXECUTION_FAILED"})
    second = await run_attempt(status, "retry", {"type": "progress"}, {"type": "serverless_api", "data": {}})
    assert (first, second) == (1, 2)
    current = await read(status, "retry")
    assert [item["type"] for item in current] == ["serverless_progress", "progress", "serverless_api"]
    assert current[0]["data"]["attempt"] == 2
    old = await read(status, "retry", attempt=1)
    assert [item["type"] for item in old] == ["serverless_progress", "error"]
    assert await status.attempts("retry") == [1, 2]
    # `after` (and so SSE ids) index the current attempt only.
    assert await read(status, "retry", after=2) == current[2:]


async def test_the_current_log_is_a_hard_link_to_the_newest_attempt(tmp_path):
    status = StatusLog(tmp_path, stale_after=60)
    await run_attempt(status, "t", {"type": "serverless_api"})
    attempt = await status.begin("t")
    assert (tmp_path / "t").samefile(attempt.path)
    assert await read(status, "t") == [], "a new attempt reads empty until its first event"
    assert status.health()["hard_links"] is True


async def test_an_older_attempt_still_running_writes_only_into_its_own_file(tmp_path):
    status = StatusLog(tmp_path, stale_after=60)
    old = await status.begin("busy")
    old_feed = Feed(first_seq=1)
    old_recorder = asyncio.create_task(status.record(old, old_feed))
    new = await status.begin("busy")
    new_feed = Feed(first_seq=1)
    new_recorder = asyncio.create_task(status.record(new, new_feed))
    for i in range(20):  # both run at once, with the same sequence numbers
        old_feed.publish(json.dumps({"type": "progress", "data": {"from": "old", "value": i}}))
        new_feed.publish(json.dumps({"type": "progress", "data": {"from": "new", "value": i}}))
        await asyncio.sleep(0)
    new_feed.finish(Result({"type": "serverless_api", "data": {"from": "new"}}))
    await new_recorder
    old_feed.finish(Result({"type": "error", "data": {"from": "old"}}))
    await old_recorder
    current = await read(status, "busy")
    assert {item["data"]["from"] for item in current} == {"new"}
    assert current[-1]["type"] == "serverless_api", "the older attempt's later end is not the current one's"
    older = await read(status, "busy", attempt=old.number)
    assert {item["data"]["from"] for item in older} == {"old"} and len(older) == 21


async def test_deliveries_racing_from_two_instances_claim_distinct_attempts(tmp_path):
    # Two StatusLogs are two instances on one shared folder; their threads race for real.
    instances = [StatusLog(tmp_path, stale_after=60), StatusLog(tmp_path, stale_after=60)]
    attempts = await asyncio.gather(*(instances[i % 2].begin("race") for i in range(12)))
    assert sorted(a.number for a in attempts) == list(range(1, 13))
    assert (tmp_path / "race").samefile(files.attempt_path(tmp_path, "race", 12))


def test_a_slow_older_publisher_cannot_point_the_name_back_at_its_attempt(tmp_path):
    # Attempt 1 claims, attempt 2 claims and publishes, then attempt 1's publish finally runs.
    first = files.claim(tmp_path, "late")
    second = files.claim(tmp_path, "late")
    files.publish(tmp_path, "late", second, links=True)
    files.publish(tmp_path, "late", first, links=True)
    assert os.path.samefile(tmp_path / "late", files.attempt_path(tmp_path, "late", second))
    assert sorted(os.listdir(tmp_path)) == ["late", "late~attempt-1", "late~attempt-2"], "no temp names left"


async def test_without_hard_links_the_name_is_a_copy_kept_up_to_date(tmp_path, monkeypatch):
    # An OSS FUSE mount answers link(2) with EPERM; a tmpfs cannot be made to, so link fails here.
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(files.os, "link", no_links)
    status = StatusLog(tmp_path, stale_after=60)
    await run_attempt(status, "copy", {"type": "error", "error_code": "TIMEOUT"})
    old = await status.begin("copy")  # attempt 2, still running below
    newer = await status.begin("copy")
    assert status.health()["hard_links"] is False
    assert await read(status, "copy") == []
    old_feed, new_feed = Feed(first_seq=1), Feed(first_seq=1)
    old_recorder = asyncio.create_task(status.record(old, old_feed))
    new_recorder = asyncio.create_task(status.record(newer, new_feed))
    new_feed.publish(json.dumps({"type": "progress", "data": {"from": "new"}}))
    old_feed.finish(Result({"type": "error", "data": {"from": "old"}}))
    await old_recorder
    new_feed.finish(Result({"type": "serverless_api", "data": {"from": "new"}}))
    await new_recorder
    assert await read(status, "copy") == [
        {"type": "progress", "data": {"from": "new"}},
        {"type": "serverless_api", "data": {"from": "new"}},
    ]
    assert await read(status, "copy", attempt=2) == [{"type": "error", "data": {"from": "old"}}]
    assert await status.attempts("copy") == [1, 2, 3]


async def test_a_log_written_before_attempts_is_kept_as_attempt_one(tmp_path):
    (tmp_path / "legacy").write_bytes(b'{"type": "status"}\n{"type": "error"}\n')
    status = StatusLog(tmp_path, stale_after=60)
    assert await status.attempts("legacy") == []
    assert await run_attempt(status, "legacy", {"type": "serverless_api"}) == 2
    assert await read(status, "legacy", attempt=1) == [{"type": "status"}, {"type": "error"}]
    assert (await read(status, "legacy"))[-1] == {"type": "serverless_api"}


async def test_unknown_tasks_and_attempts_read_as_empty(tmp_path):
    status = StatusLog(tmp_path / "missing", stale_after=60)
    assert await status.read("nothing") == b"[]"
    assert await status.read("nothing", attempt=3) == b"[]"
    assert await status.attempts("nothing") == []


async def test_retention_removes_all_of_a_task_files_together_and_only_them(tmp_path):
    status = StatusLog(tmp_path, stale_after=60)
    for task_id in ("old", "old.x", "fresh"):
        await run_attempt(status, task_id, {"type": "serverless_api"})
    await run_attempt(status, "old", {"type": "serverless_api"})
    (tmp_path / "old~cancel").write_text("")
    long_ago = time.time() - 8 * 86400
    for name in ("old", "old~attempt-1", "old~attempt-2", "old~cancel"):  # not `old.x`: another task
        os.utime(tmp_path / name, (long_ago, long_ago))
    assert files.remove_older_than(tmp_path, 7 * 86400) == 1
    assert sorted(os.listdir(tmp_path)) == ["fresh", "fresh~attempt-1", "old.x", "old.x~attempt-1"]


async def test_a_task_is_kept_while_any_of_its_files_is_fresh(tmp_path):
    status = StatusLog(tmp_path, stale_after=60)
    await run_attempt(status, "mixed", {"type": "serverless_api"})
    long_ago = time.time() - 8 * 86400
    os.utime(tmp_path / "mixed", (long_ago, long_ago))  # the hard link shares the attempt's time
    (tmp_path / "mixed~cancel").write_text("")
    assert files.remove_older_than(tmp_path, 7 * 86400) == 0
    assert (tmp_path / "mixed").exists()


@pytest.mark.parametrize("task_id", ["a~b", "x/../y"])
async def test_names_outside_the_task_id_alphabet_are_refused(tmp_path, task_id):
    from serverless.errors import InvalidParams

    status = StatusLog(tmp_path, stale_after=60)
    with pytest.raises(InvalidParams):
        await status.begin(task_id)


async def record_new(status: StatusLog, task_id: str, *payloads: dict) -> None:
    """A job nobody named: its log is claimed, written and published with its first append."""
    feed = Feed(first_seq=1)
    recorder = asyncio.create_task(status.record_new(task_id, feed))
    for payload in payloads[:-1]:
        feed.publish(json.dumps(payload))
    feed.finish(Result(payloads[-1]))
    await recorder


async def test_a_new_task_log_is_written_whole_then_named(tmp_path):
    folder = tmp_path / "not-yet"  # the folder itself is made on first use
    status = StatusLog(folder, stale_after=60)
    await record_new(status, "fresh", {"type": "progress"}, {"type": "serverless_api", "data": {}})
    assert (folder / "fresh").samefile(files.attempt_path(folder, "fresh", 1))
    assert [item["type"] for item in await read(status, "fresh")] == ["progress", "serverless_api"]
    assert sorted(p.name for p in folder.iterdir()) == ["fresh", "fresh~attempt-1"], "no temp names left"


async def test_a_new_task_log_beside_an_older_one_becomes_the_next_attempt(tmp_path):
    status = StatusLog(tmp_path, stale_after=60)
    await run_attempt(status, "again", {"type": "error", "error_code": "TIMEOUT"})
    await record_new(status, "again", {"type": "serverless_api", "data": {}})
    assert await status.attempts("again") == [1, 2]
    assert (tmp_path / "again").samefile(files.attempt_path(tmp_path, "again", 2))
    assert (await read(status, "again", attempt=1))[-1]["error_code"] == "TIMEOUT"


async def test_a_new_task_log_racing_another_instance_leaves_the_name_on_the_newest(tmp_path, monkeypatch):
    # Between our look at the name and our link, another instance claims attempt 2 and publishes it.
    status, other = StatusLog(tmp_path, stale_after=60), StatusLog(tmp_path, stale_after=60)
    real_link = os.link

    def link_after_another_claim(source, target, **kwargs):
        monkeypatch.setattr(files.os, "link", real_link)
        number = files.claim(tmp_path, "raced")
        files.publish(tmp_path, "raced", number, True)
        return real_link(source, target, **kwargs)

    monkeypatch.setattr(files.os, "link", link_after_another_claim)
    await record_new(status, "raced", {"type": "serverless_api", "data": {}})
    assert await other.attempts("raced") == [1, 2]
    assert (tmp_path / "raced").samefile(files.attempt_path(tmp_path, "raced", 2))
    assert await read(status, "raced", attempt=1) == [{"type": "serverless_api", "data": {}}]


async def test_a_new_task_log_without_hard_links_is_published_as_a_copy(tmp_path, monkeypatch):
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(files.os, "link", no_links)
    status = StatusLog(tmp_path, stale_after=60)
    await record_new(status, "copied", {"type": "progress"}, {"type": "serverless_api", "data": {}})
    assert status.health()["hard_links"] is False
    assert not (tmp_path / "copied").samefile(files.attempt_path(tmp_path, "copied", 1))
    assert [item["type"] for item in await read(status, "copied")] == ["progress", "serverless_api"]
