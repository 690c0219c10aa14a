"""Real servers for the tests: the ComfyUI emulator and the app under uvicorn, each in its own
process on a free loopback port, so that tests talk to them exactly as users do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
WS_MAX_SIZE = 100 * 1024 * 1024 + 64 * 1024  # as `python -m serverless.server` sets it: MAX_BODY_BYTES + framing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class Process:
    """A child process serving HTTP on a loopback port, its output kept in a log file."""

    def __init__(
        self, args: list[str], port: int, log: Path, env: dict[str, str] | None = None, ready_path: str = "/"
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = open(log, "ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=self._log_file, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url + ready_path, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"server failed to start; log:\n{log.read_text()[-4000:]}") from None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()


class Emulator(Process):
    """`python -m comfyui_emulator` with its own input/output/temp folders under `root`."""

    def __init__(self, root: Path, port: int | None = None, *extra: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        args = [
            sys.executable,
            "-m",
            "comfyui_emulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--root",
            str(root),
            *extra,
        ]
        super().__init__(args, port, root / "emulator.log", ready_path="/system_stats")


class App(Process):
    """The adapter (`handler:app`) under uvicorn, configured through environment variables."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        port = free_port()
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "handler:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "info",
            "--ws-max-size",
            str(WS_MAX_SIZE),
        ]
        super().__init__(
            args, port, log_dir / f"app-{port}.log", env=env, ready_path="/api/serverless/status?task_id=startup-probe"
        )
