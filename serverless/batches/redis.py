"""Batches in the fleet's Redis (keys in `serverless.status.keys`): any gateway answers for any
batch, and feeds it when its feeder's lease runs out (that instance died or stopped)."""

from __future__ import annotations

import json
from typing import Any

from redis import asyncio as aioredis

from ..status import keys
from ..status.redis import translated
from .spec import Batch
from .store import Progress, check_batch_id

# Renew a lease only while we hold it; take it when nobody does.
LEASE = """
local held = redis.call('GET', KEYS[1])
if held == false or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisBatches:
    """Satisfies `serverless.batches.store.BatchStore`."""

    def __init__(self, client: aioredis.Redis, ttl: int) -> None:
        self.client = client
        self.ttl = ttl
        self._lease = client.register_script(LEASE)
        self._release = client.register_script(RELEASE)

    async def create(self, batch: Batch, progress: Progress) -> None:
        batch_id = check_batch_id(batch.batch_id)
        with translated():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(keys.batch(batch_id), batch.to_json(), ex=self.ttl)
                pipe.set(keys.batch_part(batch_id, "progress"), progress.to_json(), ex=self.ttl)
                pipe.sadd(keys.BATCHES_LIVE, batch_id)
                await pipe.execute()

    async def batch(self, batch_id: str) -> Batch | None:
        with translated():
            data = await self.client.get(keys.batch(check_batch_id(batch_id)))
        return Batch.from_json(data) if data is not None else None

    async def progress(self, batch_id: str) -> Progress | None:
        with translated():
            data = await self.client.get(keys.batch_part(check_batch_id(batch_id), "progress"))
        return Progress.from_json(data) if data is not None else None

    async def states(self, batch_id: str) -> dict[int, str]:
        with translated():
            raw = await self.client.hgetall(keys.batch_part(check_batch_id(batch_id), "states"))
        return {int(index): _text(state) for index, state in raw.items()}

    async def save(self, batch_id: str, progress: Progress, states: dict[int, str], events: list[bytes]) -> None:
        batch_id = check_batch_id(batch_id)
        first = progress.events - len(events) + 1
        with translated():
            async with self.client.pipeline(transaction=True) as pipe:
                if states:
                    pipe.hset(keys.batch_part(batch_id, "states"), mapping={str(i): s for i, s in states.items()})
                for number, event in enumerate(events, first):
                    pipe.xadd(keys.batch_part(batch_id, "events"), {"d": event}, id=f"0-{number}")
                pipe.set(keys.batch_part(batch_id, "progress"), progress.to_json(), ex=self.ttl)
                for part in ("states", "events"):
                    pipe.expire(keys.batch_part(batch_id, part), self.ttl)
                pipe.expire(keys.batch(batch_id), self.ttl)
                if not progress.live:
                    pipe.srem(keys.BATCHES_LIVE, batch_id)
                await pipe.execute()

    async def events(self, batch_id: str, after: int) -> list[tuple[int, bytes]]:
        with translated():
            entries: Any = await self.client.xrange(
                keys.batch_part(check_batch_id(batch_id), "events"), min=f"0-{after + 1}"
            )
        return [(int(_text(entry_id).split("-")[1]), bytes(fields[b"d"])) for entry_id, fields in entries]

    async def ask_cancel(self, batch_id: str) -> None:
        with translated():
            await self.client.set(keys.batch_part(check_batch_id(batch_id), "cancel"), "1", ex=self.ttl)

    async def cancel_asked(self, batch_id: str) -> bool:
        with translated():
            return bool(await self.client.exists(keys.batch_part(check_batch_id(batch_id), "cancel")))

    async def ask_retry(self, batch_id: str, indices: list[int]) -> None:
        batch_id = check_batch_id(batch_id)
        with translated():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.rpush(keys.batch_part(batch_id, "retry"), json.dumps(indices))
                pipe.expire(keys.batch_part(batch_id, "retry"), self.ttl)
                pipe.sadd(keys.BATCHES_LIVE, batch_id)
                await pipe.execute()

    async def take_retries(self, batch_id: str) -> list[int]:
        key = keys.batch_part(check_batch_id(batch_id), "retry")
        with translated():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.lrange(key, 0, -1)
                pipe.delete(key)
                asked, _ = await pipe.execute()
        return [int(index) for entry in asked for index in json.loads(entry)]

    async def live(self) -> list[str]:
        with translated():
            members = await self.client.smembers(keys.BATCHES_LIVE)
        return sorted(_text(member) for member in members)

    async def lease(self, batch_id: str, holder: str, seconds: float) -> bool:
        with translated():
            taken = await self._lease(
                keys=[keys.batch_part(check_batch_id(batch_id), "lease")], args=[holder, int(seconds * 1000)]
            )
        return bool(taken)

    async def release(self, batch_id: str, holder: str) -> None:
        with translated():
            await self._release(keys=[keys.batch_part(check_batch_id(batch_id), "lease")], args=[holder])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
