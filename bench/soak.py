"""`python -m bench soak [--jobs N] [--kills K]`: the Redis tier under a long mixed load, with faults.

A real `redis-server`, one gateway and three workers (each with its own ComfyUI emulator), all
`python -m serverless.server` processes (`tests.fleet.Tier(processes=True)`). N jobs (2,000 by
default) go through the gateway, at most CONCURRENCY at once: sync, SSE and async (polled) in
turn, one in 20 with a ~1 MB base64 input, one in 12 cancelled at a random moment, some slow;
meanwhile K workers (2) are SIGKILLed, one at a time, and started again a few seconds later.

Then it checks what a team running it would: every caller got exactly one terminal payload (an
SSE stream's is its last event), every task's status streams hold exactly one terminal payload
across its attempts (a job never ends twice), no job ran more than twice, no worker held more
than two jobs at once (one running, one queued in its ComfyUI behind it), and Redis holds what it
should: the queue trimmed, no staged inputs left, every other key of a job with a TTL, and once
those expire (simulated: deleted) `used_memory` back within a small constant of its start.
`tests/test_fleet_soak.py` runs a small one (200 jobs, one SIGKILL) in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from tests.fleet import RedisServer, Tier
from tests.helpers import empty_image, txt2img

RUN = "/api/serverless/run"
TERMINAL_TYPES = ("serverless_api", "error")
CONCURRENCY = 48
CALLER_TIMEOUT = 600.0  # no caller may wait longer than this for its terminal payload
SETTLE_TIMEOUT = 60.0  # seconds the queue has to be trimmed and staged inputs deleted after the last job
MEMORY_SLACK = 2 * 1024 * 1024  # "a small constant": what Redis may hold more at the end than at the start
FLEET_ENV = {
    "REDIS_CLAIM_IDLE": "2",  # a killed worker's job is taken again within seconds
    "STATUS_STALE_AFTER": "5",
    "MAX_QUEUED_JOBS": "0",
    "LOG_LEVEL": "debug",  # "job start" lines tell which worker ran what
}


@dataclass(frozen=True, slots=True)
class Plan:
    task_id: str
    mode: str  # sync | sse | async
    big: bool
    slow: bool
    cancel_after: float | None  # seconds after submitting that a cancel is asked (None: never)


@dataclass(slots=True)
class Seen:
    """What one caller received."""

    plan: Plan
    terminals: list[dict[str, Any]] = field(default_factory=list)
    status: int = 0
    problem: str | None = None
    cancel_answer: int | None = None


@dataclass(slots=True)
class Report:
    jobs: int
    kills: int
    seconds: float
    outcomes: Counter[str]
    problems: list[str]
    memory_start: int
    memory_end: int
    memory_after_retention: int
    retained_per_job: float
    runs: Counter[int]
    modes: Counter[str]
    settle_seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return [
            f"soak: {self.jobs} jobs ({dict(self.modes)}), {self.kills} worker(s) SIGKILLed and restarted, "
            f"{self.seconds:.0f} s ({self.jobs / self.seconds:.1f} jobs/s)",
            f"  outcomes: {dict(self.outcomes)}",
            f"  runs per job: {dict(sorted(self.runs.items()))}; queue trimmed and staged inputs gone "
            f"{self.settle_seconds:.1f} s after the last job",
            f"  Redis used_memory: start {self.memory_start / 1e6:.2f} MB, end {self.memory_end / 1e6:.2f} MB "
            f"({self.retained_per_job / 1e3:.1f} KB retained per finished job until STATUS_RETENTION), "
            f"after retention {self.memory_after_retention / 1e6:.2f} MB "
            f"({(self.memory_after_retention - self.memory_start) / 1e3:+.0f} KB)",
            "  every job ended exactly once with a terminal payload"
            if self.ok
            else f"  PROBLEMS ({len(self.problems)}):",
            *(f"    {problem}" for problem in self.problems[:30]),
        ]


def noise_png(side: int, seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(3 * side * side)).save(buffer, format="PNG")
    return buffer.getvalue()


def plans(jobs: int, seed: int) -> list[Plan]:
    rng = random.Random(seed)
    modes = ("sync", "sse", "async")
    return [
        Plan(
            f"soak-{n}",
            modes[n % 3],
            big=n % 20 == 7,
            slow=n % 10 == 3,
            cancel_after=rng.uniform(0.0, 0.6) if n % 12 == 5 else None,
        )
        for n in range(jobs)
    ]


def workflow(plan: Plan, n: int, picture: str) -> dict[str, Any]:
    if plan.slow:
        return txt2img(seed=n, steps=4, prefix=plan.task_id)
    if plan.big:
        return {
            "1": {"class_type": "LoadImage", "inputs": {"image": picture}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": plan.task_id}},
        }
    return empty_image(color=n % 0xFFFFFF, prefix=plan.task_id)


async def call(session: aiohttp.ClientSession, gateway: str, plan: Plan, body: bytes) -> Seen:
    seen = Seen(plan)
    headers = {"X-Fc-Trace-Id": plan.task_id, "Content-Type": "application/json"}
    params: dict[str, str] = {}
    if plan.mode == "async":
        headers = {"x-fc-invocation-type": "async", "x-fc-async-task-id": plan.task_id}
    elif plan.mode == "sse":
        params["stream"] = "true"
    try:
        async with asyncio.timeout(CALLER_TIMEOUT):
            async with session.post(gateway + RUN, data=body, params=params, headers=headers) as answer:
                seen.status = answer.status
                if plan.mode == "sse":
                    async for line in answer.content:
                        if line.startswith(b"data:"):
                            payload = json.loads(line[5:])
                            if seen.terminals:
                                seen.problem = f"an event after the terminal payload: {payload.get('type')}"
                            if payload.get("type") in TERMINAL_TYPES:
                                seen.terminals.append(payload)
                else:
                    payload = await answer.json(content_type=None)
                    if plan.mode == "sync":
                        seen.terminals.append(payload)
                    elif answer.status != 202:
                        seen.terminals.append(payload)  # refused: its answer is its terminal payload
            if plan.mode == "async" and seen.status == 202:
                seen.terminals += await poll(session, gateway, plan.task_id)
    except TimeoutError:
        seen.problem = f"no terminal payload within {CALLER_TIMEOUT:g}s"
    return seen


async def poll(session: aiohttp.ClientSession, gateway: str, task_id: str) -> list[dict[str, Any]]:
    while True:
        async with session.get(gateway + "/api/serverless/status", params={"task_id": task_id}) as answer:
            logged = await answer.json(content_type=None) if answer.status == 200 else []
        ended = [payload for payload in logged if payload.get("type") in TERMINAL_TYPES]
        if ended:
            return ended
        await asyncio.sleep(0.25)


async def cancel(session: aiohttp.ClientSession, gateway: str, plan: Plan) -> int:
    await asyncio.sleep(plan.cancel_after or 0.0)
    async with session.post(gateway + "/api/serverless/cancel", params={"task_id": plan.task_id}) as answer:
        return answer.status


def stored_terminals(client: redis.Redis, task_id: str) -> tuple[int, list[dict[str, Any]]]:
    """The task's attempts, and the terminal payloads its status streams hold across them."""
    attempts = int(client.get(f"task:{task_id}") or 0)  # type: ignore[arg-type]
    found = []
    for number in range(1, attempts + 1):
        for _, fields in client.xrange(f"task:{task_id}:{number}"):  # type: ignore[union-attr]
            if fields.get(b"t") == b"1":
                found.append(json.loads(fields[b"d"]))
    return attempts, found


