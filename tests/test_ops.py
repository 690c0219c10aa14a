"""Operations through real servers: /metrics after each kind of job, admission (BUSY) under a
burst, readiness for load balancers, and JSON logs that name the job on every line about it."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import websocket  # websocket-client
from prometheus_client.parser import text_string_to_metric_families

from serverless.errors import DownloadError, InputError
from serverless.ops.logs import LineQueue, LineWriter
from serverless.ops.metrics import REASONS, refusal_reason
from serverless.settings import Settings, SettingsError
from tests.conftest import base_env
from tests.helpers import RUN, empty_image, failing_workflow, post_run, txt2img, wait_until
from tests.oss_server import LocalOss
from tests.servers import ROOT, App, Emulator, free_port, wait_http
from tests.test_oss_e2e import OSS_ON, assert_nothing_secret_in, local_oss_server, oss_env
from tests.test_stream import TERMINAL_TYPES, set_step_delay, slow_reader_workflow, status_log

pytestmark = pytest.mark.timeout(90)

Series = tuple[str, tuple[tuple[str, str], ...]]


def scrape(url: str, token: str | None = None) -> dict[Series, float]:
    """Every sample of GET /metrics, keyed by name and sorted labels."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.get(url + "/metrics", headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def counted(samples: dict[Series, float]) -> dict[Series, float]:
    """The counters, and the job histograms' counts: what one job moves by whole numbers."""
    return {
        key: value
        for key, value in samples.items()
        if key[0].endswith("_total") or (key[0].startswith("serverless_job_") and key[0].endswith("_count"))
    }


def moved(before: dict[Series, float], after: dict[Series, float]) -> dict[Series, float]:
    """The counts that changed, by how much."""
    old, new = counted(before), counted(after)
    return {key: new[key] - old.get(key, 0.0) for key in new if new[key] != old.get(key, 0.0)}


