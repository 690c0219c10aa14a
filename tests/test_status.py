"""Async invocation and the status log on a shared folder (contract section 3)."""

from __future__ import annotations

import base64
import ctypes
import json
import os
import threading
import time
import uuid
from pathlib import Path

import requests

from tests.helpers import empty_image, failing_workflow, post_run, running_prompt, txt2img, wait_until

STATUS = "/api/serverless/status"


def poll_until_done(base_url: str, task_id: str, timeout: float = 60) -> list:
    """What the FC documentation's async client does: poll until the last element is final."""

    def done() -> list | None:
        items = requests.get(base_url + STATUS, params={"task_id": task_id}, timeout=10).json()
        return items if items and items[-1]["type"] in ("serverless_api", "error") else None

    return wait_until(done, timeout=timeout, interval=0.1)


def test_fc_doc_async_client_posts_then_polls_to_the_result(app):
    task_id = f"async-{uuid.uuid4().hex}"
    response = post_run(app.url, txt2img(seed=-1), headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Trace-Id": task_id})
    assert response.status_code == 202
    assert response.json() == {"task_id": task_id}
    items = poll_until_done(app.url, task_id)
    final = items[-1]
    assert final["type"] == "serverless_api"
    assert final["data"]["task_id"] == task_id
    assert len(final["data"]["results"]) == 1
    types = [item["type"] for item in items]
    assert "execution_start" in types and "progress" in types and "executed" in types
    assert types.index("execution_start") < types.index("executed") < len(types) - 1


def test_on_fc_an_async_invocation_is_held_until_the_job_ends(emulator, start_app, tmp_path):
    server = start_app(emulator.url, FC_FUNCTION_NAME="comfyui-api")
    task_id = f"held-{uuid.uuid4().hex}"
    response = post_run(
        server.url, empty_image(prefix="held"), headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": task_id}
    )
    assert response.status_code == 200
    assert response.json()["data"]["task_id"] == task_id
    items = requests.get(server.url + STATUS, params={"task_id": task_id}, timeout=10).json()
    assert items[-1] == response.json(), "the log must end with the same result, already written"


def test_sync_runs_with_a_request_id_are_logged_too(app):
    task_id = f"req-{uuid.uuid4().hex}"
    response = post_run(app.url, empty_image(prefix="logged"), headers={"x-fc-request-id": task_id})
    assert response.status_code == 200
    items = requests.get(app.url + STATUS, params={"task_id": task_id}, timeout=10).json()
    assert items[-1] == response.json()


def test_after_returns_only_the_rest(app):
    task_id = f"after-{uuid.uuid4().hex}"
    post_run(app.url, empty_image(prefix="after"), headers={"x-fc-trace-id": task_id})
    everything = requests.get(app.url + STATUS, params={"task_id": task_id}, timeout=10).json()
    rest = requests.get(app.url + STATUS, params={"task_id": task_id, "after": "3"}, timeout=10).json()
    assert rest == everything[3:]
    beyond = requests.get(app.url + STATUS, params={"task_id": task_id, "after": "9999"}, timeout=10)
    assert beyond.json() == []


def test_unknown_task_is_an_empty_list_and_bad_queries_are_400(app):
    assert requests.get(app.url + STATUS, params={"task_id": "never-seen"}, timeout=10).json() == []
    for params in (
        {},
        {"task_id": ""},
        {"task_id": "ok", "after": "-1"},
        {"task_id": "ok", "after": "x"},
        {"task_id": "ok", "after": "²"},
        {"task_id": "ok", "attempt": "0"},
    ):
        response = requests.get(app.url + STATUS, params=params, timeout=10)
        assert response.status_code == 400, params
        assert response.json()["error_code"] == "INVALID_PARAMS"


def test_two_instances_share_the_folder_post_to_one_poll_the_other(emulator, start_app, tmp_path):
    shared = tmp_path / "nas" / "output" / "serverless_api"
    first = start_app(emulator.url, status_dir=shared, FC_INSTANCE_ID="inst-a")
    second = start_app(emulator.url, status_dir=shared, FC_INSTANCE_ID="inst-b")
    task_id = f"shared-{uuid.uuid4().hex}"
    response = post_run(first.url, txt2img(seed=3), headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Trace-Id": task_id})
    assert response.status_code == 202
    items = poll_until_done(second.url, task_id)
    assert items[-1]["type"] == "serverless_api"
    assert items[-1]["data"]["results"][0]["output"]["raw"]["filename"].startswith("ComfyUI_inst-a_")


def test_a_second_delivery_starts_a_new_log_and_the_old_attempt_stays_readable(app, emulator):
    task_id = f"retry-{uuid.uuid4().hex}"
    headers = {"x-fc-async-task-id": task_id}
    failed = post_run(app.url, failing_workflow(emulator.root), headers=headers)
    assert failed.status_code == 500
    first = requests.get(app.url + STATUS, params={"task_id": task_id}, timeout=10).json()
    assert first[-1]["error_code"] == "EXECUTION_FAILED"
    ok = post_run(app.url, empty_image(prefix="retry"), headers=headers)
    assert ok.status_code == 200
    current = requests.get(app.url + STATUS, params={"task_id": task_id}, timeout=10).json()
    assert current[-1] == ok.json()
    assert all(item.get("error_code") != "EXECUTION_FAILED" for item in current)
    old = requests.get(app.url + STATUS, params={"task_id": task_id, "attempt": "1"}, timeout=10).json()
    assert old == first


def test_sigkill_mid_job_leaves_parseable_lines_and_is_reported_lost(
    own_emulator, start_app, start_app_process, tmp_path
):
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.05}, timeout=5)
    shared = tmp_path / "nas"
    doomed = start_app_process(own_emulator.url, status_dir=shared, STATUS_STALE_AFTER="1")
    task_id = f"killed-{uuid.uuid4().hex}"
    post_run(
        doomed.url, txt2img(seed=9, steps=200), headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Trace-Id": task_id}
    )
    log_file = shared / task_id
    wait_until(lambda: log_file.exists() and b'"progress"' in log_file.read_bytes())
    doomed.kill()
    lines = log_file.read_bytes().split(b"\n")
    assert lines[-1] == b"", "an fsync'd append ends with a newline"
    assert all(json.loads(line) for line in lines[:-1])
    witness = start_app(own_emulator.url, status_dir=shared, STATUS_STALE_AFTER="1")

    def ended() -> list | None:
        items = requests.get(witness.url + STATUS, params={"task_id": task_id}, timeout=10).json()
        return items if items and items[-1]["type"] in ("error", "serverless_api") else None

    # The log ends once it has been still for STATUS_STALE_AFTER (1 s): waited for, generously.
    items = wait_until(ended, timeout=10)
    assert items[-1]["type"] == "error"
    assert items[-1]["error_code"] == "UNAVAILABLE"
    assert "instance lost" in items[-1]["error_message"]


