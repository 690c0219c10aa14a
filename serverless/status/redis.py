"""The status log in Redis streams (`STATUS_BACKEND=redis`), for a fleet of instances that share
no disk.

    task:<id>              the number of the task's newest attempt (INCR claims the next one)
    task:<id>:<n>          attempt n: a stream, one entry per payload, entry id `0-<seq>`
    task:<id>:<n>:alive    set while attempt n's owner lives (expires after STATUS_STALE_AFTER)

Entry ids *are* our sequence numbers (`0-1`, `0-2`, ...), so `after=N` and SSE `Last-Event-ID`
map to `XREAD`/`XRANGE` from `0-N` with no lookup, and a retried write cannot duplicate an event
(Redis refuses an id not above the last). Every write refreshes the keys' EXPIRE: retention is
Redis's. An event larger than REDIS_MAX_EVENT_BYTES is replaced by a short note; base64 outputs
never go through Redis: the stored terminal keeps each output's listing (and OSS link) and says
where the content went. Redis is spoken here (and in `serverless.fleet`) only; its errors become
`ComfyUIUnavailable` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from ..core import jsontext
from ..core.request import validate_task_id
from ..errors import ComfyUIUnavailable, InvalidParams, ServerlessError
from ..jobs.feed import Event, Feed
from .body import json_array

log = logging.getLogger(__name__)

BASE64_NOTE = "base64 outputs are not kept in the Redis status log: ask for output_oss, or read the file"
BLOCK_SECONDS = 1.0  # longest XREAD BLOCK: pointer changes and Redis outages are noticed this often
BACKOFF_MAX = 5.0
DOWN = (rexc.ConnectionError, rexc.TimeoutError, OSError)
# A new attempt and its owner's mark in one step: a reader must never see the attempt without the
# mark (it would read "instance lost"). The mark's key is derived, so this needs one Redis, not a cluster.
BEGIN = """
local number = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[1] .. ':' .. number .. ':alive', '1', 'EX', ARGV[2])
return number
"""


def connect(url: str) -> aioredis.Redis:
    """The app's one Redis client (a connection pool). redis-py's own retries are off: callers
    are told at once, and the loops that must outlive an outage retry with their own backoff."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=BLOCK_SECONDS + 10.0,
        retry=None,
        health_check_interval=30,
    )


def unavailable(exc: BaseException) -> ComfyUIUnavailable:
    """A Redis failure as the caller sees it (the URL, which may hold a password, is not named)."""
    return ComfyUIUnavailable(f"Redis cannot be reached ({type(exc).__name__}: {exc}); try again shortly")


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Redis's errors as the error tree's (503: the tier is down or refusing)."""
    try:
        yield
    except DOWN as exc:
        raise unavailable(exc) from exc
    except rexc.RedisError as exc:
        raise ComfyUIUnavailable(f"Redis refused the call ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True, slots=True)
class RedisAttempt:
    """One delivery of a task; a retry (number > 1) is marked in its terminal payload."""

    task_id: str
    number: int

    @property
    def key(self) -> str:
        return f"task:{self.task_id}:{self.number}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored payload of an attempt, as a follower gets it."""

    seq: int
    data: bytes
    terminal: bool
    attempt: int


