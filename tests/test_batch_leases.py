"""A batch's lease asked for by several callers of one instance at the same moment: a retry's
request takes the batch up while the instance's scan finds it live again. Both stores (the status
folder on a box, the fleet's Redis) grant the holder its lease without an error, and the instance
starts one feeder for the batch, not one per caller (two would submit its items twice)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from serverless.batches.feeder import Feeders
from serverless.batches.redis import RedisBatches
from serverless.batches.spec import Batch
from serverless.batches.store import BatchStore, FileBatches
from serverless.settings import BatchSettings
from serverless.status.redis import connect
from tests.fleet import RedisServer

DATABASE = 31  # below the topologies' (32 and up)
BATCH_ID = "batch-0123456789abcdef"
AT_ONCE = 32


@pytest.fixture(params=["box", "fleet"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BatchStore]:
    if request.param == "box":
        (tmp_path / "~batches" / BATCH_ID).mkdir(parents=True)  # made by the batch's creation
        yield FileBatches(tmp_path / "~batches")
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis.Redis.from_url(server.url(DATABASE)).flushdb()
    client = connect(server.url(DATABASE))
    yield RedisBatches(client, ttl=600)
    await client.aclose()


class Counted:
    """The store, counting the feeders started (each reads its batch once, first)."""

    def __init__(self, store: BatchStore) -> None:
        self.store, self.feeders_started = store, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    async def batch(self, batch_id: str) -> Batch | None:
        self.feeders_started += 1
        return None  # nothing to feed: the feeder ends at once


async def test_the_holder_asking_its_lease_many_times_at_once_gets_it_every_time(store: BatchStore) -> None:
    granted = await asyncio.gather(*(store.lease(BATCH_ID, "gateway-1", 30) for _ in range(AT_ONCE)))
    assert granted == [True] * AT_ONCE
    assert not await store.lease(BATCH_ID, "gateway-2", 30)  # held: another instance waits
    await store.release(BATCH_ID, "gateway-1")
    assert await store.lease(BATCH_ID, "gateway-2", 30)


async def test_a_batch_taken_up_by_many_callers_at_once_gets_one_feeder(store: BatchStore) -> None:
    counted = Counted(store)
    feeders = Feeders(resources=None, jobs=None, store=counted, settings=BatchSettings(), holder="gateway-1")  # type: ignore[arg-type]
    await asyncio.gather(*(feeders.take(BATCH_ID) for _ in range(AT_ONCE)))
    await asyncio.sleep(0)  # every feeder started has taken its first step (reading its batch)
    assert counted.feeders_started == 1
    await feeders.aclose()
    await feeders.take(BATCH_ID)  # the first has ended: a later take starts the next
    await asyncio.sleep(0)
    assert counted.feeders_started == 2
    await feeders.aclose()
