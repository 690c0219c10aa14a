"""POST /api/serverless/run?stream=true end to end: the app under uvicorn, the ComfyUI emulator on a
real port, real HTTP clients. What the adapter forwards is compared byte for byte with what the
emulator says it sent to the adapter's client id (`GET /emulator/sent`).

Hanging up is tested for every transport here and in test_websocket.py with the same scenarios:
the job of the caller that left is cancelled in ComfyUI, the job beside it is not touched.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import requests
import websocket  # websocket-client

from tests.helpers import RUN, comfyui_texts, empty_image, failing_workflow, post_run, txt2img, wait_until
from tests.servers import App, Emulator

pytestmark = pytest.mark.timeout(60)

TERMINAL_TYPES = ("serverless_api", "error")
HangUp = Callable[[], None]


# -- reading a stream ---------------------------------------------------------------------------


@dataclass
class SseEvent:
    """One block of a `text/event-stream` body (the lines before a blank line)."""

    id: int | None = None
    data: str | None = None  # the one `data:` line's text, exactly as received
    comments: list[str] = field(default_factory=list)


def parse_block(block: bytes) -> SseEvent:
    event = SseEvent()
    for line in block.split(b"\n"):
        assert not line.endswith(b"\r"), f"lines end with a bare LF: {block[:120]!r}"
        if line.startswith(b":"):
            event.comments.append(line[1:].strip().decode())
        elif line.startswith(b"id: "):
            event.id = int(line[4:])
        elif line.startswith(b"data: "):
            assert event.data is None, f"one data line per event: {block[:300]!r}"
            event.data = line[6:].decode("utf-8")
        else:
            raise AssertionError(f"unexpected line in the stream: {line[:200]!r}")
    return event


def read_events(response: requests.Response) -> Iterator[SseEvent]:
    """The stream's events as they arrive, until the server ends the body."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            yield parse_block(block)
    assert buffer == b"", f"the stream ended inside an event: {buffer[:200]!r}"


