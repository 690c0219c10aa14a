"""The status folder misbehaving, for real on temp folders: names squatted by non-files, a folder
that stops answering, one that cannot be written, and owners that vanish after claiming."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from serverless.errors import InvalidParams, Unavailable
from serverless.jobs.feed import Feed, Result
from serverless.status import files
from serverless.status.log import Attempt, StatusLog

# -- squatting ---------------------------------------------------------------------------------


def squat(folder: Path, name: str, kind: str) -> None:
    path = folder / name
    if kind == "directory":
        path.mkdir()  # what a workflow's filename_prefix `serverless_api/<id>/x` leaves
    elif kind == "symlink":
        (folder.parent / "elsewhere").write_text('{"type": "serverless_api"}\n')
        path.symlink_to(folder.parent / "elsewhere")
    else:
        os.mkfifo(path)


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
async def test_a_squatted_task_name_reads_as_invalid_params_without_blocking(tmp_path, kind):
    folder = tmp_path / "status"
    folder.mkdir()
    squat(folder, "taken", kind)
    status = StatusLog(folder, stale_after=60, io_timeout=5)
    with pytest.raises(InvalidParams, match="not a file") as caught:
        await status.read("taken")  # a fifo opened plainly would block this read for ever
    assert caught.value.status_code == 400 and caught.value.raw["task_id"] == "taken"
    assert json.loads(await status.read("other")) == [], "other tasks are unaffected"


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
async def test_a_squatted_task_name_is_refused_when_a_job_begins(tmp_path, kind):
    folder = tmp_path / "status"
    folder.mkdir()
    squat(folder, "taken", kind)
    status = StatusLog(folder, stale_after=60, io_timeout=5)
    with pytest.raises(InvalidParams, match="not a file"):
        await status.begin("taken")
    assert sorted(os.listdir(folder)) == ["taken"], "no attempt file is left behind"


async def test_a_squatted_attempt_file_is_skipped_by_the_next_claim(tmp_path):
    status = StatusLog(tmp_path, stale_after=60)
    (tmp_path / "t~attempt-1").mkdir()
    attempt = await status.begin("t")
    assert attempt.number == 2
    with pytest.raises(InvalidParams):
        await status.read("t", attempt=1)


# -- a folder that stops answering -------------------------------------------------------------


class HangingStatusLog(StatusLog):
    """A status folder whose reads block until `release` is set, as a dead NAS mount does."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.release = threading.Event()

    def _read(self, *args):  # type: ignore[no-untyped-def]
        self.release.wait()
        return super()._read(*args)


async def test_a_hung_folder_times_out_reads_and_leaves_the_default_executor_free(tmp_path):
    status = HangingStatusLog(tmp_path, stale_after=60, io_timeout=0.5, threads=2)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        results = await asyncio.gather(*(status.read(f"t{i}") for i in range(6)), return_exceptions=True)
        assert loop.time() - started < 5
        assert all(isinstance(r, Unavailable) for r in results), results
        assert "did not answer within 0.5s" in str(results[0])
        assert status.health()["busy"] == 2, "both status threads are stuck, and only they are"
        # Input decoding and everything else on asyncio's default executor still runs.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 2) == "free"
        assert "did not answer" in status.health()["last_error"]
        status.release.set()
        assert json.loads(await status.read("t0")) == [], "answers again once the disk does"
    finally:
        status.release.set()
        await status.aclose()


async def test_a_recorder_whose_append_hangs_still_ends_and_its_lines_stay_in_order(tmp_path):
    release = threading.Event()

    class HungFirstAppend(StatusLog):
        """The first append sticks inside the disk (holding the attempt's lock) until released."""

        hung = False

        async def _write(self, attempt: Attempt, lines: list[bytes], lock: threading.Lock) -> None:
            if self.hung:
                return await super()._write(attempt, lines, lock)
            self.hung = True

            def stuck() -> None:
                with lock:
                    release.wait()
                    files.write_lines(attempt.path, lines)

            await self._run(stuck)

    status = HungFirstAppend(tmp_path, stale_after=60, io_timeout=0.3)
    attempt = await status.begin("hung")
    feed = Feed()
    recorder = asyncio.create_task(status.record(attempt, feed))
    feed.publish(json.dumps({"type": "progress"}))
    feed.finish(Result({"type": "serverless_api"}))
    await asyncio.wait_for(recorder, 5)  # gave up on the hung disk rather than hang with it
    assert "did not answer" in status.health()["last_error"]
    release.set()
    await asyncio.to_thread(status._pool.shutdown, True)  # the disk answers: queued appends run
    lines = [json.loads(line) for line in attempt.path.read_bytes().splitlines()]
    assert lines == [{"type": "progress"}, {"type": "serverless_api"}, {"type": "serverless_api"}]


