"""The edges of the HTTP API: unknown routes and flags, lifecycle hooks only from the platform,
bodies that never finish or are cut off, and inputs ComfyUI would choke on."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from tests.helpers import RUN, empty_image, post_run, txt2img, wait_until


def test_unknown_routes_and_methods_answer_the_error_object(app):
    missing = requests.get(app.url + "/api/serverless/nope", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["type"] == "error" and missing.json()["error_code"] == "NOT_FOUND"
    assert "/api/serverless/nope" in missing.json()["error_message"]

    wrong = requests.get(app.url + RUN, timeout=10)
    assert wrong.status_code == 405
    assert wrong.json()["error_code"] == "INVALID_PARAMS" and "GET" in wrong.json()["error_message"]
    assert "POST" in wrong.headers.get("allow", "")


def test_a_misspelt_flag_is_ignored_but_named_in_a_warning(app):
    response = post_run(app.url, empty_image(prefix="edges-warn"), params={"outputBase64": "true", "streem": "1"})
    assert response.status_code == 200
    assert response.json()["data"]["results"][0]["output"]["base64"]["content"] is None  # ignored, as FC does
    warning = response.headers["warning"]
    assert warning.startswith("299 - ") and "2 unknown query parameter(s) ignored" in warning
    assert "outputBase64" not in warning, "no client text in a header"
    assert "output_base64" in warning  # the known ones, to fix the spelling
    wait_until(lambda: "unknown query parameter(s) ignored: outputBase64, streem" in app.log_text())


def test_known_flags_get_no_warning(app):
    response = post_run(app.url, empty_image(prefix="edges-nowarn"), params={"output_base64": "1"})
    assert response.status_code == 200 and "warning" not in response.headers


def test_on_fc_a_trigger_request_cannot_call_the_lifecycle_hooks(start_app, emulator):
    server = start_app(emulator.url, FC_FUNCTION_NAME="comfyui", DRAIN_TIMEOUT="5")
    # An HTTP trigger forwards every path; FC marks such requests /http-invoke (and a caller's own
    # header does not survive FC), so both of these are ordinary callers.
    for headers in ({}, {"x-fc-control-path": "/http-invoke"}):
        refused = requests.get(server.url + "/pre-stop", headers=headers, timeout=10)
        assert refused.status_code == 401 and refused.json()["error_code"] == "UNAUTHORIZED"
        assert requests.post(server.url + "/initialize", headers=headers, timeout=10).status_code == 401
    assert requests.get(server.url + "/api/serverless/health", timeout=10).status_code == 200
    assert post_run(server.url, empty_image(prefix="edges-fc")).status_code == 200  # still in service

    ready = requests.post(server.url + "/initialize", headers={"x-fc-control-path": "/initialize"}, timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    stopped = requests.get(server.url + "/pre-stop", headers={"x-fc-control-path": "/pre-stop"}, timeout=30)
    assert stopped.status_code == 200 and stopped.json()["status"] == "drained"
    assert requests.get(server.url + "/api/serverless/health", timeout=10).status_code == 503


def test_with_a_lifecycle_token_only_its_holder_calls_the_hooks(start_app, emulator):
    server = start_app(emulator.url, LIFECYCLE_TOKEN="s3cret-hook-token")
    assert requests.post(server.url + "/initialize", timeout=10).status_code == 401  # loopback is not enough
    wrong = {"Authorization": "Bearer s3cret-hook-tokeN"}
    assert requests.post(server.url + "/initialize", headers=wrong, timeout=10).status_code == 401
    right = {"Authorization": "Bearer s3cret-hook-token"}
    assert requests.post(server.url + "/initialize", headers=right, timeout=30).status_code == 200
    assert "s3cret-hook-token" not in server.log_text()


def test_deep_extra_data_is_refused_before_comfyui_and_jobs_go_on(app, emulator):
    before = len(requests.get(emulator.url + "/history", timeout=10).json())
    deep: object = {}
    for _ in range(900):
        deep = {"a": deep}
    body = {"prompt": empty_image(prefix="edges-deep"), "extra_data": deep}
    refused = post_run(app.url, json.dumps(body))
    assert refused.status_code == 400 and refused.json()["error_code"] == "INVALID_PARAMS"
    assert "extra_data" in refused.json()["error_message"]
    assert len(requests.get(emulator.url + "/history", timeout=10).json()) == before
    assert post_run(app.url, empty_image(prefix="edges-after-deep")).status_code == 200


def _partial_body(url: str, declared: int, sent: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST {RUN} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    sock.sendall(head + sent)
    return sock


def test_a_body_that_stops_arriving_is_refused_after_the_body_timeout(start_app, emulator):
    server = start_app(emulator.url, INPUT_TIMEOUT="1")
    sock = _partial_body(server.url, 1000, b'{"1": ')
    started = time.monotonic()
    answer = sock.recv(65536).decode()
    sock.close()
    assert "400" in answer.split("\r\n")[0] and "did not arrive within 1s" in answer
    assert time.monotonic() - started < 10


def test_a_caller_hanging_up_mid_body_is_one_info_line_not_a_traceback(start_app, emulator):
    server = start_app(emulator.url)
    for _ in range(3):
        _partial_body(server.url, 1000, b'{"1": {"class_type"').close()
    wait_until(lambda: server.log_text().count("hung up before its body arrived") == 3)
    assert post_run(server.url, empty_image(prefix="edges-hangup")).status_code == 200
    log = server.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log and " ERROR " not in log


def test_a_job_whose_events_pass_the_byte_cap_still_ends_with_its_result(start_app, emulator, tmp_path, monkeypatch):
    monkeypatch.setattr("serverless.jobs.feed.MAX_JOB_BYTES", 4096)
    server = start_app(emulator.url, status_dir=tmp_path / "capped")
    headers = {"x-fc-trace-id": "edges-capped"}
    response = post_run(server.url, txt2img(steps=40), headers=headers)
    assert response.status_code == 200 and response.json()["type"] == "serverless_api"
    log = (tmp_path / "capped" / "edges-capped").read_bytes()
    lines = log.splitlines()
    assert json.loads(lines[-1])["type"] == "serverless_api"
    assert len(log) - len(lines[-1]) <= 4096 + len(lines)  # the events before the terminal, within the cap
    events = post_run(server.url, txt2img(steps=40), params={"stream": "1"}).text.count("data: ")
    assert events < 40  # the stream is capped the same way: progress of 40 steps alone would pass it
    wait_until(lambda: "passed 4096 bytes of events" in server.log_text())


def test_a_filename_prefix_cannot_squat_a_task_log(start_app, emulator):
    output = emulator.root / "output"
    server = start_app(emulator.url, status_dir=output / "serverless_api", COMFYUI_OUTPUT_DIR=str(output))
    for prefix in (
        "serverless_api/edges-squat/x",
        "./serverless_api//edges-squat/y",
        "a/../serverless_api/z/w",
        "../outside",
        "/abs/path",
    ):
        refused = post_run(server.url, empty_image(prefix=prefix))
        assert refused.status_code == 400 and refused.json()["error_code"] == "INVALID_PARAMS", prefix
        assert "filename_prefix" in refused.json()["error_message"]
    assert not (output / "serverless_api" / "edges-squat").exists()
    # A name that merely starts like the folder is an ordinary file name beside it.
    assert post_run(server.url, empty_image(prefix="serverless_api_like")).status_code == 200
    ok = post_run(server.url, empty_image(prefix="edges-squat"), headers={"x-fc-trace-id": "edges-squat"})
    assert ok.status_code == 200
    status = requests.get(server.url + "/api/serverless/status", params={"task_id": "edges-squat"}, timeout=10)
    assert status.json()[-1]["type"] == "serverless_api"


def _post_and_stop_reading(server, query: str) -> bytes:
    """POST a job whose answer (a noisy 2048x2048 picture's base64) is far more than the sockets'
    buffers hold, read nothing until the server gives up on us, then what was in flight."""
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 2048, "height": 2048, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": 5, "strength": 1.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "stall"}},
    }
    body = json.dumps(workflow).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(
        (
            f"POST {RUN}?{query} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    # A second quietly; a noisy 16 MB answer made and encoded on a loaded machine takes far longer.
    wait_until(lambda: "read nothing for 1s; its connection is closed" in server.log_text(), timeout=150)
    received = b""
    sock.settimeout(30)
    while chunk := sock.recv(1 << 20):  # what was in flight, then the end: the server closed it
        received += chunk
    sock.close()
    return received


@pytest.mark.timeout(240)  # see _post_and_stop_reading
def test_a_caller_that_stops_reading_has_its_connection_closed_after_the_write_timeout(
    start_app, emulator, monkeypatch
):
    monkeypatch.setattr("serverless.transports.caller.WRITE_TIMEOUT", 1.0)
    server = start_app(emulator.url)
    received = _post_and_stop_reading(server, "output_base64=true")
    head, _, content = received.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    declared = int(lengths[0])
    assert head.startswith(b"HTTP/1.1 200") and len(content) < declared
    assert requests.get(server.url + "/api/serverless/health", timeout=10).json()["jobs"] == 0
    assert "Traceback" not in server.log_text()


@pytest.mark.timeout(240)  # see _post_and_stop_reading
def test_a_stream_reader_that_stops_reading_is_closed_after_the_write_timeout(start_app, emulator, monkeypatch):
    monkeypatch.setattr("serverless.transports.caller.WRITE_TIMEOUT", 1.0)
    server = start_app(emulator.url)
    received = _post_and_stop_reading(server, "output_base64=true&stream=true")
    head, _, content = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert b"execution_success" in content, "the events before the big one were delivered"
    assert not content.endswith(b"0\r\n\r\n"), "the chunked stream was cut, not ended"
    assert requests.get(server.url + "/api/serverless/health", timeout=10).json()["jobs"] == 0
    assert "Traceback" not in server.log_text()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # ComfyUI's worker dies: the point
def test_health_notices_a_comfyui_whose_queue_no_longer_moves(start_app, own_emulator, monkeypatch):
    monkeypatch.setattr("serverless.lifecycle.QUEUE_STALL_AFTER", 1.0)
    server = start_app(own_emulator.url)
    deep: object = {}
    for _ in range(900):
        deep = {"a": deep}
    # What the adapter refuses, sent to ComfyUI directly: its prompt worker dies copying it.
    prompt = {"prompt": empty_image(prefix="stall"), "client_id": "x", "extra_data": deep}
    assert requests.post(own_emulator.url + "/prompt", json=prompt, timeout=10).status_code == 200
    waiting = {"prompt": empty_image(prefix="stall-next"), "client_id": "x"}
    assert requests.post(own_emulator.url + "/prompt", json=waiting, timeout=10).status_code == 200

    def stuck() -> bool:
        health = requests.get(server.url + "/api/serverless/health", timeout=10)
        return health.status_code == 503 and "queue is not moving" in health.json()["reason"]

    wait_until(stuck, timeout=30)


def test_a_job_whose_outputs_are_only_text_succeeds_with_no_results(app):
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    response = post_run(app.url, workflow)
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "serverless_api" and response.json()["data"]["results"] == []
