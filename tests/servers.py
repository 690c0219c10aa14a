"""Real servers for the tests on free loopback ports, so that tests talk to them exactly as users
do: the ComfyUI emulator and the app under uvicorn, either in a thread of the test process (fast:
the default) or in a process of their own (for signals, SIGKILL and a process's fds or memory)."""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
import uvicorn
from aiohttp import web

from serverless.app import create_app
from serverless.server import DrainingServer
from serverless.settings import Settings
from serverless.transports.coalesce import HttpProtocol

ROOT = Path(__file__).resolve().parent.parent
WS_MAX_SIZE = 100 * 1024 * 1024 + 64 * 1024  # as `python -m serverless.server` sets it: MAX_BODY_BYTES + framing
EMULATOR_MODULE = "comfyui_emulator"  # the one place naming the emulator's package


PORTS_FROM = 20_000  # test servers' ports: below Linux's ephemeral range (32768-60999), where connections take theirs
PORTS_EACH = 1_000  # a block of its own for each pytest-xdist worker
_next_port = itertools.count()


def free_port() -> int:
    """A loopback port free now, for a server a test is about to start. Taken from this test
    process's own block (by its pytest-xdist worker number), below the ports the kernel gives
    connections and `bind(0)`: another worker's server, or a connection's own end, cannot take it
    between this pick and the server's bind (a kernel-chosen port could: a test once found its
    ComfyUI's port answered by another worker's server)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = PORTS_FROM + (int(worker) % 12 if worker.isdigit() else 0) * PORTS_EACH
    for _ in range(PORTS_EACH):
        port = start + next(_next_port) % PORTS_EACH
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use, or its last connection still closing
            return port
    raise RuntimeError(f"no free port in {start}-{start + PORTS_EACH - 1}")


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
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

    def running(self) -> bool:
        return self.proc.poll() is None

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
            EMULATOR_MODULE,
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


# --- in-process servers ---------------------------------------------------------------------------
# Most tests only need a server on a port. These run in a thread of the test process (one event
# loop each), which starts in milliseconds instead of the ~1 s of a fresh interpreter. Tests that
# need a real process (signals, SIGKILL, /proc of the app) use the classes above.

create_emulator_app = importlib.import_module(EMULATOR_MODULE).create_app
EMULATOR_STATE = importlib.import_module(EMULATOR_MODULE + ".state").EMULATOR

# Which in-process server a log record comes from: set in each server's thread, so every task of
# its loop (and every `asyncio.to_thread` call, which copies the context) carries it.
SERVER_ID: contextvars.ContextVar[str] = contextvars.ContextVar("test_server_id", default="")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0

_levels_lock = threading.Lock()
_live_levels: dict[str, int] = {}
_root_level_before: list[int] = []


def _set_log_level(server_id: str, level: int | None) -> None:
    """The root logger at the lowest LOG_LEVEL of the live in-process apps, as each app process
    had its own root logger at its LOG_LEVEL; back to where it was once none is left."""
    root = logging.getLogger()
    with _levels_lock:
        if not _root_level_before:
            _root_level_before.append(root.level)
        if level is None:
            _live_levels.pop(server_id, None)
        else:
            _live_levels[server_id] = level
        root.setLevel(min([*_live_levels.values()], default=_root_level_before[0]))


class _OwnRecords(logging.Filter):
    """Only the records logged by one in-process server's thread, tasks and worker threads."""

    def __init__(self, server_id: str) -> None:
        super().__init__()
        self.server_id = server_id

    def filter(self, record: logging.LogRecord) -> bool:
        return SERVER_ID.get() == self.server_id


class _Server(DrainingServer):
    """The server `python -m serverless.server` runs (its exit signals drain the app's jobs first),
    which notices `should_exit` as soon as it is woken (`wake`) instead of at uvicorn's next 0.1 s
    tick: the many apps the tests stop each stop that much sooner."""

    _loop: asyncio.AbstractEventLoop | None = None
    _woken: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._woken = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            try:
                await asyncio.wait_for(self._woken.wait(), 0.1)
            except TimeoutError:
                pass
            should_exit = await self.on_tick(counter)

    def wake(self) -> None:
        loop, woken = self._loop, self._woken
        if loop is not None and woken is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(woken.set)
            except RuntimeError:  # its loop closed meanwhile: it has stopped
                pass


