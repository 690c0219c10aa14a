"""An instance's Redis connections under a burst (a real `redis-server`; nothing is written): callers
queue for the pool's connections as long as others give theirs back, and are told why when none
comes back (`status.redis.PatientPool`)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rexc

from serverless.status import redis as status_redis
from serverless.status.redis import connect, unavailable
from tests.fleet import RedisServer


def test_a_burst_of_callers_waits_its_turn_for_connections_that_keep_coming_back(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixty calls on two connections, each held 0.1 s: the last waits ~3 s, past a 2 s wait for
    a connection, and is answered, as every other (a connection came back every 0.1 s)."""
    monkeypatch.setattr(status_redis, "POOL_WAIT", 2.0)

    async def main() -> list[object]:
        client = connect(redis_server.url(), max_connections=2)
        try:
            calls = [client.blpop([f"nothing-{n}"], timeout=0.1) for n in range(60)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.aclose()

    answers = asyncio.run(main())
    assert answers == [None] * 60  # each BLPOP timed out in Redis, none failed for want of a connection


def test_connections_that_all_stay_taken_fail_the_wait_saying_so(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status_redis, "POOL_WAIT", 0.5)

    async def main() -> BaseException | None:
        client = connect(redis_server.url(), max_connections=2)
        try:
            held = [asyncio.ensure_future(client.blpop([f"held-{n}"], timeout=20)) for n in range(2)]
            await _blocked_in_redis(redis_server, 2)  # both connections taken, none given back for 20 s
            try:
                await client.ping()
            except rexc.ConnectionError as exc:
                return exc
            finally:
                for call in held:
                    call.cancel()
                await asyncio.gather(*held, return_exceptions=True)
            return None
        finally:
            await client.aclose()

    failed = asyncio.run(main())
    assert isinstance(failed, rexc.ConnectionError)
    message = unavailable(failed).message
    assert "all 2 of this instance's connections to it stayed in use for 0.5 s" in message, message


async def _blocked_in_redis(redis_server: RedisServer, count: int) -> None:
    """Until `count` clients wait in a BLPOP, as Redis lists its clients."""
    watcher = aioredis.Redis.from_url(redis_server.url())
    try:
        for _ in range(600):
            if sum(client["cmd"] == "blpop" for client in await watcher.client_list()) >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{count} clients never waited in Redis")
    finally:
        await watcher.aclose()
