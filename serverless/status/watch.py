"""One blocking read per instance for every follower of a Redis stream (`StreamWatch`).

A gateway may have thousands of callers waiting on their jobs' status streams. Each holding a
connection in `XREAD BLOCK` would take a pooled connection apiece (redis-py refuses the 101st, or
opens one per caller). Instead, each follower registers the stream it waits on and reads it
without blocking; one task per instance blocks on all registered streams at once (one `XREAD`
naming them all) and wakes the followers of a stream that got entries. A new registration wakes
that read through the instance's own wake stream (without waiting for it: the read starts from
the registration's id whenever it names the stream), so the read names the new stream at once.

The entries the watch read are kept for the stream's followers (`after`, up to KEPT per
stream): a follower woken by the watch takes them from there instead of reading them again, one
round trip fewer per batch of events.

Once it runs, the watch's read also names SPARES streams that do not exist yet, the first logs of
new tasks whose ids it chose (`spare`): a caller that names its new task so registers it with no
wake of the read, which names it already (a gateway's sync job: one round trip fewer each).

The watch's read goes over one connection it keeps (`HeldReads`, as a fleet worker's wait for
news does): its answer reaches the followers without a trip through the pool's bookkeeping, and
the followers it wakes go first, before the next read is sent.

    follower:  register(key) -> XREAD key (no block) -> nothing: wait for news (bounded)
               -> the watch's entries after its cursor (XREAD when it has not kept them) -> again
    watch:     XREAD BLOCK watch:<id> key1 key2 ... -> keep each key's entries, wake its followers
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from . import keys

log = logging.getLogger(__name__)

DOWN = (rexc.ConnectionError, rexc.TimeoutError, OSError)


def still_cancelled(cause: BaseException | None = None) -> None:
    """CancelledError when the running task has a cancel pending. redis-py, cancelled inside a
    call, may drop the connection and raise ConnectionError instead, or even return as if nothing
    happened: a loop that went on would keep its task from ever ending (a shutdown waiting for it
    hangs). Called where such a loop meets a Redis error, and at the head of each round."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError from cause


WAKE_TTL = 60  # seconds the wake stream outlives the instance that writes it
WAKE_KEPT = 16  # entries the wake stream keeps (MAXLEN ~): only the newest wakes anyone
KEPT = 512  # entries of a followed stream the watch keeps for its followers (the newest)
SPARES = 2  # new tasks' first logs the watch's read names before they exist (`spare`)
READ_COUNT = 256  # entries of each stream one read of the watch takes at most


class HeldReads:
    """The blocking reads (XREAD BLOCK) of one loop, on a connection of the pool that it keeps:
    taken once, not taken from the pool and given back around each read, so that an answer
    reaches the loop without the pool's bookkeeping first (that answer is a job's start on a
    worker, its end on a gateway). After a failure or a cancel the connection goes back to the
    pool (closed by redis-py when a reply may be half read) and the next read takes another."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool: Any = client.connection_pool  # redis-py's pool API is untyped
        self._held: Any = None

    async def xread(self, streams: dict[Any, Any], count: int, block_ms: int) -> list[tuple[Any, list[Any]]]:
        """XREAD COUNT `count` BLOCK `block_ms` of `streams` (stream -> the id to read after), as
        `Redis.xread` answers it: each stream with entries, its entries as (id, fields)."""
        held = self._held
        if held is None:
            held = self._held = await _connection(self._pool)
        try:
            await held.send_command("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", *streams, *streams.values())
            answer = await held.read_response()
        except BaseException:
            self._held = None
            await self._pool.release(held)
            raise
        return read_streams(answer)

    async def aclose(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            await self._pool.release(held)


async def _connection(pool: Any) -> Any:
    """A connection of the pool: redis-py before 5.3 wants the command it is for (its name only
    picks nothing); from 5.3 on, naming it is deprecated. (Asked of redis-py's own pool: ours
    passes on whatever it is given, `redis.PatientPool`.)"""
    if NAMES_COMMAND:
        return await pool.get_connection("XREAD")
    return await pool.get_connection()


def _names_command(get_connection: Callable[..., Any]) -> bool:
    parameter = inspect.signature(get_connection).parameters.get("command_name")
    return parameter is not None and parameter.default is inspect.Parameter.empty


NAMES_COMMAND = _names_command(aioredis.BlockingConnectionPool.get_connection)


def read_streams(answer: Any) -> list[tuple[Any, list[Any]]]:
    """An XREAD answer as RESP2 or RESP3 gives it, in `Redis.xread`'s shape."""
    if not answer:
        return []
    pairs = answer.items() if isinstance(answer, dict) else answer
    return [
        (name, [(entry, dict(zip(fields[::2], fields[1::2], strict=True))) for entry, fields in entries])
        for name, entries in pairs
    ]