class RedisStatus:
    """Status logs in Redis; satisfies `serverless.status.store.StatusStore`."""

    def __init__(self, client: aioredis.Redis, stale_after: float, retention_days: float, max_event_bytes: int) -> None:
        self.client = client
        self.stale_after = stale_after
        self.ttl = max(int(retention_days * 86400), 60)
        self.max_event_bytes = max_event_bytes
        self._last_error: str | None = None
        self._up: bool | None = None
        self._begin = client.register_script(BEGIN)

    # -- attempts ----------------------------------------------------------------------------

    async def begin(self, task_id: str) -> RedisAttempt:
        """Claim the task's next attempt (INCR): readers see it, empty and alive, from now on."""
        validate_task_id(task_id)
        with self._translated():
            number = int(await self._begin(keys=[f"task:{task_id}"], args=[self.ttl, self._alive_ttl]))
        if number > 1:
            log.info("task_id=%s: attempt %d begins (retried)", task_id, number)
        return RedisAttempt(task_id, number)

    async def current(self, task_id: str) -> int:
        """The newest attempt's number (0 for a task no one began)."""
        validate_task_id(task_id)
        with self._translated():
            value = await self.client.get(f"task:{task_id}")
        return int(value) if value else 0

    async def attempts(self, task_id: str) -> list[int]:
        """Attempts 1..n of the task (`[]` when unknown)."""
        return list(range(1, await self.current(task_id) + 1))

    @property
    def _alive_ttl(self) -> int:
        return max(int(self.stale_after), 1)

    # -- writing -----------------------------------------------------------------------------

    async def record(self, attempt: RedisAttempt, feed: Feed) -> None:
        """Store every event of `feed` until its terminal payload; while Redis is down, keep the
        events and retry with backoff (the terminal payload included). Marks the owner alive."""
        heartbeat = max(self.stale_after / 4, 0.05)
        pending: list[Event] = []
        try:
            async for event in feed.follow(idle=heartbeat, pinned=True):
                if event is None:
                    await self._until_written(attempt, [])
                    continue
                pending.append(event)
                if event.seq == feed.last_seq or event.terminal:  # caught up: one round trip for the lot
                    await self._until_written(attempt, pending)
                    pending = []
        except Exception as exc:  # a bug: the log must still end with its terminal
            log.error(
                "status stream of task_id=%s attempt %d failed (%s); writing its terminal",
                attempt.task_id,
                attempt.number,
                exc,
            )
            await self._until_written(attempt, [await feed.wait()])

    async def _until_written(self, attempt: RedisAttempt, events: list[Event]) -> None:
        delay = 0.1
        while True:
            try:
                await self._write(attempt, events)
                return
            except DOWN as exc:
                self._last_error = f"writing task {attempt.task_id}: {exc}"
                log.warning(
                    "task_id=%s: Redis is down (%s); %d event(s) kept, retrying in %.1fs",
                    attempt.task_id,
                    exc,
                    len(events),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _write(self, attempt: RedisAttempt, events: list[Event]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for event in events:
                data = self.stored(event, attempt)
                pipe.xadd(attempt.key, {"d": data, "t": "1" if event.terminal else "0"}, id=f"0-{event.seq}")
            if events:
                pipe.expire(attempt.key, self.ttl)
                pipe.expire(f"task:{attempt.task_id}", self.ttl)
            pipe.set(f"{attempt.key}:alive", "1", ex=self._alive_ttl)
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, DOWN):
                raise result
            if isinstance(result, rexc.ResponseError) and "equal or smaller" not in str(result):
                # written before a lost answer ("equal or smaller" id): nothing to do; anything else is a bug
                log.error("task_id=%s: Redis refused an event: %s", attempt.task_id, result)

    def stored(self, event: Event, attempt: RedisAttempt) -> bytes:
        """What goes into Redis for an event: the terminal without base64 (marked when retried);
        an oversized event replaced by a note."""
        if event.terminal:
            return stored_terminal(event.data, attempt.number > 1)
        data = event.data
        if len(data) <= self.max_event_bytes:
            return data
        note = {
            "type": "serverless_dropped",
            "data": {"task_id": attempt.task_id, "seq": event.seq, "bytes": len(data), "limit": self.max_event_bytes},
        }
        return jsontext.dumps(note)

    # -- reading -----------------------------------------------------------------------------

    async def read(self, task_id: str, after: int = 0, attempt: int | None = None) -> bytes:
        """The status API's body for the current attempt (or attempt `attempt`): the payloads
        after the first `after`; `[]` for an unknown task; an attempt without a terminal whose
        owner stopped beating ends with an "instance lost" error."""
        if attempt is not None and attempt < 1:
            raise InvalidParams("attempt must be a whole number from 1", raw={"attempt": attempt})
        number = attempt or await self.current(task_id)
        if not number:
            return b"[]"
        key = f"task:{task_id}:{number}"
        with self._translated():
            async with self.client.pipeline(transaction=True) as pipe:  # one snapshot, as `follow`'s
                pipe.xrange(key, min=f"0-{after + 1}")
                pipe.xrevrange(key, count=1)
                pipe.exists(f"{key}:alive")
                entries, last, alive = await pipe.execute()
        lines = [fields[b"d"] for _, fields in entries]
        ended = bool(last) and last[0][1].get(b"t") == b"1"
        if not ended and not alive:
            lines.append(self.lost_payload())
        return json_array(lines)

    def lost_payload(self) -> bytes:
        lost = ComfyUIUnavailable(
            f"instance lost: the job's worker has given no news for {self.stale_after:g}s and no result",
            raw={"silent_s": self.stale_after},
        )
        return jsontext.dumps(lost.to_payload())

    async def follow(
        self, task_id: str, after: int = 0, attempt: int | None = None, idle: float | None = None
    ) -> AsyncIterator[Entry | None]:
        """The task's payloads after `after` as they are stored, from any instance (XREAD BLOCK,
        no polling), until a terminal one; None after `idle` seconds of silence. Starts at
        attempt `attempt` (default the current one, or 1 for a task not begun yet) and moves on to
        a newer attempt when one begins (a retry), its payloads numbered on from the last seen.
        An attempt whose owner is gone ends with "instance lost"; Redis unreachable for longer
        than `stale_after` ends with a 503 error."""
        loop = asyncio.get_running_loop()
        number = attempt or max(await self.current(task_id), 1)
        cursor, offset = after, 0
        silent_since = loop.time()
        down_since: float | None = None
        block = min(idle or BLOCK_SECONDS, BLOCK_SECONDS)
        while True:
            key = f"task:{task_id}:{number}"
            try:
                answer: Any = await self.client.xread({key: f"0-{cursor}"}, count=512, block=int(block * 1000))
                down_since = None
            except DOWN as exc:
                now = loop.time()
                down_since = down_since or now
                if now - down_since > self.stale_after:
                    yield Entry(offset + cursor + 1, jsontext.dumps(unavailable(exc).to_payload()), True, number)
                    return
                await asyncio.sleep(BLOCK_SECONDS / 2)
                answer = None
            for _, entries in answer or []:
                for entry_id, fields in entries:
                    cursor = int(entry_id.split(b"-")[1])
                    terminal = fields.get(b"t") == b"1"
                    yield Entry(offset + cursor, fields[b"d"], terminal, number)
                    if terminal:
                        return
                silent_since = loop.time()
            if answer:
                continue
            if idle is not None and loop.time() - silent_since >= idle:
                silent_since = loop.time()
                yield None
            if down_since is not None:
                continue
            newest, alive = await self._attempt_state(task_id, number)
            if newest > number:  # retried elsewhere: go on with the new attempt
                number, offset, cursor = newest, offset + cursor, 0
            elif newest == number and alive is False:
                yield Entry(offset + cursor + 1, self.lost_payload(), True, number)
                return

    async def _attempt_state(self, task_id: str, number: int) -> tuple[int, bool | None]:
        """(the newest attempt's number, whether attempt `number`'s owner lives); (0, None) when
        Redis does not answer."""
        try:
            # One snapshot (MULTI): a retry begins its attempt, then removes the dead one's mark.
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(f"task:{task_id}")
                pipe.exists(f"task:{task_id}:{number}:alive")
                newest, alive = await pipe.execute()
        except DOWN:
            return 0, None
        return int(newest or 0), bool(alive)

    async def append_terminal(self, task_id: str, attempt: int, error: ServerlessError) -> None:
        """End attempt `attempt` of a task with `error` (a lost worker, a cancelled queued job),
        numbered after its last stored payload."""
        key = f"task:{task_id}:{attempt}"
        with self._translated():
            last: Any = await self.client.xrevrange(key, count=1)
            seq = int(last[0][0].split(b"-")[1]) + 1 if last else 1
            if last and last[0][1].get(b"t") == b"1":
                return  # it ended after all
            payload = jsontext.dumps(error.to_payload())
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(key, {"d": payload, "t": "1"}, id=f"0-{seq}")
                pipe.expire(key, self.ttl)
                pipe.delete(f"{key}:alive")
                await pipe.execute()

    async def ended(self, task_id: str, attempt: int) -> bool:
        """Whether attempt `attempt` stored its terminal payload."""
        with self._translated():
            last: Any = await self.client.xrevrange(f"task:{task_id}:{attempt}", count=1)
        return bool(last) and last[0][1].get(b"t") == b"1"

    async def has_outputs(self, task_id: str, attempt: int) -> bool:
        """Whether attempt `attempt` stored an `executed` message with outputs (a GPU was used)."""
        with self._translated():
            entries: Any = await self.client.xrange(f"task:{task_id}:{attempt}")
        for _, fields in entries:
            try:
                payload = json.loads(fields[b"d"])
            except ValueError:
                continue
            if payload.get("type") == "executed" and (payload.get("data") or {}).get("output"):
                return True
        return False

    # -- health ------------------------------------------------------------------------------

    async def writable(self) -> bool:
        """Whether Redis answers a PING now."""
        try:
            self._up = bool(await self.client.ping())
        except (*DOWN, rexc.RedisError) as exc:
            self._up = False
            self._last_error = f"{type(exc).__name__}: {exc}"
        return self._up

    def health(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "writable": self._up,
            "not_writable_because": None if self._up in (True, None) else f"Redis: {self._last_error}",
            "last_error": self._last_error,
        }

    async def prune_forever(self, retention_days: float, every: float = 3600.0) -> None:
        """Nothing to do: every key carries its EXPIRE."""

    async def aclose(self) -> None:
        await self.client.aclose()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            with translated():
                yield
        except ComfyUIUnavailable as exc:
            self._last_error = exc.message
            raise


def stored_terminal(data: bytes, retried: bool) -> bytes:
    """The terminal payload as stored: each output's base64 content left out with a note, and
    `"retried": true` on a retried attempt's. Untouched (same bytes) when there is nothing to do."""
    if not retried and b'"base64"' not in data:
        return data
    payload = json.loads(data)
    for result in (payload.get("data") or {}).get("results") or []:
        encoded = (result.get("output") or {}).get("base64")
        if isinstance(encoded, dict) and encoded.get("content") is not None:
            result["output"]["base64"] = {"content": None, "note": BASE64_NOTE}
    if retried:
        payload["retried"] = True
    return jsontext.dumps(payload)
