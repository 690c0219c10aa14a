"""The instance lifecycle, end to end, as FC runs it: `bootstrap` serves the app on a free port and
the app starts ComfyUI (the emulator, through `COMFYUI_CMD`) as its supervised child. Real
processes on loopback; ComfyUI is killed with SIGKILL, the app is stopped with SIGTERM. What needs
no signal runs in this interpreter: /pre-stop against an in-process app and ComfyUI, and the server's
main refusing a taken ComfyUI port (it stops before anything is set up), and the cut of a job longer
than DRAIN_TIMEOUT through the server's own SIGTERM handler."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from prometheus_client.parser import text_string_to_metric_families

from serverless import server as server_main
from tests.helpers import post_run, running_prompt, txt2img, wait_until
from tests.servers import EMULATOR_MODULE, ROOT, InProcessApp, InProcessEmulator, Process, free_port

pytestmark = pytest.mark.timeout(60)

B64 = {"output_base64": "true"}


class Instance(Process):
    """`bootstrap` with ComfyUI (the emulator, its own folders under `root`) as a supervised child."""

    def __init__(
        self,
        tmp: Path,
        step_delay: float = 0.02,
        ready_path: str = "/api/serverless/health",
        comfyui_port: int = 0,
        before_comfyui: str = "",
        **env: str,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.root = tmp / "comfyui"
        self.status_dir = tmp / "status"
        self.comfyui_url = f"http://127.0.0.1:{comfyui_port or free_port()}"
        comfyui = shlex.join(
            [
                sys.executable,
                "-m",
                EMULATOR_MODULE,
                "--host",
                "127.0.0.1",
                "--port",
                self.comfyui_url.rsplit(":", 1)[1],
                "--root",
                str(self.root),
                "--step-delay",
                str(step_delay),
            ]
        )
        if before_comfyui:  # a shell command run by the child before it execs ComfyUI
            comfyui = shlex.join(["sh", "-c", f"{before_comfyui}; exec {comfyui}"])
        port = free_port()
        settings = {
            "COMFYUI_URL": self.comfyui_url,
            "COMFYUI_CMD": comfyui,
            "FC_CUSTOM_LISTEN_PORT": str(port),
            "STATUS_DIR": str(self.status_dir),
            "FC_INSTANCE_ID": "life-1",
            "PYTHON": sys.executable,  # bootstrap's interpreter: the one under test
            **env,
        }
        super().__init__([str(ROOT / "bootstrap")], port, tmp / f"app-{port}.log", env=settings, ready_path=ready_path)

    def comfyui_pids(self) -> list[int]:
        """Processes running this instance's ComfyUI (found by its unique --root)."""
        return emulator_pids(self.root)

    def health(self) -> int:
        return requests.get(self.url + "/api/serverless/health", timeout=5).status_code

    def history_count(self) -> int:
        return len(requests.get(self.comfyui_url + "/history", timeout=5).json())