def test_a_live_silent_job_is_not_reported_lost(own_emulator, start_app, tmp_path):
    # A job queued behind a long one sends nothing for a while; its owner keeps the log fresh.
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.05}, timeout=5)
    server = start_app(own_emulator.url, STATUS_STALE_AFTER="1")
    blocker = threading.Thread(target=lambda: post_run(server.url, txt2img(seed=1, steps=60)))
    blocker.start()
    wait_until(lambda: running_prompt(own_emulator.url))
    task_id = f"quiet-{uuid.uuid4().hex}"
    post_run(
        server.url, empty_image(prefix="quiet"), headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Trace-Id": task_id}
    )
    time.sleep(2)
    items = requests.get(server.url + STATUS, params={"task_id": task_id}, timeout=10).json()
    assert all(item.get("error_code") != "UNAVAILABLE" for item in items)
    assert poll_until_done(server.url, task_id)[-1]["type"] == "serverless_api"
    blocker.join(60)


def test_task_ids_never_reach_outside_the_folder(app, tmp_path):
    status_dir = Path(app.log).parent / "status"
    before = set(os.listdir(status_dir.parent))
    for task_id in ("../x", "/etc/passwd", "..", "a/../../b", "x" * 300, "..%2f..%2fetc"):
        response = requests.get(app.url + STATUS, params={"task_id": task_id}, timeout=10)
        assert response.status_code == 400, task_id
        run = post_run(app.url, empty_image(), headers={"x-fc-trace-id": task_id})
        assert run.status_code == 400, task_id
    raw = requests.get(app.url + STATUS + "?task_id=%2e%2e", timeout=10)
    assert raw.status_code == 400
    assert set(os.listdir(status_dir.parent)) == before


