"""ComfyUI as a child process: started, watched, restarted with backoff, its output logged.

Used when this instance starts ComfyUI itself (`COMFYUI_CMD`, or `COMFYUI_DIR` with `main.py`).
Jobs ask `wait_ready()` before they submit, and learn from `generation` whether the process they
submitted to has died (its in-memory queue, and their prompt, died with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)
comfy_log = logging.getLogger("comfyui")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STOP_TIMEOUT = 10.0
OUTPUT_DRAIN_TIMEOUT = 2.0
OUTPUT_CHUNK = 64 * 1024
_LINE_END = re.compile(rb"\r\n|\r|\n")


def comfyui_command(cmd: str, directory: str, url_port: int) -> list[str] | None:
    """The command that starts ComfyUI here, or None when ComfyUI runs elsewhere."""
    if cmd:
        return shlex.split(cmd)
    if directory and (Path(directory) / "main.py").is_file():
        return [sys.executable, str(Path(directory) / "main.py"), "--listen", "127.0.0.1",
                "--port", str(url_port), "--disable-auto-launch"]
    return None


class Supervisor:
    """Keeps one ComfyUI child running. `probe()` says whether ComfyUI answers."""

    def __init__(self, command: list[str], probe: Callable[[], Awaitable[bool]], cwd: str | None = None) -> None:
        self.command = command
        self.probe = probe
        self.cwd = cwd
        self.generation = 0  # bumped each time a child dies
        self._ready = asyncio.Event()
        self._process: asyncio.subprocess.Process | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self, timeout: float) -> bool:
        """True once ComfyUI answers; False if it does not within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
            return True
        except TimeoutError:
            return False

    async def run(self) -> None:
        """Start, watch and restart the child until cancelled; then stop it."""
        backoff = BACKOFF_START
        while True:
            started = asyncio.get_running_loop().time()
            code = await self._run_once()
            lived = asyncio.get_running_loop().time() - started
            backoff = BACKOFF_START if lived > 60 else min(backoff * 2, BACKOFF_MAX)
            log.error("ComfyUI exited with %s after %.1fs; restarting in %.1fs", code, lived, backoff)
            await asyncio.sleep(backoff)

    async def _run_once(self) -> int | None:
        """One child, from start to exit. If cancelled, the child is stopped before we return."""
        log.info("starting ComfyUI: %s", shlex.join(self.command))
        process = self._process = await asyncio.create_subprocess_exec(
            *self.command, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # our signals (Ctrl-C, SIGTERM) are handled by us, then passed on
        )
        forward = asyncio.create_task(self._forward_output(process))
        watch = asyncio.create_task(self._watch_ready())
        try:
            code = await process.wait()
            # Tell running jobs at once: their prompt died with this process.
            self._ready.clear()
            self.generation += 1
            _signal_group(process, signal.SIGKILL)  # helpers it left behind hold the GPU and the pipe
            return code
        finally:
            watch.cancel()
            await self._stop_child()  # when cancelled: the child still runs, and holds the pipe open
            # The output ends when the last holder of the pipe is gone; don't wait on a stray one.
            done, _ = await asyncio.wait({forward}, timeout=OUTPUT_DRAIN_TIMEOUT)
            if not done:
                forward.cancel()
            await asyncio.gather(watch, forward, return_exceptions=True)

    async def _forward_output(self, process: asyncio.subprocess.Process) -> None:
        """Log the child's output a line at a time (logger `comfyui`). A progress bar's
        carriage-return updates count as lines, and an over-long line is cut, never fatal: a pipe
        nobody reads would block ComfyUI's next write."""
        assert process.stdout is not None
        pending = b""
        while chunk := await process.stdout.read(OUTPUT_CHUNK):
            *lines, pending = _LINE_END.split(pending + chunk)
            if len(pending) > OUTPUT_CHUNK:
                lines.append(pending)
                pending = b""
            for line in lines:
                if line.strip():
                    comfy_log.info("%s", line.decode(errors="replace").rstrip())
        if pending.strip():
            comfy_log.info("%s", pending.decode(errors="replace").rstrip())

    async def _watch_ready(self) -> None:
        while True:
            if await self.probe():
                if not self._ready.is_set():
                    log.info("ComfyUI is ready (pid %s)", self._process.pid if self._process else "?")
                self._ready.set()
                return
            await asyncio.sleep(0.1)

    async def _stop_child(self) -> None:
        """SIGTERM to ComfyUI's process group; SIGKILL if it is not gone within STOP_TIMEOUT."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        log.info("stopping ComfyUI (pid %s)", process.pid)
        _signal_group(process, signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            _signal_group(process, signal.SIGKILL)
            await process.wait()


def _signal_group(process: asyncio.subprocess.Process, number: int) -> None:
    """Signal the child's whole process group (it is a session leader: group id == its pid)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, number)