# -- a folder that cannot be written -----------------------------------------------------------
# Tests run as root, for whom chmod 0o555 stops nothing; a folder path running through a regular
# file fails for root too (ENOTDIR), as does a STATUS_DIR that is itself a regular file.


@pytest.mark.parametrize("layout", ["parent is a file", "folder is a file"])
async def test_an_unwritable_folder_is_reported_by_the_probe(tmp_path, layout, caplog):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    folder = blocker / "status" if layout == "parent is a file" else blocker
    status = StatusLog(folder, stale_after=60)
    with caplog.at_level(logging.ERROR, logger="serverless.status.log"):
        assert await status.check_at_startup() is False
    assert f"STATUS_DIR {folder}" in caplog.text
    health = status.health()
    assert health["writable"] is False
    expected = "NotADirectoryError" if layout == "parent is a file" else "FileExistsError"
    assert expected in health["not_writable_because"]
    with pytest.raises(Unavailable):
        await status.begin("t")


async def test_a_writable_folder_probes_true_and_leaves_nothing(tmp_path):
    status = StatusLog(tmp_path / "status", stale_after=60)
    assert status.health()["writable"] is None
    assert await status.check_at_startup() is True
    assert status.health()["writable"] is True
    assert os.listdir(tmp_path / "status") == []


async def test_the_probe_answer_is_kept_for_a_few_seconds(tmp_path):
    folder = tmp_path / "status"
    status = StatusLog(folder, stale_after=60)
    assert await status.writable() is True
    folder.rmdir()
    folder.write_text("now a file")
    assert await status.writable() is True, "cached"
    status._probed = (time.monotonic() - 60, True, None)  # the cache has expired
    assert await status.writable() is False


# -- accepted, then silence --------------------------------------------------------------------


async def test_a_claimed_attempt_is_known_at_once_and_reads_lost_once_its_owner_is_silent(tmp_path):
    status = StatusLog(tmp_path, stale_after=1)
    attempt = await status.begin("quiet")
    assert attempt.path.exists() and attempt.path.read_bytes() == b""
    assert json.loads(await status.read("quiet")) == [], "claimed, and its owner is alive"
    old = time.time() - 5
    os.utime(attempt.path, (old, old))
    items = json.loads(await status.read("quiet"))
    assert len(items) == 1 and items[0]["error_code"] == "UNAVAILABLE"
    assert "instance lost" in items[0]["error_message"]


async def test_an_owner_killed_between_claim_and_publish_still_reads_lost(tmp_path):
    status = StatusLog(tmp_path, stale_after=1)
    attempt = await status.begin("half")
    os.unlink(tmp_path / "half")  # as if the owner died before making it the current log
    old = time.time() - 5
    os.utime(attempt.path, (old, old))
    items = json.loads(await status.read("half"))
    assert items[-1]["error_code"] == "UNAVAILABLE"


async def test_a_queued_attempt_whose_owner_lives_is_not_reported_lost(tmp_path):
    status = StatusLog(tmp_path, stale_after=0.4)
    attempt = await status.begin("alive")
    feed = Feed()
    recorder = asyncio.create_task(status.record(attempt, feed))
    feed.publish(json.dumps({"type": "serverless_progress", "data": {"state": "queued", "attempt": 1}}))
    deadline = time.monotonic() + 1.5  # several stale periods, kept fresh by the heartbeat
    while time.monotonic() < deadline:
        items = json.loads(await status.read("alive"))
        assert all(item.get("error_code") != "UNAVAILABLE" for item in items)
        await asyncio.sleep(0.1)
    feed.finish(Result({"type": "serverless_api"}))
    await recorder
    assert json.loads(await status.read("alive"))[-1] == {"type": "serverless_api"}
