"""`python -m serverless.server`: uvicorn on ${HOST}:${FC_CUSTOM_LISTEN_PORT:-9000}, draining on
the first exit signal and stopping on the second.

Plain uvicorn closes connections before the app's lifespan ends, which would cut SSE streams and
jobs without their terminal payload. Here the first SIGTERM/SIGINT drains the app as FC's
GET /pre-stop does (new jobs refused, status and health still answer, running jobs get
DRAIN_TIMEOUT seconds and are then cancelled with a terminal payload); then uvicorn shuts down,
ComfyUI is stopped by the lifespan, and the process exits 0. A second signal cancels the running
jobs at once (each still ends with its terminal payload, in its status log and on its stream),
then shuts down the same way and exits 128 + the signal number (130 for Ctrl-C). A third leaves
it to uvicorn, which closes whatever is still open.

A bad setting prints one line, `settings error: NAME='value': reason`, and exits 2. A port that is
taken (ours, FC_CUSTOM_LISTEN_PORT, or the one of the ComfyUI we are to start, COMFYUI_URL's)
prints one line naming its setting and exits 3, as a server that could not start does.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from .app import create_app
from .comfyui.supervisor import PortTaken, comfyui_command
from .jobs.runner import JobRunner
from .ops import logs
from .settings import Settings, SettingsError
from .state import started
from .transports.coalesce import HttpProtocol

SHUTDOWN_MARGIN = 30.0  # uvicorn's own limit on open connections is only a backstop to the drain
SETTINGS_EXIT_CODE = 2
NOT_STARTED_EXIT_CODE = 3
PORT_CHECK_TIMEOUT = 1.0

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn whose first exit signal drains the app's jobs before uvicorn's shutdown starts, and
    whose second cancels them at once. `exit_code` is 0, or 128 + the signal that stopped it now."""

    def __init__(self, app: Starlette, config: uvicorn.Config, drain_timeout: float, freeze: bool = False) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self.freeze = freeze  # the process's own server: what start-up made is frozen (`startup`)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.signals = 0
        self.exit_code = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.freeze:  # an app in a thread of another program: its objects are not ours to freeze
            return
        # What start-up made (modules, settings, routes, clients: ~65,000 objects) lives as long
        # as the process: out of the garbage collector's full passes, which otherwise walk it
        # all in the middle of a job now and then (45 ms, measured; 0.9 ms frozen).
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = started(self.app)
        if state is None or self.loop is None:  # nothing to drain yet
            super().handle_exit(sig, frame)
            return
        jobs = state.jobs
        self.signals += 1
        if self.signals == 1:
            self.loop.call_soon_threadsafe(self._start, self._drain_then_exit(jobs, sig))
        elif self.signals == 2:
            self.exit_code = 128 + sig
            self.loop.call_soon_threadsafe(self._start, self._stop_now(jobs, sig))
        else:
            self.force_exit = True  # uvicorn closes whatever is still open

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_then_exit(self, jobs: JobRunner, sig: int) -> None:
        again = "press Ctrl-C again" if sig == signal.SIGINT else "signal again"
        log.info(
            "%s: draining jobs (%d running, up to %gs); %s to cancel them and stop now",
            signal.Signals(sig).name,
            jobs.running,
            self.drain_timeout,
            again,
        )
        try:
            await jobs.drain(self.drain_timeout)
        finally:
            self._shut_down(sig)

    async def _stop_now(self, jobs: JobRunner, sig: int) -> None:
        log.warning("%s again: cancelling %d running job(s) and stopping now", signal.Signals(sig).name, jobs.running)
        try:
            await jobs.drain(0)  # cancels every job; each ends with its terminal payload
        finally:
            self._shut_down(sig)

    def _shut_down(self, sig: int) -> None:
        """Start uvicorn's graceful shutdown (once: uvicorn reads a repeated SIGINT as "force")."""
        if not self.should_exit:
            super().handle_exit(sig, None)