def emulator_pids(root: Path) -> list[int]:
    """Live processes running an emulator with this --root (a zombie has no command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if EMULATOR_MODULE.encode() in args and str(root).encode() in args:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Callable[..., Instance]]:
    """Start instances: `instance(step_delay=..., **env)`; each is stopped after the test."""
    started: list[Instance] = []

    def start(**kwargs: Any) -> Instance:
        server = Instance(tmp_path / f"instance-{len(started)}", **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        for pid in server.comfyui_pids():  # never leave a ComfyUI behind, even if a test failed
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    """One instance for the tests that leave it serving (a ComfyUI killed under it is restarted)."""
    server = Instance(tmp_path_factory.mktemp("serving"), step_delay=0.1)
    yield server
    server.stop()
    for pid in server.comfyui_pids():
        os.kill(pid, signal.SIGKILL)


class Call(threading.Thread):
    """A call made in the background; `.response` and `.ended` (monotonic) once it returned."""

    def __init__(self, make: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.make = make
        self.response: Any = None
        self.ended = 0.0
        self.start()

    def run(self) -> None:
        self.response = self.make()
        self.ended = time.monotonic()

    def result(self, timeout: float = 30) -> Any:
        self.join(timeout)
        assert self.response is not None, "the call did not return in time"
        return self.response


def status_log(instance: Instance, task_id: str) -> list[dict[str, Any]]:
    path = instance.status_dir / task_id
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_bootstrap_serves_a_run_and_logs_comfyui_output_with_a_prefix_and_no_secrets(serving):
    server = serving
    assert len(server.comfyui_pids()) == 1
    secrets = {
        "x-fc-access-key-id": "LTAI-KEY-ID-1",
        "x-fc-access-key-secret": "KEY-SECRET-2",
        "x-fc-security-token": "STS-TOKEN-3",
    }

    response = post_run(server.url, txt2img(steps=3), params=B64, headers={"x-fc-trace-id": "t-1", **secrets})

    assert response.status_code == 200, response.text
    assert response.json()["type"] == "serverless_api"
    prompt_id = response.json()["data"]["prompt_id"]
    executed = re.compile(r"^\S+ \S+ INFO comfyui: .*Prompt executed", re.MULTILINE)
    ended = re.compile(rf"job end task_id=t-1 prompt_id={prompt_id} outcome=ok duration=[\d.]+s")
    # A thread writes the log lines: they are waited for, not read the moment the answer is in.
    log = wait_until(lambda: executed.search(t := server.log_text()) and ended.search(t) and t, timeout=20)
    assert not [secret for secret in secrets.values() if secret in log]


def comfyui_metrics(server: Instance) -> dict[str, float]:
    """The supervised ComfyUI's series of GET /metrics: up (1 or 0) and restarts_total."""
    text = requests.get(server.url + "/metrics", timeout=5).text
    return {
        sample.name.removeprefix("serverless_comfyui_"): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in ("serverless_comfyui_up", "serverless_comfyui_restarts_total")
    }


def test_comfyui_killed_mid_job_fails_the_job_at_once_then_restarts_counted_and_serves(serving):
    server = serving
    [first_pid] = server.comfyui_pids()
    assert comfyui_metrics(server) == {"up": 1, "restarts_total": 0}
    job = Call(lambda: post_run(server.url, txt2img(steps=200), params=B64))  # 20 s if left alone
    wait_until(lambda: running_prompt(server.comfyui_url), timeout=10)

    killed = time.monotonic()
    os.kill(first_pid, signal.SIGKILL)
    response = job.result(timeout=10)
    kill_to_error = job.ended - killed

    print(f"\nComfyUI SIGKILL -> COMFYUI_UNAVAILABLE response: {kill_to_error:.3f}s")
    assert response.status_code == 503
    assert response.json()["error_code"] == "COMFYUI_UNAVAILABLE"
    assert kill_to_error < 5.0
    assert server.health() == 503  # restarting (backoff, then start-up)
    wait_until(lambda: comfyui_metrics(server)["restarts_total"] == 1)

    # A job arriving during the restart waits for ComfyUI instead of failing.
    during_restart = post_run(server.url, txt2img(steps=3), params=B64)
    assert during_restart.status_code == 200, during_restart.text
    assert server.health() == 200
    [second_pid] = server.comfyui_pids()
    assert second_pid != first_pid
    after = post_run(server.url, txt2img(steps=3), params=B64)
    assert after.status_code == 200, after.text
    assert comfyui_metrics(server) == {"up": 1, "restarts_total": 1}
    ended = re.compile(r"job end task_id=\S+ prompt_id=\S+ outcome=COMFYUI_UNAVAILABLE duration=")
    wait_until(lambda: "ComfyUI exited with -9" in (t := server.log_text()) and ended.search(t), timeout=20)


