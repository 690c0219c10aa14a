"""The fleet's short path, at the level of Redis (a real `redis-server`, databases 25-30): a
gateway gives the job it queues to the lane's lone idle worker in the same round trip
(`queue.ENQUEUE`), and a worker stores a job's last events with the decision of its end in one
step (`status.redis.APPEND_END`), which a cancel acknowledged first still wins."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from serverless.fleet.queue import CANCEL, CANCELLED, EXPIRED, RedisQueue
from serverless.fleet.worker import Consumer
from serverless.jobs.feed import Event, Feed
from serverless.jobs.spec import JobSpec
from serverless.settings import Settings
from serverless.status import keys
from serverless.status.redis import Ending, RedisStatus, connect
from tests.fleet import RedisServer
from tests.helpers import empty_image

WORKER = "w1:8000"


def _run(redis_server: RedisServer, db: int, body: Callable[[Any, RedisStatus], Awaitable[None]]) -> None:
    async def main() -> None:
        client = connect(redis_server.url(db))
        await client.flushdb()
        status = RedisStatus(client, stale_after=60, retention_days=1, max_event_bytes=1 << 20)
        try:
            await body(client, status)
        finally:
            await client.aclose()

    asyncio.run(main())


async def _idle_alone(client: Any, consumer: Consumer) -> None:
    """The worker's state as its `NEXT` leaves it before its blocking read: marked idle, and the
    only worker whose heartbeat is live."""
    await consumer._groups()
    await client.set(keys.idle_worker(""), consumer.name, px=5000)
    await client.zadd(keys.WORKERS, {consumer.name: int(time.time() * 1000)})


def _consumer(client: Any, status: RedisStatus) -> Consumer:
    return Consumer(client, status, None, Settings.from_env({}), WORKER)  # type: ignore[arg-type]


def test_a_job_queued_while_the_lone_worker_waits_is_given_to_it_taken(redis_server: RedisServer) -> None:
    async def body(client: Any, status: RedisStatus) -> None:
        consumer = _consumer(client, status)
        await _idle_alone(client, consumer)
        submitted = await RedisQueue(client, status).submit(JobSpec(empty_image(), task_id="given-1"), "normal", None)
        assert submitted.attempt == 1
        given: Any = await client.xrange(keys.given(WORKER))
        assert len(given) == 1, "its given stream holds the job"
        fields = given[0][1]
        assert fields[b"task_id"] == b"given-1" and fields[b"took"] == b"1" and fields[b"stream"] == b"jobs:normal"
        entry = fields[b"entry"].decode()
        assert await client.get(keys.run_claim("given-1", entry)) == WORKER.encode(), "taken for it"
        assert await client.get(keys.attempts("given-1")) == b"1", "its attempt begun"
        pending: Any = await client.xpending_range("jobs:normal", "workers", "-", "+", 10)
        assert [(p["message_id"].decode(), p["consumer"].decode()) for p in pending] == [(entry, WORKER)]
        assert await client.get(keys.idle_worker("")) is None, "one job per wait"
        # a worker that missed the wake finds it with its next look, once
        taken = await consumer._next(wait=False)
        assert taken is not None and taken.task_id == "given-1" and taken.entry == entry and taken.took == 1
        assert await consumer._next(wait=False) is None

    _run(redis_server, 27, body)


def test_no_job_is_given_while_another_worker_lives_or_jobs_wait(redis_server: RedisServer) -> None:
    async def body(client: Any, status: RedisStatus) -> None:
        consumer = _consumer(client, status)
        queue = RedisQueue(client, status)
        await _idle_alone(client, consumer)
        await client.zadd(keys.WORKERS, {"other:8000": int(time.time() * 1000)})
        await queue.submit(JobSpec(empty_image(), task_id="not-given-1"), "normal", None)
        assert await client.xlen(keys.given(WORKER)) == 0, "another worker may hold its models: NEXT places it"
        await client.zrem(keys.WORKERS, "other:8000")
        await queue.submit(JobSpec(empty_image(), task_id="not-given-2"), "low", None)
        assert await client.xlen(keys.given(WORKER)) == 0, "a job waits already: it goes first"
        first = await consumer._next(wait=False)
        assert first is not None and first.task_id == "not-given-1", "read as ever, in its order"

    _run(redis_server, 28, body)


def test_a_jobs_last_events_are_stored_with_its_end_in_one_step(redis_server: RedisServer) -> None:
    async def body(client: Any, status: RedisStatus) -> None:
        await client.xgroup_create("jobs:normal", "workers", id="0", mkstream=True)
        entry = (await client.xadd("jobs:normal", {"task_id": "settled-1", "spec": "{}"})).decode()
        await client.xreadgroup("workers", WORKER, {"jobs:normal": ">"}, count=1)
        attempt = await status.begin("settled-1")
        feed = Feed()
        for n in range(3):
            feed.publish_payload({"type": "status", "data": {"n": n}})
        last = [Event(4, b'{"type": "serverless_progress"}'), Event(5, b'{"type": "serverless_api"}', True)]
        cancel_key, ended_key = keys.queue_cancel("settled-1", entry), keys.queue_ended("settled-1", entry)
        handoff = keys.handoff(WORKER)
        ending = Ending(cancel_key, ended_key, "succeeded", 60, "jobs:normal", "workers", entry, handoff)
        assert await status.write_settled(attempt, feed, last, ending) is True
        assert (await client.xpending("jobs:normal", "workers"))["pending"] == 0, "acknowledged with them"
        assert ending.newest_handoff == ""
        stored: Any = await client.xrange(attempt.key)
        assert [entry[0] for entry in stored] == [b"0-1", b"0-2", b"0-3", b"0-4", b"0-5"]
        assert stored[-1][1][b"t"] == b"1"
        assert feed.recorded == 5, "its recorder stores them no more"
        cancel = client.register_script(CANCEL)
        names = [keys.run_claim("settled-1", entry), ending.ended_key, ending.cancel_key]
        await client.set(names[0], WORKER)
        assert await cancel(keys=names, args=[CANCELLED, 60, EXPIRED]) == b"ended succeeded", "a later cancel: 409"

    _run(redis_server, 29, body)


def test_a_cancel_acknowledged_first_wins_over_the_step_that_would_store_the_end(redis_server: RedisServer) -> None:
    async def body(client: Any, status: RedisStatus) -> None:
        attempt = await status.begin("settled-2")
        feed = Feed()
        feed.publish_payload({"type": "status", "data": {}})
        cancel_key, ended_key = keys.queue_cancel("settled-2", "1-0"), keys.queue_ended("settled-2", "1-0")
        ending = Ending(cancel_key, ended_key, "succeeded", 60, "jobs:normal", "workers", "1-0", keys.handoff(WORKER))
        await client.xadd(ending.cancel_key, {"cancel": "1"})
        last = [Event(2, b'{"type": "serverless_api"}', True)]
        assert await status.write_settled(attempt, feed, last, ending) is False
        assert await client.xlen(attempt.key) == 0, "nothing stored: the job ends cancelled, stored as any event"
        assert feed.recorded == 0
        ended: Any = await client.xrange(ending.ended_key)
        assert ended[0][1][b"state"] == b"cancelled"

    _run(redis_server, 30, body)


def test_a_job_given_as_its_worker_began_draining_goes_back_to_the_queue_at_once(redis_server: RedisServer) -> None:
    async def body(client: Any, status: RedisStatus) -> None:
        consumer = _consumer(client, status)
        await _idle_alone(client, consumer)
        await RedisQueue(client, status).submit(JobSpec(empty_image(), task_id="given-2"), "normal", None)
        await consumer._give_back_given()  # what a draining worker does as its loop stops
        assert await client.xlen(keys.HANDOFFS) == 1, "free workers are woken to claim it"
        pending: Any = await client.xpending_range("jobs:normal", "workers", "-", "+", 10)
        assert pending[0]["time_since_delivered"] >= 3_600_000, "claimable at once"
        await consumer._give_back_given()
        assert await client.xlen(keys.HANDOFFS) == 1, "handed back once"

    _run(redis_server, 26, body)


def test_a_new_tasks_log_named_by_the_watchs_read_beforehand_wakes_its_follower(redis_server: RedisServer) -> None:
    """A gateway's new sync job takes a spare id: its log is followed with no wake of the watch."""

    async def body(client: Any, status: RedisStatus) -> None:
        watch = status.watch
        assert watch.spare() is None, "the watch does not run yet: the caller wakes it"
        async with watch.news("some-other-log", "0-0"):  # a follower: the watch's read runs
            for _ in range(100):
                spare = watch.spare()
                if spare is not None:
                    break
                await asyncio.sleep(0.01)
            assert spare is not None
            task_id, key, held = spare
            assert key == keys.attempt(task_id, 1)
            await asyncio.sleep(0.05)  # what a queued job's run takes
            await client.xadd(key, {"d": "{}", "t": "0"}, id="0-1")
            await asyncio.wait_for(held.wait(), 5)
            assert [entry[0] for entry in watch.after(key, 0) or []] == [b"0-1"], "read by the watch"
            watch.release(key, held)
        await watch.aclose()

    _run(redis_server, 25, body)
