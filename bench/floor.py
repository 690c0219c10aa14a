"""The floor under section 1's stream goals: what the protocols cost on their own with the bench's
clients, on a bare Starlette app under uvicorn (`bench/floor_app.py`: the adapter's stack, none of
its code, canned bytes). A websocket per job (connect, the body, 20 messages, the close) against a
POST answered with JSON; an SSE answer of the same 20 events, read line by line as the bench's SSE
client reads them, against that JSON. One request at a time, in runs of each kind as section 1's jobs
(`suite.in_runs`); difference of the p50s."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from . import procs
from .clients import percentile
from .report import Figure, info
from .suite import in_runs

BODY = b'{"1": {"class_type": "EmptyImage", "inputs": {"width": 64}}}'


async def floors(session: aiohttp.ClientSession, workdir: Path, jobs: int = 200, warmup: int = 20) -> list[Figure]:
    server = start(workdir)
    url = server.url
    try:
        await server.wait_ready(session, "/ready")
        runs: dict[str, Callable[[], Awaitable[object]]] = {
            "json": lambda: _post(session, url + "/json"),
            "sse": lambda: _sse(session, url + "/sse"),
            "ws": lambda: _ws(session, url + "/ws"),
        }
        series: dict[str, list[float]] = {name: [] for name in runs}
        for name, measured in in_runs(list(runs), warmup, jobs):  # as section 1's jobs
            started = time.perf_counter()
            await runs[name]()
            if measured:
                series[name].append((time.perf_counter() - started) * 1000)
    finally:
        server.stop()
    p50 = {name: percentile(values, 50) for name, values in series.items()}
    section = "1. overhead per job"
    return [
        info(
            section,
            "floor: SSE over JSON, bare Starlette, p50",
            p50["sse"] - p50["json"],
            "ms",
            f"20 events read line by line; JSON {p50['json']:.2f} ms, SSE {p50['sse']:.2f} ms",
        ),
        info(
            section,
            "floor: websocket over POST, bare Starlette, p50",
            p50["ws"] - p50["json"],
            "ms",
            f"a connection, handshake and close a job; websocket {p50['ws']:.2f} ms",
        ),
    ]


def start(workdir: Path) -> procs.Server:
    """`floor_app` under uvicorn on a free port, as the adapter is served (no access log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    args = [sys.executable, "-m", "uvicorn", "bench.floor_app:app", "--port", str(port), "--no-access-log"]
    return procs.Server([*args, "--log-level", "warning"], port, workdir / "floor.log")


async def _post(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(url, data=BODY) as resp:
        await resp.read()


async def _sse(session: aiohttp.ClientSession, url: str) -> None:
    events = []
    async with session.post(url, data=BODY) as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append((time.monotonic(), line[6:].rstrip(b"\r\n").decode()))


async def _ws(session: aiohttp.ClientSession, url: str) -> None:
    async with session.ws_connect(url) as ws:
        await ws.send_str(BODY.decode())
        async for _ in ws:
            pass