@pytest.mark.timeout(240)  # processes started one after another: slow on a loaded machine
def test_initialize_waits_for_a_starting_comfyui_runs_the_prewarm_once_and_comfyui_dies_with_a_killed_server(
    instance, tmp_path
):
    prewarm = tmp_path / "prewarm.json"
    prewarm.write_text(json.dumps(txt2img(steps=2, prefix="prewarm")))
    # ComfyUI is held at a gate until a second after /initialize is called; the app answers at
    # once (status needs no ComfyUI), however slowly a loaded machine starts either.
    gate = tmp_path / "comfyui-may-start"
    server = instance(
        before_comfyui=f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.05; done",
        PREWARM_PROMPT=str(prewarm),
        ready_path="/api/serverless/status?task_id=probe",
    )
    assert server.health() == 503
    early_job = Call(lambda: post_run(server.url, txt2img(steps=2), params=B64))

    opens = threading.Timer(1.0, gate.touch)
    started = time.monotonic()
    opens.start()
    first = requests.post(server.url + "/initialize", timeout=120)
    waited = time.monotonic() - started

    assert first.status_code == 200, first.text
    assert first.json()["prewarm"]["outcome"] == "ok"
    assert waited > 0.5  # it waited for ComfyUI to answer (held 1 s)
    assert server.health() == 200
    assert early_job.result().status_code == 200  # jobs arriving meanwhile waited too
    runs = server.history_count()
    assert runs == 2  # the prewarm and the early job

    second = requests.post(server.url + "/initialize", timeout=30)

    assert second.status_code == 200
    assert second.json()["prewarm"] == first.json()["prewarm"]
    assert server.history_count() == runs  # not run again
    assert wait_until(lambda: server.log_text().count("prewarm finished"), timeout=20) == 1

    # SIGKILLed, the server runs no shutdown of its own: its ComfyUI goes with it all the same.
    assert len(server.comfyui_pids()) == 1
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    wait_until(lambda: server.comfyui_pids() == [], timeout=10)


def test_pre_stop_answers_after_the_running_job_ended_and_takes_no_new_jobs(
    own_emulator: InProcessEmulator, start_app: Callable[..., InProcessApp], tmp_path: Path
) -> None:
    """FC's GET /pre-stop is a request, not a signal: the app and its ComfyUI in-process."""
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.1}, timeout=5)
    server = start_app(own_emulator.url)
    job = Call(lambda: post_run(server.url, txt2img(steps=30), params=B64, headers={"x-fc-trace-id": "draining-job"}))
    wait_until(lambda: running_prompt(own_emulator.url), timeout=10)

    asked = time.monotonic()
    pre_stop = requests.get(server.url + "/pre-stop", timeout=30)
    answered = time.monotonic()

    assert pre_stop.status_code == 200, pre_stop.text
    assert pre_stop.json()["jobs"] == 0
    # When pre-stop answered, the job had ended: its terminal payload was already on disk.
    logged = [json.loads(line) for line in (tmp_path / "status" / "draining-job").read_text().splitlines()]
    assert logged[-1]["type"] == "serverless_api"
    response = job.result()
    assert response.status_code == 200, response.text
    assert answered >= job.ended - 0.2  # the job's answer and pre-stop's go out together
    assert answered - asked > 1.0  # it really waited (the job had ~3 s left)
    refused = post_run(server.url, txt2img(steps=2))
    assert refused.status_code == 503
    assert refused.json()["error_code"] == "UNAVAILABLE"


def test_sigterm_lets_running_jobs_finish_on_every_transport_refuses_new_ones_exits_0_and_stops_comfyui(instance):
    """A sync call, an SSE stream and a websocket, all three running or queued when SIGTERM comes."""
    server = instance(step_delay=0.1)

    def stream() -> list[str]:
        with requests.post(
            server.url + "/api/serverless/run",
            params={"stream": "true", **B64},
            data=json.dumps(txt2img(steps=20)),
            stream=True,
            timeout=30,
        ) as response:
            lines = response.iter_lines()
            return [json.loads(line[5:])["type"] for line in lines if line.startswith(b"data:")]

    def websocket_messages() -> list[str]:
        ws = websocket.create_connection(server.url.replace("http", "ws") + "/api/serverless/ws", timeout=30)
        ws.send(json.dumps(txt2img(steps=20)))
        types = []
        while not types or types[-1] not in ("serverless_api", "error"):
            types.append(json.loads(ws.recv())["type"])
        ws.close()
        return types

    job, sse, ws = (
        Call(lambda: post_run(server.url, txt2img(steps=20), params=B64)),
        Call(stream),
        Call(websocket_messages),
    )
    wait_until(lambda: len(requests.get(server.comfyui_url + "/queue", timeout=5).json()["queue_pending"]) == 2)

    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "SIGTERM: draining jobs" in server.log_text(), timeout=5)
    refused = post_run(server.url, txt2img(steps=2))
    status = requests.get(server.url + "/api/serverless/status", params={"task_id": "nothing"}, timeout=5)
    code = server.proc.wait(30)

    assert refused.status_code == 503 and refused.json()["error_code"] == "UNAVAILABLE"
    assert status.status_code == 200  # the instance still answers while it drains
    response = job.result()
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "serverless_api"
    assert sse.result()[-1] == "serverless_api"
    assert ws.result()[-1] == "serverless_api"
    assert code == 0, server.log_text()[-3000:]
    assert server.comfyui_pids() == []
    assert "stopping ComfyUI" in server.log_text()
    warnings = [line for line in server.log_text().splitlines() if "WARNING" in line or "ERROR" in line]
    assert warnings == [], warnings  # a normal shutdown (its ComfyUI stopped first, then the socket) warns of nothing


