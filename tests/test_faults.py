"""ComfyUI failing in every way the emulator can fail, end to end: killed mid-job, its websocket
cut, /history slow or answering garbage, /view refusing an output, nothing listening at start.

Each job must end, within a generous bound (proof that nothing hangs, not a timing goal), in its
documented error or a recovered result; the caller and the status log (`GET
/api/serverless/status`, task id from `x-fc-trace-id`) end with the same, single terminal payload.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
import requests

from tests.helpers import RUN, empty_image, running_prompt, txt2img, wait_until
from tests.servers import App, Emulator, InProcessEmulator

pytestmark = pytest.mark.timeout(90)

BOUND = 30.0  # seconds: far above any legitimate duration here, far below a hang
STATUS = "/api/serverless/status"
TERMINAL = ("serverless_api", "error")
B64 = {"output_base64": "true"}


class Outcome:
    """One traced run: the HTTP status, every payload received (one for a JSON answer, the whole
    stream for SSE), and how long it took."""

    def __init__(self, status: int, payloads: list[dict[str, Any]], elapsed: float, streamed: bool) -> None:
        self.status = status
        self.payloads = payloads
        self.elapsed = elapsed
        self.streamed = streamed

    @property
    def terminal(self) -> dict[str, Any]:
        return self.payloads[-1]


def traced_run(server: App, body: Any, task_id: str, params: dict[str, str] | None = None) -> Outcome:
    """POST a run with `x-fc-trace-id: task_id`; a stream is read to its end."""
    params = dict(params or {})
    started = time.monotonic()
    response = requests.post(
        server.url + RUN,
        data=json.dumps(body),
        params=params,
        headers={"x-fc-trace-id": task_id},
        timeout=BOUND,
        stream=True,
    )
    streamed = response.headers.get("content-type", "").startswith("text/event-stream")
    if streamed:
        payloads = [
            json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")
        ]
    else:
        payloads = [response.json()]
    return Outcome(response.status_code, payloads, time.monotonic() - started, streamed)


def in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(outcome=call()), daemon=True)
    thread.start()
    return thread, box


def status_log(server: App, task_id: str) -> list[dict[str, Any]]:
    response = requests.get(server.url + STATUS, params={"task_id": task_id}, timeout=10)
    assert response.status_code == 200
    return list(response.json())


def assert_ends_once(payloads: list[dict[str, Any]], terminal: dict[str, Any]) -> None:
    """The sequence ends with `terminal`, and nothing before it was terminal."""
    assert payloads[-1] == terminal
    assert [p.get("type") for p in payloads[:-1] if p.get("type") in TERMINAL] == []


def assert_logged(server: App, task_id: str, outcome: Outcome) -> None:
    """The status log ends with the caller's terminal payload (and, for a stream, holds the same
    payloads the caller received). A JSON answer is only sent once its payload is logged; a stream's
    terminal event may reach its reader a moment before the log has it, so that is waited for."""
    if outcome.streamed:
        wait_until(lambda: (status_log(server, task_id) or [{}])[-1].get("type") in TERMINAL, timeout=10)
    items = status_log(server, task_id)
    assert_ends_once(items, outcome.terminal)
    if outcome.streamed:
        assert items == outcome.payloads


def assert_error(outcome: Outcome, code: str, http_status: int) -> None:
    terminal = outcome.terminal
    assert terminal["type"] == "error", terminal
    assert terminal["error_code"] == code, terminal
    assert terminal["error_message"]
    assert outcome.status == (200 if outcome.streamed else http_status)
    assert_ends_once(outcome.payloads, terminal)
    assert outcome.elapsed < BOUND


def assert_result(outcome: Outcome, results: int = 1) -> dict[str, Any]:
    terminal = outcome.terminal
    assert outcome.status == 200, terminal
    assert terminal["type"] == "serverless_api", terminal
    assert len(terminal["data"]["results"]) == results
    assert_ends_once(outcome.payloads, terminal)
    assert outcome.elapsed < BOUND
    return dict(terminal["data"])


def new_task(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


def configure(emulator: Emulator, **knobs: float) -> None:
    requests.post(emulator.url + "/emulator/config", json=knobs, timeout=5).raise_for_status()


def wait_for_pending(emulator: Emulator) -> None:
    """Until a second prompt waits in ComfyUI's queue behind the running one."""
    wait_until(lambda: requests.get(emulator.url + "/queue", timeout=5).json()["queue_pending"], timeout=BOUND)


