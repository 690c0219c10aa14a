"""The floors under section 1's goals: what the protocols cost on their own with the bench's
clients, on the adapter's stack (Starlette under uvicorn) and none of its code.

- Streams (`bench/floor_app.py`, canned bytes): a websocket per job (connect, the body, 20
  messages, the close) against a POST answered with JSON; an SSE answer of the same 20 events,
  read line by line as the bench's SSE client reads them, against that JSON.
- Sync and ComfyUI's own API (`bench/floor_proxy.py`), the jobs of section 1 against ComfyUI's
  example client talking to ComfyUI directly: the bench's sync client through a bare sync adapter
  (ComfyUI's messages on one shared websocket, outputs read from ComfyUI's folder), and the example
  client through a bare pass-through proxy (`/prompt`, `/ws`, `/history`, `/view` forwarded).

One job at a time, in runs of each kind as section 1's jobs (`suite.in_runs`); difference of the
p50s."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from . import procs
from .clients import DirectClient, percentile, run_sse, run_sync, run_ws
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


async def proxy_floors(
    session: aiohttp.ClientSession,
    comfyui_url: str,
    output_dir: str,
    job: Callable[[str], dict[str, Any]],
    workdir: Path,
    jobs: int = 200,
    warmup: int = 20,
) -> list[Figure]:
    env = {"FLOOR_COMFYUI_URL": comfyui_url, "FLOOR_OUTPUT_DIR": output_dir}
    bare = start(workdir / "bare", "bench.floor_proxy:app", **env)
    local = start(workdir / "local", "bench.floor_proxy:app", **env, FLOOR_LOCAL="1")
    try:
        await bare.wait_ready(session, "/ready")
        await local.wait_ready(session, "/ready")
        async with (
            DirectClient(session, comfyui_url) as direct,
            DirectClient(session, bare.url) as proxied,
            DirectClient(session, local.url) as answered,
        ):
            runs = {"direct": direct.run, **bare_runs(session, bare.url), "proxy": proxied.run, "local": answered.run}
            pids = {**dict.fromkeys(("sync", "sse", "ws"), bare.pid), "local": local.pid}
            measured = await p50s(runs, job, jobs, warmup, pids)
    finally:
        bare.stop()
        local.stop()
    p50, cpu = measured.p50, measured.cpu
    section = "1. overhead per job"
    return [
        info(
            section,
            "floor: sync through a bare adapter, added p50",
            p50["sync"] - p50["direct"],
            "ms",
            f"one websocket, outputs read from the folder; direct {p50['direct']:.2f}, bare {p50['sync']:.2f} ms",
        ),
        *stream_floor_figures(section, p50),
        info(
            section,
            "floor: app CPU per job, bare adapter, sync",
            cpu["sync"],
            "ms",
            f"SSE {cpu['sse']:.2f} / websocket {cpu['ws']:.2f} / ComfyUI's API answering /history and /view "
            f"{cpu['local']:.2f} ms (the adapter's: the rows 'app CPU per job' above)",
        ),
        info(
            section,
            "floor: ComfyUI's API through a bare proxy, added p50",
            p50["proxy"] - p50["direct"],
            "ms",
            f"/prompt, /ws, /history, /view forwarded; proxied {p50['proxy']:.2f} ms",
        ),
        info(
            section,
            "floor: ComfyUI's API, bare proxy answering /history and /view, added p50",
            p50["local"] - p50["direct"],
            "ms",
            f"/prompt and /ws forwarded, outputs read from the folder; {p50['local']:.2f} ms",
        ),
    ]


def stream_floor_figures(section: str, p50: dict[str, float]) -> list[Figure]:
    """The stream goals' floor with ComfyUI's real messages: the bare adapter's SSE and websocket
    (each message passed on as it comes, then the answer) over its own sync answer."""
    return [
        info(
            section,
            f"floor: {name} over sync, bare adapter, p50",
            p50[key] - p50["sync"],
            "ms",
            f"ComfyUI's messages passed on as they come; sync {p50['sync']:.2f}, {name} {p50[key]:.2f} ms",
        )
        for key, name in (("sse", "SSE"), ("ws", "websocket"))
    ]


async def stream_floors(
    session: aiohttp.ClientSession,
    comfyui_url: str,
    output_dir: str,
    job: Callable[[str], dict[str, Any]],
    workdir: Path,
    section: str,
    jobs: int = 200,
    warmup: int = 20,
) -> list[Figure]:
    """`stream_floor_figures` for another section's job (W2's: its input staged as the adapter does)."""
    bare = start(
        workdir / "streams", "bench.floor_proxy:app", FLOOR_COMFYUI_URL=comfyui_url, FLOOR_OUTPUT_DIR=output_dir
    )
    try:
        await bare.wait_ready(session, "/ready")
        measured = await p50s(bare_runs(session, bare.url), job, jobs, warmup)
    finally:
        bare.stop()
    return stream_floor_figures(section, measured.p50)


Run = Callable[[dict[str, Any]], Awaitable[list[bytes]]]


def bare_runs(session: aiohttp.ClientSession, url: str) -> dict[str, Run]:
    """The bench's sync, SSE and websocket clients against the bare adapter at `url`."""
    return {
        "sync": lambda workflow: run_sync(session, url, workflow),
        "sse": lambda workflow: run_sse(session, url, workflow),
        "ws": lambda workflow: run_ws(session, url, workflow),
    }


@dataclass(frozen=True)
class Measured:
    p50: dict[str, float]  # ms, by run
    cpu: dict[str, float]  # ms of its server's CPU a job, for the runs given a pid


async def p50s(
    runs: dict[str, Run],
    job: Callable[[str], dict[str, Any]],
    jobs: int,
    warmup: int,
    pids: Mapping[str, int] | None = None,
) -> Measured:
    """Each run's p50 in ms, one job at a time in runs of each kind (as section 1's jobs); and
    the CPU the server of each run in `pids` spent a job (as section 1 counts the app's)."""
    series: dict[str, list[float]] = {name: [] for name in runs}
    pids = pids or {}
    spent = dict.fromkeys(pids, 0.0)
    for name, measured in in_runs(list(runs), warmup, jobs):
        workflow = job(f"bench/floor-{name}/img")
        cpu = procs.cpu_seconds(pids[name]) if name in pids else 0.0
        started = time.perf_counter()
        if not await runs[name](workflow):
            raise RuntimeError(f"the bare {name} run returned no image")
        if measured:
            series[name].append((time.perf_counter() - started) * 1000)
            if name in pids:  # clock ticks: each reading is coarse, their sum is not biased
                spent[name] += procs.cpu_seconds(pids[name]) - cpu
    p50 = {name: percentile(values, 50) for name, values in series.items()}
    return Measured(p50, {name: seconds * 1000 / jobs for name, seconds in spent.items()})


def start(workdir: Path, app: str = "bench.floor_app:app", **env: str) -> procs.Server:
    """`app` under uvicorn on a free port, as the adapter is served (no access log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    args = [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--no-access-log"]
    log = workdir / (app.split(":")[0].rpartition(".")[2] + ".log")
    return procs.Server([*args, "--log-level", "warning"], port, log, env)


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