def in_a_job(log: str) -> bool:
    """Whether the worker whose log this is runs a job now (its last start has no end yet)."""
    events = re.findall(r"job (start|end) task_id=", log[-20000:])
    return bool(events) and events[-1] == "start"


def two_jobs_at_most(name: str, log: str) -> list[str]:
    """Each life of a worker (a killed one's log goes on with its next) held two jobs at most at a
    time: one running, one queued in its ComfyUI behind it (`serverless.fleet.worker`)."""
    problems = []
    for life in log.split("Started server process")[1:]:
        running: list[str] = []
        for kind, task_id in re.findall(r"job (start|end) task_id=(\S+)", life):
            if kind == "start":
                if len(running) >= 2:
                    problems.append(f"{name} started {task_id} while {', '.join(running)} ran")
                running.append(task_id)
            elif task_id in running:
                running.remove(task_id)
    return problems


def outcome(payload: dict[str, Any]) -> str:
    return "succeeded" if payload.get("type") == "serverless_api" else str(payload.get("error_code"))


def settled(client: redis.Redis) -> bool:
    """The queue holds at most the entry last handed out per stream, and no staged inputs are left."""
    streams = [f"jobs:{p}" for p in ("high", "normal", "low")]
    return all(int(client.xlen(s)) <= 1 for s in streams) and not client.keys("staged:*")  # type: ignore[arg-type]


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])  # type: ignore[index]


def expire_retained(client: redis.Redis) -> list[str]:
    """Delete every key with a TTL (what STATUS_RETENTION and the other TTLs do in time); return
    the names of the keys without one (they must not grow with the jobs run)."""
    kept = []
    for key in client.scan_iter(count=1000):
        ttl = int(client.ttl(key))  # type: ignore[arg-type]
        if ttl >= 0:
            client.delete(key)
        elif ttl == -1:  # -2: it expired meanwhile
            kept.append(key.decode())
    return kept