def test_old_logs_are_removed_by_retention(emulator, start_app, tmp_path):
    status_dir = tmp_path / "aged"
    status_dir.mkdir()
    old, fresh = status_dir / "old-task", status_dir / "fresh-task"
    old.write_text('{"type": "serverless_api"}\n')
    fresh.write_text('{"type": "serverless_api"}\n')
    eight_days_ago = time.time() - 8 * 86400
    os.utime(old, (eight_days_ago, eight_days_ago))
    start_app(emulator.url, status_dir=status_dir, STATUS_RETENTION_DAYS="7")
    wait_until(lambda: not old.exists())
    assert fresh.exists()


def fc_doc_poller(url: str, task_id: str) -> list[dict]:
    """The FC documentation's async client: poll until the last element is a terminal payload."""
    while True:
        items = requests.get(url + STATUS, params={"task_id": task_id}, timeout=10).json()
        if items and items[-1]["type"] in ("serverless_api", "error"):
            return items
        time.sleep(0.05)


def test_on_fc_a_retried_task_reads_as_its_new_attempt_and_only_transient_failures_ask_for_a_retry(
    start_app, own_emulator
):
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.05}, timeout=5)
    server = start_app(own_emulator.url, FC_FUNCTION_NAME="comfyui", JOB_TIMEOUT="2")
    task_id = f"fc-retry-{uuid.uuid4().hex}"
    held = {"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": task_id}

    # A failure a retry cannot fix answers 2xx: FC keeps the result in the log and does not retry.
    bad = post_run(server.url, failing_workflow(own_emulator.root), headers=held)
    assert bad.status_code == 200 and bad.json()["error_code"] == "EXECUTION_FAILED"
    # A transient one (the deadline) answers 5xx, so FC delivers the task again.
    slow = post_run(server.url, txt2img(seed=1, steps=200), headers=held)
    assert slow.status_code == 504 and slow.json()["error_code"] == "TIMEOUT"

    result: list[requests.Response] = []
    delivery = threading.Thread(
        target=lambda: result.append(post_run(server.url, txt2img(seed=2, steps=10), headers=held))
    )
    delivery.start()

    # From the new attempt's first line on, the poller reads only the new attempt.
    def new_attempt_began() -> bool:  # its file is claimed (empty), then its events come in
        items = requests.get(server.url + STATUS, params={"task_id": task_id}, timeout=10).json()
        return not items or items[-1].get("error_code") != "TIMEOUT"  # no longer the last attempt's end

    wait_until(new_attempt_began)
    items = fc_doc_poller(server.url, task_id)
    delivery.join()
    assert items[-1]["type"] == "serverless_api" and result[0].status_code == 200
    assert items[-1] == result[0].json()
    assert not [item for item in items if item["type"] == "error"]
    attempts = [
        requests.get(server.url + STATUS, params={"task_id": task_id, "attempt": n}, timeout=10).json()
        for n in ("1", "2", "3")
    ]
    assert [a[-1].get("error_code", a[-1]["type"]) for a in attempts] == [
        "EXECUTION_FAILED",
        "TIMEOUT",
        "serverless_api",
    ]


