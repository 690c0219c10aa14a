"""Shared fixtures: the ComfyUI emulator and the app under uvicorn on loopback ports.

The plain fixtures (`emulator`, `own_emulator`, `app`, `start_app`) serve from threads of the test
process; `emulator_process` and `start_app_process` start real processes, for the tests that
kill, signal or measure one.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.fleet import RedisServer
from tests.servers import App, Emulator, InProcessApp, InProcessEmulator, free_port
from tests.topologies import TOPOLOGIES, Deployment, Topology, deploy

S = TypeVar("S", App, InProcessApp)

# Every process the tests start (servers, CLIs, `redis-server`, ...) goes through Popen, asyncio's
# included: counted here by test file, summed over xdist's workers and reported at the end. What a
# worker starts before its first test is pytest-xdist's own (its `uname -p` for the platform line).
_spawned: collections.Counter[str] = collections.Counter()
_running: str | None = None  # None: before the first test
_popen_init = subprocess.Popen.__init__


def _counting_init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
    if _running is not None:
        _spawned[_running] += 1
    _popen_init(self, *args, **kwargs)


subprocess.Popen.__init__ = _counting_init  # type: ignore[method-assign]


# The files that take longest, longest first (wall time measured in a full run). pytest-xdist
# (`--dist loadfile --no-loadscope-reorder`, pytest.ini) hands files to its workers in collection
# order: these start first and the many short files fill in at the end, rather than a long file
# starting last while the other worker idles.
LONGEST_FILES = (
    "test_redis_tier.py",
    "test_batches.py",
    "test_cancel_races.py",
    "test_previews.py",
    "test_lifecycle.py",
    "test_comfyapi.py",
    "test_ops.py",
    "test_stream.py",
    "test_readme.py",
    "test_playground.py",
    "test_security.py",
    "test_s3_e2e.py",
    "test_models.py",
    "test_websocket.py",
    "test_load.py",
    "test_status.py",
    "test_comfyapi_editor.py",
    "test_tenants.py",
    "test_properties.py",
    "test_openapi.py",
    "test_contract.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: n for n, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order kept


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Any:
    global _running
    _running = item.nodeid.split("::")[0]
    try:
        return (yield)
    finally:
        _running = "(outside a test)"


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The browser a module's tests share is closed once the next test is in another module: a live
    sync Playwright holds the thread's event loop, which asyncio tests need."""
    browser = sys.modules.get("tests.browser")  # not imported: no browser (and maybe no Playwright)
    if browser is not None and (
        nextitem is None or getattr(nextitem, "module", None) is not getattr(item, "module", None)
    ):
        browser.close_shared()


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # an xdist worker: its counts go back to the controller
        output["spawned"] = dict(_spawned)


_by_workers: collections.Counter[str] = collections.Counter()


def pytest_testnodedown(node: Any, error: object) -> None:
    _by_workers.update(getattr(node, "workeroutput", {}).get("spawned", {}))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if getattr(terminalreporter.config, "workeroutput", None) is not None:
        return  # a worker: the controller reports
    spawned = _by_workers or _spawned  # (xdist's own workers are not counted)
    most = ", ".join(f"{name} {count}" for name, count in spawned.most_common(40))
    terminalreporter.write_line(f"processes started by the tests: {sum(spawned.values())} (most: {most})")


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessEmulator]:
    """One emulator for tests that do not disturb it (no kills, no dropped sockets)."""
    server = InProcessEmulator(tmp_path_factory.mktemp("emulator"))
    yield server
    server.stop()


@pytest.fixture
def own_emulator(tmp_path: Path) -> Iterator[InProcessEmulator]:
    """A fresh emulator for a test that reconfigures it or drops its websockets."""
    server = InProcessEmulator(tmp_path / "emulator")
    yield server
    server.stop()


@pytest.fixture
def emulator_process(tmp_path: Path) -> Iterator[Emulator]:
    """A fresh emulator in a process of its own, for a test that kills it."""
    server = Emulator(tmp_path / "emulator")
    yield server
    server.stop()


def base_env(comfyui_url: str, status_dir: Path) -> dict[str, str]:
    return {
        "COMFYUI_URL": comfyui_url,
        "STATUS_DIR": str(status_dir),
        "FC_INSTANCE_ID": "test-1",
        "COMFYUI_STARTUP_TIMEOUT": "5",
    }


@pytest.fixture(scope="session")
def app(emulator: InProcessEmulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessApp]:
    """The app against the shared emulator, with default settings."""
    logs = tmp_path_factory.mktemp("app")
    server = InProcessApp(logs, base_env(emulator.url, logs / "status"))
    yield server
    server.stop()


def _starter(kind: Callable[[Path, dict[str, str]], S], tmp_path: Path) -> Iterator[Callable[..., S]]:
    """`start(comfyui_url, status_dir=None, **env)` for apps of `kind`, all stopped after the test."""
    started: list[S] = []

    def start(comfyui_url: str, status_dir: Path | None = None, **env: str) -> S:
        settings = base_env(comfyui_url, status_dir or tmp_path / "status")
        server = kind(tmp_path, {**settings, **env})
        started.append(server)
        return server

    yield start
    for server in started:
        if isinstance(server, InProcessApp):
            server.begin_stop()  # together: each shutdown's waits overlap
    for server in started:
        server.stop()


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[Callable[..., InProcessApp]]:
    """Start apps with custom settings: `start_app(comfyui_url, **env)`; stopped after the test."""
    yield from _starter(InProcessApp, tmp_path)


@pytest.fixture
def start_app_process(tmp_path: Path) -> Iterator[Callable[..., App]]:
    """As `start_app`, each app in a process of its own (`uvicorn handler:app`): for a test that
    kills it or reads its /proc entries."""
    yield from _starter(App, tmp_path)


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One `redis-server` per test process; each test takes a database of its own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> Topology:
    """Each behaviour a caller sees, on one box and through a gateway and two workers."""
    chosen: Topology = request.param
    return chosen


@pytest.fixture
def deployment(
    topology: Topology, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Deployment]]:
    """`deployment(**env)`: the test's topology, its apps configured by `env`; stopped after."""
    made: list[Deployment] = []

    def make(step_delay: float = 0.02, colocated: bool = False, **env: str) -> Deployment:
        server = request.getfixturevalue("redis_server") if topology == "fleet" else None
        made.append(deploy(topology, tmp_path / f"deployment{len(made)}", server, step_delay, colocated, **env))
        return made[-1]

    yield make
    for each in made:
        each.stop()
