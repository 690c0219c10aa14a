"""Queue entries no worker can run (dead letters): what a gateway never writes, or what cannot be
read back (a bug, a hand-made `XADD`). Each is acknowledged and kept, with why, in `dead:jobs`
(capped), so that one bad entry never stops a consumer; a task it names ends with an error, so
its caller hears of it."""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis

from ..core.request import validate_task_id
from ..errors import Unclassified
from ..status import keys
from ..status.redis import RedisStatus
from .wire import GROUP

log = logging.getLogger(__name__)

KEPT = 1000  # entries kept (MAXLEN ~): an operator looks at the newest


async def bury(
    client: aioredis.Redis,
    status: RedisStatus,
    stream: str,
    entry: str,
    fields: dict[bytes, bytes],
    reason: str,
    consumer: str,
) -> None:
    """Acknowledge entry `entry` of `stream` and keep it in `dead:jobs`, in one step (not deleted
    from its stream: the workers' trim removes it, and the group's lag stays exact)."""
    record: dict[Any, Any] = {
        **fields,
        "dead_from": stream,
        "dead_entry": entry,
        "dead_reason": reason[:500],
        "dead_consumer": consumer,
    }
    async with client.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.DEAD_LETTERS, record, maxlen=KEPT, approximate=True)
        pipe.xack(stream, GROUP, entry)
        await pipe.execute()
    log.error(
        "consumer %s: entry %s of %s cannot be run (%s): moved to %s",
        consumer,
        entry,
        stream,
        reason,
        keys.DEAD_LETTERS,
    )
    try:
        task_id = fields[b"task_id"].decode()
        validate_task_id(task_id)
    except Exception:
        return  # no task to tell
    if await client.set(keys.run_claim(task_id, entry), consumer, nx=True, ex=status.ttl):
        attempt = await status.begin(task_id)
        error = Unclassified(f"the queued job could not be read by a worker ({reason[:200]})")
        await status.append_terminal(task_id, attempt.number, error)
