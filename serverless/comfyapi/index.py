"""The prompts queued through ComfyUI's own API, as any instance reads them: their numbers, the
workflow and client each came with, which are not known to have ended yet (`/queue`), and, per
websocket client, the tasks queued for it (`/ws` follows them from any gateway).

    PromptIndex
    ├── MemoryIndex   one box: this process's prompts
    └── RedisIndex    a fleet: every gateway's, in the fleet's Redis (keys in `status.keys`)

A task's events and its end are the status store's; the index only names the tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from redis import asyncio as aioredis

from ..status import keys
from ..status.redis import translated
from ..status.watch import StreamWatch

KEY_TTL = 86400  # seconds an API v2 Idempotency-Key stays claimed (its spec: 24 h)
KEEP = 10000  # prompts listed (ComfyUI's MAXIMUM_HISTORY_SIZE)
CLIENT_KEEP = 1000  # tasks remembered per websocket client


@dataclass(frozen=True, slots=True)
class PromptEntry:
    """One prompt as `/queue` and `/history` show it. `extra_data` is never kept (API-node keys
    live there): only the client id ComfyUI shows of it."""

    task_id: str
    number: int
    workflow: dict[str, Any] = field(repr=False)
    client_id: str | None = None
    outputs: tuple[str, ...] = ()  # the output nodes it executes
    owner: str | None = None  # the caller's key digest (API keys)
    created: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> PromptEntry:
        raw = json.loads(data)
        return cls(**{**raw, "outputs": tuple(raw.get("outputs") or ())})


class PromptIndex(Protocol):
    # Whether other instances answer for its prompts (`/history`, `/queue`): a fleet's, in Redis.
    # A process's own are answered only by it, from the job itself while it runs here.
    shared: bool

    def bell(self, client_id: str) -> contextlib.AbstractContextManager[asyncio.Event]:
        """Set when a prompt for `client_id` is queued on this instance (`Bells`)."""
        ...

    def ring(self, client_id: str | None) -> None:
        """A prompt for `client_id` was queued here: wake its followers."""
        ...

    def news(self, client_id: str, cursor: str) -> contextlib.AbstractAsyncContextManager[asyncio.Event]:
        """Set when a prompt for `client_id` is queued after `cursor` (`client_cursor`), on this
        instance (its bell) or on another (a fleet's: the instance's one blocking Redis read
        wakes it), while the block lasts."""
        ...

    async def add(self, entry: PromptEntry) -> None:
        """Keep a new prompt, live, and tell its client's followers."""
        ...

    async def number(self, front: bool) -> int:
        """A new prompt's number: growing, negative for one queued `front` (as ComfyUI numbers them)."""
        ...

    async def get(self, task_id: str) -> PromptEntry | None: ...

    async def recent(self, limit: int | None) -> list[PromptEntry]:
        """The newest `limit` prompts (all with None), oldest first."""
        ...

    async def live(self) -> list[PromptEntry]:
        """The prompts not yet seen ended, oldest first."""
        ...

    async def settled(self, task_ids: list[str]) -> None:
        """These prompts were seen ended: `live` leaves them out from now on."""
        ...

    async def forget(self, task_ids: list[str] | None) -> None:
        """Leave these prompts (all with None) out of the history (ComfyUI's `POST /history`)."""
        ...

    async def client_cursor(self, client_id: str) -> str:
        """Where a websocket client connecting now starts following its tasks."""
        ...

    async def client_tasks(self, client_id: str, cursor: str) -> tuple[list[str], str]:
        """The tasks queued for `client_id` after `cursor`, and the cursor after them."""
        ...

    async def put_asset(self, record: dict[str, Any]) -> None:
        """Keep an API v2 asset record (`id`, `hash`, the staged file's `name`...)."""
        ...

    async def asset(self, asset_id: str) -> dict[str, Any] | None: ...

    async def asset_by_hash(self, digest: str) -> dict[str, Any] | None:
        """The newest asset record over the bytes of that `blake3:` hash."""
        ...

    async def delete_asset(self, asset_id: str) -> bool:
        """Forget an asset record (its bytes stay for the others over them); False when unknown."""
        ...

    async def claim_key(self, key: str) -> bool:
        """Claim an API v2 `Idempotency-Key` for KEY_TTL seconds: False when claimed before."""
        ...

    async def release_key(self, key: str) -> None:
        """Give a claim up: its submission was refused, nothing was queued."""
        ...


