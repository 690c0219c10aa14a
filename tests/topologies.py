"""The two topologies every caller-visible behaviour must hold on, in process (fast to start):

    box    one app beside one ComfyUI emulator, a temp folder as its NAS
    fleet  a gateway (no ComfyUI) and two workers, each beside its own emulator, sharing one real
           `redis-server` database (STATUS_BACKEND=redis, QUEUE_BACKEND=redis)

`Deployment.url` is where callers go; the rest is for tests that look behind it (which emulator
ran a job, its output folder). Tests that need processes (SIGKILL) use `tests.fleet.Tier`."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import redis

from serverless.status import keys
from tests.fleet import RedisServer
from tests.servers import InProcessApp, InProcessEmulator

Topology = Literal["box", "fleet"]
TOPOLOGIES: tuple[Topology, ...] = ("box", "fleet")
WORKERS = 2

# tests/test_redis_tier.py takes the low numbers; the server has 64. A deployment lives for one
# test and its database is flushed as it starts, so the numbers are used again round after round.
_databases = itertools.cycle(range(32, 64))


@dataclass
class Deployment:
    topology: Topology
    url: str
    emulators: list[InProcessEmulator]
    apps: list[InProcessApp]
    redis_url: str | None = None
    stopped: bool = field(default=False, repr=False)

    def output_files(self, name: str) -> list[Path]:
        """Every emulator's output file called `name` (the one that ran the job has it)."""
        return [path for emulator in self.emulators for path in (emulator.root / "output").rglob(name)]

    def set_step_delay(self, seconds: float) -> None:
        """How long each sampling step takes on every emulator."""
        import requests

        for emulator in self.emulators:
            requests.post(emulator.url + "/emulator/config", json={"step_delay": seconds}, timeout=5)

    def log_text(self) -> str:
        return "\n".join(app.log_text() for app in self.apps)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for app in self.apps:
            app.begin_stop()  # together: each shutdown's waits overlap
        for app in self.apps:
            app.stop()
        for emulator in self.emulators:
            emulator.stop()


def deploy(
    topology: Topology,
    root: Path,
    redis_server: RedisServer | None,
    step_delay: float = 0.02,
    colocated: bool = False,
    **env: str,
) -> Deployment:
    """A deployment of `topology` under `root`, every app configured by `env` on top of the base;
    `colocated`: each app beside its ComfyUI shares its disk (COMFYUI_OUTPUT_DIR, as on FC)."""
    # A MODELS_DIR in `env` is every emulator's models folder too (shared, as on FC's NAS).
    models = Path(env["MODELS_DIR"]) if env.get("MODELS_DIR") else None
    common = {
        "FC_INSTANCE_ID": "test-1",
        "COMFYUI_STARTUP_TIMEOUT": "5",
        "WORKFLOWS_DIR": str(root / "workflows"),
        "DRAIN_TIMEOUT": "5",  # a job still running when the test ends does not hold its teardown
    }
    if topology == "box":
        emulator = InProcessEmulator(root / "emulator", step_delay=step_delay, models_dir=models)
        beside = _beside(emulator) if colocated else {}
        app = InProcessApp(
            root, {**common, "COMFYUI_URL": emulator.url, "STATUS_DIR": str(root / "status"), **beside, **env}
        )
        return Deployment("box", app.url, [emulator], [app])
    assert redis_server is not None
    url = redis_server.url(next(_databases))
    redis.Redis.from_url(url).flushdb()
    fleet = {
        **common,
        "STATUS_BACKEND": "redis",
        "QUEUE_BACKEND": "redis",
        "REDIS_URL": url,
        "STATUS_DIR": str(root / "unused-status"),
        "REDIS_CLAIM_IDLE": "5",
    }
    emulators, apps = [], []
    try:
        for number in range(1, WORKERS + 1):
            emulator = InProcessEmulator(root / f"emulator{number}", step_delay=step_delay, models_dir=models)
            emulators.append(emulator)
            worker_env = {**fleet, "ROLE": "worker", "COMFYUI_URL": emulator.url, "FC_INSTANCE_ID": f"worker{number}"}
            worker_env |= _beside(emulator) if colocated else {}
            apps.append(InProcessApp(root, {**worker_env, **env}))
        gateway_env = {**fleet, "ROLE": "gateway", "COMFYUI_URL": "http://127.0.0.1:9", "FC_INSTANCE_ID": "gateway"}
        gateway = InProcessApp(root, {**gateway_env, **env})
        apps.append(gateway)
        _wait_published(url)
    except BaseException:
        Deployment("fleet", "", emulators, apps).stop()
        raise
    return Deployment("fleet", gateway.url, emulators, apps, url)


def _beside(emulator: InProcessEmulator) -> dict[str, str]:
    """The settings of an app sharing `emulator`'s disk: its output folder (input and temp beside it)."""
    return {"COMFYUI_OUTPUT_DIR": str(emulator.root / "output")}


def _wait_published(url: str, timeout: float = 20.0) -> None:
    """Until a worker has told the gateways what its ComfyUI has: its `/object_info` (hosted
    workflows need it), then its other answers (`/system_stats`, `/models`...), published after."""
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while client.exists(keys.OBJECT_INFO, keys.COMFYUI_INFO) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("no worker published its /object_info and /system_stats")
        time.sleep(0.02)
