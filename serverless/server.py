"""`python -m serverless.server`: uvicorn on 0.0.0.0:${FC_CUSTOM_LISTEN_PORT:-9000}, draining on
the first exit signal.

Plain uvicorn closes connections before the app's lifespan ends, which would cut SSE streams and
jobs without their terminal payload. Here the first SIGTERM/SIGINT drains the app as FC's
GET /pre-stop does (new jobs refused, status and health still answer, running jobs get
DRAIN_TIMEOUT seconds and are then cancelled with a terminal payload); then uvicorn shuts down,
ComfyUI is stopped by the lifespan, and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from .app import create_app
from .jobs.registry import Jobs
from .settings import Settings

SHUTDOWN_MARGIN = 30.0  # uvicorn's own limit on open connections is only a backstop to the drain

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn whose first exit signal drains the app's jobs before uvicorn's shutdown starts."""

    def __init__(self, app: Starlette, config: uvicorn.Config, drain_timeout: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_requested = False
        self.drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        jobs: Jobs | None = getattr(self.app.state, "jobs", None)  # set once the lifespan started
        if self.drain_requested or self.should_exit or jobs is None or self.loop is None:
            super().handle_exit(sig, frame)
            return
        self.drain_requested = True
        self.loop.call_soon_threadsafe(self._start_drain, jobs, sig)

    def _start_drain(self, jobs: Jobs, sig: int) -> None:
        log.info("%s: draining jobs (up to %gs) before shutting down", signal.Signals(sig).name, self.drain_timeout)
        self.drain = asyncio.create_task(self._drain_then_exit(jobs, sig))

    async def _drain_then_exit(self, jobs: Jobs, sig: int) -> None:
        try:
            await jobs.drain(self.drain_timeout)
        finally:
            super().handle_exit(sig, None)


def configure_logging() -> None:
    """Log lines with time, level and logger name at LOG_LEVEL (both entry points use this)."""
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main() -> None:
    configure_logging()
    settings = Settings.from_env()  # a bad value stops us here, named
    app = create_app(settings)
    # After a graceful shutdown uvicorn raises the signal that stopped it again, under the handlers
    # in place before it started. By then jobs are drained and ComfyUI stopped: a clean exit.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: None)
    server = DrainingServer(
        app,
        uvicorn.Config(
            app,
            host="0.0.0.0",
            port=int(os.environ.get("FC_CUSTOM_LISTEN_PORT") or 9000),
            timeout_graceful_shutdown=int(settings.drain_timeout + SHUTDOWN_MARGIN),
            access_log=False,
        ),
        settings.drain_timeout,
    )
    server.run()
    sys.exit(0 if server.started else 3)


if __name__ == "__main__":
    main()