def wait_for_log(server: App, task_id: str, kind: str) -> None:
    """Until the task's log holds a payload of type `kind` (the job is that far)."""
    wait_until(lambda: any(item.get("type") == kind for item in status_log(server, task_id)), timeout=BOUND)


def greetings_logged(server: App, task_id: str) -> int:
    """ComfyUI's greetings (a `status` with the socket's `sid`) in a streamed task's log: one for
    each websocket the job has been on."""
    return sum(
        1 for item in status_log(server, task_id) if item.get("type") == "status" and "sid" in (item.get("data") or {})
    )


# -- ComfyUI dies -----------------------------------------------------------------------------------


def test_comfyui_killed_mid_job_ends_running_and_queued_jobs_unavailable(own_emulator, start_app, tmp_path):
    configure(own_emulator, step_delay=0.05)
    server = start_app(own_emulator.url, COMFYUI_STARTUP_TIMEOUT="2")
    running, queued = new_task("killed-running"), new_task("killed-queued")
    first, first_box = in_thread(lambda: traced_run(server, txt2img(seed=1, steps=400), running))
    wait_until(lambda: running_prompt(own_emulator.url))
    second, second_box = in_thread(lambda: traced_run(server, txt2img(seed=2, steps=400), queued, {"stream": "1"}))
    wait_for_log(server, running, "progress")
    wait_for_pending(own_emulator)

    own_emulator.kill()
    first.join(BOUND)
    second.join(BOUND)

    for task_id, box in ((running, first_box), (queued, second_box)):
        outcome = box["outcome"]
        assert_error(outcome, "COMFYUI_UNAVAILABLE", 503)
        assert_logged(server, task_id, outcome)

    # ComfyUI back on the same address: the instance serves again, nothing to restart.
    revived = InProcessEmulator(tmp_path / "revived", own_emulator.port, step_delay=0)
    try:
        assert_result(traced_run(server, empty_image(prefix="revived"), new_task("revived"), B64))
    finally:
        revived.stop()


def test_nothing_listening_at_start_is_unavailable_then_serves_once_comfyui_is_up(start_app, dead_url, tmp_path):
    server = start_app(dead_url)
    for params in ({}, {"stream": "true"}):
        task_id = new_task("refused")
        outcome = traced_run(server, empty_image(prefix="refused"), task_id, params)
        assert_error(outcome, "COMFYUI_UNAVAILABLE", 503)
        assert_logged(server, task_id, outcome)

    late = InProcessEmulator(tmp_path / "late", int(dead_url.rsplit(":", 1)[1]), step_delay=0)
    try:
        wait_until(lambda: requests.get(server.url + "/api/serverless/health", timeout=5).status_code == 200)
        task_id = new_task("late")
        outcome = traced_run(server, empty_image(prefix="late"), task_id, B64)
        assert_result(outcome)
        assert_logged(server, task_id, outcome)
    finally:
        late.stop()


# -- ComfyUI's websocket breaks ---------------------------------------------------------------------


def test_websocket_cut_twice_recovers_running_and_queued_jobs_and_logs_their_results(own_emulator, start_app):
    configure(own_emulator, step_delay=0.02)
    server = start_app(own_emulator.url)
    running, queued = new_task("cut-running"), new_task("cut-queued")
    stream = {"stream": "1", **B64}
    first, first_box = in_thread(lambda: traced_run(server, txt2img(seed=3, steps=100), running, stream))
    wait_until(lambda: running_prompt(own_emulator.url))
    second, second_box = in_thread(lambda: traced_run(server, empty_image(prefix="cut-queued"), queued, B64))
    wait_for_log(server, running, "progress")
    wait_for_pending(own_emulator)

    for cut in range(2):
        # Cut only once the job is on a socket again: its log holds one greeting per socket.
        wait_until(lambda c=cut: greetings_logged(server, running) > c, timeout=BOUND)
        dropped = requests.post(own_emulator.url + "/emulator/drop_websockets", timeout=5).json()["dropped"]
        assert dropped >= 1
    first.join(BOUND)
    second.join(BOUND)

    stream, sync = first_box["outcome"], second_box["outcome"]
    assert_result(stream)
    assert_result(sync)
    assert_logged(server, running, stream)
    assert_logged(server, queued, sync)
    # The stream went on after the cuts: it holds every step's progress up to the last one.
    steps = [p["data"]["value"] for p in stream.payloads if p.get("type") == "progress"]
    assert steps and steps[-1] == 100
    assert server.log_text().count("websocket lost") >= 2


