"""A cancel the Redis client swallows still stops the loops that call it.

redis-py, cancelled inside a call, may return as if nothing happened (seen with a blocking XREAD
cancelled as it starts) or raise ConnectionError: a background loop that went on would never end,
and the instance's shutdown, which waits for it, would hang (a fleet gateway did, in the suite).
"""

from __future__ import annotations

import asyncio

import pytest

from serverless.batches.feeder import Feeders
from serverless.settings import BatchSettings
from serverless.status.redis import translated
from serverless.status.watch import still_cancelled

STOPS_WITHIN = 10.0  # seconds: each loop below stops at once; the bound only ends a hung test


class SwallowingStore:
    """A batch store whose `live` swallows a cancel, as the Redis client may."""

    def __init__(self) -> None:
        self.calls = asyncio.Event()

    async def live(self) -> list[str]:
        self.calls.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass  # swallowed: returns as if nothing happened
        return []


async def test_the_batch_feeders_loop_stops_when_its_store_swallowed_the_cancel() -> None:
    store = SwallowingStore()
    feeders = Feeders(resources=None, jobs=None, store=store, settings=BatchSettings(lease_seconds=0.3), holder="h")  # type: ignore[arg-type]
    task = asyncio.create_task(feeders.run_forever())
    await store.calls.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), STOPS_WITHIN)
    assert task.cancelled()


async def test_a_redis_error_met_by_a_cancelled_task_is_a_cancel() -> None:
    async def call() -> None:
        with translated():
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:  # what redis-py may do: the cancel becomes a lost connection
                raise ConnectionError("connection lost") from None

    task = asyncio.create_task(call())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_loop_with_no_cancel_pending_goes_on() -> None:
    still_cancelled()  # nothing pending: it returns, and a loop's round goes on
