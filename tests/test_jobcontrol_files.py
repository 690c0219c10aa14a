"""Job control's pure parts and its files beside the status logs: the task summary built from a
log, cancel requests and idempotency claims, and their pruning with the logs."""

from __future__ import annotations

import os
import time

from serverless.status import files, sidecars
from serverless.status.summary import summarise


def progress(state: str, at: float, percent: float = 0.0, position: int | None = None) -> dict:
    return {
        "type": "serverless_progress",
        "data": {
            "task_id": "t",
            "state": state,
            "percent": percent,
            "queue_position": position,
            "queue_size": 2,
            "at": at,
        },
    }


def test_a_summary_reads_state_times_and_result_from_the_log():
    result = {"type": "serverless_api", "data": {"task_id": "t"}}
    log = [
        progress("queued", 1.0, position=1),
        {"type": "status"},
        progress("running", 2.0, 40, 0),
        progress("succeeded", 3.0, 100),
        result,
    ]
    assert summarise("t", log) == {
        "task_id": "t",
        "state": "succeeded",
        "percent": 100.0,
        "queue_position": None,
        "queue_size": 2,
        "created_at": 1.0,
        "started_at": 2.0,
        "ended_at": 3.0,
        "result": result,
    }
    running = summarise("t", log[:3])
    assert running["state"] == "running" and running["percent"] == 40 and running["ended_at"] is None


def test_a_lost_owner_reads_as_failed_and_a_cancel_as_cancelled():
    lost = {"type": "error", "error_code": "UNAVAILABLE", "error_message": "instance lost", "raw": None}
    assert summarise("t", [progress("running", 2.0, 40, 0), lost])["state"] == "failed"
    cancelled = {"type": "error", "error_code": "EXECUTION_INTERRUPTED", "error_message": "cancelled by request"}
    answer = summarise("t", [progress("queued", 1.0), progress("cancelled", 2.0), cancelled])
    assert answer["state"] == "cancelled" and answer["error"] == cancelled and answer["started_at"] is None
    assert summarise("t", [])["state"] == "queued"  # claimed, nothing written yet


def test_a_cancel_request_names_the_newest_attempt_and_goes_with_the_task(tmp_path):
    assert sidecars.request_cancel(tmp_path, "t") is None
    files.claim(tmp_path, "t")
    files.claim(tmp_path, "t")
    assert sidecars.request_cancel(tmp_path, "t") == 2
    assert sidecars.cancels_asked(tmp_path, [("t", 1), ("t", 2)]) == [("t", 2)]
    old = time.time() - 10 * 86400
    for name in os.listdir(tmp_path):
        os.utime(tmp_path / name, (old, old))
    assert sidecars.prune(tmp_path, 86400) == 1
    assert os.listdir(tmp_path) == []


def test_a_key_is_claimed_once_and_pruned_only_once_its_task_is_gone(tmp_path):
    record = {"task_id": "t", "digest": "d"}
    assert sidecars.claim_key(tmp_path, "k", record) is None
    assert sidecars.claim_key(tmp_path, "k", {"task_id": "u", "digest": "e"}) == record
    files.claim(tmp_path, "t")
    old = time.time() - 10 * 86400
    os.utime(sidecars.key_path(tmp_path, "k"), (old, old))
    sidecars.prune(tmp_path, 86400)  # the task is recent: its key stays
    assert sidecars.read_key(tmp_path, "k") == record
    os.utime(files.attempt_path(tmp_path, "t", 1), (old, old))
    assert sidecars.prune(tmp_path, 86400) == 1
    assert sidecars.read_key(tmp_path, "k") == {}
    sidecars.release_key(tmp_path, "k", "t")  # nothing left to release: no error
