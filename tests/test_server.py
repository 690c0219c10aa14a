"""`python -m serverless.server` as run by `bootstrap`: where it listens (HOST, FC_CUSTOM_LISTEN_PORT)
and its access log (LOG_LEVEL=debug). Real processes; the listening socket is read from /proc/net/tcp."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers import wait_until
from tests.servers import InProcessEmulator, Process, free_port

pytestmark = pytest.mark.timeout(60)

STATUS = "/api/serverless/status?task_id=probe"
STOP_WAIT = 15.0


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses (dotted) on which a socket listens on TCP `port`."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            addresses.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return addresses


def start_server(tmp_path: Path, **env: str) -> Process:
    """`python -m serverless.server` with some settings (no ComfyUI unless given: status still answers)."""
    port = free_port()
    settings = {
        "FC_CUSTOM_LISTEN_PORT": str(port),
        "STATUS_DIR": str(tmp_path / "status"),
        "COMFYUI_URL": f"http://127.0.0.1:{free_port()}",
        **env,
    }
    return Process(
        [sys.executable, "-m", "serverless.server"],
        port,
        tmp_path / f"server-{port}.log",
        env=settings,
        ready_path=STATUS,
    )


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, emulator: InProcessEmulator) -> Iterator[dict[str, Process]]:
    """Three server processes shared by the module's tests, each with the settings its tests look
    at and nothing else that they read: the defaults (and the emulator as ComfyUI), FC's, and
    HOST=0.0.0.0 with LOG_LEVEL=debug (an access log)."""
    root = tmp_path_factory.mktemp("servers")
    settings = {
        "default": {"COMFYUI_URL": emulator.url},
        "fc": {"FC_FUNCTION_NAME": "comfyui"},
        "host_and_access_log": {"HOST": "0.0.0.0", "LOG_LEVEL": "debug"},
    }
    with ThreadPoolExecutor(len(settings)) as pool:  # started together: each start-up's wait overlaps
        starting = {name: pool.submit(start_server, root, **env) for name, env in settings.items()}
    started = {name: future.result() for name, future in starting.items() if future.exception() is None}
    try:
        for future in starting.values():
            future.result()  # a server that failed to start fails the tests (the others are stopped)
        yield started
    finally:
        for process in started.values():  # stopped together too: each drain's wait overlaps
            process.proc.terminate()
        for process in started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.proc.wait(STOP_WAIT)
            process.stop()  # closes its log; kills it if it has not exited by now


def test_the_server_listens_on_loopback_by_default(servers):
    assert listening_addresses(servers["default"].port) == {"127.0.0.1"}


def test_on_fc_the_server_listens_on_all_addresses(servers):
    assert listening_addresses(servers["fc"].port) == {"0.0.0.0"}


def test_host_chooses_the_listening_address(servers):
    assert listening_addresses(servers["host_and_access_log"].port) == {"0.0.0.0"}


def test_access_log_true_logs_a_line_per_request_and_the_default_logs_none(servers):
    quiet, chatty = servers["default"], servers["host_and_access_log"]

    for process in (quiet, chatty):
        for n in range(3):
            assert requests.get(f"{process.url}/api/serverless/status?task_id=req-{n}", timeout=5).ok

    # uvicorn logs an access line before the response goes out; a thread writes it out soon after
    def access_lines() -> list[str]:
        return [line for line in chatty.log_text().splitlines() if "GET /api/serverless/status?task_id=req-" in line]

    lines = wait_until(lambda: len(access_lines()) == 3 and access_lines(), timeout=20)
    assert all(" uvicorn.access: " in line and '" 200' in line for line in lines)
    assert "task_id=req-" not in quiet.log_text()


def test_the_server_takes_a_websocket_run_body_as_big_as_an_http_one(servers):
    import json

    import websocket  # websocket-client

    process = servers["default"]
    text = "iVBORw0KGgoAAAANSUhEUg" * (20 * 1024 * 1024 // 22 + 1)  # 20 MiB: past uvicorn's 16 MiB default
    body = json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {"t": text}}})
    ws = websocket.create_connection(process.url.replace("http://", "ws://") + "/api/serverless/ws", timeout=30)
    ws.send(body)
    while (answer := json.loads(ws.recv()))["type"] not in ("serverless_api", "error"):
        pass
    ws.close()
    assert answer["type"] == "error" and answer["error_code"] == "PROMPT_ERROR"


def test_an_instance_without_a_bucket_never_loads_a_bucket_client(servers):
    """oss2 (with requests and pycryptodome) and obstore are a quarter of an idle instance's memory:
    only an instance with OSS or S3 configured loads them."""
    maps = Path(f"/proc/{servers['default'].proc.pid}/maps").read_text()
    assert "/Crypto/" not in maps and "/obstore/" not in maps  # their native libraries, mapped once loaded