async def soak(
    root: Path, jobs: int = 2000, kills: int = 2, workers: int = 3, seed: int = 27, spared_in_process: bool = False
) -> Report:
    """Run the soak in `root` (its Redis, processes and logs); the report says what held.
    `spared_in_process`: the workers never killed run in this process (the suite's small soak)."""
    server = RedisServer(root / "redis")
    fleet = Tier(root, server.url(0), dict(FLEET_ENV), processes=True)
    doomed = {k % workers for k in range(kills)}  # the killer below kills worker k % workers
    problems: list[str] = []
    try:
        gateway = fleet.gateway()
        for index in range(workers):
            fleet.worker(step_delay=0.02, process=index in doomed or not spared_in_process)
        client = redis.Redis.from_url(server.url(0))
        memory_start = used_memory(client)
        picture = "data:image/png;base64," + base64.b64encode(noise_png(600, seed)).decode()
        planned = plans(jobs, seed)
        bodies = {plan.task_id: json.dumps(workflow(plan, n, picture)).encode() for n, plan in enumerate(planned)}
        done = 0
        limit = asyncio.Semaphore(CONCURRENCY)
        started = time.monotonic()
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one(plan: Plan) -> Seen:
                nonlocal done
                async with limit:
                    caller = asyncio.ensure_future(call(session, gateway.url, plan, bodies[plan.task_id]))
                    asked = await cancel(session, gateway.url, plan) if plan.cancel_after is not None else None
                    seen = await caller
                    seen.cancel_answer = asked
                    done += 1
                    return seen

            async def killer() -> int:
                for k in range(kills):
                    while True:  # a share of the jobs done first
                        if done >= jobs * (k + 1) / (kills + 1):
                            break
                        await asyncio.sleep(0.1)
                    index = k % workers
                    for _ in range(100):  # killed mid-job: its job is taken again by another worker
                        if await asyncio.to_thread(in_a_job, fleet.workers[index].log_text()):
                            break
                        await asyncio.sleep(0.05)
                    await asyncio.to_thread(fleet.workers[index].kill)
                    await asyncio.sleep(3.0)
                    await asyncio.to_thread(fleet.restart_worker, index)
                return kills

            killing = asyncio.create_task(killer())
            seen = await asyncio.gather(*(one(plan) for plan in planned))
            killed = await killing
        seconds = time.monotonic() - started

        outcomes: Counter[str] = Counter()
        runs: Counter[int] = Counter()
        starts = Counter(task for node in fleet.workers for task in node.started())
        for each in seen:
            task_id = each.plan.task_id
            if each.problem:
                problems.append(f"{task_id} ({each.plan.mode}): {each.problem}")
            if len(each.terminals) != 1:
                problems.append(f"{task_id} ({each.plan.mode}): {len(each.terminals)} terminal payloads to its caller")
                continue
            told = each.terminals[0]
            outcomes[outcome(told)] += 1
            if told.get("error_code") in ("BUSY",) or each.status == 0:
                continue
            attempts, stored = stored_terminals(client, task_id)
            if len(stored) != 1:
                problems.append(f"{task_id}: {len(stored)} terminal payloads stored over {attempts} attempt(s)")
            elif outcome(stored[0]) != outcome(told):
                problems.append(f"{task_id}: its caller was told {outcome(told)}, its log says {outcome(stored[0])}")
            runs[starts[task_id]] += 1
            if starts[task_id] > 2:
                problems.append(f"{task_id} ran {starts[task_id]} times")
            if each.plan.cancel_after is None and outcome(told) == "EXECUTION_INTERRUPTED":
                problems.append(f"{task_id}: interrupted though no one cancelled it: {told.get('error_message')}")
        for node in fleet.workers:
            problems += two_jobs_at_most(node.name, node.log_text())

        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            if settled(client):
                break
            await asyncio.sleep(0.5)
        settle_seconds = SETTLE_TIMEOUT - (deadline - time.monotonic())
        if not settled(client):
            lengths = {p: client.xlen(f"jobs:{p}") for p in ("high", "normal", "low")}
            problems.append(f"the queue is not trimmed or staged inputs are left: {lengths}, {client.keys('staged:*')}")
        memory_end = used_memory(client)
        kept = expire_retained(client)
        allowed = re.compile(r"^(jobs:(high|normal|low)(:added)?|fleet:.*|dead:jobs|comfy:number)$")
        for key in kept:
            if not allowed.match(key):
                problems.append(f"key {key} has no TTL")
        memory_after = used_memory(client)
        if memory_after - memory_start > MEMORY_SLACK:
            problems.append(f"Redis holds {memory_after - memory_start} bytes more than at the start once TTLs expired")
        return Report(
            jobs,
            killed,
            seconds,
            outcomes,
            problems,
            memory_start,
            memory_end,
            memory_after,
            (memory_end - memory_start) / max(jobs, 1),
            runs,
            Counter(plan.mode for plan in planned),
            settle_seconds,
        )
    finally:
        fleet.stop()
        server.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=2, help="workers SIGKILLed (and started again) meanwhile")
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        report = asyncio.run(soak(Path(tmp), args.jobs, args.kills, args.workers))
        print("\n".join(report.lines()))
    return 0 if report.ok else 1
