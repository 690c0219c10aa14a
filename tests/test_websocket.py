"""WS /api/serverless/ws end to end: the app under uvicorn, the ComfyUI emulator on a real port,
websocket-client as the caller. The same job event sequence as the SSE stream (test_stream.py),
rendered as one text message each, then the terminal payload, then a normal close."""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

import pytest
import requests
import websocket  # websocket-client
from websocket import ABNF

from tests.helpers import comfyui_texts, empty_image, failing_workflow, txt2img, wait_until
from tests.test_stream import (
    TERMINAL_TYPES,
    HangUp,
    assert_forwarded_as_sent,
    ends_prompt,
    hanging_up_cancels_only_that_job,
    history_messages,
    open_websocket,
    prompt_ids,
    sent_to,
    set_step_delay,
    slow_reader_workflow,
    status_log,
    wait_no_jobs,
)

pytestmark = pytest.mark.timeout(60)

NORMAL_CLOSURE = 1000


def ws_url(base_url: str, query: str = "") -> str:
    return base_url.replace("http://", "ws://") + "/api/serverless/ws" + query


def connect(base_url: str, query: str = "") -> websocket.WebSocket:
    return websocket.create_connection(ws_url(base_url, query), timeout=30)


def receive_all(ws: websocket.WebSocket) -> tuple[list[str], int]:
    """Every text message until the server closes, and its close code."""
    texts = []
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == ABNF.OPCODE_TEXT:
            texts.append(frame.data.decode("utf-8"))
        elif opcode == ABNF.OPCODE_CLOSE:
            ws.close()
            return texts, struct.unpack("!H", frame.data[:2])[0]


def run(base_url: str, body: str | dict[str, Any], query: str = "") -> tuple[list[str], int]:
    ws = connect(base_url, query)
    ws.send(body if isinstance(body, str) else json.dumps(body))
    return receive_all(ws)


def open_websocket_then_vanish(base_url: str, workflow: dict[str, Any]) -> HangUp:
    """A websocket caller whose connection just drops (no close frame), as a network failure does."""
    ws = websocket.create_connection(ws_url(base_url), timeout=30)
    ws.send(json.dumps(workflow))

    def vanish() -> None:
        ws.sock.shutdown(socket.SHUT_RDWR)
        ws.sock.close()

    return vanish


def test_websocket_forwards_comfyuis_texts_byte_for_byte_then_the_result_then_closes_normally(app, emulator):
    texts, code = run(app.url, empty_image(prefix="wsbytes", color=0x123456), "?output_base64=true")

    assert code == NORMAL_CLOSURE
    *everything, terminal = texts
    forwarded = comfyui_texts(everything)
    result = json.loads(terminal)
    assert result["type"] == "serverless_api"
    assert not [text for text in forwarded if json.loads(text)["type"] in TERMINAL_TYPES]
    prompt_id = result["data"]["prompt_id"]
    assert_forwarded_as_sent(forwarded, sent_to(emulator.url, prompt_id), prompt_id)
    assert ends_prompt(forwarded[-1], prompt_id)
    (output,) = result["data"]["results"]
    assert output["output"]["raw"]["filename"].startswith("wsbytes_test-1_")
    assert output["output"]["base64"]["content"], "the query's output_base64 applies"
    # The same payloads as the job's status log (the websocket is one more rendering of the feed),
    # once its last append is in (a job nobody named does not hold its answer for it).
    logged = wait_until(lambda: (items := status_log(app, prompt_id)) and items[-1]["type"] in TERMINAL_TYPES and items)
    assert logged == [json.loads(text) for text in texts]


@pytest.mark.parametrize(
    "body",
    [
        "{oops",
        "[1, 2, 3]",
        "",
        json.dumps({"last_node_id": 9, "nodes": [{"id": 1}], "links": [], "version": 0.4}),
    ],
    ids=["not-json", "not-an-object", "empty", "ui-format"],
)
def test_an_invalid_first_message_gives_the_error_object_then_a_normal_close(app, body):
    texts, code = run(app.url, body)

    assert code == NORMAL_CLOSURE
    (text,) = texts
    error = json.loads(text)
    assert error["type"] == "error" and error["error_code"] == "INVALID_PARAMS" and error["error_message"]
    if "nodes" in body:  # a UI-format workflow is converted; this one has a node without a type
        assert "without a type" in error["error_message"]


def test_a_refused_prompt_ends_the_websocket_with_prompt_error(app):
    workflow = empty_image()
    del workflow["2"]["inputs"]["images"]
    texts, code = run(app.url, workflow)

    assert code == NORMAL_CLOSURE
    terminal = json.loads(texts[-1])
    assert terminal["type"] == "error" and terminal["error_code"] == "PROMPT_ERROR"
    assert terminal["raw"]["node_errors"]["2"]["errors"][0]["type"] == "required_input_missing"


def test_execution_error_ends_the_websocket_with_execution_failed(app, emulator):
    texts, code = run(app.url, failing_workflow(emulator.root))

    assert code == NORMAL_CLOSURE
    messages = [json.loads(text) for text in texts]
    terminal = messages[-1]
    assert terminal["type"] == "error" and terminal["error_code"] == "EXECUTION_FAILED"
    (failure,) = [m for m in messages[:-1] if m["type"] == "execution_error"]
    assert failure["data"] == terminal["raw"] and terminal["raw"]["node_type"] == "LoadImage"
    prompt_id = failure["data"]["prompt_id"]
    forwarded = comfyui_texts(texts[:-1])
    assert_forwarded_as_sent(forwarded, sent_to(emulator.url, prompt_id), prompt_id)