def value(samples: dict[Series, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def started(transport: str) -> Series:
    return ("serverless_jobs_started_total", (("transport", transport),))


def ended(transport: str, outcome: str) -> Series:
    return ("serverless_jobs_ended_total", (("outcome", outcome), ("transport", transport)))


def refusal(source: str, reason: str) -> Series:
    return ("serverless_input_refusals_total", (("reason", reason), ("source", source)))


PHASES_COUNTED = {
    (f"serverless_job_{phase}_seconds_count", ()): 1.0 for phase in ("queued", "execution", "outputs", "total")
}


def drop_a_slow_sse_reader(server: App, task_id: str) -> bytes:
    """An SSE caller that reads nothing until its job has ended (as tests/test_stream.py's slow
    reader), then reads its stream to the end."""
    url = urlsplit(server.url)
    body = json.dumps(slow_reader_workflow(steps=120)).encode()
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect((url.hostname, url.port))
    reader.sendall(
        f"POST {RUN}?stream=true HTTP/1.1\r\nHost: {url.netloc}\r\nX-Fc-Trace-Id: {task_id}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    wait_until(
        lambda: (items := status_log(server, task_id)) and items[-1]["type"] in TERMINAL_TYPES, timeout=40, interval=0.2
    )
    received = bytearray()
    reader.settimeout(20)
    while chunk := reader.recv(1 << 16):
        received += chunk
    reader.close()
    return bytes(received)


# -- metrics ----------------------------------------------------------------------------------------


@pytest.mark.timeout(180)  # its slow SSE reader, as tests/test_stream.py's: a minute and more on a loaded machine
def test_metrics_count_each_kind_of_job_once_under_its_labels(own_emulator, start_app, monkeypatch):
    monkeypatch.setattr("serverless.jobs.feed.READER_LAG", 20)
    server = start_app(own_emulator.url)
    refused = empty_image(prefix="m-refused")
    del refused["2"]["inputs"]["images"]
    private_url = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "http://127.0.0.1:1/x.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "m-in"}},
    }
    sync_runs: list[tuple[dict[str, Any], int, dict[Series, float]]] = [
        (empty_image(prefix="m-ok"), 200, {started("sync"): 1, ended("sync", "ok"): 1, **PHASES_COUNTED}),
        (
            refused,
            400,
            {started("sync"): 1, ended("sync", "PROMPT_ERROR"): 1, ("serverless_prompt_refusals_total", ()): 1},
        ),
        (failing_workflow(own_emulator.root), 500, {started("sync"): 1, ended("sync", "EXECUTION_FAILED"): 1}),
        (private_url, 400, {started("sync"): 1, ended("sync", "INPUT_ERROR"): 1, refusal("url", "blocked_address"): 1}),
    ]
    for workflow, status, expected in sync_runs:
        before = scrape(server.url)
        assert post_run(server.url, workflow).status_code == status
        assert moved(before, scrape(server.url)) == expected

    set_step_delay(own_emulator, 0.05)  # a job that samples for a second: its reader is counted meanwhile
    before = scrape(server.url)
    ws = websocket.create_connection(server.url.replace("http", "ws", 1) + "/api/serverless/ws", timeout=30)
    ws.send(json.dumps(txt2img(seed=9, steps=20, prefix="m-ws")))
    texts = [json.loads(ws.recv())["type"]]
    assert value(scrape(server.url), "serverless_stream_readers", transport="ws") == 1  # while it reads
    while text := ws.recv():
        texts.append(json.loads(text)["type"])
    ws.close()
    assert texts[-1] == "serverless_api"
    assert moved(before, scrape(server.url)) == {started("ws"): 1, ended("ws", "ok"): 1, **PHASES_COUNTED}

    set_step_delay(own_emulator, 0.01)
    before = scrape(server.url)
    received = drop_a_slow_sse_reader(server, "m-slow")
    # Its events gone from the buffer, or more than READER_LAG behind: either note (test_stream).
    assert re.search(rb"\n: dropped: (events \d+\.\.\d+ were dropped|\d+ events behind \(more than 20\)); ", received)
    assert moved(before, scrape(server.url)) == {
        started("sse"): 1,
        ended("sse", "ok"): 1,
        **PHASES_COUNTED,
        ("serverless_stream_readers_dropped_total", (("transport", "sse"),)): 1,
    }
    settled = wait_until(
        lambda: (
            (s := scrape(server.url))
            and value(s, "serverless_stream_readers", transport="sse") == 0
            and value(s, "serverless_stream_readers", transport="ws") == 0
            and s
        )
    )
    assert value(settled, "serverless_jobs_in_flight") == 0
    assert value(settled, "serverless_status_append_seconds_count") >= 5  # each job appended at least once


def test_metric_series_do_not_grow_with_the_number_of_jobs(start_app, emulator):
    server = start_app(emulator.url)
    for kind in ("first-ok", "first-fail"):
        workflow = empty_image(prefix=f"card-{kind}") if kind == "first-ok" else failing_workflow(emulator.root)
        post_run(server.url, workflow, headers={"x-fc-trace-id": f"card-{kind}"})
    series = set(scrape(server.url))

    task_ids = [f"card-{uuid.uuid4().hex[:12]}" for _ in range(20)]
    for index, task_id in enumerate(task_ids):
        workflow = empty_image(color=index, prefix=task_id) if index % 2 else failing_workflow(emulator.root)
        post_run(server.url, workflow, headers={"x-fc-trace-id": task_id})

    after = scrape(server.url)
    assert set(after) == series
    assert value(after, "serverless_jobs_ended_total", transport="sync", outcome="ok") == 11
    text = requests.get(server.url + "/metrics", timeout=5).text
    assert not any(task_id in text for task_id in task_ids) and "127.0.0.1" not in text


def test_metrics_need_the_metrics_token_when_one_is_set(start_app, emulator):
    token = "metrics-token-" + uuid.uuid4().hex
    server = start_app(emulator.url, METRICS_TOKEN=token)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
        refused = requests.get(server.url + "/metrics", headers=headers, timeout=5)
        assert refused.status_code == 401 and refused.json()["error_code"] == "UNAUTHORIZED"
    assert ("serverless_jobs_started_total", (("transport", "sync"),)) in scrape(server.url, token)
    assert token not in server.log_text()


def test_metrics_take_an_api_key_without_a_metrics_token_and_only_the_token_with_one(start_app, emulator):
    """As the README's Operations section says: a scraper holds one of the two, never both."""
    key, token = "sk-metrics-" + uuid.uuid4().hex, "metrics-token-" + uuid.uuid4().hex
    keyed = start_app(emulator.url, API_KEYS=key)
    assert requests.get(keyed.url + "/metrics", timeout=5).status_code == 401
    assert ("serverless_jobs_in_flight", ()) in scrape(keyed.url, key)
    both = start_app(emulator.url, API_KEYS=key, METRICS_TOKEN=token)
    assert ("serverless_jobs_in_flight", ()) in scrape(both.url, token)
    refused = requests.get(both.url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    assert refused.status_code == 401
    assert (
        requests.get(both.url + "/api/workflows", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code
        == 401
    )


# -- admission and readiness ------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    retry_after: str | None
    at: float


class Prober:
    """Asks health, ready and metrics in turn until stopped; keeps the slowest answer's time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.slowest = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in ("/api/serverless/health", "/api/serverless/ready", "/metrics"):
                started_at = time.monotonic()
                requests.get(self.url + path, timeout=10)
                self.slowest = max(self.slowest, time.monotonic() - started_at)
                self.answers += 1
            time.sleep(0.05)


PENDING = 2  # MAX_PENDING_JOBS of the burst test: 3 jobs of 2 s run, 27 callers are refused


def test_a_burst_past_max_pending_jobs_is_refused_busy_at_once_and_the_admitted_jobs_finish(own_emulator, start_app):
    set_step_delay(own_emulator, 0.1)  # each job: 20 steps, 2 s in ComfyUI
    server = start_app(own_emulator.url, MAX_PENDING_JOBS=str(PENDING))
    barrier = threading.Barrier(30)

    def call(index: int) -> Answer:
        barrier.wait()
        response = post_run(server.url, txt2img(seed=index, steps=20, prefix=f"burst-{index}"), timeout=90)
        return Answer(response.status_code, response.json(), response.headers.get("retry-after"), time.monotonic())

    with Prober(server.url) as prober, ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(call, range(30)))

    done = [a for a in answers if a.status == 200]
    busy = [a for a in answers if a.status == 503]
    admitted = 1 + PENDING  # 1 running + PENDING waiting
    assert len(done) == admitted and len(busy) == 30 - admitted, sorted(a.status for a in answers)
    assert all(a.body["type"] == "serverless_api" for a in done)
    assert all(a.body["error_code"] == "BUSY" and a.retry_after == "5" for a in busy)
    assert max(a.at for a in busy) < min(a.at for a in done), "refused at once, while the first job ran"
    assert prober.answers >= admitted and prober.slowest < 1.0, f"slowest probe {prober.slowest:.3f}s"
    metrics = scrape(server.url)
    assert value(metrics, "serverless_jobs_refused_busy_total") == 30 - admitted
    assert value(metrics, "serverless_jobs_ended_total", transport="sync", outcome="ok") == admitted
    assert value(metrics, "serverless_jobs_in_flight") == 0


def ready(server: App) -> requests.Response:
    return requests.get(server.url + "/api/serverless/ready", timeout=5)


def health(server: App) -> int:
    return requests.get(server.url + "/api/serverless/health", timeout=5).status_code


def test_ready_is_503_while_the_instance_is_full_or_draining_and_health_stays_200_while_full(own_emulator, start_app):
    set_step_delay(own_emulator, 0.1)
    server = start_app(own_emulator.url, MAX_PENDING_JOBS="0", DRAIN_TIMEOUT="30")
    assert ready(server).status_code == 200 and ready(server).json()["status"] == "ready"

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(post_run, server.url, txt2img(seed=1, steps=20, prefix="ready-full"), None, None, 60)
        full = wait_until(lambda: (r := ready(server)).status_code == 503 and r.json())  # a 503 Response is falsy
        assert "full" in full["reason"] and full["jobs"] == 1
        assert health(server) == 200  # alive, only not to be sent more work
        refused = post_run(server.url, empty_image(prefix="ready-refused"))
        assert refused.status_code == 503 and refused.json()["error_code"] == "BUSY"
        assert job.result().status_code == 200
    assert ready(server).status_code == 200

    assert requests.get(server.url + "/pre-stop", timeout=30).status_code == 200  # loopback: allowed
    draining = ready(server)
    assert draining.status_code == 503 and "draining" in draining.json()["reason"]
    assert value(scrape(server.url), "serverless_comfyui_up") == 1


def test_ready_is_503_when_comfyui_does_not_answer(start_app, dead_url):
    server = start_app(dead_url)
    response = ready(server)
    assert response.status_code == 503 and response.json()["reason"] == "ComfyUI does not answer"
    assert value(scrape(server.url), "serverless_comfyui_up") == 0


# -- JSON logs and OSS ------------------------------------------------------------------------------


@pytest.fixture
def oss_app(start_app_process: Callable[..., App], emulator: Emulator) -> Iterator[tuple[LocalOss, App, str]]:
    """JSON logs at DEBUG, and a local OSS of its own (its injected failures reach no other test).
    The app runs in its own process: its log is what the process itself writes."""
    bucket = f"ops-{uuid.uuid4().hex[:8]}"
    with local_oss_server(bucket) as oss:
        yield oss, start_app_process(emulator.url, LOG_FORMAT="json", LOG_LEVEL="DEBUG", **oss_env(oss, bucket)), bucket


def test_json_logs_are_one_object_a_line_naming_the_job_and_nothing_secret(oss_app, emulator):
    oss, server, _ = oss_app
    oss.fail_next(1, 503)  # one retried upload: its warning names the job too
    uploaded = post_run(server.url, empty_image(prefix="json-ok"), params=OSS_ON, headers={"x-fc-trace-id": "json-ok"})
    failed = post_run(server.url, failing_workflow(emulator.root), headers={"x-fc-trace-id": "json-fail"})
    assert uploaded.status_code == 200 and failed.status_code == 500
    signed_url = uploaded.json()["data"]["results"][0]["output"]["oss"]["url"]

    text = wait_until(lambda: (t := server.log_text()).count('"job end') >= 2 and t)
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line parses
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    assert any(entry["logger"].startswith("uvicorn") for entry in entries)  # uvicorn's lines too
    for task_id in ("json-ok", "json-fail"):
        about = [entry for entry in entries if task_id in entry["message"]]
        assert len(about) >= 2 and all(entry.get("task_id") == task_id for entry in about), about
        assert len({entry["prompt_id"] for entry in about}) == 1
    assert {e["prompt_id"] for e in entries if e.get("task_id") == "json-ok"} == {uploaded.json()["data"]["prompt_id"]}
    retried = [entry for entry in entries if "retrying" in entry["message"]]
    assert retried and all(entry["task_id"] == "json-ok" for entry in retried)
    assert_nothing_secret_in(text, signed_url)


def test_an_app_whose_stderr_nobody_reads_keeps_answering(emulator, tmp_path):
    """A log collector that stalls leaves stderr's pipe full (64 KiB): the app's lines wait in
    memory for it, and every caller is still answered. Then the pipe is read: the lines come, in
    order."""
    port = free_port()
    env = {**os.environ, **base_env(emulator.url, tmp_path / "status"), "LOG_LEVEL": "DEBUG"}
    args = [sys.executable, "-m", "uvicorn", "handler:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/api/serverless/health", proc)
        with requests.Session() as session:  # each request logs a line or more at DEBUG: >64 KiB in all
            for number in range(1500):
                answer = session.get(f"{url}/api/serverless/status?task_id=unread-{number}", timeout=30)
                assert answer.status_code == 200, answer.text
            result = session.post(url + RUN, json=empty_image(prefix="unread"), timeout=30)
            assert result.status_code == 200, result.text
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)  # read at last: everything logged comes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    asked = [int(m) for m in re.findall(r"task_id=unread-(\d+)", text)]
    assert len(text) > 64 * 1024 and asked and asked == sorted(asked), text[-2000:]
    assert "job end" in text and "dropped" not in text


def test_log_lines_past_the_queue_are_dropped_and_counted_in_the_next_line():
    """The writer thread's queue is bounded: past it, lines are dropped (memory stays bounded while
    stderr is not read), and the first line queued after says how many."""
    lines: queue.Queue[logging.LogRecord] = queue.Queue(2)
    handler = LineQueue(lines)
    record = lambda text: logging.makeLogRecord({"msg": text, "levelno": logging.INFO})  # noqa: E731
    for number in range(5):
        handler.handle(record(f"line {number}"))
    taken = [lines.get_nowait().getMessage() for _ in range(2)]
    handler.handle(record("line 5"))
    later = [lines.get_nowait().getMessage() for _ in range(2)]
    assert taken == ["line 0", "line 1"]
    assert later == ["3 log line(s) were dropped: stderr was not read", "line 5"]


def test_the_log_writer_gathers_lines_logged_together_into_one_write_in_order_and_writes_the_rest_when_stopped():
    """Lines logged close together (a job's, many jobs') wake the writer thread once and reach
    the stream in one write, in order; stopping the writer writes whatever is still queued."""

    class Stream:
        def __init__(self) -> None:
            self.writes: list[str] = []

        def write(self, text: str) -> None:
            self.writes.append(text)

        def flush(self) -> None:
            pass

    stream = Stream()
    target = logging.StreamHandler(stream)  # type: ignore[arg-type]
    target.setFormatter(logging.Formatter("%(message)s"))
    lines: queue.Queue[logging.LogRecord] = queue.Queue(100)
    handler = LineQueue(lines)
    writer = LineWriter(lines, target)
    writer.start()
    record = lambda text: logging.makeLogRecord({"msg": text, "levelno": logging.INFO})  # noqa: E731
    for number in range(20):
        handler.handle(record(f"line {number}"))
    wait_until(lambda: stream.writes)
    handler.handle(record("last"))
    writer.stop()
    assert "".join(stream.writes) == "".join(f"line {n}\n" for n in range(20)) + "last\n"
    assert len(stream.writes) < 21  # gathered: not one write a line


def test_oss_uploads_bytes_retries_and_failures_are_counted(start_app, emulator):
    """An app in-process: its metrics are its own, its log is not read."""
    bucket = f"ops-{uuid.uuid4().hex[:8]}"
    with local_oss_server(bucket) as oss:
        server = start_app(emulator.url, **oss_env(oss, bucket))
        oss_metrics_are_counted(oss, server, bucket)


def oss_metrics_are_counted(oss: LocalOss, server: Any, bucket: str) -> None:
    oss.fail_next(1, 503)
    response = post_run(server.url, empty_image(batch=2, prefix="oss-m"), params=OSS_ON)
    assert response.status_code == 200
    objects = [result["output"]["oss"]["object"] for result in response.json()["data"]["results"]]
    metrics = scrape(server.url)
    assert value(metrics, "serverless_oss_uploads_total") == 2
    assert value(metrics, "serverless_oss_retries_total") == 1
    uploaded = sum(len(oss.get_object(bucket, key)[0]) for key in objects)
    assert uploaded > 0 and value(metrics, "serverless_oss_upload_bytes_total") == uploaded

    oss.fail_next(3, 503)  # every attempt of one upload
    response = post_run(server.url, empty_image(prefix="oss-fail"), params=OSS_ON)
    assert response.status_code == 500 and response.json()["error_code"] == "OUTPUT_ERROR"
    metrics = scrape(server.url)
    assert value(metrics, "serverless_oss_upload_failures_total") == 1
    assert value(metrics, "serverless_oss_retries_total") == 3
    assert value(metrics, "serverless_jobs_ended_total", transport="sync", outcome="OUTPUT_ERROR") == 1


# -- pure ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "source", "reason"),
    [
        (DownloadError("blocked address 127.0.0.1"), "url", "blocked_address"),
        (DownloadError("host images.internal resolves to blocked address 10.0.0.7"), "url", "blocked_address"),
        (DownloadError("larger than 100 bytes (Content-Length 200)"), "url", "too_large"),
        (DownloadError("timed out after 10s connecting"), "url", "timeout"),
        (DownloadError("HTTP 404"), "url", "http_status"),
        (DownloadError("unsupported URL scheme 'file' (only http and https)"), "url", "scheme"),
        (DownloadError("cannot connect (Connection refused)"), "url", "connection"),
        (DownloadError("something new"), "url", "other"),
        (InputError("oss://b/k is too large (9 bytes): the limit is 1 bytes"), "oss", "too_large"),
        (InputError("oss://b/k not found"), "oss", "not_found"),
        (InputError("oss://b/k access denied: AccessDenied (HTTP 403)"), "oss", "denied"),
    ],
)
def test_an_input_refusal_is_labelled_with_one_of_a_fixed_set_of_reasons(error, source, reason):
    assert refusal_reason(error, source) == reason
    assert reason in REASONS


def test_admission_and_metrics_settings_are_read_checked_and_the_token_kept_out_of_repr():
    settings = Settings.from_env({"MAX_PENDING_JOBS": "0", "METRICS_TOKEN": "token-never-shown"})
    assert settings.service.max_pending_jobs == 0 and settings.security.metrics_token == "token-never-shown"
    assert "token-never-shown" not in repr(settings)
    assert Settings.from_env({}).service.max_pending_jobs == 256
    for bad in ("-1", "2.5", "many"):
        with pytest.raises(SettingsError, match=f"^MAX_PENDING_JOBS={bad!r}: "):
            Settings.from_env({"MAX_PENDING_JOBS": bad})
