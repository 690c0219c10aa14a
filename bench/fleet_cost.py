"""What a fleet costs over one box (issue #26 item 11): `python -m bench` section 7, or alone as
`python -m bench.fleet_cost [--quick]`.

Everything runs here on loopback: a `redis-server` (no persistence), two ComfyUI emulators (their
step delay makes a job's length: one KSampler step), one box (`bootstrap` on the first emulator)
and a fleet as deployed (`ROLE=gateway` with no ComfyUI, `ROLE=worker` per emulator, sharing
that Redis). Every job is a sync `POST /api/serverless/run` answered with JSON (outputs listed,
no base64); the box and the fleet run the same workflows on the same emulators.

- added latency: `EmptyImage 64x64 -> SaveImage` (a new colour each time), one at a time,
  alternately through the box and through gateway + one worker; the difference of the p50s.
- one worker's rate: 4 ms jobs, 10 clients looping (the queue never empty: the rate is what the
  worker sustains), box against gateway + one worker, the same job count each.
- N workers' rate: 0.5 s jobs, 2N clients looping, against N times one box's rate with 2 clients.
  Its jobs name a checkpoint no worker has loaded yet, so that every worker holds it after the
  warm-up: affinity hands a job to a worker holding its models unless it waits AFFINITY_WAIT
  (3 s), so a worker joining a fleet that holds the model takes work only once jobs wait that long.
- CPU per job: the CPU seconds every process of a path spent over the one-worker rate's jobs
  (box: the app and its ComfyUI; fleet: gateway, worker, Redis and its ComfyUI), divided by the
  job count: on two cores, what bounds the rates above. Beside it, the Redis commands the fleet's
  jobs cost (`INFO commandstats`: those its scripts run counted too, and the scripts called).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from . import procs
from .clients import NO_LIMIT, RUN, long_workflow, percentile, small_workflow
from .redis_tier import Redis, fresh_session, set_step_delay
from .report import Figure, goal, info

SECTION = "7. fleet cost"
START_TIMEOUT = 120.0  # seconds a process of the section may take to answer (a loaded machine)
WORKERS = 2  # N of the scaling figure (the two cores allow no more to mean anything)


async def _job(session: aiohttp.ClientSession, url: str, workflow: dict[str, Any]) -> float:
    started = time.perf_counter()
    async with session.post(url + RUN, data=json.dumps(workflow), timeout=NO_LIMIT) as resp:
        payload = json.loads(await resp.read())
    if payload.get("type") != "serverless_api":
        raise RuntimeError(f"job failed: {str(payload)[:300]}")
    return time.perf_counter() - started


async def _rate(clients: int, jobs: int, run: Callable[[], Awaitable[float]]) -> float:
    """Jobs/s of `clients` clients looping `run` until `jobs` jobs are done."""
    left = [jobs]

    async def client() -> None:
        while left[0] > 0:
            left[0] -= 1
            await run()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return jobs / (time.perf_counter() - started)


class Fleet:
    """The processes of the section: Redis, emulators, one box, a gateway and its workers."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.redis = Redis(work)
        self.started: list[procs.Server] = []
        self.emulators: list[procs.Server] = []
        self.workers: list[procs.Server] = []
        self.box: procs.Server | None = None
        self.gateway: procs.Server | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.emulators = [procs.start_emulator(self.work / f"comfyui{n}") for n in range(WORKERS)]
        self.started += self.emulators
        for emulator in self.emulators:
            await emulator.wait_ready(session, "/system_stats", timeout=START_TIMEOUT)
        self.box = procs.start_app(self.work / "box", self.emulators[0].url)
        tier = {"STATUS_BACKEND": "redis", "QUEUE_BACKEND": "redis", "REDIS_URL": self.redis.url}
        self.gateway = procs.start_app(self.work / "gateway", "http://127.0.0.1:9", ROLE="gateway", **tier)
        self.started += [self.box, self.gateway]
        for server in (self.box, self.gateway):
            await server.wait_ready(session, procs.HEALTH, timeout=START_TIMEOUT)
        await self.add_worker(session)

    async def add_worker(self, session: aiohttp.ClientSession | None = None) -> None:
        n = len(self.workers)
        tier = {"STATUS_BACKEND": "redis", "QUEUE_BACKEND": "redis", "REDIS_URL": self.redis.url}
        worker = procs.start_app(
            self.work / f"w{n}", self.emulators[n].url, ROLE="worker", FC_INSTANCE_ID=f"w{n}", **tier
        )
        self.workers.append(worker)
        self.started.append(worker)
        if session is not None:
            await worker.wait_ready(session, procs.HEALTH, timeout=START_TIMEOUT)

    def stop(self) -> None:
        for server in reversed(self.started):
            server.stop()
        self.redis.stop()


async def added_latency(fleet: Fleet, jobs: int) -> list[Figure]:
    assert fleet.box is not None and fleet.gateway is not None
    box, tier = [], []
    colors = iter(range(1, 10**9))
    async with fresh_session() as session:
        await set_step_delay(session, fleet.emulators, 0)
        for _ in range(20):  # warm both paths
            for url in (fleet.box.url, fleet.gateway.url):
                await _job(session, url, small_workflow("bench/fleet-warm/img", next(colors)))
        for index in range(jobs):
            order = [(fleet.box.url, box), (fleet.gateway.url, tier)]
            for url, series in order if index % 2 else order[::-1]:
                series.append(await _job(session, url, small_workflow("bench/fleet/img", next(colors))) * 1000)
    added = percentile(tier, 50) - percentile(box, 50)
    return [
        info(SECTION, "one box p50 / p99, short job", percentile(box, 50), "ms", f"p99 {percentile(box, 99):.2f} ms"),
        info(SECTION, "gateway + worker p50 / p99", percentile(tier, 50), "ms", f"p99 {percentile(tier, 99):.2f} ms"),
        goal(
            SECTION,
            "added by the fleet, p50",
            added,
            "ms",
            "<= 2 ms",
            lambda v: v <= 2.0,
            f"p99 +{percentile(tier, 99) - percentile(box, 99):.2f} ms; {jobs} jobs each, alternately",
        ),
    ]


