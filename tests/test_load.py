"""Load: 1,000 tiny jobs at 50 at a time against the emulator (step_delay 0), sync and SSE mixed.

Every job must end with its result, and afterwards the app must hold no more than before: no
running jobs (health's `jobs`), no leaked file descriptors (sockets, status-log files), no memory
growth beyond allocator slack. Before/after are both measured after a warm-up (connection pools
filled, imports and caches settled), so what grows with the number of jobs shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import aiohttp
import pytest
import requests

from tests.helpers import RUN, empty_image

pytestmark = pytest.mark.timeout(240)

JOBS = 1000
CONCURRENCY = 50
WARMUP_JOBS = 200
# Allowances for what legitimately varies between two quiet moments: pooled keep-alive connections
# to ComfyUI (up to one per concurrent job; measured 27-47 fds at rest after runs of 50 at once)
# and the allocator's free lists. A leak per job would show as ~1,000.
FD_SLACK = CONCURRENCY
RSS_SLACK_MIB = 6.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def one_job(session: aiohttp.ClientSession, url: str, index: int) -> str | None:
    """Run job `index`; None when it ended with its result, else what went wrong."""
    # A new colour each time, or ComfyUI answers from its cache without running anything.
    workflow = empty_image(width=4 + index % 5, height=4, color=index, prefix=f"load/{index % 10}/img")
    stream = index % 5 == 0
    params = {"stream": "true"} if stream else {}
    async with session.post(url + RUN, data=json.dumps(workflow), params=params) as response:
        if stream:
            lines = [line async for line in response.content]
            payload = json.loads([line for line in lines if line.startswith(b"data: ")][-1][6:])
        else:
            payload = await response.json(content_type=None)
    if response.status != 200 or payload.get("type") != "serverless_api" or len(payload["data"]["results"]) != 1:
        return f"job {index}: HTTP {response.status}: {str(payload)[:300]}"
    return None


async def run_jobs(url: str, first: int, count: int) -> list[str]:
    """`count` jobs, CONCURRENCY at a time, on one client session closed at the end."""
    pending = iter(range(first, first + count))
    errors: list[str] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in pending:
            try:
                error = await one_job(session, url, index)
            except (aiohttp.ClientError, ValueError, IndexError) as exc:
                error = f"job {index}: {type(exc).__name__}: {exc}"
            if error:
                errors.append(error)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY), timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    return errors


def quiet(url: str, pid: int) -> tuple[int, float]:
    """Wait until no job runs and the fd count holds still; then (fds, RSS MiB)."""
    deadline = time.monotonic() + 30
    while requests.get(url + "/api/serverless/health", timeout=10).json()["jobs"]:
        assert time.monotonic() < deadline, "jobs still running long after their callers got results"
        time.sleep(0.05)
    previous = -1
    while (fds := open_fds(pid)) != previous and time.monotonic() < deadline:
        previous = fds
        time.sleep(0.3)
    return fds, rss_mib(pid)


def test_a_thousand_jobs_at_fifty_at_once_leave_nothing_behind(own_emulator, start_app):
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0}, timeout=5).raise_for_status()
    server = start_app(own_emulator.url)
    pid = server.proc.pid

    errors = asyncio.run(run_jobs(server.url, 0, WARMUP_JOBS))
    assert not errors, errors[:5]
    fds_before, rss_before = quiet(server.url, pid)

    started = time.monotonic()
    errors = asyncio.run(run_jobs(server.url, WARMUP_JOBS, JOBS))
    elapsed = time.monotonic() - started
    assert not errors, f"{len(errors)} of {JOBS} jobs failed: {errors[:5]}"
    fds_after, rss_after = quiet(server.url, pid)

    queue: dict[str, Any] = requests.get(own_emulator.url + "/queue", timeout=5).json()
    assert queue == {"queue_running": [], "queue_pending": []}
    assert fds_after <= fds_before + FD_SLACK, f"open fds {fds_before} -> {fds_after} over {JOBS} jobs"
    assert rss_after <= rss_before + RSS_SLACK_MIB, f"RSS {rss_before:.1f} -> {rss_after:.1f} MiB over {JOBS} jobs"
    assert elapsed < 180, "1,000 tiny jobs must not take minutes"
    print(
        f"\n{JOBS} jobs in {elapsed:.1f}s; fds {fds_before} -> {fds_after}; RSS {rss_before:.1f} -> {rss_after:.1f} MiB"
    )
