"""The processes a benchmark measures, started on free loopback ports, and what /proc says of them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
HEALTH = "/api/serverless/health"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A child process serving HTTP on loopback; its output goes to a log file."""

    def __init__(self, args: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = open(log, "ab")  # closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_ready(
        self, session: aiohttp.ClientSession, path: str, timeout: float = 30.0, interval: float = 0.005
    ) -> float:
        """Poll `path` until it answers 200; returns the seconds since the process was started."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log.name}: exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                async with session.get(self.url + path, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return time.monotonic() - self.started
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(interval)
        raise RuntimeError(f"{self.url}{path} did not answer 200 within {timeout}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


def start_emulator(root: Path, step_delay: float = 0.0, *extra: str) -> Server:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
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
        "--step-delay",
        str(step_delay),
        *extra,
    ]
    return Server(args, port, root / "emulator.log")


def start_app(workdir: Path, comfyui_url: str, **env: str) -> Server:
    """The adapter as it is deployed: `bootstrap` (uvicorn, no access log, LOG_LEVEL INFO)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    settings = {
        "COMFYUI_URL": comfyui_url,
        "COMFYUI_CMD": "",
        "COMFYUI_DIR": "",
        "FC_CUSTOM_LISTEN_PORT": str(port),
        "STATUS_DIR": str(workdir / "status"),
        "FC_INSTANCE_ID": "bench",
        "PYTHON": sys.executable,
        **env,
    }
    return Server([str(ROOT / "bootstrap")], port, workdir / f"app-{port}.log", settings)


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def rss_mib(pid: int) -> float:
    """Resident memory now (VmRSS)."""
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int) -> float:
    """The highest resident memory since start or since `reset_peak_rss` (VmHWM)."""
    return _status_kib(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int) -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machine() -> str:
    """One line describing the machine, for the report."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kib = 0
    uname = os.uname()
    return (
        f"{os.cpu_count()} x {model}, {mem_kib / 1024 / 1024:.0f} GiB RAM, Linux {uname.release}, "
        f"Python {sys.version.split()[0]}"
    )


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
