"""Records kept beside the Redis status streams for job control, as the file store keeps its
sidecars (`serverless.status.sidecars`), for instances that share Redis but no queue
(`STATUS_BACKEND=redis`, `QUEUE_BACKEND=none`):

    task:<id>:<n>:cancel   a cancel request for attempt n (the instance running it looks for it)
    idempotency:<key>      an `Idempotency-Key` claim: `{"task_id", "digest"}` of the request

Both expire with the logs. Redis errors are the caller's to translate (`RedisStatus`).
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from . import keys

# Release a claim only while it still holds our task: a GET and a DEL apart could free another's.
RELEASE = """
local found = redis.call('GET', KEYS[1])
if found and cjson.decode(found)['task_id'] == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def key_name(key: str) -> str:
    return keys.idempotency(key)


async def request_cancel(client: aioredis.Redis, request_key: str, ttl: int) -> None:
    """Leave a cancel request (its key: `keys.cancel_request`)."""
    await client.set(request_key, "1", ex=ttl)


async def cancels_asked(client: aioredis.Redis, request_keys: list[str]) -> list[bool]:
    """For each cancel request key (`keys.cancel_request`), whether the request is there."""
    if not request_keys:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for request_key in request_keys:
            pipe.exists(request_key)
        return [bool(found) for found in await pipe.execute()]


async def claim_key(client: aioredis.Redis, key: str, record: dict[str, Any], ttl: int) -> dict[str, Any] | None:
    """Claim `key` for `record` (SET NX: of two claimers one wins, and it is written whole at
    once); None when claimed here, else what the claim holds ({} when it went in between: the
    caller claims again)."""
    if await client.set(key_name(key), json.dumps(record), nx=True, ex=ttl):
        return None
    return await read_key(client, key)


async def read_key(client: aioredis.Redis, key: str) -> dict[str, Any]:
    """What a claimed key holds; {} when it is not there."""
    found: Any = await client.get(key_name(key))
    if found is None:
        return {}
    try:
        record = json.loads(found)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


async def release_key(client: aioredis.Redis, key: str, task_id: str) -> None:
    """Give a claim up, unless it now holds another task."""
    await client.eval(RELEASE, 1, key_name(key), task_id)