# -- /history misbehaves ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("history_delay", "request_timeout"), [(1.0, "60"), (3.0, "0.5")], ids=["slow", "slower-than-the-request-timeout"]
)
def test_slow_history_still_gives_the_result(own_emulator, start_app, history_delay, request_timeout, monkeypatch):
    monkeypatch.setattr("serverless.comfyui.client.REQUEST_TIMEOUT", float(request_timeout))
    # Beyond the request timeout the outputs come from the `executed` messages instead.
    configure(own_emulator, step_delay=0, history_delay=history_delay)
    server = start_app(own_emulator.url)
    task_id = new_task("slow-history")
    outcome = traced_run(server, empty_image(width=8, height=6, prefix="slowhist"), task_id, B64)
    (result,) = assert_result(outcome)["results"]
    assert result["output"]["raw"]["filename"].startswith("slowhist_test-1_")
    assert result["output"]["bytes"] > 0 and result["output"]["base64"]["content"]
    assert_logged(server, task_id, outcome)


def test_garbage_history_does_not_matter_when_the_websocket_delivered_every_message(own_emulator, start_app):
    # ComfyUI sends `executed` for every output node (cached ones too) and builds the history
    # entry from the same outputs: a job that saw all its messages never reads /history.
    configure(own_emulator, step_delay=0, history_garbage=1)
    server = start_app(own_emulator.url)
    task_id = new_task("garbage-history")
    outcome = traced_run(server, empty_image(prefix="garbage", batch=2), task_id, {"stream": "1", **B64})
    data = assert_result(outcome, results=2)
    assert [r["batch_id"] for r in data["results"]] == [0, 1]
    assert_logged(server, task_id, outcome)
    assert "no history for" not in server.log_text()


def test_garbage_history_while_the_websocket_is_cut_still_recovers_the_running_job(own_emulator, start_app):
    # Both faults at once: history cannot tell whether the job ended, but the queue says it runs,
    # so the job is followed on the new socket and its outputs come from `executed` messages.
    configure(own_emulator, step_delay=0.02, history_garbage=1)
    server = start_app(own_emulator.url)
    task_id = new_task("garbage-cut")
    thread, box = in_thread(lambda: traced_run(server, txt2img(seed=4, steps=40), task_id, B64))
    wait_for_log(server, task_id, "progress")
    requests.post(own_emulator.url + "/emulator/drop_websockets", timeout=5)
    thread.join(BOUND)
    outcome = box["outcome"]
    assert_result(outcome)
    assert_logged(server, task_id, outcome)


# -- /view refuses an output ------------------------------------------------------------------------


@pytest.mark.parametrize("params", [B64, {}, {"stream": "1", **B64}], ids=["base64", "no-base64", "stream"])
def test_output_that_cannot_be_read_is_output_error_with_the_results_so_far(own_emulator, start_app, params):
    configure(own_emulator, step_delay=0, view_status=404)
    server = start_app(own_emulator.url)
    task_id = new_task("view-404")
    outcome = traced_run(server, empty_image(prefix="view404"), task_id, params)
    assert_error(outcome, "OUTPUT_ERROR", 500)
    assert outcome.terminal["raw"] == {"results": []}
    assert "404" in outcome.terminal["error_message"]
    assert_logged(server, task_id, outcome)


def test_output_error_leaves_the_instance_serving(own_emulator, start_app):
    configure(own_emulator, step_delay=0, view_status=500)
    server = start_app(own_emulator.url)
    assert_error(traced_run(server, empty_image(prefix="v500"), new_task("v500"), B64), "OUTPUT_ERROR", 500)
    configure(own_emulator, view_status=0)
    assert_result(traced_run(server, empty_image(prefix="v200"), new_task("v200"), B64))
    health = requests.get(server.url + "/api/serverless/health", timeout=10).json()
    assert health["status"] == "ok" and health["jobs"] == 0
