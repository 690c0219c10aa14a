"""What a new user meets first: `make serve` and `./bootstrap` when a port is taken (one line
naming the setting that moves it, no traceback), `PORT=` for `make serve`, and the emulator mode's
download links working without configuring a secret. Real processes."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from serverless import server
from tests.helpers import empty_image, post_run, txt2img, wait_until
from tests.servers import ROOT, Process, free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on (a ComfyUI of the user's, an earlier server)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


def until_exit(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    settings = {**os.environ, "PYTHON": sys.executable, "STATUS_DIR": str(tmp_path / "status"), **env}
    return subprocess.run(args, cwd=ROOT, env=settings, capture_output=True, text=True, timeout=30)


def test_a_taken_emulator_port_is_one_line_naming_emulator_port(taken_port: int, tmp_path: Path) -> None:
    done = until_exit(
        [str(ROOT / "bootstrap"), "--emulator"],
        tmp_path,
        EMULATOR_PORT=str(taken_port),
        EMULATOR_ROOT=str(tmp_path / "emulator"),
        FC_CUSTOM_LISTEN_PORT=str(free_port()),
    )
    assert done.returncode == 3
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"port {taken_port} (EMULATOR_PORT) is already taken" in done.stderr
    assert f"EMULATOR_PORT={taken_port + 1}" in done.stderr


def test_a_taken_listening_port_is_one_line_naming_fc_custom_listen_port(
    taken_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m serverless.server`'s main, in this interpreter: it stops before its logging, app
    and uvicorn are set up (a bad setting's one line and exit 2 are checked in a process of its own
    by tests/test_settings.py)."""
    monkeypatch.setattr(server, "bound_malloc_arenas", lambda: False)  # this process's malloc is left alone
    for name, value in {
        "STATUS_DIR": str(tmp_path / "status"),
        "FC_CUSTOM_LISTEN_PORT": str(taken_port),
        "COMFYUI_URL": f"http://127.0.0.1:{free_port()}",
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        server.main()
    done = capsys.readouterr()
    assert exited.value.code == 3 and done.out == ""
    assert done.err.strip().splitlines() == [
        f"cannot start: port {taken_port} on 127.0.0.1 (FC_CUSTOM_LISTEN_PORT) is already taken by another "
        f"process (this API started earlier?): stop it, or choose another port, e.g. "
        f"FC_CUSTOM_LISTEN_PORT={taken_port + 1}"
    ]


def test_make_serve_takes_port_as_the_listening_port() -> None:
    """`make -n` prints the commands without running them (nothing is installed)."""
    done = subprocess.run(["make", "-n", "serve", "PORT=9123"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if "./bootstrap --emulator" in line]
    assert "FC_CUSTOM_LISTEN_PORT=9123" in line


def test_the_emulator_mode_serves_the_api_its_download_links_without_a_secret_and_keeps_status_beside_outputs(
    tmp_path: Path,
) -> None:
    """`./bootstrap --emulator` (what `make serve` runs): the API against the emulator on
    EMULATOR_PORT, download links without configuring a secret, status logs beside the emulator's
    outputs (not under /mnt/auto), and exit status 0 when stopped."""
    port, root, emulator_port = free_port(), tmp_path / "emulator", free_port()
    env = {
        "PYTHON": sys.executable,
        "EMULATOR_PORT": str(emulator_port),
        "EMULATOR_ROOT": str(root),
        "FC_CUSTOM_LISTEN_PORT": str(port),
    }
    server = Process(
        [str(ROOT / "bootstrap"), "--emulator"],
        port,
        tmp_path / "bootstrap.log",
        env,
        "/api/serverless/status?task_id=p",
    )
    try:
        wait_until(lambda: requests.get(server.url + "/api/serverless/health", timeout=5).status_code == 200)
        answer = post_run(server.url, empty_image(prefix="linked"), params={"output_url": "true"})
        assert answer.status_code == 200, answer.text
        (url,) = [item["output"]["url"] for item in answer.json()["data"]["results"]]
        download = requests.get(url, timeout=10)
        assert download.status_code == 200 and download.content.startswith(b"\x89PNG")
        ran = post_run(
            server.url, txt2img(steps=2), params={"output_base64": "true"}, headers={"x-fc-trace-id": "dev-1"}
        )
        assert ran.status_code == 200, ran.text
        assert requests.get(f"http://127.0.0.1:{emulator_port}/system_stats", timeout=5).ok
        assert (root / "output" / "serverless_api" / "dev-1").is_file()
    finally:
        server.stop()
    assert server.proc.returncode == 0
    secret = root / ".file-link-secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_text()) == 64
    assert "FILE_LINK_SECRET" not in json.dumps(answer.json()) and secret.read_text() not in server.log_text()