class InProcessApp:
    """The adapter (`serverless.app.create_app`) under uvicorn in a thread of the test process,
    configured by an environment mapping (os.environ is neither read nor changed). Its log records
    (any logger, at its LOG_LEVEL) go to `log`, as an app process's output did."""

    def __init__(self, log_dir: Path, env: dict[str, str], port: int | None = None) -> None:
        full_env = {**os.environ, **env}
        self.env = env  # what it was configured with (a test may start another like it)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"app-{self.port}.log"
        self._id = f"app-{self.port}-{id(self)}"
        settings = Settings.from_env(full_env)  # a bad setting fails here, before any set-up
        level = logging.getLevelName(full_env.get("LOG_LEVEL", "INFO").upper())
        self._handler = logging.FileHandler(self.log, encoding="utf-8")
        self._handler.setLevel(level)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._handler.addFilter(_OwnRecords(self._id))
        logging.getLogger().addHandler(self._handler)
        _set_log_level(self._id, level)
        own = SERVER_ID.set(self._id)  # what building the app logs (an old setting's name...) is its own
        try:
            app = create_app(settings)
        except BaseException:
            self._forget_log()
            raise
        finally:
            SERVER_ID.reset(own)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            lifespan="on",
            log_level="warning",
            log_config=None,
            ws_max_size=WS_MAX_SIZE,
            http=HttpProtocol,  # as `serverless.server` serves it
        )
        self.server = _Server(app, config, settings.service.drain_timeout)
        self._thread = threading.Thread(target=self._run, name=self._id, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"in-process app failed to start; log:\n{self.log_text()[-4000:]}")
            time.sleep(0.005)

    def _run(self) -> None:
        SERVER_ID.set(self._id)
        self.server.run()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        """Serving (not stopped)."""
        return self._thread.is_alive() and not self.server.should_exit

    def signal(self, number: int) -> None:
        """What the signal does to `python -m serverless.server`: the handler it installs for
        SIGTERM and SIGINT (`DrainingServer.handle_exit`), called here instead (a thread gets no
        signals). The first drains the jobs, then shuts down; a second cancels them at once."""
        self.server.handle_exit(number, None)

    def wait(self, timeout: float) -> int:
        """Its exit status once it has shut down by itself (as `python -m serverless.server` exits)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self.url} did not stop within {timeout}s"
        return self.server.exit_code if self.server.started else 3

    def begin_stop(self) -> None:
        """Tell it to shut down (as SIGTERM would) without waiting: apps stopping together each
        wait for their own ends at once, not one after another."""
        self.server.should_exit = True
        self.server.wake()

    def stop(self) -> None:
        """Shut down as on SIGTERM (lifespan end included); idempotent."""
        self.begin_stop()
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(STOP_TIMEOUT)
        self._forget_log()
        assert not self._thread.is_alive(), f"{self.url} did not stop within {2 * STOP_TIMEOUT}s"

    def _forget_log(self) -> None:
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()
        _set_log_level(self._id, None)


class InProcessEmulator:
    """The ComfyUI emulator's aiohttp app in a thread of the test process, its folders under `root`."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        step_delay: float = 0.02,
        models_dir: Path | None = None,
        custom_nodes: bool = True,
    ) -> None:
        self._custom_nodes = custom_nodes
        self.root = root
        self.models_dir = models_dir
        root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._id = f"emulator-{self.port}-{id(self)}"
        self._step_delay = step_delay
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=self._id, daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT) or self._error is not None:
            self.stop()
            raise RuntimeError(f"in-process emulator failed to start: {self._error!r}")

    def _run(self) -> None:
        SERVER_ID.set(self._id)
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by __init__ when start-up fails
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._done = asyncio.get_running_loop(), asyncio.Event()
        self._app = create_emulator_app(
            self.root, self._step_delay, models_dir=self.models_dir, custom_nodes=self._custom_nodes
        )
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            await self._done.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        """Close the sockets and the app (its shutdown hooks included); idempotent."""
        if self._loop is not None and self._done is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(STOP_TIMEOUT)
        assert not self._thread.is_alive(), f"{self.url} did not stop within {STOP_TIMEOUT}s"

    def kill(self) -> None:
        """Die as a SIGKILLed ComfyUI looks from outside: in one step of its loop every websocket's
        connection is aborted (no close frame) and the server is told to go; then its port closes."""
        loop, done = self._loop, self._done
        if loop is not None and done is not None and self._thread.is_alive():

            def die() -> None:
                self._app[EMULATOR_STATE].hub.drop_all()
                done.set()

            loop.call_soon_threadsafe(die)
        self.stop()
