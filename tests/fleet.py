"""A Redis tier on loopback for the tests: a real `redis-server`, gateways and workers, each
worker with its own ComfyUI emulator: in threads of the test process (fast: the default), or as
`python -m serverless.server` processes for the tests that kill one (`Tier(processes=True)`)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.servers import InProcessApp, InProcessEmulator, Process, free_port

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


class NodeLog:
    """What a node's log tells of the jobs it ran ("job start" lines are debug)."""

    name: str
    log_text: Callable[[], str]  # the server's (a process's or an in-process app's)

    def started(self) -> list[str]:
        """Task ids of the jobs this node started, in order."""
        return re.findall(r"job start task_id=(\S+)", self.log_text())

    def most_at_once(self) -> int:
        """The most jobs this node held at one time: started and not yet ended (a worker runs one
        and may queue one more in its ComfyUI behind it)."""
        running: set[str] = set()
        most = 0
        for kind, task_id in re.findall(r"job (start|end) task_id=(\S+)", self.log_text()):
            if kind == "start":
                running.add(task_id)
                most = max(most, len(running))
            else:
                assert task_id in running, f"{self.name}: end of {task_id}, which it did not start"
                running.discard(task_id)
        return most


class Node(NodeLog, Process):
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


class InProcessNode(NodeLog, InProcessApp):
    """A node of the tier in a thread of the test process."""

    def __init__(self, log_dir: Path, env: dict[str, str], name: str) -> None:
        self.name = name
        port = free_port()
        super().__init__(log_dir, {**env, "FC_INSTANCE_ID": name, "FC_CUSTOM_LISTEN_PORT": str(port)}, port)


@dataclass
class Tier:
    """Gateways and workers sharing one Redis database."""

    root: Path
    redis_url: str
    env: dict[str, str] = field(default_factory=dict)
    processes: bool = False  # True: each worker in a process of its own (to kill one); emulators stay in threads
    gateway_processes: bool = False  # True: each gateway in a process of its own (to signal one)
    gateways: list[Any] = field(default_factory=list)  # Node, or InProcessNode
    workers: list[Any] = field(default_factory=list)
    emulators: list[Any] = field(default_factory=list)  # Emulator, or InProcessEmulator
    worker_env: dict[str, dict[str, str]] = field(default_factory=dict)  # a worker's settings, by name

    def common(self) -> dict[str, str]:
        return {
            "STATUS_BACKEND": "redis",
            "QUEUE_BACKEND": "redis",
            "REDIS_URL": self.redis_url,
            "STATUS_DIR": str(self.root / "unused-status"),
            "FC_INSTANCE_ID": "t",
            "COMFYUI_STARTUP_TIMEOUT": "5",
            "LOG_LEVEL": "debug",  # "job start" lines (debug) tell which worker ran what
            "WORKFLOWS_DIR": str(self.root / "workflows"),  # the tier's shared disk, as the NAS
            "DRAIN_TIMEOUT": "5",  # a job still running when the test ends does not hold its teardown
            **self.env,
        }

    def gateway(self, ready_path: str = "/api/serverless/health", process: bool | None = None, **env: str) -> Any:
        """A gateway; in a process if `process` (default: the tier's `gateway_processes`)."""
        settings = {**self.common(), "ROLE": "gateway", "COMFYUI_URL": "http://127.0.0.1:9", **env}
        name = f"gateway{len(self.gateways) + 1}"
        in_process = not (self.gateway_processes if process is None else process)
        node = InProcessNode(self.root, settings, name) if in_process else Node(self.root, settings, name, ready_path)
        self.gateways.append(node)
        return node

    def worker(
        self, step_delay: float = 0.0, custom_nodes: bool = True, process: bool | None = None, **env: str
    ) -> Any:
        """A worker with an emulator of its own; in a process if `process` (default: the tier's
        `processes`), so that a test can start the one it kills as a process and the rest in-process."""
        number = len(self.workers) + 1
        folder = self.root / f"emulator{number}"
        # a worker killed leaves its ComfyUI up: emulators stay in threads
        emulator = InProcessEmulator(folder, step_delay=step_delay, custom_nodes=custom_nodes)
        self.emulators.append(emulator)
        settings = {**self.common(), "ROLE": "worker", "COMFYUI_URL": emulator.url, **env}
        name = f"worker{number}"
        in_process = not (self.processes if process is None else process)
        node = InProcessNode(self.root, settings, name) if in_process else Node(self.root, settings, name)
        self.workers.append(node)
        self.worker_env[name] = settings
        return node

    def restart_worker(self, index: int) -> Any:
        """Start worker `index` again (after it was killed), on its own ComfyUI, as a process
        manager would: a new process (hence a new consumer name), its log appended to."""
        old = self.workers[index]
        settings = self.worker_env[old.name]
        node = (
            Node(self.root, settings, old.name)
            if isinstance(old, Node)
            else InProcessNode(self.root, settings, old.name)
        )
        self.workers[index] = node
        return node

    def stop(self) -> None:
        for node in [*self.gateways, *self.workers]:
            if isinstance(node, InProcessApp):
                node.begin_stop()  # together: each shutdown's waits overlap
        for node in [*self.gateways, *self.workers, *self.emulators]:
            node.stop()
