"""ComfyUI as a child process: started, watched, restarted with backoff, its output logged.

Used when this instance starts ComfyUI itself (`COMFYUI_CMD`, or `COMFYUI_DIR` with `main.py`).
Jobs ask `wait_ready()` before they submit, and learn from `generation` whether the process they
submitted to has died (its in-memory queue, and their prompt, died with it).

The ComfyUI that answers must be our child: a child is not started while something already answers
on its address (another ComfyUI, or one orphaned by an earlier run), and a child that exits before
it was ready is a failure, whatever answers meanwhile. On Linux the child dies with us, even if we
are killed with SIGKILL (`PR_SET_PDEATHSIG`); it runs in its own process group, which we signal as
a whole to stop it and the helpers it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
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
PORT_CHECK_TIMEOUT = 1.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LINE_END = re.compile(rb"\r\n|\r|\n")


def comfyui_command(cmd: str, directory: str, url_port: int) -> list[str] | None:
    """The command that starts ComfyUI here, or None when ComfyUI runs elsewhere."""
    if cmd:
        return shlex.split(cmd)
    if directory and (Path(directory) / "main.py").is_file():
        return [
            sys.executable,
            str(Path(directory) / "main.py"),
            "--listen",
            "127.0.0.1",
            "--port",
            str(url_port),
            "--disable-auto-launch",
        ]
    return None


class PortTaken(RuntimeError):
    """Something already listens where our ComfyUI child is to listen: jobs would run there."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"port {port} on {host} (COMFYUI_URL) is already taken by another process (another "
            f"ComfyUI, or one left over from an earlier run?), where the ComfyUI of COMFYUI_CMD/COMFYUI_DIR "
            f"is to listen: stop that process or choose another port in COMFYUI_URL"
        )


class Supervisor:
    """Keeps one ComfyUI child running. `probe()` says whether ComfyUI answers; `address` is the
    (host, port) the child listens on, checked to be free before each child starts."""

    def __init__(
        self,
        command: list[str],
        probe: Callable[[], Awaitable[bool]],
        cwd: str | None = None,
        address: tuple[str, int] | None = None,
    ) -> None:
        self.command = command
        self.probe = probe
        self.cwd = cwd
        self.address = address
        self.generation = 0  # bumped each time a child dies
        self.problem = "ComfyUI is starting"  # why it is not ready, for health
        self._ready = asyncio.Event()
        self._process: asyncio.subprocess.Process | None = None
        self._planned = False  # the child is being restarted on purpose (`restart`)
        self.restarts = 0  # planned restarts

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def check_port(self) -> None:
        """Raise PortTaken if something answers on `address` while no child of ours runs."""
        if self.address is not None and await _answers(*self.address):
            raise PortTaken(*self.address)

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
            try:
                await self.check_port()
            except PortTaken as exc:
                backoff = min(backoff * 2, BACKOFF_MAX)
                self.problem = str(exc)
                log.error("not starting ComfyUI: %s; checking again in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                continue
            started = asyncio.get_running_loop().time()
            code, was_ready = await self._run_once()
            if self._planned:  # stopped on purpose: a new one at once
                self._planned = False
                continue
            lived = asyncio.get_running_loop().time() - started
            backoff = BACKOFF_START if lived > 60 else min(backoff * 2, BACKOFF_MAX)
            when = "after" if was_ready else "before it was ready, after"
            self.problem = f"ComfyUI exited with {code} {when} {lived:.1f}s; restarting"
            log.error("ComfyUI exited with %s %s %.1fs; restarting in %.1fs", code, when, lived, backoff)
            await asyncio.sleep(backoff)

    async def _run_once(self) -> tuple[int, bool]:
        """One child, from start to exit: its exit code, and whether it was ever ready. If
        cancelled, the child is stopped before we return."""
        log.info("starting ComfyUI: %s", shlex.join(self.command))
        self.problem = "ComfyUI is starting"
        process = self._process = await asyncio.create_subprocess_exec(
            *self.command,
            cwd=self.cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # our signals (Ctrl-C, SIGTERM) are handled by us, then passed on
            preexec_fn=_die_with_parent(),
        )
        forward = asyncio.create_task(self._forward_output(process))
        watch = asyncio.create_task(self._watch_ready(process))
        try:
            code = await process.wait()
            was_ready = self._ready.is_set()
            # Tell running jobs at once: their prompt died with this process.
            self._ready.clear()
            self.generation += 1
            _signal_group(process, signal.SIGKILL)  # helpers it left behind hold the GPU and the pipe
            return code, was_ready
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

    async def _watch_ready(self, process: asyncio.subprocess.Process) -> None:
        """Set ready once ComfyUI answers from our child: while it runs, and (where /proc tells)
        on a socket that our child's process group holds. Another process that answers on the
        port is not our ComfyUI: jobs sent there would be lost to us."""
        warned = False
        while True:
            if await self.probe() and process.returncode is None:
                owned = await asyncio.to_thread(_group_listens, process.pid, self._port())
                if owned is not False and process.returncode is None:
                    log.info("ComfyUI is ready (pid %s)", process.pid)
                    self._ready.set()
                    return
                if not warned:
                    warned = True
                    self.problem = (
                        f"port {self._port()} answers, but not from the ComfyUI we started "
                        f"(pid {process.pid}): another process holds it"
                    )
                    log.error("%s", self.problem)
            await asyncio.sleep(0.1)

    def rss(self) -> int | None:
        """The running child's resident memory in bytes (from /proc), None when none runs or the
        system cannot tell."""
        process = self._process
        if process is None or process.returncode is not None:
            return None
        try:
            with open(f"/proc/{process.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    async def restart(self) -> None:
        """Stop the child (its memory with it); `run` starts a new one at once. Callers wait for
        it with `wait_ready`."""
        self._planned = True
        self.restarts += 1
        self._ready.clear()
        await self._stop_child()

    def _port(self) -> int | None:
        return self.address[1] if self.address else None

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


async def _answers(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port (a refusal or a timeout: no)."""
    try:
        async with asyncio.timeout(PORT_CHECK_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _group_listens(group: int, port: int | None) -> bool | None:
    """Whether a process of process group `group` holds a socket listening on TCP `port`; None
    when this cannot be told (no port given, or no Linux /proc)."""
    if port is None:
        return None
    try:
        listening = _listening_inodes(port)
    except OSError:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != group:  # fields after "(comm)": state ppid pgrp
                continue
            for fd in (entry / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and int(link[8:-1]) in listening:
                    return True
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return False


def _listening_inodes(port: int) -> set[int]:
    """Inodes of the sockets listening on TCP `port`, any address, IPv4 or IPv6 (/proc/net)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)  # the header
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(int(fields[9]))
    if not inodes and not Path("/proc/net/tcp").exists():
        raise OSError("no /proc/net/tcp")
    return inodes


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a `preexec_fn` after which the child gets SIGKILL when we die, however we die, so
    that no orphaned ComfyUI keeps the port (and the GPU) for the next start to find. Strictly the
    signal comes when the thread that started the child ends: the event loop's thread, which lives
    as long as the app. The setting survives exec, but not into processes the child forks: a
    command must `exec` ComfyUI rather than fork it (`sh -c "...; exec python main.py"`)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent, kill = os.getpid(), int(signal.SIGKILL)

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:  # we died before the request took effect
            os._exit(127)

    return preexec


def _signal_group(process: asyncio.subprocess.Process, number: int) -> None:
    """Signal the child's whole process group (it is a session leader: group id == its pid)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, number)