class Bells:
    """Wakes this instance's `/ws` followers of a client id the moment a prompt for it is queued
    here (`RedisIndex` adds those queued on other gateways)."""

    def __init__(self) -> None:
        self._bells: dict[str, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def bell(self, client_id: str) -> Iterator[asyncio.Event]:
        """An event set when a prompt for `client_id` is queued here, while the block lasts."""
        event = asyncio.Event()
        self._bells.setdefault(client_id, set()).add(event)
        try:
            yield event
        finally:
            bells = self._bells.get(client_id)
            if bells is not None:
                bells.discard(event)
                if not bells:
                    del self._bells[client_id]

    def ring(self, client_id: str | None) -> None:
        for event in self._bells.get(client_id or "", ()):
            event.set()

    @contextlib.asynccontextmanager
    async def news(self, client_id: str, cursor: str) -> AsyncIterator[asyncio.Event]:
        """The bell alone: every prompt is queued here."""
        with self.bell(client_id) as event:
            yield event


class MemoryIndex(Bells):
    """One box's prompts, in this process."""

    shared = False

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[str, PromptEntry] = {}
        self._live: set[str] = set()
        # Per client: how many tasks were ever queued for it (its cursor), and the newest CLIENT_KEEP.
        self._clients: dict[str, tuple[int, list[str]]] = {}
        self._numbers = itertools.count()
        self._assets: dict[str, dict[str, Any]] = {}
        self._hashes: dict[str, str] = {}
        self._keys: dict[str, float] = {}  # Idempotency-Key -> claimed until (monotonic)

    async def number(self, front: bool) -> int:
        number = next(self._numbers)
        return -number if front else number

    async def add(self, entry: PromptEntry) -> None:
        self._entries.pop(entry.task_id, None)
        self._entries[entry.task_id] = entry
        self._live.add(entry.task_id)
        while len(self._entries) > KEEP:
            self._live.discard(next(iter(self._entries)))
            del self._entries[next(iter(self._entries))]
        if entry.client_id:
            count, tasks = self._clients.get(entry.client_id, (0, []))
            tasks.append(entry.task_id)
            del tasks[:-CLIENT_KEEP]
            self._clients[entry.client_id] = (count + 1, tasks)

    async def get(self, task_id: str) -> PromptEntry | None:
        return self._entries.get(task_id)

    async def recent(self, limit: int | None) -> list[PromptEntry]:
        entries = list(self._entries.values())
        return entries[-limit:] if limit else entries

    async def live(self) -> list[PromptEntry]:
        return [entry for entry in self._entries.values() if entry.task_id in self._live]

    async def settled(self, task_ids: list[str]) -> None:
        self._live.difference_update(task_ids)

    async def forget(self, task_ids: list[str] | None) -> None:
        for task_id in list(self._entries) if task_ids is None else task_ids:
            if task_id not in self._live:  # ComfyUI's history holds ended prompts only
                self._entries.pop(task_id, None)

    async def client_cursor(self, client_id: str) -> str:
        return str(self._clients.get(client_id, (0, []))[0])

    async def client_tasks(self, client_id: str, cursor: str) -> tuple[list[str], str]:
        """The cursor counts every task ever queued for the client (not those kept: a client
        past CLIENT_KEEP prompts still gets each new one)."""
        count, tasks = self._clients.get(client_id, (0, []))
        first = count - len(tasks)  # the number of the oldest task kept
        return tasks[max(0, int(cursor) - first) :], str(count)

    async def put_asset(self, record: dict[str, Any]) -> None:
        self._assets[record["id"]] = record
        if record.get("hash"):
            self._hashes[record["hash"]] = record["id"]

    async def asset(self, asset_id: str) -> dict[str, Any] | None:
        return self._assets.get(asset_id)

    async def asset_by_hash(self, digest: str) -> dict[str, Any] | None:
        asset_id = self._hashes.get(digest)
        return self._assets.get(asset_id) if asset_id is not None else None

    async def delete_asset(self, asset_id: str) -> bool:
        return self._assets.pop(asset_id, None) is not None

    async def claim_key(self, key: str) -> bool:
        now = time.monotonic()
        if self._keys.get(key, 0.0) > now:
            return False
        self._keys = {k: until for k, until in self._keys.items() if until > now}
        self._keys[key] = now + KEY_TTL
        return True

    async def release_key(self, key: str) -> None:
        self._keys.pop(key, None)


class RedisIndex(Bells):
    """Every gateway's prompts, in the fleet's Redis, kept `ttl` seconds after the last."""

    shared = True

    def __init__(self, client: aioredis.Redis, ttl: int, watch: StreamWatch | None = None) -> None:
        super().__init__()
        self.client = client
        self.ttl = ttl
        self.watch = watch  # the instance's one blocking read (`StreamWatch`): other gateways' prompts

    @contextlib.asynccontextmanager
    async def news(self, client_id: str, cursor: str) -> AsyncIterator[asyncio.Event]:
        """The bell, and the client's stream of tasks through the watch (a prompt queued on
        another gateway wakes it as its entry is stored: no polling)."""
        with self.bell(client_id) as event:
            if self.watch is None:
                yield event
                return
            async with self.watch.news(keys.comfy_client(client_id), cursor, event):
                yield event

    async def number(self, front: bool) -> int:
        with translated():
            number = int(await self.client.incr(keys.COMFY_NUMBER)) - 1
        return -number if front else number

    async def add(self, entry: PromptEntry) -> None:
        order = abs(entry.number)  # the order of queueing, whatever the sign
        with translated():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(keys.comfy_prompt(entry.task_id), entry.to_json(), ex=self.ttl)
                pipe.zadd(keys.COMFY_PROMPTS, {entry.task_id: order})
                pipe.zremrangebyrank(keys.COMFY_PROMPTS, 0, -KEEP - 1)
                pipe.zadd(keys.COMFY_LIVE, {entry.task_id: order})
                pipe.expire(keys.COMFY_PROMPTS, self.ttl)
                pipe.expire(keys.COMFY_LIVE, self.ttl)
                if entry.client_id:
                    stream = keys.comfy_client(entry.client_id)
                    pipe.xadd(stream, {"task_id": entry.task_id}, maxlen=CLIENT_KEEP, approximate=True)
                    pipe.expire(stream, self.ttl)
                await pipe.execute()

    async def get(self, task_id: str) -> PromptEntry | None:
        with translated():
            data = await self.client.get(keys.comfy_prompt(task_id))
        return PromptEntry.from_json(data) if data is not None else None

    async def _entries(self, ids: list[Any]) -> list[PromptEntry]:
        if not ids:
            return []
        with translated():
            found = await self.client.mget([keys.comfy_prompt(_text(task_id)) for task_id in ids])
        return [PromptEntry.from_json(data) for data in found if data is not None]

    async def recent(self, limit: int | None) -> list[PromptEntry]:
        with translated():
            ids = await self.client.zrange(keys.COMFY_PROMPTS, -limit if limit else 0, -1)
        return await self._entries(list(ids))

    async def live(self) -> list[PromptEntry]:
        with translated():
            ids = await self.client.zrange(keys.COMFY_LIVE, 0, -1)
        return await self._entries(list(ids))

    async def settled(self, task_ids: list[str]) -> None:
        if task_ids:
            with translated():
                await self.client.zrem(keys.COMFY_LIVE, *task_ids)

    async def forget(self, task_ids: list[str] | None) -> None:
        with translated():
            if task_ids is None:
                ids = [_text(task_id) for task_id in await self.client.zrange(keys.COMFY_PROMPTS, 0, -1)]
            else:
                ids = task_ids
            live = {_text(task_id) for task_id in await self.client.zrange(keys.COMFY_LIVE, 0, -1)}
            ended = [task_id for task_id in ids if task_id not in live]
            if ended:
                await self.client.zrem(keys.COMFY_PROMPTS, *ended)

    async def client_cursor(self, client_id: str) -> str:
        with translated():
            last = await self.client.xrevrange(keys.comfy_client(client_id), count=1)
        return _text(last[0][0]) if last else "0-0"

    async def client_tasks(self, client_id: str, cursor: str) -> tuple[list[str], str]:
        with translated():
            answer: Any = await self.client.xread({keys.comfy_client(client_id): cursor}, count=100)
        tasks: list[str] = []
        for _, entries in answer or ():
            for entry_id, fields in entries:
                cursor = _text(entry_id)
                tasks.append(_text(fields[b"task_id"]))
        return tasks, cursor

    async def put_asset(self, record: dict[str, Any]) -> None:
        with translated():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(keys.comfy_asset(record["id"]), json.dumps(record), ex=self.ttl)
                if record.get("hash"):
                    pipe.set(keys.comfy_asset_hash(record["hash"]), record["id"], ex=self.ttl)
                await pipe.execute()

    async def asset(self, asset_id: str) -> dict[str, Any] | None:
        with translated():
            data = await self.client.get(keys.comfy_asset(asset_id))
        return dict(json.loads(data)) if data is not None else None

    async def asset_by_hash(self, digest: str) -> dict[str, Any] | None:
        with translated():
            asset_id = await self.client.get(keys.comfy_asset_hash(digest))
        return await self.asset(_text(asset_id)) if asset_id is not None else None

    async def delete_asset(self, asset_id: str) -> bool:
        with translated():
            return bool(await self.client.delete(keys.comfy_asset(asset_id)))

    async def claim_key(self, key: str) -> bool:
        with translated():
            return bool(await self.client.set(keys.comfy_idempotency(key), "1", nx=True, ex=KEY_TTL))

    async def release_key(self, key: str) -> None:
        with translated():
            await self.client.delete(keys.comfy_idempotency(key))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
