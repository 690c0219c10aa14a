"""The status log's file discipline, on a temp folder: torn lines, attempts, liveness."""

from __future__ import annotations

import json
import os
import time

import pytest

from serverless.errors import InvalidParams
from serverless.jobs.feed import Feed, Result
from serverless.status.log import StatusLog


async def read(status: StatusLog, task_id: str) -> list:
    return json.loads(await status.read(task_id))


async def test_record_appends_every_event_and_the_terminal_payload(tmp_path):
    status = StatusLog(tmp_path, stale_after=60)
    feed = Feed()
    recorder = status.record(await status.begin("t1"), feed)
    for i in range(50):
        feed.publish(json.dumps({"type": "progress", "data": {"value": i}}))
    feed.finish(Result({"type": "serverless_api", "data": {}}))
    await recorder
    items = await read(status, "t1")
    assert len(items) == 51 and items[-1]["type"] == "serverless_api"
    assert [i["data"]["value"] for i in items[:-1]] == list(range(50))


async def test_a_torn_line_is_skipped_and_closed_off_by_the_next_append(tmp_path):
    # An append cut short (a full disk, a writer stuck and given up on) leaves a torn line in the
    # attempt's file; the attempt's next append closes it off.
    status = StatusLog(tmp_path, stale_after=60)
    attempt = await status.begin("t2")
    attempt.path.write_bytes(b'{"type": "status"}\n{"type": "progr')
    assert await read(status, "t2") == [{"type": "status"}]
    feed = Feed(first_seq=2)
    recorder = status.record(attempt, feed)
    feed.finish(Result({"type": "error", "error_code": "TIMEOUT"}))
    await recorder
    items = await read(status, "t2")
    assert items == [{"type": "status"}, {"type": "error", "error_code": "TIMEOUT"}]


async def test_silent_unfinished_log_reads_as_instance_lost_but_is_not_changed(tmp_path):
    status = StatusLog(tmp_path, stale_after=1)
    path = tmp_path / "t3"
    path.write_bytes(b'{"type": "execution_start"}\n')
    old = time.time() - 5
    os.utime(path, (old, old))
    items = await read(status, "t3")
    assert items[-1]["error_code"] == "UNAVAILABLE"
    assert path.read_bytes() == b'{"type": "execution_start"}\n'


async def test_finished_logs_are_never_reported_lost(tmp_path):
    status = StatusLog(tmp_path, stale_after=1)
    path = tmp_path / "t4"
    path.write_bytes(b'{"type": "serverless_api"}\n')
    old = time.time() - 5
    os.utime(path, (old, old))
    assert await read(status, "t4") == [{"type": "serverless_api"}]


@pytest.mark.parametrize("task_id", ["../escape", "..", "/abs", "a/b", ""])
async def test_paths_outside_the_folder_are_refused(tmp_path, task_id):
    status = StatusLog(tmp_path / "inner", stale_after=1)
    with pytest.raises(InvalidParams):
        await status.read(task_id)


async def test_a_symlink_planted_in_the_folder_is_not_followed_for_writing(tmp_path):
    target = tmp_path / "outside"
    target.write_text("")
    folder = tmp_path / "status"
    folder.mkdir()
    (folder / "evil").symlink_to(target)
    status = StatusLog(folder, stale_after=60)
    with pytest.raises(InvalidParams):
        await status.begin("evil")
    assert target.read_text() == ""