def test_websocket_ends_with_error_when_comfyui_dies(own_emulator, start_app):
    set_step_delay(own_emulator, 0.05)
    server = start_app(own_emulator.url, COMFYUI_STARTUP_TIMEOUT="2")
    ws = connect(server.url)
    ws.send(json.dumps(txt2img(seed=7, steps=400)))  # 20 s if left alone
    while json.loads(ws.recv())["type"] != "progress":
        pass

    own_emulator.kill()
    killed = time.monotonic()
    texts, code = receive_all(ws)
    ended = time.monotonic() - killed

    assert code == NORMAL_CLOSURE
    terminal = json.loads(texts[-1])
    assert terminal["type"] == "error" and terminal["error_code"] == "COMFYUI_UNAVAILABLE"
    assert not [text for text in texts[:-1] if json.loads(text)["type"] in TERMINAL_TYPES]
    assert ended < 2 + 10, "the job must fail after the reconnect timeout, not at its deadline"
    wait_no_jobs(server)


@pytest.mark.parametrize(
    "state, open_call",
    [
        ("running", open_websocket),
        ("pending", open_websocket),
        ("running", open_websocket_then_vanish),
    ],
    ids=["running", "pending", "running-connection-dropped"],
)
def test_closing_the_websocket_cancels_that_job_and_only_that_job(own_emulator, start_app, state, open_call):
    set_step_delay(own_emulator, 0.05)
    server = start_app(own_emulator.url)
    hanging_up_cancels_only_that_job(own_emulator, server, open_call, state)


def test_without_cancel_on_disconnect_the_websocket_job_outlives_its_client(own_emulator, start_app):
    set_step_delay(own_emulator, 0.05)
    server = start_app(own_emulator.url, CANCEL_ON_DISCONNECT="false")
    hang_up = open_websocket(server.url, txt2img(seed=31, steps=30, prefix="kept"), {"X-Fc-Trace-Id": "kept-ws"})
    (prompt_id,) = wait_until(lambda: prompt_ids(own_emulator.url, "kept", "running"))

    hang_up()

    log = wait_until(
        lambda: (items := status_log(server, "kept-ws")) and items[-1]["type"] in TERMINAL_TYPES and items, timeout=30
    )
    assert log[-1]["type"] == "serverless_api" and log[-1]["data"]["prompt_id"] == prompt_id
    assert history_messages(own_emulator.url, prompt_id)[-1] == "execution_success"
    wait_no_jobs(server)


def test_a_slow_websocket_reader_is_dropped_with_try_again_later_and_the_job_goes_on(
    own_emulator, start_app, monkeypatch
):
    monkeypatch.setattr("serverless.jobs.feed.READER_LAG", 20)
    set_step_delay(own_emulator, 0.01)
    server = start_app(own_emulator.url)
    ws = websocket.create_connection(
        ws_url(server.url),
        timeout=30,
        header={"X-Fc-Trace-Id": "slow-ws"},
        sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),),
    )
    ws.send(json.dumps(slow_reader_workflow(steps=120)))  # about 4 MB of events

    # The job ends while its reader reads nothing at all.
    log = wait_until(
        lambda: (items := status_log(server, "slow-ws")) and items[-1]["type"] in TERMINAL_TYPES and items,
        timeout=40,
        interval=0.2,
    )
    assert log[-1]["type"] == "serverless_api", log[-1]

    texts, code = receive_all(ws)
    assert code == 1013, "try again later"
    assert not [text for text in texts if json.loads(text)["type"] in TERMINAL_TYPES]
    assert "dropping a slow websocket reader of task_id=slow-ws" in server.log_text()
    wait_no_jobs(server)


def test_a_20_mib_run_body_gets_its_answer_not_a_dropped_connection(app):
    text = "iVBORw0KGgoAAAANSUhEUg" * (20 * 1024 * 1024 // 22 + 1)
    body = json.dumps({**empty_image(prefix="ws-big"), "3": {"class_type": "NoSuchNode", "inputs": {"t": text}}})
    assert len(body) > 20 * 1024 * 1024
    texts, code = run(app.url, body)
    assert code == NORMAL_CLOSURE
    terminal = json.loads(texts[-1])
    assert terminal["type"] == "error" and terminal["error_code"] == "PROMPT_ERROR"  # it reached ComfyUI


def test_a_websocket_reader_that_stops_reading_is_closed_after_the_write_timeout(emulator, start_app, monkeypatch):
    monkeypatch.setattr("serverless.transports.caller.WRITE_TIMEOUT", 1.0)
    server = start_app(emulator.url)
    workflow = {  # a noisy 2048x2048 picture: its base64 is far more than the sockets' buffers hold
        "1": {"class_type": "EmptyImage", "inputs": {"width": 2048, "height": 2048, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": 5, "strength": 1.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ws-stall"}},
    }
    ws = websocket.create_connection(
        ws_url(server.url, "?output_base64=true"), timeout=30, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),)
    )
    try:
        ws.send(json.dumps(workflow))  # and then read nothing
        # The whole answer fits the server's buffer; the close after it waits for room: bounded too.
        wait_until(lambda: "read nothing for 1s; its connection is closed" in server.log_text(), timeout=60)
    finally:
        ws.close()
    health = server.url + "/api/serverless/health"
    wait_until(lambda: requests.get(health, timeout=10).json()["jobs"] == 0, timeout=30)
    assert "Traceback" not in server.log_text()
