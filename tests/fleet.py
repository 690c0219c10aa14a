"""A Redis tier on loopback for the tests: a real `redis-server`, gateways and workers as
`python -m serverless.server` processes, each worker with its own ComfyUI emulator."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.servers import Emulator, Process, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """`redis-server` on a free loopback port with its files in `directory`; `durable` turns on
    the append-only file fsynced on every write (what the README recommends)."""

    def __init__(self, directory: Path, durable: bool = False, port: int | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.durable = durable
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            *persistence,
            "--dir",
            str(self.directory),
            "--databases",
            "64",
        ]
        log = open(self.directory / "redis.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    log_text = (self.directory / "redis.log").read_text()
                    raise RuntimeError(f"redis-server did not start: {log_text}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: what a crash does (only what is in the append-only file survives)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


class Node(Process):
    """`python -m serverless.server` in a role of the tier."""

    def __init__(
        self, log_dir: Path, env: dict[str, str], name: str, ready_path: str = "/api/serverless/health"
    ) -> None:
        port = free_port()
        self.name = name
        args = [sys.executable, "-m", "serverless.server"]
        super().__init__(
            args, port, log_dir / f"{name}.log", env={**env, "FC_CUSTOM_LISTEN_PORT": str(port)}, ready_path=ready_path
        )

    def started(self) -> list[str]:
        """Task ids of the jobs this node started, in order."""
        return re.findall(r"job start task_id=(\S+)", self.log_text())

    def assert_one_job_at_a_time(self) -> None:
        """Every job start is followed by its end before the next start."""
        events = re.findall(r"job (start|end) task_id=(\S+)", self.log_text())
        running: str | None = None
        for kind, task_id in events:
            if kind == "start":
                assert running is None, f"{self.name} started {task_id} while {running} ran"
                running = task_id
            else:
                assert running == task_id, f"{self.name}: end of {task_id} while {running} ran"
                running = None


@dataclass
class Tier:
    """Gateways and workers sharing one Redis database."""

    root: Path
    redis_url: str
    env: dict[str, str] = field(default_factory=dict)
    gateways: list[Node] = field(default_factory=list)
    workers: list[Node] = field(default_factory=list)
    emulators: list[Emulator] = field(default_factory=list)

    def common(self) -> dict[str, str]:
        return {
            "STATUS_BACKEND": "redis",
            "QUEUE_BACKEND": "redis",
            "REDIS_URL": self.redis_url,
            "STATUS_DIR": str(self.root / "unused-status"),
            "FC_INSTANCE_ID": "t",
            "COMFYUI_RECONNECT_TIMEOUT": "5",
            "LOG_LEVEL": "debug",  # "job start" lines (debug) tell which worker ran what
            **self.env,
        }

    def gateway(self, ready_path: str = "/api/serverless/health", **env: str) -> Node:
        node = Node(
            self.root,
            {**self.common(), "ROLE": "gateway", "COMFYUI_URL": "http://127.0.0.1:9", **env},
            f"gateway{len(self.gateways) + 1}",
            ready_path,
        )
        self.gateways.append(node)
        return node

    def worker(self, step_delay: float = 0.0, **env: str) -> Node:
        number = len(self.workers) + 1
        emulator = Emulator(self.root / f"emulator{number}", None, "--step-delay", str(step_delay))
        self.emulators.append(emulator)
        node = Node(
            self.root, {**self.common(), "ROLE": "worker", "COMFYUI_URL": emulator.url, **env}, f"worker{number}"
        )
        self.workers.append(node)
        return node

    def stop(self) -> None:
        for node in [*self.gateways, *self.workers, *self.emulators]:
            node.stop()