def stream(base_url: str, workflow: dict[str, Any], headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(
        base_url + RUN,
        params={"stream": "true"},
        data=json.dumps(workflow),
        headers=headers or {},
        stream=True,
        timeout=60,
    )


def payloads(events: Iterator[SseEvent] | list[SseEvent]) -> list[dict[str, Any]]:
    return [json.loads(event.data) for event in events if event.data is not None]


# -- what ComfyUI sent ----------------------------------------------------------------------------


def prompt_id_of(text: str) -> str | None:
    data = json.loads(text).get("data")
    return data.get("prompt_id") if isinstance(data, dict) else None


def ends_prompt(text: str, prompt_id: str) -> bool:
    message = json.loads(text)
    return (
        message["type"] == "executing"
        and message["data"].get("node") is None
        and message["data"].get("prompt_id") == prompt_id
    )


def client_id_of(comfyui_url: str, prompt_id: str) -> str:
    """The ComfyUI client id the adapter submitted `prompt_id` with (its history's `extra_data`)."""
    entry = requests.get(f"{comfyui_url}/history/{prompt_id}", timeout=5).json()[prompt_id]
    return str(entry["prompt"][3]["client_id"])


def sent_to(comfyui_url: str, prompt_id: str) -> list[str]:
    """Every text the emulator sent to the adapter's client id (shared by all its jobs), once it
    has sent the end of `prompt_id`."""
    client_id = wait_until(
        lambda: client_id_of(comfyui_url, prompt_id) if prompt_ended(comfyui_url, prompt_id) else None, timeout=10
    )

    def sent() -> list[str] | None:
        texts = requests.get(comfyui_url + "/emulator/sent", params={"client_id": client_id}, timeout=5).json()
        return texts if any(ends_prompt(text, prompt_id) for text in texts) else None

    return wait_until(sent, timeout=10)


def prompt_ended(comfyui_url: str, prompt_id: str) -> bool:
    return prompt_id in requests.get(f"{comfyui_url}/history/{prompt_id}", timeout=5).json()


def is_status(text: str) -> bool:
    return json.loads(text)["type"] == "status"


def assert_forwarded_as_sent(forwarded: list[str], sent: list[str], prompt_id: str) -> None:
    """Each forwarded text is one ComfyUI sent to the adapter, in ComfyUI's order; none of the
    job's own is missing, none of another prompt's is there, and every `status` broadcast sent
    while the job ran (from its first message to its last) was forwarded to it."""
    remaining = iter(sent)
    for text in forwarded:
        assert any(text == candidate for candidate in remaining), f"not sent, or out of order: {text[:300]}"
    own = [text for text in sent if prompt_id_of(text) == prompt_id]
    assert own and [text for text in forwarded if prompt_id_of(text) == prompt_id] == own
    strangers = [text for text in forwarded if prompt_id_of(text) not in (None, prompt_id)]
    assert not strangers, f"another prompt's messages leaked in: {strangers[0][:300]}"
    first, last = sent.index(own[0]), len(sent) - 1 - sent[::-1].index(own[-1])
    statuses = [text for text in sent[first : last + 1] if is_status(text)]
    forwarded_from_first = forwarded[forwarded.index(own[0]) :]
    assert [text for text in forwarded_from_first if is_status(text)] == statuses


# -- the emulator's queue and history, and the app's health -----------------------------------------


def prompt_ids(comfyui_url: str, prefix: str, where: str) -> list[str]:
    """Prompts in ComfyUI's `queue_running` or `queue_pending` whose SaveImage prefix is `prefix`."""
    queue = requests.get(comfyui_url + "/queue", timeout=5).json()
    return [
        item[1]
        for item in queue[f"queue_{where}"]
        if any(str(node["inputs"].get("filename_prefix", "")).startswith(prefix + "_") for node in item[2].values())
    ]


def queued(comfyui_url: str, prompt_id: str) -> bool:
    queue = requests.get(comfyui_url + "/queue", timeout=5).json()
    return any(item[1] == prompt_id for item in queue["queue_running"] + queue["queue_pending"])


def history_messages(comfyui_url: str, prompt_id: str) -> list[str] | None:
    """The message types of the prompt's history entry; None if it never ran."""
    entry = requests.get(f"{comfyui_url}/history/{prompt_id}", timeout=5).json().get(prompt_id)
    return None if entry is None else [name for name, _ in entry["status"]["messages"]]


def set_step_delay(emulator: Emulator, seconds: float) -> None:
    requests.post(emulator.url + "/emulator/config", json={"step_delay": seconds}, timeout=5).raise_for_status()


def jobs_running(server: App) -> int:
    return int(requests.get(server.url + "/api/serverless/health", timeout=10).json()["jobs"])


def wait_no_jobs(server: App) -> None:
    wait_until(lambda: jobs_running(server) == 0, timeout=20, interval=0.1)


def status_log(server: App, task_id: str) -> list[dict[str, Any]]:
    response = requests.get(server.url + "/api/serverless/status", params={"task_id": task_id}, timeout=10)
    return list(response.json())


def in_background(call: Callable[[], Any]) -> Future[Any]:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


# -- callers that hang up -------------------------------------------------------------------------


def open_stream(base_url: str, workflow: dict[str, Any], headers: dict[str, str] | None = None) -> HangUp:
    """An SSE caller, as requests users write it; hanging up closes its connection."""
    response = stream(base_url, workflow, headers)
    assert response.status_code == 200
    return response.close


def open_sync(base_url: str, workflow: dict[str, Any], headers: dict[str, str] | None = None) -> HangUp:
    """A synchronous caller on a raw socket, so the test decides when the connection goes away."""
    url = urlsplit(base_url)
    body = json.dumps(workflow).encode()
    head = [
        f"POST {RUN} HTTP/1.1",
        f"Host: {url.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    return sock.close


def open_websocket(base_url: str, workflow: dict[str, Any], headers: dict[str, str] | None = None) -> HangUp:
    """A websocket caller (websocket-client) that hangs up politely, with a close frame."""
    ws = websocket.create_connection(
        base_url.replace("http://", "ws://") + "/api/serverless/ws", timeout=30, header=headers or {}
    )
    ws.send(json.dumps(workflow))
    return ws.close


def hanging_up_cancels_only_that_job(
    emulator: Emulator, server: App, open_call: Callable[..., HangUp], state: str
) -> None:
    """The caller of a `state` ("running" or "pending") job hangs up while another job runs or
    waits beside it: its prompt leaves ComfyUI's queue (interrupted, or never run), the other
    one ends normally, and the app holds no job afterwards."""
    # At 0.05 s a step: a running victim would take 20 s; a pending one waits 3 s behind its neighbour.
    neighbour_steps = 3 if state == "running" else 60
    victim_steps = 400 if state == "running" else 3
    if state == "running":
        hang_up = open_call(server.url, txt2img(seed=21, steps=victim_steps, prefix="victim"))
        (victim,) = wait_until(lambda: prompt_ids(emulator.url, "victim", "running"))
        neighbour = in_background(
            lambda: post_run(server.url, txt2img(seed=22, steps=neighbour_steps, prefix="neighbour"))
        )
        wait_until(lambda: prompt_ids(emulator.url, "neighbour", "pending"))
    else:
        neighbour = in_background(
            lambda: post_run(server.url, txt2img(seed=22, steps=neighbour_steps, prefix="neighbour"))
        )
        wait_until(lambda: prompt_ids(emulator.url, "neighbour", "running"))
        hang_up = open_call(server.url, txt2img(seed=21, steps=victim_steps, prefix="victim"))
        (victim,) = wait_until(lambda: prompt_ids(emulator.url, "victim", "pending"))

    hang_up()

    wait_until(lambda: not queued(emulator.url, victim), timeout=10)
    answer = neighbour.result(timeout=30)
    assert answer.status_code == 200, answer.text
    neighbour_id = answer.json()["data"]["prompt_id"]
    assert history_messages(emulator.url, neighbour_id)[-1] == "execution_success"
    victim_history = history_messages(emulator.url, victim)
    if state == "running":
        assert victim_history is not None and "execution_interrupted" in victim_history
    else:  # removed before it ran (or, on a very slow machine, interrupted as it started)
        assert victim_history is None or "execution_interrupted" in victim_history
    assert not queued(emulator.url, victim)
    wait_no_jobs(server)


# -- the tests ------------------------------------------------------------------------------------


def test_stream_forwards_comfyuis_texts_byte_for_byte_with_ids_then_one_terminal_payload(app, emulator):
    with stream(app.url, txt2img(seed=3, steps=5, prefix="bytes"), headers={"x-fc-trace-id": "sse-bytes"}) as response:
        headers = response.headers
        events = list(read_events(response))  # to the end of the body

    assert response.status_code == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-store"
    assert headers["x-accel-buffering"] == "no"
    assert all(event.data is not None and event.id is not None for event in events), "no pings in 15 s"
    assert [event.id for event in events] == list(range(1, len(events) + 1))
    *everything, terminal = [str(event.data) for event in events]
    forwarded = comfyui_texts(everything)
    result = json.loads(terminal)
    assert result["type"] == "serverless_api" and result["data"]["task_id"] == "sse-bytes"
    assert not [text for text in forwarded if json.loads(text)["type"] in TERMINAL_TYPES]
    prompt_id = result["data"]["prompt_id"]
    assert_forwarded_as_sent(forwarded, sent_to(emulator.url, prompt_id), prompt_id)
    assert ends_prompt(forwarded[-1], prompt_id)
    # The status log holds the same payloads, the terminal one included.
    assert status_log(app, "sse-bytes") == [json.loads(text) for text in [*everything, terminal]]


def test_execution_error_mid_stream_ends_it_with_execution_failed(app, emulator):
    with stream(app.url, failing_workflow(emulator.root)) as response:
        events = list(read_events(response))

    messages = payloads(events)
    terminal = messages[-1]
    assert terminal["type"] == "error" and terminal["error_code"] == "EXECUTION_FAILED"
    assert terminal["raw"]["node_id"] == "1" and terminal["raw"]["node_type"] == "LoadImage"
    (failure,) = [m for m in messages[:-1] if m["type"] == "execution_error"]
    assert failure["data"] == terminal["raw"]
    assert not [m for m in messages[:-1] if m["type"] in TERMINAL_TYPES]
    forwarded = comfyui_texts([str(event.data) for event in events[:-1]])
    prompt_id = failure["data"]["prompt_id"]
    assert_forwarded_as_sent(forwarded, sent_to(emulator.url, prompt_id), prompt_id)


def test_stream_ends_with_error_when_comfyui_dies(own_emulator, start_app):
    set_step_delay(own_emulator, 0.05)
    server = start_app(own_emulator.url, COMFYUI_STARTUP_TIMEOUT="2")
    with stream(server.url, txt2img(seed=7, steps=400)) as response:  # 20 s if left alone
        events = read_events(response)
        for event in events:
            if event.data is not None and json.loads(event.data)["type"] == "progress":
                break
        own_emulator.kill()
        killed = time.monotonic()
        after = payloads(events)  # the rest of the same stream
    ended = time.monotonic() - killed

    terminal = after[-1]
    assert terminal["type"] == "error" and terminal["error_code"] == "COMFYUI_UNAVAILABLE"
    assert not [m for m in after[:-1] if m["type"] in TERMINAL_TYPES]
    print(f"\nComfyUI killed -> stream ended {ended:.2f}s later (COMFYUI_STARTUP_TIMEOUT=2)")
    assert ended < 2 + 10, "the job must fail after the reconnect timeout, not at its deadline"
    wait_no_jobs(server)


def test_keep_alive_pings_while_the_job_waits_silently(own_emulator, start_app, monkeypatch):
    monkeypatch.setattr("serverless.transports.http.PING_INTERVAL", 0.2)
    set_step_delay(own_emulator, 0.05)
    server = start_app(own_emulator.url)
    ahead = in_background(lambda: post_run(server.url, txt2img(seed=1, steps=40, prefix="ahead")))  # 2 s
    wait_until(lambda: prompt_ids(own_emulator.url, "ahead", "running"))

    with stream(server.url, empty_image(prefix="behind")) as response:
        events = list(read_events(response))

    pings = [event for event in events if event.comments]
    assert len(pings) >= 2, "the queued job is silent for about 2 s"
    assert all(e.comments == ["ping"] and e.data is None and e.id is None for e in pings)
    data = [event for event in events if event.data is not None]
    assert [event.id for event in data] == list(range(1, len(data) + 1))
    assert json.loads(str(data[-1].data))["type"] == "serverless_api"
    assert events[-1] is data[-1]
    types_before_first_ping = [json.loads(str(e.data))["type"] for e in events[: events.index(pings[0])]]
    assert "execution_start" not in types_before_first_ping
    assert ahead.result(timeout=30).status_code == 200


@pytest.mark.parametrize("state", ["running", "pending"])
def test_closing_the_stream_cancels_that_job_and_only_that_job(own_emulator, start_app, state):
    set_step_delay(own_emulator, 0.05)
    server = start_app(own_emulator.url)
    hanging_up_cancels_only_that_job(own_emulator, server, open_stream, state)


@pytest.mark.parametrize("state", ["running", "pending"])
def test_a_synchronous_caller_hanging_up_cancels_that_job_and_only_that_job(own_emulator, start_app, state):
    set_step_delay(own_emulator, 0.05)
    server = start_app(own_emulator.url)
    hanging_up_cancels_only_that_job(own_emulator, server, open_sync, state)


@pytest.mark.parametrize("open_call", [open_stream, open_sync], ids=["sse", "sync"])
def test_without_cancel_on_disconnect_the_job_outlives_its_caller(own_emulator, start_app, open_call):
    set_step_delay(own_emulator, 0.05)
    server = start_app(own_emulator.url, CANCEL_ON_DISCONNECT="false")
    hang_up = open_call(server.url, txt2img(seed=31, steps=30, prefix="kept"), {"x-fc-trace-id": "kept-1"})
    (prompt_id,) = wait_until(lambda: prompt_ids(own_emulator.url, "kept", "running"))

    hang_up()

    log = wait_until(
        lambda: (items := status_log(server, "kept-1")) and items[-1]["type"] in TERMINAL_TYPES and items, timeout=30
    )
    assert log[-1]["type"] == "serverless_api", log[-1]
    assert log[-1]["data"]["prompt_id"] == prompt_id
    assert history_messages(own_emulator.url, prompt_id)[-1] == "execution_success"
    wait_no_jobs(server)
    assert "caller gone" not in server.log_text()


def slow_reader_workflow(steps: int, side_branches: int = 60) -> dict[str, Any]:
    """txt2img whose sampler runs after `side_branches` small previews, so that each of its
    `progress_state` messages (they list every started node) is large: megabytes, quickly."""
    workflow = txt2img(seed=41, steps=steps, prefix="slow")
    for k in range(side_branches):
        workflow[f"e{k}"] = {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": k},
        }
        workflow[f"p{k}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"e{k}", 0]}}
    return workflow


@pytest.mark.timeout(180)  # 4 MB of events made and dropped: a minute and more on a loaded machine
def test_a_slow_reader_is_dropped_and_the_job_goes_on(own_emulator, start_app, monkeypatch):
    monkeypatch.setattr("serverless.jobs.feed.READER_LAG", 20)
    set_step_delay(own_emulator, 0.01)
    server = start_app(own_emulator.url)
    url = urlsplit(server.url)
    body = json.dumps(slow_reader_workflow(steps=120)).encode()  # about 4 MB of events
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the app's buffers fill
    reader.connect((url.hostname, url.port))
    reader.sendall(
        f"POST {RUN}?stream=true HTTP/1.1\r\nHost: {url.netloc}\r\nX-Fc-Trace-Id: slow-1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )

    # The job ends while its reader reads nothing at all.
    log = wait_until(
        lambda: (items := status_log(server, "slow-1")) and items[-1]["type"] in TERMINAL_TYPES and items,
        timeout=120,  # ~1 s of sampling and 4 MB of events: far longer only on a loaded machine
        interval=0.2,
    )
    assert log[-1]["type"] == "serverless_api", log[-1]
    assert history_messages(own_emulator.url, log[-1]["data"]["prompt_id"])[-1] == "execution_success"

    # Reading again, it gets the rest at once: the stream went on only at the kernel's next zero-window
    # probe, seconds later and the later the longer it had waited, while its socket was ever corked.
    received = bytearray()
    reader.settimeout(20)
    while chunk := reader.recv(1 << 16):
        received += chunk
    reader.close()

    print(f"\nslow reader: {len(received) / 1e6:.1f} MB received, then dropped")
    assert b'"type": "serverless_api"' not in received
    # Either way of falling behind (its events gone from the buffer, or more than READER_LAG behind
    # the newest: which comes first depends on when its writer runs) ends it with the same note.
    dropped = rb"\n: dropped: (events \d+\.\.\d+ were dropped|\d+ events behind \(more than 20\)); "
    assert re.search(dropped + rb"the job goes on: GET /api/serverless/status\?task_id=slow-1\n\n", received)
    assert received.endswith(b"\r\n0\r\n\r\n"), "the stream ends cleanly after the note"
    assert "dropping a slow SSE reader of task_id=slow-1" in server.log_text()
    wait_no_jobs(server)


def test_a_reader_that_keeps_up_is_not_dropped_by_a_small_buffer(own_emulator, start_app, monkeypatch):
    # A buffer of 20 events for a job of far more. The steps come 0.1 s apart, so only a reader
    # held up for most of a second falls 20 behind (a burst of side nodes, as the slow reader's
    # workflow has, would outrun any reader on a loaded machine: that is the test above).
    monkeypatch.setattr("serverless.jobs.feed.READER_LAG", 20)
    set_step_delay(own_emulator, 0.1)
    server = start_app(own_emulator.url)
    with stream(server.url, slow_reader_workflow(steps=30, side_branches=0)) as response:
        events = list(read_events(response))
    assert len(events) > 3 * 20, "far more events than the buffer holds"

    assert [event.id for event in events] == list(range(1, len(events) + 1))
    assert json.loads(str(events[-1].data))["type"] == "serverless_api"
    assert "dropping a slow SSE reader" not in server.log_text()


async def test_two_hundred_concurrent_streams_each_end_with_their_own_result(app):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[list[int], dict[str, Any]]:
        workflow = empty_image(width=8, height=8, color=i * 40_503 % 0xFFFFFF, prefix=f"many{i}")
        ids, payload = [], {}
        async with client.stream("POST", RUN, params={"stream": "true"}, content=json.dumps(workflow)) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("id: "):
                    ids.append(int(line[4:]))
                elif line.startswith("data: "):
                    payload = json.loads(line[6:])
        return ids, payload

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=app.url, limits=limits, timeout=httpx.Timeout(60)) as client:
        answers = await asyncio.gather(*(one(client, i) for i in range(200)))
    print(f"\n200 concurrent SSE streams: {time.monotonic() - started:.1f}s wall time")

    prompt_ids_seen = set()
    for i, (ids, payload) in enumerate(answers):
        assert payload.get("type") == "serverless_api", payload
        assert ids == list(range(1, len(ids) + 1))
        (result,) = payload["data"]["results"]
        assert result["output"]["raw"]["filename"].startswith(f"many{i}_test-1_")
        prompt_ids_seen.add(payload["data"]["prompt_id"])
    assert len(prompt_ids_seen) == 200
    await asyncio.to_thread(wait_no_jobs, app)


def app_descriptors(app_port: int, comfyui_port: int, folder: Path) -> int:
    """The open descriptors of this process that are an in-process app's own: its callers'
    connections and its listener (local port: the app's), its connections to ComfyUI (remote port:
    ComfyUI's) and the files it holds under `folder` (other servers of this process hold none)."""
    sockets, files = set(), 0
    for entry in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
        elif target.startswith(str(folder)):
            files += 1
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
            held += fields[9] in sockets and (local == app_port or remote == comfyui_port)
    return held + files


def test_callers_hanging_up_leave_no_job_socket_or_file_behind(own_emulator, start_app, tmp_path):
    set_step_delay(own_emulator, 0.05)
    server = start_app(own_emulator.url)  # in this process: its descriptors are read from ours

    def open_fds() -> int:
        return app_descriptors(server.port, own_emulator.port, tmp_path)

    assert post_run(server.url, empty_image(prefix="warm")).status_code == 200
    baseline = open_fds()
    print(f"\napp file descriptors after one job: {baseline}")

    for round_ in range(6):
        for name, open_call in (("sse", open_stream), ("sync", open_sync), ("ws", open_websocket)):
            prefix = f"leak-{name}-{round_}"
            hang_up = open_call(server.url, txt2img(seed=round_, steps=400, prefix=prefix))
            (prompt_id,) = wait_until(lambda p=prefix: prompt_ids(own_emulator.url, p, "running"))
            hang_up()
            wait_until(lambda p=prompt_id: not queued(own_emulator.url, p), timeout=10)
            wait_no_jobs(server)

    # Pooled keep-alive connections to ComfyUI may come and go; a leak grows with every round.
    wait_until(lambda: open_fds() <= baseline + 3, timeout=20, interval=0.2)
