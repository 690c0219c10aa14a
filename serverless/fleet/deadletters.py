"""Queue entries no worker can run (dead letters): what a gateway never writes, or what cannot be
read back (a bug, a hand-made `XADD`), and jobs whose workers died under them twice (WORKER_LOST).
Each is acknowledged and kept, with why, in `dead:jobs` (capped), so that one bad entry never
stops a consumer; a task it names ends with an error, so its caller hears of it. An operator
lists them (`listed`) and queues one again (`requeue`): the task runs once more, as a new attempt."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from ..core.request import validate_task_id
from ..errors import InvalidParams, NotFound, Unclassified
from ..status import keys
from ..status.redis import RedisStatus
from .wire import GROUP, PRIORITIES, decode_spec, lane_of, stream

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
    begun: int = 0,
) -> None:
    """Acknowledge entry `entry` of `stream` and keep it in `dead:jobs`, in one step (not deleted
    from its stream: the workers' trim removes it, and the group's lag stays exact); its task's
    log ends with why (on attempt `begun` when the entry was taken as it was read)."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.DEAD_LETTERS, _record(stream, entry, fields, reason, consumer), maxlen=KEPT, approximate=True)
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
    error = Unclassified(f"the queued job could not be read by a worker ({reason[:200]})")
    if begun:
        await status.append_terminal(task_id, begun, error)
    elif await client.set(keys.run_claim(task_id, entry), consumer, nx=True, ex=status.ttl):
        attempt = await status.begin(task_id)
        await status.append_terminal(task_id, attempt.number, error)


async def keep(
    client: aioredis.Redis, stream: str, entry: str, fields: dict[Any, Any], reason: str, consumer: str
) -> None:
    """Keep a job that ends without being run again (its worker acknowledges it as ever)."""
    await client.xadd(
        keys.DEAD_LETTERS, _record(stream, entry, fields, reason, consumer), maxlen=KEPT, approximate=True
    )
    log.warning("consumer %s: entry %s of %s kept as a dead letter (%s)", consumer, entry, stream, reason)


def _record(stream: str, entry: str, fields: dict[Any, Any], reason: str, consumer: str) -> dict[Any, Any]:
    return {**fields, "dead_from": stream, "dead_entry": entry, "dead_reason": reason[:500], "dead_consumer": consumer}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A kept entry as an operator sees it (`id`: its id in `dead:jobs`)."""

    id: str
    task_id: str | None
    owner: str | None
    priority: str | None
    stream: str
    reason: str
    consumer: str
    at: float

    def shown(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "task_id": self.task_id,
            "priority": self.priority,
            "lane": lane_of(self.stream),
            "reason": self.reason,
            "worker": self.consumer,
            "at": self.at,
        }


def _letter(entry: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
    letter_id = entry.decode() if isinstance(entry, bytes) else entry
    owner: str | None = None
    try:
        named = json.loads(fields[b"spec"]).get("owner")
        owner = named if isinstance(named, str) else None
    except (KeyError, ValueError, AttributeError):
        pass
    source = fields.get(b"dead_from", b"").decode(errors="replace")
    priority = next((p for p in PRIORITIES if stream(p, lane_of(source)) == source), None)
    task_id = fields.get(b"task_id", b"").decode(errors="replace") or None
    return DeadLetter(
        letter_id,
        task_id,
        owner,
        priority,
        source,
        fields.get(b"dead_reason", b"").decode(errors="replace"),
        fields.get(b"dead_consumer", b"").decode(errors="replace"),
        int(letter_id.split("-")[0]) / 1000,
    )


async def listed(client: aioredis.Redis, limit: int, owner: str | None) -> list[DeadLetter]:
    """The newest `limit` dead letters an operator (`owner`: None sees all) may see, newest first."""
    found: list[DeadLetter] = []
    last = "+"
    while len(found) < limit:
        batch: Any = await client.xrevrange(keys.DEAD_LETTERS, last, "-", count=max(limit, 50))
        letters = [
            _letter(entry, fields)
            for entry, fields in batch
            if (entry.decode() if isinstance(entry, bytes) else entry) != last
        ]
        if not letters:
            break
        found += [letter for letter in letters if owner is None or letter.owner == owner]
        last = letters[-1].id
    return found[:limit]


async def taken_back(
    client: aioredis.Redis, letter_id: str, owner: str | None
) -> tuple[DeadLetter, dict[bytes, bytes]]:
    """A dead letter an operator queues again: removed from `dead:jobs` (XDEL: one operator of
    two wins), with the queue entry's own fields. NotFound for one unknown (or another key's);
    InvalidParams for one no worker could read (it would only die again)."""
    if not _is_entry_id(letter_id):
        raise InvalidParams("a dead letter's id is a stream entry id (<ms>-<seq>)", raw={"id": letter_id[:64]})
    found: Any = await client.xrange(keys.DEAD_LETTERS, letter_id, letter_id)
    if not found or (owner is not None and _letter(*found[0]).owner != owner):
        raise NotFound(f"no dead letter {letter_id}", raw={"id": letter_id})
    letter, fields = _letter(*found[0]), found[0][1]
    try:
        decode_spec(fields[b"spec"], None)
    except Exception as exc:
        raise InvalidParams(f"dead letter {letter_id} is not a job a worker can read", raw={"id": letter_id}) from exc
    if letter.task_id is None or letter.priority is None:
        raise InvalidParams(f"dead letter {letter_id} names no task or queue", raw={"id": letter_id})
    validate_task_id(letter.task_id)
    if not await client.xdel(keys.DEAD_LETTERS, letter_id):
        raise NotFound(f"no dead letter {letter_id} (queued again meanwhile)", raw={"id": letter_id})
    return letter, {key: value for key, value in fields.items() if not key.startswith(b"dead_")}


def _is_entry_id(text: str) -> bool:
    ms, _, seq = text.partition("-")
    return ms.isdigit() and seq.isdigit() and len(text) < 48
