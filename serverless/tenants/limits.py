"""A key's limits: `rate=N/s` (jobs it may start per second) and `concurrency=N` (its jobs running at
once on a box; a fleet's gateways admit them into the queue in `serverless.fleet.admission`).

The rate is a GCRA (the generic cell rate algorithm, a token bucket kept as one time): each job
moves the key's "theoretical arrival time" on by 1/N s; a job is refused while that time is more
than one second's burst ahead of now, and told when to come back (`Retry-After`). On one box the
time is kept in memory; with Redis every gateway shares it, moved by one Lua script on Redis' own
clock (the gateways' clocks never meet).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import redis.asyncio as aioredis

from ..errors import RateLimited
from ..status import keys
from ..status.redis import translated


class RateLimiter(Protocol):
    async def wait_for(self, owner: str, rate: float) -> float:
        """0 when a job of `owner` may start now (and it is counted), else the seconds until one may."""
        ...


def _burst(rate: float) -> float:
    return max(1.0, math.floor(rate))  # one second's worth of jobs at once


class MemoryRate:
    """The GCRA of each key, in this process (one box)."""

    def __init__(self) -> None:
        self._arrival: dict[str, float] = {}

    async def wait_for(self, owner: str, rate: float) -> float:
        now = time.monotonic()
        interval = 1.0 / rate
        arrival = max(self._arrival.get(owner, now), now)
        ahead = arrival + interval - now - _burst(rate) * interval
        if ahead > 1e-9:
            return ahead
        self._arrival[owner] = arrival + interval
        return 0.0


# KEYS[1] the key's arrival time (ms); ARGV: interval (ms), burst tolerance (ms). -> 0 or ms to wait
GCRA = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local arrival = tonumber(redis.call('GET', KEYS[1]) or '0')
if arrival < now then arrival = now end
local ahead = arrival + interval - now - tolerance
if ahead > 0 then return ahead end
redis.call('SET', KEYS[1], arrival + interval, 'PX', math.ceil(arrival + interval - now) + 1000)
return 0
"""


class RedisRate:
    """The GCRA of each key in Redis: every gateway sharing it counts the same jobs."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._script = client.register_script(GCRA)

    async def wait_for(self, owner: str, rate: float) -> float:
        interval = 1000.0 / rate
        with translated():
            ahead: Any = await self._script(keys=[keys.key_rate(owner)], args=[interval, _burst(rate) * interval])
        return float(ahead) / 1000.0


async def check_rate(limiter: RateLimiter, owner: str | None, label: str, rate: float) -> None:
    """RateLimited (429, `Retry-After`) when the key started its `rate` of jobs this second."""
    if owner is None or rate <= 0:
        return
    wait = await limiter.wait_for(owner, rate)
    if wait > 0:
        raise RateLimited(
            f"API key {label!r} may start {rate:g} job(s) a second (rate={rate:g}/s): retry in {wait:.2f}s",
            wait,
            raw={"key": label, "rate": rate, "retry_after_s": round(wait, 3)},
        )


class KeyGates:
    """A key's jobs running at once on this box, at most its `concurrency=`: the others wait (in
    the order they came) behind its own, and other keys' jobs pass them."""

    def __init__(self) -> None:
        self._gates: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self._users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def slot(self, owner: str | None, limit: int) -> AsyncIterator[None]:
        if owner is None or limit <= 0:
            yield
            return
        gate = self._gates.get(owner)
        if gate is None or gate[1] != limit:  # a new limit counts for the jobs that come from now on
            gate = (asyncio.Semaphore(limit), limit)
            self._gates[owner] = gate
        self._users[owner] = self._users.get(owner, 0) + 1
        try:
            async with gate[0]:
                yield
        finally:
            self._users[owner] -= 1
            if not self._users[owner]:
                del self._users[owner]
                if self._gates.get(owner) is gate:
                    del self._gates[owner]
