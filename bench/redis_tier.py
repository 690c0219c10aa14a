"""`python -m bench.redis_tier [--quick]`: the Redis tier (gateway + workers) against the single-box
path: jobs/s and latency at 1, 10 and 100 clients, with 4 ms and 100 ms jobs.

Everything runs here on loopback: a `redis-server` (no persistence), the ComfyUI emulator (one
per worker; its step delay makes the job length: one KSampler step), the adapter as deployed
(`bootstrap`). Each client posts sync jobs (JSON answer, no base64) back to back until the cell's
job count is reached. Configurations: one box (one ComfyUI), the tier with one worker (the same
GPU count: what the tier costs) and with two workers (what it buys).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from . import procs
from .clients import NO_LIMIT, RUN, long_workflow, percentile

CLIENTS = (1, 10, 100)
JOBS = {0.004: "4 ms", 0.1: "100 ms"}


@dataclass(frozen=True, slots=True)
class Cell:
    setup: str
    job: str
    clients: int
    jobs: int
    jobs_per_s: float
    p50_ms: float
    p95_ms: float


class Redis:
    """A throwaway redis-server on a free loopback port."""

    def __init__(self, directory: Path) -> None:
        self.port = procs.free_port()
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def commands(self) -> dict[str, int]:
        """How many times each command ran so far (`INFO commandstats`; a script's own calls counted)."""
        import redis

        with redis.Redis.from_url(self.url) as client:
            stats: dict[str, dict[str, int]] = client.info("commandstats")  # type: ignore[assignment]
        return {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def set_step_delay(session: aiohttp.ClientSession, emulators: list[procs.Server], delay: float) -> None:
    for emulator in emulators:
        async with session.post(emulator.url + "/emulator/config", json={"step_delay": delay}) as resp:
            resp.raise_for_status()


async def one_job(session: aiohttp.ClientSession, url: str, seed: int) -> float:
    started = time.monotonic()
    async with session.post(url + RUN, data=json.dumps(long_workflow(1, seed)), timeout=NO_LIMIT) as resp:
        payload = json.loads(await resp.read())
    if payload.get("type") != "serverless_api":
        raise RuntimeError(f"job failed: {payload}")
    return time.monotonic() - started


async def cell(
    session: aiohttp.ClientSession, url: str, setup: str, job: str, clients: int, jobs: int, seeds: list[int]
) -> Cell:
    latencies: list[float] = []
    left = [jobs]

    async def client() -> None:
        while left[0] > 0:
            left[0] -= 1
            seeds[0] += 1
            latencies.append(await one_job(session, url, seeds[0]))

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.monotonic() - started
    return Cell(
        setup, job, clients, jobs, jobs / elapsed, percentile(latencies, 50) * 1000, percentile(latencies, 95) * 1000
    )


def fresh_session() -> aiohttp.ClientSession:
    """A session per cell: connections left idle from one cell to the next would meet the
    server's keep-alive timeout mid-reuse (a reset that says nothing about the server)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def measure(url: str, setup: str, emulators: list[procs.Server], quick: bool, seeds: list[int]) -> list[Cell]:
    cells = []
    for delay, job in JOBS.items():
        async with fresh_session() as session:
            await set_step_delay(session, emulators, delay)
            for _ in range(5):  # warm the path
                await one_job(session, url, seeds[0] + 10_000_000)
                seeds[0] += 1
        for clients in CLIENTS:
            jobs = max(clients, 10 if quick else 30) if delay > 0.05 else max(2 * clients, 50 if quick else 200)
            async with fresh_session() as session:
                cells.append(await cell(session, url, setup, job, clients, jobs, seeds))
            print(
                f"  {setup:<22} {job:>6} {clients:>3} clients: {cells[-1].jobs_per_s:7.1f} jobs/s, "
                f"p50 {cells[-1].p50_ms:7.1f} ms",
                flush=True,
            )
    return cells


async def run(quick: bool) -> list[Cell]:
    cells: list[Cell] = []
    seeds = [1]
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        work = Path(tmp)
        started: list[procs.Server] = []
        redis = Redis(work)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            try:
                emulators = [procs.start_emulator(work / f"comfyui{n}") for n in range(2)]
                started += emulators
                for emulator in emulators:
                    await emulator.wait_ready(session, "/system_stats")
                box = procs.start_app(work / "box", emulators[0].url)
                started.append(box)
                await box.wait_ready(session, procs.HEALTH)
                cells += await measure(box.url, "one box", emulators[:1], quick, seeds)
                box.stop()

                tier = {"STATUS_BACKEND": "redis", "QUEUE_BACKEND": "redis", "REDIS_URL": redis.url}
                gateway = procs.start_app(work / "gateway", "http://127.0.0.1:9", ROLE="gateway", **tier)
                worker1 = procs.start_app(work / "w1", emulators[0].url, ROLE="worker", FC_INSTANCE_ID="w1", **tier)
                started += [gateway, worker1]
                for server in (gateway, worker1):
                    await server.wait_ready(session, procs.HEALTH)
                cells += await measure(gateway.url, "gateway + 1 worker", emulators[:1], quick, seeds)
                worker2 = procs.start_app(work / "w2", emulators[1].url, ROLE="worker", FC_INSTANCE_ID="w2", **tier)
                started.append(worker2)
                await worker2.wait_ready(session, procs.HEALTH)
                cells += await measure(gateway.url, "gateway + 2 workers", emulators, quick, seeds)
            finally:
                for server in reversed(started):
                    server.stop()
                redis.stop()
    return cells


def table(cells: list[Cell]) -> str:
    rows = ["| setup | job | clients | jobs/s | p50 ms | p95 ms |", "|---|---|---:|---:|---:|---:|"]
    rows += [
        f"| {c.setup} | {c.job} | {c.clients} | {c.jobs_per_s:.1f} | {c.p50_ms:.1f} | {c.p95_ms:.1f} |" for c in cells
    ]
    added = added_latency(cells)
    rows += [
        "",
        *(
            f"Added latency (gateway + 1 worker vs one box, 1 client, p50), {job}: {ms:+.1f} ms"
            for job, ms in added.items()
        ),
    ]
    return "\n".join(rows)


def added_latency(cells: list[Cell]) -> dict[str, float]:
    def p50(setup: str, job: str) -> float:
        return next(c.p50_ms for c in cells if c.setup == setup and c.job == job and c.clients == 1)

    return {job: p50("gateway + 1 worker", job) - p50("one box", job) for job in JOBS.values()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_tier", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs per cell")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    cells = asyncio.run(run(args.quick))
    text = table(cells)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