async def one_worker_rate(fleet: Fleet, jobs: int, clients: int = 10, step: float = 0.004) -> list[Figure]:
    assert fleet.box is not None and fleet.gateway is not None
    seeds = iter(range(1, 10**9))
    rates, cpu = {}, {}
    box_pids = [fleet.box.pid, fleet.emulators[0].pid]
    fleet_pids = [fleet.gateway.pid, fleet.workers[0].pid, fleet.redis.pid, fleet.emulators[0].pid]
    async with fresh_session() as session:
        await set_step_delay(session, fleet.emulators, step)
        for name, url, pids in (("box", fleet.box.url, box_pids), ("fleet", fleet.gateway.url, fleet_pids)):
            for _ in range(5):
                await _job(session, url, long_workflow(1, next(seeds)))
            before = [procs.cpu_seconds(pid) for pid in pids]
            commands = fleet.redis.commands()
            rates[name] = await _rate(clients, jobs, lambda url=url: _job(session, url, long_workflow(1, next(seeds))))
            cpu[name] = [(procs.cpu_seconds(pid) - b) * 1000 / jobs for pid, b in zip(pids, before, strict=True)]
            ran = {command: calls - commands.get(command, 0) for command, calls in fleet.redis.commands().items()}
    ratio = rates["fleet"] / rates["box"]
    parts = ", ".join(
        f"{n} {v:.2f}" for n, v in zip(("gateway", "worker", "Redis", "ComfyUI"), cpu["fleet"], strict=True)
    )
    return [
        info(
            SECTION,
            "CPU per job, one box",
            sum(cpu["box"]),
            "ms",
            f"app {cpu['box'][0]:.2f}, ComfyUI {cpu['box'][1]:.2f}",
        ),
        info(SECTION, "CPU per job, gateway + worker", sum(cpu["fleet"]), "ms", parts),
        info(
            SECTION,
            "Redis commands per job, gateway + worker",
            sum(ran.values()) / jobs,
            "commands",
            f"scripts called {sum(n for c, n in ran.items() if c.startswith('eval')) / jobs:.1f}; "
            f"XADD {ran.get('xadd', 0) / jobs:.1f}, XREAD {ran.get('xread', 0) / jobs:.1f}",
        ),
        info(SECTION, f"one box, {step * 1000:g} ms jobs, {clients} clients", rates["box"], "jobs/s"),
        goal(
            SECTION,
            f"gateway + 1 worker, {step * 1000:g} ms jobs (ratio)",
            ratio,
            "x",
            ">= 0.9 x one box",
            lambda v: v >= 0.9,
            f"{rates['fleet']:.1f} jobs/s; {jobs} jobs each",
        ),
    ]


async def scaling(fleet: Fleet, jobs_per_client: int, step: float = 0.5) -> list[Figure]:
    assert fleet.box is not None and fleet.gateway is not None
    seeds = iter(range(10**6, 10**9))
    cold = "v1-5-pruned-emaonly.safetensors"  # loaded by no worker yet (see the module docstring)

    def job(url: str) -> Awaitable[float]:
        return _job(session, url, long_workflow(1, next(seeds), cold))

    async with fresh_session() as session:
        while len(fleet.workers) < WORKERS:
            await fleet.add_worker(session)
        box, gateway = fleet.box.url, fleet.gateway.url
        await set_step_delay(session, fleet.emulators, 0)
        await _rate(2 * WORKERS, 8 * WORKERS, lambda: job(gateway))  # warm: every worker loads the checkpoint
        await set_step_delay(session, fleet.emulators, step)
        box_rate = await _rate(2, 2 * jobs_per_client, lambda: job(box))
        clients = 2 * WORKERS
        tier_rate = await _rate(clients, clients * jobs_per_client, lambda: job(gateway))
        await set_step_delay(session, fleet.emulators, 0)
    ratio = tier_rate / (WORKERS * box_rate)
    return [
        info(SECTION, f"one box, {step:g} s jobs, 2 clients", box_rate, "jobs/s"),
        goal(
            SECTION,
            f"gateway + {WORKERS} workers, {step:g} s jobs (ratio to {WORKERS} x one box)",
            ratio,
            "x",
            ">= 0.95 x N",
            lambda v: v >= 0.95,
            f"{tier_rate:.2f} jobs/s with {clients} clients",
        ),
    ]


async def fleet_cost(workdir: Path, quick: bool) -> list[Figure]:
    """Section 7 (see the module docstring); its own processes, stopped before it returns."""
    print("fleet cost: one box against gateway + workers (Redis)", flush=True)
    fleet = Fleet(workdir)
    try:
        async with fresh_session() as session:
            await fleet.start(session)
        figures = await added_latency(fleet, 60 if quick else 200)
        figures += await one_worker_rate(fleet, 100 if quick else 300)
        figures += await scaling(fleet, 4 if quick else 6)
    finally:
        fleet.stop()
    return figures


def main() -> None:
    from .report import text_table

    parser = argparse.ArgumentParser(prog="python -m bench.fleet_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs")
    args = parser.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        figures = asyncio.run(fleet_cost(Path(tmp), args.quick))
    print(f"load average at start: {load}")
    print(text_table(figures))


if __name__ == "__main__":
    main()