def configure_logging(settings: Settings) -> None:
    """Log lines at LOG_LEVEL in LOG_FORMAT, a line per request or websocket connection at
    LOG_LEVEL=debug (both entry points use this)."""
    service = settings.service
    logs.configure_logging(service.log_level, service.log_format, service.access_log)


def load_settings() -> Settings:
    """The settings from the environment; a bad value prints one line to stderr and exits 2."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"settings error: {exc}", file=sys.stderr)
        raise SystemExit(SETTINGS_EXIT_CODE) from None


def taken_port(settings: Settings) -> str | None:
    """Why this server cannot start here, in one line, when a port it needs is taken; else None.
    Checked before uvicorn starts, whose own failure is a traceback (ComfyUI's port) or an errno
    naming no setting (ours)."""
    host, port = settings.service.host, settings.service.port
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return None  # uvicorn reports the rest (an address not on this machine...) itself
        return (
            f"port {port} on {host} (FC_CUSTOM_LISTEN_PORT) is already taken by another "
            f"process (this API started earlier?): stop it, or choose another port, e.g. "
            f"FC_CUSTOM_LISTEN_PORT={port + 1}"
        )
    command = comfyui_command(settings.comfyui.cmd, settings.comfyui.dir, settings.comfyui.port)
    if command and settings.fleet.role != "gateway" and _answers(settings.comfyui.host, settings.comfyui.port):
        return str(PortTaken(settings.comfyui.host, settings.comfyui.port))
    return None


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=PORT_CHECK_TIMEOUT).close()
    except OSError:
        return False
    return True


def where_written(settings: Settings) -> str:
    """Where this server writes on disk, for the log at start (bootstrap may have chosen it)."""
    workflows = f"hosted workflows to {settings.status.workflows_dir.absolute()} (WORKFLOWS_DIR)"
    if settings.fleet.queue_backend == "redis":
        return workflows
    return f"status logs to {settings.status.dir.absolute()} (STATUS_DIR), {workflows}"


def ws_max_size(settings: Settings) -> int:
    """The largest websocket message uvicorn should take: a run body, and a little framing."""
    return settings.inputs.max_body_bytes + 64 * 1024


MALLOC_ARENAS = 2  # glibc's malloc arenas for this process (its default: 8 per core)
M_ARENA_MAX = -8  # mallopt's parameter for it (glibc's malloc.h)


def bound_malloc_arenas() -> bool:
    """At most MALLOC_ARENAS glibc malloc arenas in this process, unless MALLOC_ARENA_MAX says
    otherwise (the environment is left alone: ComfyUI, started from here, keeps glibc's default).
    Pillow, hashing and disk work run in threads, and each thread may get an arena of its own that
    keeps what a big image took: four WebP conversions at once held 24 MiB a job, 8 MiB so.
    False where it does not apply (not glibc)."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False


def main() -> None:
    bound_malloc_arenas()
    settings = load_settings()
    problem = taken_port(settings)
    if problem is not None:
        print(f"cannot start: {problem}", file=sys.stderr)
        raise SystemExit(NOT_STARTED_EXIT_CODE)
    configure_logging(settings)
    log.info("writing %s", where_written(settings))
    app = create_app(settings)
    # After a graceful shutdown uvicorn raises the signal that stopped it again, under the handlers
    # in place before it started. By then jobs are drained and ComfyUI stopped: exit as decided.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: None)
    server = DrainingServer(
        app,
        uvicorn.Config(
            app,
            host=settings.service.host,
            port=settings.service.port,
            timeout_graceful_shutdown=int(settings.service.drain_timeout + SHUTDOWN_MARGIN),
            access_log=settings.service.access_log,
            log_config=None,  # uvicorn's loggers go through ours: one format, one level
            # A websocket run body may be as big as an HTTP one (uvicorn's own limit is 16 MiB).
            ws_max_size=ws_max_size(settings),
            http=HttpProtocol,  # a response's head and body in one write
        ),
        settings.service.drain_timeout,
        freeze=True,
    )
    server.run()
    sys.exit(server.exit_code if server.started else 3)


if __name__ == "__main__":
    main()
