"""ComfyUI as a child process: started, watched, restarted with backoff, its output logged.

Used when this instance starts ComfyUI itself (`COMFYUI_CMD`, or `COMFYUI_DIR` with `main.py`).
Jobs ask `wait_ready()` before they submit, and learn from `generation` whether the process they
submitted to has died (its in-memory queue, and their prompt, died with it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("serverless.supervisor")
comfy_log = logging.getLogger("comfyui")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STOP_TIMEOUT = 10.0


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
        self.on_death: Callable[[], None] = lambda: None

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
        try:
            while True:
                started = asyncio.get_running_loop().time()
                code = await self._run_once()
                self._ready.clear()
                self.generation += 1
                self.on_death()
                lived = asyncio.get_running_loop().time() - started
                backoff = BACKOFF_START if lived > 60 else min(backoff * 2, BACKOFF_MAX)
                log.error("ComfyUI exited with %s after %.1fs; restarting in %.1fs", code, lived, backoff)
                await asyncio.sleep(backoff)
        finally:
            await self._stop_child()

    async def _run_once(self) -> int | None:
        log.info("starting ComfyUI: %s", shlex.join(self.command))
        self._process = await asyncio.create_subprocess_exec(
            *self.command, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # our signals (Ctrl-C, SIGTERM) are handled by us, then passed on
        )
        forward = asyncio.create_task(self._forward_output(self._process))
        watch = asyncio.create_task(self._watch_ready())
        try:
            return await self._process.wait()
        finally:
            watch.cancel()
            await asyncio.gather(watch, forward, return_exceptions=True)

    async def _forward_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            comfy_log.info("%s", line.decode(errors="replace").rstrip())

    async def _watch_ready(self) -> None:
        while True:
            if await self.probe():
                if not self._ready.is_set():
                    log.info("ComfyUI is ready (pid %s)", self._process.pid if self._process else "?")
                self._ready.set()
                return
            await asyncio.sleep(0.1)

    def kill_child(self) -> None:
        """For tests and operators: kill ComfyUI as a crash would."""
        if self._process and self._process.returncode is None:
            os.killpg(self._process.pid, signal.SIGKILL)

    async def _stop_child(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