class StreamWatch:
    """Wakes the followers of Redis streams (see the module docstring)."""

    def __init__(
        self, client: aioredis.Redis, block_seconds: float, spare_key: Callable[[str], str] | None = None
    ) -> None:
        self._client = client
        self._spare_key = spare_key  # a new task's first log, named from its id (None: no spares)
        self._spares: dict[str, str] = {}  # task id -> its first log's key, named by the read under way
        self._block_ms = int(block_seconds * 1000)
        self._wake_key = keys.watch_wake(uuid.uuid4().hex)
        self._wake_seen = "0-0"
        self._since: dict[str, str] = {}  # stream -> the last entry id the watch has read of it
        self._followers: dict[str, set[asyncio.Event]] = {}
        self._kept: dict[str, collections.deque[tuple[int, Any]]] = {}  # stream -> (seq, entry) read
        self._task: asyncio.Task[None] | None = None
        self._waking: asyncio.Task[None] | None = None  # the one wake under way (`_wake_soon`)
        self._wake_again = False  # a stream was registered while it was
        self._reads = HeldReads(client)

    @contextlib.asynccontextmanager
    async def news(self, key: str, since: str, event: asyncio.Event | None = None) -> AsyncIterator[asyncio.Event]:
        """An event set whenever stream `key` gets entries after `since` (the follower clears it
        before each read of its own), for as long as the block lasts; `event` to share one
        between the streams a follower reads together."""
        event = event or asyncio.Event()
        if self._register(key, since, event):  # the watch's read names the new stream from now on
            self._wake_soon()  # (from `since`: nothing is missed)
        try:
            yield event
        finally:
            self.release(key, event)

    def hold(self, key: str) -> asyncio.Event:
        """Register stream `key` from its start for a follower about to come, without waking the
        watch's read: its caller wakes it in a write of its own (an entry in `wake_key`, in the
        round trip that makes the stream's news possible). `release` it once the follower has
        registered (`news`), or will not come."""
        event = asyncio.Event()
        self._register(key, "0-0", event)
        return event

    def spare(self) -> tuple[str, str, asyncio.Event] | None:
        """A new task id whose first log the watch's read under way names already, that log
        registered from its start as `hold` registers one (`release` it as `hold`'s): (task id,
        key, event). None when there is none (the watch does not run, or they are taken): `hold`
        a key of the caller's own, and wake the read."""
        if not self._spares or self._task is None or self._task.done():
            return None
        task_id, key = self._spares.popitem()
        event = asyncio.Event()
        self._register(key, "0-0", event)
        return task_id, key, event

    @property
    def wake_key(self) -> str:
        """The stream whose entries wake the watch's read (`hold`): MAXLEN ~WAKE_KEPT, WAKE_TTL."""
        return self._wake_key

    def _register(self, key: str, since: str, event: asyncio.Event) -> bool:
        """Add a follower of `key`; True when the stream is new to the watch's read."""
        followers = self._followers.setdefault(key, set())
        fresh = not followers
        followers.add(event)
        if fresh:
            self._since[key] = since
            self._kept[key] = collections.deque(maxlen=KEPT)
        self._start()
        return fresh

    def release(self, key: str, event: asyncio.Event) -> None:
        """A follower of `key` (`news`, `hold`) is gone; the stream with its last one."""
        followers = self._followers.get(key)
        if followers is None:
            return
        followers.discard(event)
        if not followers:
            del self._followers[key]
            self._since.pop(key, None)
            self._kept.pop(key, None)

    def after(self, key: str, cursor: int) -> list[Any] | None:
        """The entries of stream `key` (ids `0-<seq>`, as status logs number them) after number
        `cursor` that the watch has read, `[]` when it has read none after it (nothing new);
        None when it cannot tell (it has not kept them, or the ids are not numbers): read them."""
        kept, since = self._kept.get(key), self._since.get(key)
        if kept is None or since is None or not since.startswith("0-"):
            return None
        if cursor >= int(since[2:]):
            return []
        if not kept or kept[0][0] > cursor + 1:
            return None
        return [entry for seq, entry in kept if seq > cursor]

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="redis stream watch")

    def _wake_soon(self) -> None:
        """Wake the watch's read, not waiting for it: one wake at a time, and one more after it
        for the streams registered meanwhile (a thousand new followers take two, not a thousand)."""
        if self._waking is not None and not self._waking.done():
            self._wake_again = True
            return
        self._waking = asyncio.create_task(self._wakes(), name="redis stream watch wake")

    async def _wakes(self) -> None:
        while True:
            self._wake_again = False
            await self._wake()
            if not self._wake_again:
                return

    async def _wake(self) -> None:
        with contextlib.suppress(*DOWN):  # Redis down: followers find out by their own reads
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=WAKE_KEPT, approximate=True)
                pipe.expire(self._wake_key, WAKE_TTL)
                await pipe.execute()

    async def _run(self) -> None:
        """Until no stream is followed (with spares: until closed): one XREAD BLOCK over every
        followed stream and the spares (`spare`)."""
        while self._followers or self._spare_key is not None:
            still_cancelled()
            if self._spare_key is not None:
                while len(self._spares) < SPARES:
                    task_id = str(uuid.uuid4())
                    self._spares[task_id] = self._spare_key(task_id)
            spares = {key: "0-0" for key in self._spares.values()}
            streams: dict[Any, Any] = {self._wake_key: self._wake_seen, **spares, **self._since}
            try:
                answer: Any = await self._reads.xread(streams, READ_COUNT, self._block_ms)
            except DOWN as exc:
                still_cancelled(exc)  # a cancel redis-py reported as a lost connection ends the watch
                log.debug("stream watch: Redis is down (%s)", exc)
                self._wake_all()  # each follower's own read meets the outage and reports it
                await asyncio.sleep(self._block_ms / 2000)
                continue
            woken = False
            for name, entries in answer or []:
                key = name.decode() if isinstance(name, bytes) else name
                last = entries[-1][0]
                last = last.decode() if isinstance(last, bytes) else last
                if key == self._wake_key:
                    self._wake_seen = last
                    continue
                if key in self._since:
                    self._since[key] = last
                    self._keep(key, entries)
                for event in self._followers.get(key, ()):
                    event.set()
                    woken = True
            if woken:
                # The woken followers go first (a sync caller's answer leaves before the next
                # read is sent; one whose job ended no longer names its stream in it).
                await asyncio.sleep(0)

    def _keep(self, key: str, entries: list[Any]) -> None:
        kept = self._kept.get(key)
        if kept is None:
            return
        for entry in entries:
            entry_id = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
            head, _, seq = entry_id.partition("-")
            if head != "0":  # not a status log's numbering: its followers read it themselves
                kept.clear()
                return
            kept.append((int(seq), entry))

    def _wake_all(self) -> None:
        for followers in self._followers.values():
            for event in followers:
                event.set()

    async def aclose(self) -> None:
        for task in (self._task, self._waking):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._reads.aclose()