# mount(2) and umount2(2) called as `mount` and `umount -l` call them, without a process each.
LIBC = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_REMOUNT, MNT_DETACH = 1, 32, 2


def mount(source: str, target: Path, kind: str, flags: int, options: str = "") -> None:
    if LIBC.mount(source.encode(), os.fsencode(target), kind.encode(), flags, options.encode() or None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), str(target))


def test_a_read_only_status_folder_is_reported_and_refuses_async_jobs_while_sync_ones_run(
    start_app, emulator, tmp_path
):
    folder = tmp_path / "ro-nas"
    folder.mkdir()
    mount("tmpfs", folder, "tmpfs", 0, "size=4m")
    try:
        (folder / "status").mkdir()
        mount("tmpfs", folder, "tmpfs", MS_REMOUNT | MS_RDONLY)  # read-only, even for root
        server = start_app(emulator.url, status_dir=folder / "status")
        assert "cannot be written" in server.log_text() and str(folder / "status") in server.log_text()

        health = requests.get(server.url + "/api/serverless/health", timeout=10)
        assert health.status_code == 503 and "status folder cannot be written" in health.json()["reason"]
        asynchronous = post_run(
            server.url, empty_image(prefix="ro"), headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Trace-Id": "ro-async"}
        )
        assert asynchronous.status_code == 503 and asynchronous.json()["error_code"] == "UNAVAILABLE"
        # The operator is told too, with the reason the caller got (a 503 once left no line at all).
        assert (
            "POST /api/serverless/run answered 503 UNAVAILABLE: the status folder cannot be written"
            in server.log_text()
        )
        synchronous = post_run(server.url, empty_image(prefix="ro"), headers={"X-Fc-Trace-Id": "ro-sync"})
        assert synchronous.status_code == 200 and synchronous.json()["type"] == "serverless_api"
        assert not list((folder / "status").iterdir())
    finally:
        LIBC.umount2(os.fsencode(folder), MNT_DETACH)


def test_a_status_folder_that_stops_answering_hangs_nothing_else(start_app, emulator, tmp_path, monkeypatch):
    monkeypatch.setattr("serverless.status.log.IO_TIMEOUT", 1.0)
    from serverless.status import files

    folder = tmp_path / "nas"
    server = start_app(emulator.url, status_dir=folder)
    assert post_run(server.url, empty_image(prefix="hang-before"), headers={"x-fc-trace-id": "hang-1"}).ok
    # From here the shared disk stops answering: every file operation on it blocks (as a NAS
    # whose server went away does) until the test lets it go.
    answering = threading.Event()
    for name in ("read", "first_line", "claim", "publish", "append", "probe", "touch", "numbers", "newest"):
        real = getattr(files, name)

        def hanging(*args, _real=real, **kwargs):
            if args and str(args[0]).startswith(str(folder)):
                answering.wait(60)
            return _real(*args, **kwargs)

        monkeypatch.setattr(files, name, hanging)
    try:

        def health_reports_the_folder() -> bool:
            started = time.perf_counter()
            answer = requests.get(server.url + "/api/serverless/health", timeout=10)
            assert time.perf_counter() - started < 0.5, "health waited for the disk (1 s)"
            return answer.status_code == 503 and "did not answer within 1s" in answer.json()["reason"]

        wait_until(health_reports_the_folder, timeout=30, interval=0.2)
        started = time.monotonic()
        status = requests.get(server.url + STATUS, params={"task_id": "hang-1"}, timeout=10)
        assert status.status_code == 503 and "did not answer within 1s" in status.json()["error_message"]
        assert time.monotonic() - started < 5
        # A job with an input (decoded on asyncio's own threads) still runs and answers its caller.
        picture = base64.b64encode(png_bytes()).decode()
        job = {
            "1": {"class_type": "LoadImage", "inputs": {"image": picture}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "hang-during"}},
        }
        assert post_run(server.url, job, headers={"x-fc-trace-id": "hang-2"}).status_code == 200
    finally:
        answering.set()


def png_bytes() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()