def test_sigterm_cuts_a_job_longer_than_drain_timeout_with_a_terminal_payload(
    own_emulator: InProcessEmulator, start_app: Callable[..., InProcessApp], tmp_path: Path
) -> None:
    """In-process: the server's own SIGTERM handler (the test above sends the real signal)."""
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.1}, timeout=5)
    server = start_app(own_emulator.url, DRAIN_TIMEOUT="1")
    job = Call(
        lambda: post_run(
            server.url,
            txt2img(steps=300),
            params=B64,  # 30 s if left alone
            headers={"x-fc-trace-id": "cut-job"},
        )
    )
    wait_until(lambda: running_prompt(own_emulator.url), timeout=10)

    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    code = server.wait(30)
    exited = time.monotonic() - signalled

    response = job.result()
    print(
        f"\nSIGTERM with DRAIN_TIMEOUT=1 -> job answered after {job.ended - signalled:.2f}s, exit after {exited:.2f}s"
    )
    assert response.status_code == 500
    assert response.json()["error_code"] == "EXECUTION_INTERRUPTED"
    logged = [json.loads(line) for line in (tmp_path / "status" / "cut-job").read_text().splitlines()]
    assert logged[-1]["error_code"] == "EXECUTION_INTERRUPTED"
    assert 1.0 <= job.ended - signalled < 8.0
    assert code == 0, server.log_text()[-3000:]


def server_until_exit(tmp: Path, comfyui_port: int, monkeypatch: pytest.MonkeyPatch) -> tuple[object, str]:
    """`python -m serverless.server` (what `bootstrap` execs) with the emulator as ComfyUI on
    `comfyui_port`, its main run in this interpreter until it exits by itself (a taken port stops
    it before its logging, app or ComfyUI is set up): its exit status and what it wrote to stderr."""
    comfyui = [sys.executable, "-m", "comfyui_emulator", "--port", str(comfyui_port), "--root", str(tmp / "ours")]
    monkeypatch.setattr(server_main, "bound_malloc_arenas", lambda: False)  # this process's malloc is left alone
    for name, value in {
        "COMFYUI_URL": f"http://127.0.0.1:{comfyui_port}",
        "COMFYUI_CMD": shlex.join(comfyui),
        "FC_CUSTOM_LISTEN_PORT": str(free_port()),
        "STATUS_DIR": str(tmp / "status"),
    }.items():
        monkeypatch.setenv(name, value)
    stderr = io.StringIO()
    with redirect_stderr(stderr), pytest.raises(SystemExit) as exited:
        server_main.main()
    return exited.value.code, stderr.getvalue()


def test_the_app_refuses_to_start_when_a_plain_listener_holds_comfyuis_port(tmp_path, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        code, stderr = server_until_exit(tmp_path, port, monkeypatch)

    assert code == 3, stderr[-3000:]
    assert f"port {port} on 127.0.0.1 (COMFYUI_URL) is already taken by another process" in stderr
    assert "starting ComfyUI" not in stderr and "ComfyUI is ready" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert emulator_pids(tmp_path / "ours") == []


def test_the_app_refuses_to_start_when_another_comfyui_answers_on_its_port(tmp_path, monkeypatch):
    other = InProcessEmulator(tmp_path / "other")
    try:
        code, stderr = server_until_exit(tmp_path, other.port, monkeypatch)
        history = requests.get(other.url + "/history", timeout=5).json()
    finally:
        other.stop()

    assert code == 3, stderr[-3000:]
    assert f"port {other.port} on 127.0.0.1 (COMFYUI_URL) is already taken by another process" in stderr
    assert "ComfyUI is ready" not in stderr
    assert history == {}
    assert emulator_pids(tmp_path / "ours") == []


@pytest.mark.timeout(240)  # processes started one after another: slow on a loaded machine
def test_a_comfyui_that_took_the_port_while_ours_started_is_never_taken_for_ours(instance, tmp_path):
    port, other_root = free_port(), tmp_path / "other"
    other = shlex.join([sys.executable, "-m", "comfyui_emulator", "--port", str(port), "--root", str(other_root)])
    answers = shlex.join(
        [
            sys.executable,
            "-c",
            "import sys, time, urllib.request\nwhile True:\n try:\n"
            f"  urllib.request.urlopen('http://127.0.0.1:{port}/system_stats'); sys.exit()\n"
            " except OSError: time.sleep(0.05)",
        ]
    )
    # Our child starts another ComfyUI outside its process group, waits until that one answers,
    # then execs our ComfyUI, which cannot listen and exits.
    try:
        server = instance(
            comfyui_port=port,
            before_comfyui=f"setsid {other} >/dev/null 2>&1 & {answers}",
            ready_path="/api/serverless/status?task_id=probe",
            COMFYUI_STARTUP_TIMEOUT="1",
        )
        # three Pythons start one after another here (a loaded machine: tens of seconds)
        wait_until(lambda: "not starting ComfyUI" in server.log_text(), timeout=120)
        health = requests.get(server.url + "/api/serverless/health", timeout=5)
        job = post_run(server.url, txt2img(steps=2), params=B64)
        history = requests.get(f"http://127.0.0.1:{port}/history", timeout=5).json()
    finally:
        for pid in emulator_pids(other_root):
            os.kill(pid, signal.SIGKILL)

    log = server.log_text()
    assert "ComfyUI is ready" not in log
    assert "but not from the ComfyUI we started" in log
    assert re.search(r"ComfyUI exited with 1 before it was ready", log)
    assert health.status_code == 503
    assert f"port {port} on 127.0.0.1 (COMFYUI_URL) is already taken" in health.json()["reason"]
    assert job.status_code == 503 and job.json()["error_code"] == "COMFYUI_UNAVAILABLE"
    assert history == {}  # nothing ran on the other ComfyUI


def test_a_second_sigint_cancels_the_running_stream_with_its_terminal_payload_and_exits_130(instance):
    server = instance(step_delay=0.5)  # 50 s for the job below if left alone

    def stream() -> list[dict[str, Any]]:
        with requests.post(
            server.url + "/api/serverless/run",
            params={"stream": "true", **B64},
            headers={"x-fc-trace-id": "ctrl-c"},
            data=json.dumps(txt2img(steps=100)),
            stream=True,
            timeout=30,
        ) as response:
            return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]

    sse = Call(stream)
    wait_until(lambda: running_prompt(server.comfyui_url), timeout=10)

    server.proc.send_signal(signal.SIGINT)
    wait_until(
        lambda: "SIGINT: draining jobs (1 running, up to 600s); press Ctrl-C again" in server.log_text(), timeout=5
    )
    server.proc.send_signal(signal.SIGINT)
    code = server.proc.wait(30)

    events = sse.result()
    log = server.log_text()
    assert events[-1]["error_code"] == "EXECUTION_INTERRUPTED", events[-1]
    assert status_log(server, "ctrl-c")[-1] == events[-1]
    assert code == 130, log[-3000:]
    assert "Traceback" not in log
    assert "SIGINT again: cancelling 1 running job(s)" in log
    assert server.comfyui_pids() == []
