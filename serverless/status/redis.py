"""The status log in Redis streams (`STATUS_BACKEND=redis`), for a fleet of instances that share
no disk.

    task:<id>              the number of the task's newest attempt (INCR claims the next one)
    task:<id>:<n>          attempt n: a stream, one entry per payload, entry id `0-<seq>`
    task:<id>:<n>:alive    set while attempt n's runner lives (expires after STATUS_STALE_AFTER)
    task:<id>:<n>:previews the newest sampler previews of a job that asked them: a short stream
                           (PREVIEWS_KEPT entries, PREVIEWS_TTL seconds), never part of the log
    task:<id>:<n>:result   attempt n's terminal payload whole, when its stream keeps it without base64
    task:<id>:owner        whose the task is ("": made without API keys), set by the gateway that
                           queued it: the task is known (queued) before any worker begins it
    (every key is named in `serverless.status.keys`)

Entry ids *are* our sequence numbers (`0-1`, `0-2`, ...), so `after=N` and SSE `Last-Event-ID`
map to `XREAD`/`XRANGE` from `0-N` with no lookup, and a retried write cannot duplicate an event
(Redis refuses an id not above the last). Every write refreshes the keys' EXPIRE: retention is
Redis's. An event larger than MAX_EVENT_BYTES is replaced by a short note; base64 outputs
never go through Redis: the stored terminal keeps each output's listing (and OSS link) and says
where the content went. Job control reads the same streams: the summary is computed from the
payloads (`summary.summarise`) as the file store's, and `follow` serves `events` from any
instance. Redis is spoken here (and in `serverless.fleet`) only; its errors become
`Unavailable` (503) with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..core import jsontext
from ..core.request import validate_task_id
from ..errors import InvalidParams, NotFound, ServerlessError, Unavailable
from ..jobs.feed import Event, Feed, HandedOff
from . import keys
from . import redis_sidecars as sidecars
from .body import json_array, owner_named
from .store import Entry
from .summary import summarise
from .tasklist import SCAN_BUDGET, TaskPage, TaskQuery, TaskRow, before, page
from .watch import StreamWatch, still_cancelled

log = logging.getLogger(__name__)

BASE64_NOTE = (
    "base64 outputs are kept FILE_LINK_EXPIRES seconds after the job: "
    "ask for output_oss or output_url for files that outlive it"
)
MAX_EVENT_BYTES = 1024 * 1024  # the largest event stored; a bigger one becomes a `serverless_dropped` note
BIG_TERMINAL = 256 * 1024  # terminal payloads from this size on are split in a worker thread
PREVIEWS_KEPT = 2  # a follower wants the newest preview; one more covers a read between two writes
PREVIEWS_TTL = 60  # seconds a job's previews outlive its last one
# Seconds between two writes of a job's events (Nagle's rule, as `transports.bursts` writes to a
# caller), counted from the job's start too: its first events are stored together WRITE_WINDOW
# later (a short job's whole log, terminal payload included, in one write, off the prompt's way to
# ComfyUI), an event after a quiet spell at once, the rest of its burst together a moment later,
# the terminal payload (with what waits) at once. Each write wakes every follower's gateway.
WRITE_WINDOW = 0.010
BLOCK_SECONDS = 1.0  # longest XREAD BLOCK: pointer changes and Redis outages are noticed this often
MAX_CONNECTIONS = 64  # an instance's Redis connections (a worker's consumer and jobs, a gateway's calls)
POOL_WAIT = 10.0  # seconds a call waits for a free connection while none is given back; then it fails
POOL_PATIENCE = 60.0  # seconds a call waits for one at most, however many others are given back meanwhile
# Seconds a new connection may take to open, counted on the event loop: a gateway busy with a burst
# of callers (its loop late by seconds) must not take a Redis that answers for one that cannot be
# reached. As long as a hung Redis makes a call wait for a free connection (POOL_WAIT).
CONNECT_TIMEOUT = 10.0
BACKOFF_MAX = 5.0
LIST_BATCH = 64  # tasks the list reads at a time
DOWN = (rexc.ConnectionError, rexc.TimeoutError, OSError)
# A new attempt and its owner's mark in one step: a reader must never see the attempt without the
# mark (it would read "instance lost"). The mark's key is derived, so this needs one Redis, not a cluster.
BEGIN = """
local number = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[1] .. ':' .. number .. ':alive', '1', 'EX', ARGV[2])
return number
"""


# A batch of an attempt's events stored in one step (`RedisStatus._write`): one command, where a
# pipeline of an XADD per event cost the worker twice the CPU; Redis wakes a follower's blocking
# read once for the lot. KEYS: the attempt's stream, its task's attempt counter, owner, the
# attempt's owner mark, previews, result, then the task lists the first batch lists it in.
# ARGV: [1] the log's TTL, [2] "1": refresh the log's expiries, [3] the owner mark's TTL ("": not
# refreshed), [4] the newest preview ("": none) kept [5] deep for [6] seconds, [7] the terminal
# payload whole ("": not kept apart) for [8] seconds, [9] the task's list member ("": not listed),
# [10] its score, [11] the score before which members are dropped (not when the task has its
# owner's record: a gateway queued it, and listed it then); then per event its seq, data
# and kind ("0", "1": terminal, "r": terminal kept whole apart). An event stored before (its seq
# not above the stream's last: a retried write whose answer was lost) is skipped; the first write
# refused (past maxmemory) refuses the batch before anything is stored.
_APPEND_BODY = """
for i = first, #ARGV, 3 do
  local kind = ARGV[i + 2]
  local added
  if kind == 'r' then
    added = redis.pcall('XADD', KEYS[1], '0-' .. ARGV[i], 'd', ARGV[i + 1], 't', '1', 'r', '1')
  else
    added = redis.pcall('XADD', KEYS[1], '0-' .. ARGV[i], 'd', ARGV[i + 1], 't', kind)
  end
  if type(added) == 'table' and added.err and not string.find(added.err, 'equal or smaller', 1, true) then
    return redis.error_reply(added.err)
  end
end
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[5], 'MAXLEN', ARGV[5], '*', 'd', ARGV[4])
  redis.call('EXPIRE', KEYS[5], ARGV[6])
end
if ARGV[7] ~= '' then redis.call('SET', KEYS[6], ARGV[7], 'EX', ARGV[8]) end
if ARGV[9] ~= '' and redis.call('EXISTS', KEYS[3]) == 0 then
  for k = lists, #KEYS do
    redis.call('ZADD', KEYS[k], 'NX', ARGV[10], ARGV[9])
    redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', ARGV[11])
    redis.call('EXPIRE', KEYS[k], ARGV[1])
  end
end
if ARGV[2] == '1' then
  for k = 1, 3 do redis.call('EXPIRE', KEYS[k], ARGV[1]) end
end
if ARGV[3] ~= '' then redis.call('SET', KEYS[4], '1', 'EX', ARGV[3]) end
return 1
"""
APPEND = "local lists, first = 7, 12\n" + _APPEND_BODY
# `APPEND` with a fleet worker's end of a queue submission decided in the same step, as
# `fleet.queue.END` decides it: KEYS[7] its `cancel:` stream, KEYS[8] its `ended:` stream, KEYS[9]
# the queue stream it is entry ARGV[15] of (group ARGV[14]), KEYS[10] the worker's hand-off stream
# (the task lists from KEYS[11]), ARGV[12] how it ends, ARGV[13] the `ended:` stream's TTL, the
# events from ARGV[16]. -> 0, nothing stored, when a cancel was acknowledged first (it then ends
# cancelled, as `ended:` says); else the events are stored, the entry acknowledged (its terminal
# payload stored: `XACK`, as the worker's `_ack` would) -> {1, the newest hand-off's id or ""}.
APPEND_END = (
    """
local state = ARGV[12]
local cancelled = redis.call('EXISTS', KEYS[7]) == 1
if cancelled then state = 'cancelled' end
redis.call('XADD', KEYS[8], 'MAXLEN', '1', '*', 'state', state)
redis.call('EXPIRE', KEYS[8], ARGV[13])
if cancelled then return 0 end
local lists, first = 11, 16
local function append()
"""
    + _APPEND_BODY
    + """
end
local refused = append()
if type(refused) == 'table' and refused.err then return refused end
redis.call('XACK', KEYS[9], ARGV[14], ARGV[15])
local newest = redis.call('XREVRANGE', KEYS[10], '+', '-', 'COUNT', 1)
return {1, #newest > 0 and newest[1][1] or ''}
"""
)


class RedisFull(ConnectionError):
    """Redis refused a write for want of memory (`maxmemory` with `noeviction`): the events are
    kept and written again, as while Redis is down, rather than lost."""


class PatientPool(aioredis.BlockingConnectionPool):
    """A bounded pool whose callers wait for a free connection as long as other callers keep giving
    theirs back: a burst of callers on a busy instance (hundreds of sync calls on a gateway whose CPU is
    taken) queues for the connections and is answered, where a flat POOL_WAIT told some of them
    "Redis cannot be reached" of a Redis that answered every command. Connections that all stay
    taken POOL_WAIT seconds (a hung Redis, a stuck socket) still fail the wait, saying so; no
    wait outlasts POOL_PATIENCE."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.given_back = 0  # connections released so far

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        patience = time.monotonic() + POOL_PATIENCE
        while True:
            given_back = self.given_back
            try:
                return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
            except rexc.ConnectionError as exc:
                if str(exc) != POOL_EMPTY:
                    raise  # a new connection that could not connect: Redis's own trouble
                if self.given_back == given_back or time.monotonic() >= patience:
                    busy = f"all {self.max_connections} of this instance's connections to it stayed in use"
                    raise rexc.ConnectionError(f"{busy} for {self.timeout:g} s") from exc

    async def release(self, connection: Any) -> None:
        self.given_back += 1
        await super().release(connection)


POOL_EMPTY = "No connection available."  # what redis-py's BlockingConnectionPool says after its timeout


def connect(url: str, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """The app's one Redis client: a bounded pool whose callers wait for a free connection rather
    than fail (`PatientPool`); followers hold none while they wait (`StreamWatch`). redis-py's own
    retries are off: callers are told at once, and the loops that must outlive an outage retry
    with their own backoff."""
    pool = PatientPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=BLOCK_SECONDS + 10.0,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))


def unavailable(exc: BaseException) -> Unavailable:
    """A Redis failure as the caller sees it (the URL, which may hold a password, is not named)."""
    return Unavailable(f"Redis cannot be reached ({type(exc).__name__}: {exc}); try again shortly")


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Redis's errors as the error tree's (503: the tier is down or refusing); a cancel of the
    task that redis-py met inside a read and reported as a lost connection stays a cancel."""
    try:
        yield
    except DOWN as exc:
        still_cancelled(exc)
        raise unavailable(exc) from exc
    except rexc.RedisError as exc:
        raise Unavailable(f"Redis refused the call ({type(exc).__name__}: {exc})") from exc


@dataclass(slots=True)
class Ending:
    """A fleet worker's end of a queue submission, decided with its last events (`APPEND_END`):
    the submission's `cancel:` and `ended:` streams (`fleet.queue`), how it ends, the TTL, and the
    entry acknowledged with them (its stream, group and id) and the worker's hand-off stream.
    `newest_handoff`: that stream's newest entry id once they are stored ("": none)."""

    cancel_key: str
    ended_key: str
    state: str
    ttl: int
    stream: str
    group: str
    entry: str
    handoff_key: str
    newest_handoff: str | None = None


@dataclass(frozen=True, slots=True)
class RedisAttempt:
    """One delivery of a task; a retry (number > 1) is marked in its terminal payload."""

    task_id: str
    number: int

    @property
    def key(self) -> str:
        return keys.attempt(self.task_id, self.number)


@dataclass(frozen=True, slots=True)
class Tip:
    """An attempt's state as a follower checks it: the newest attempt's number, whether this
    one's owner lives (None: Redis did not answer), and its last entry's (seq, terminal)."""

    newest: int
    alive: bool | None
    last: tuple[int, bool] | None = None


class RedisStatus:
    """Status logs in Redis; satisfies `serverless.status.store.StatusStore`."""

    def __init__(
        self,
        client: aioredis.Redis,
        stale_after: float,
        retention_days: float,
        max_event_bytes: int,
        result_ttl: int = 3600,
        retry_grace: float = 0.0,
    ) -> None:
        self.client = client
        self.retry_grace = retry_grace  # a fleet: seconds a dead worker's job waits for another worker
        self.result_ttl = result_ttl  # seconds a terminal's base64 outputs (and linked files) are kept
        self.stale_after = stale_after
        self.ttl = max(int(retention_days * 86400), 60)
        self.max_event_bytes = max_event_bytes
        self._last_error: str | None = None
        self._up: bool | None = None
        self._begin = client.register_script(BEGIN)
        self._append = client.register_script(APPEND)
        self._append_end = client.register_script(APPEND_END)
        self.watch = StreamWatch(client, BLOCK_SECONDS, lambda task_id: keys.attempt(task_id, 1))
        self._last_down: BaseException | None = None

    # -- attempts ----------------------------------------------------------------------------

    async def begin(self, task_id: str) -> RedisAttempt:
        """Claim the task's next attempt (INCR): readers see it, empty and alive, from now on."""
        validate_task_id(task_id)
        with self._translated():
            number = int(await self._begin(keys=[keys.attempts(task_id)], args=[self.ttl, self._alive_ttl]))
        if number > 1:
            log.info("task_id=%s: attempt %d begins (retried)", task_id, number)
        return RedisAttempt(task_id, number)

    async def current(self, task_id: str) -> int:
        """The newest attempt's number (0 for a task no one began)."""
        validate_task_id(task_id)
        with self._translated():
            value = await self.client.get(keys.attempts(task_id))
        return int(value) if value else 0

    async def attempts(self, task_id: str) -> list[int]:
        """Attempts 1..n of the task (`[]` when unknown)."""
        return list(range(1, await self.current(task_id) + 1))

    @property
    def alive_ttl(self) -> int:
        """Seconds an attempt's owner mark lasts unless refreshed (`BEGIN`'s ARGV[2])."""
        return self._alive_ttl

    @property
    def _alive_ttl(self) -> int:
        """How long an attempt whose runner went silent reads as running: STATUS_STALE_AFTER, and
        on a fleet the time another worker takes to run it again too (`retry_grace`): a job lost
        with its worker ends "instance lost" only when it will not be run again."""
        return max(int(self.stale_after + self.retry_grace), 1)

    # -- writing -----------------------------------------------------------------------------

    async def record_new(self, task_id: str, feed: Feed, claimed: Callable[[RedisAttempt], None] | None = None) -> None:
        """`begin` (told to `claimed`), then `record` (a claim is one cheap round trip here)."""
        try:
            attempt = await self.begin(task_id)
        except ServerlessError as exc:
            log.error("task_id=%s runs without a status log: %s", task_id, exc.message)
            return
        if claimed is not None:
            claimed(attempt)
        await self.record(attempt, feed)

    async def record(self, attempt: RedisAttempt, feed: Feed) -> None:
        """Store every event of `feed` until its terminal payload; while Redis is down, keep the
        events and retry with backoff (the terminal payload included). Marks the owner alive."""
        heartbeat = max(self.stale_after / 4, 0.05)
        loop = asyncio.get_running_loop()
        refresh_at = 0.0  # the keys' expiries and the owner's mark are refreshed from then on (now)
        written = loop.time()  # when the last batch was written (none yet: the first waits a window too)
        pending: list[Event] = []
        preview: Event | None = None  # the newest preview not stored yet (the job shows them if asked)
        try:
            async for event in feed.follow(idle=heartbeat, pinned=True, previews=True):
                if event is None:
                    await self._until_written(attempt, [])
                    refresh_at = loop.time() + heartbeat
                    continue
                if event.terminal and isinstance(event.error, HandedOff):
                    event = handed_off(event, attempt)  # not an end: another worker runs it again
                if event.preview:
                    preview = event
                else:
                    pending.append(event)
                if event.seq == feed.last_seq or event.terminal:  # caught up: one round trip for the lot
                    # A write follows the one before it no sooner than WRITE_WINDOW later (what comes
                    # meanwhile goes with it); the terminal payload never waits.
                    if not event.terminal and await _more_within(feed, event.seq, written + WRITE_WINDOW - loop.time()):
                        continue
                    if feed.sealed and not event.terminal:
                        continue  # stored with the job's end (`write_settled`), or with its terminal
                    # The expiries and the owner's mark with the first batch, the terminal one and
                    # once a heartbeat: the batches between carry their entries alone.
                    refresh = event.terminal or loop.time() >= refresh_at
                    pending = [each for each in pending if each.seq > feed.recorded]  # else stored with its end
                    if pending or preview is not None:
                        await self._until_written(attempt, pending, preview, refresh)
                        if pending:
                            feed.recorded = max(feed.recorded, pending[-1].seq)
                    written = loop.time()
                    if refresh:
                        refresh_at = loop.time() + heartbeat
                    pending, preview = [], None
        except Exception as exc:  # a bug: the log must still end with its terminal
            log.error(
                "status stream of task_id=%s attempt %d failed (%s); writing its terminal",
                attempt.task_id,
                attempt.number,
                exc,
            )
            terminal = await feed.wait()
            if isinstance(terminal.error, HandedOff):
                terminal = handed_off(terminal, attempt)
            await self._until_written(attempt, [terminal])

    async def _until_written(
        self, attempt: RedisAttempt, events: list[Event], preview: Event | None = None, refresh: bool = True
    ) -> None:
        delay = 0.1
        while True:
            try:
                await self._write(attempt, events, preview, refresh)
                return
            except (*DOWN, RedisFull) as exc:
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

    async def _write(
        self,
        attempt: RedisAttempt,
        events: list[Event],
        preview: Event | None = None,
        refresh: bool = True,
        end: Ending | None = None,
    ) -> bool | None:
        """Store `events` (and the newest `preview`) in one step (`APPEND`); with `refresh`, the
        log's expiries (when there are events) and its owner's mark too; with `end`, only when
        no cancel came first (`APPEND_END`: False, nothing stored). None: Redis refused them."""
        stored = [
            await self._stored(event, attempt) if event.terminal else (self.stored(event, attempt), None)
            for event in events
        ]
        task_id, number = attempt.task_id, attempt.number
        names = [attempt.key, keys.attempts(task_id), keys.owner(task_id), keys.alive(task_id, number)]
        names += [keys.previews(task_id, number), keys.result(task_id, number)]
        whole = next((kept for _, kept in stored if kept is not None), None)
        shown = preview.data if preview is not None and len(preview.data) <= self.max_event_bytes else b""
        listed: tuple[list[str], str, int, int] | None = None
        if number == 1 and events and events[0].seq == 1 and end is None:  # a queued task: its gateway listed it
            listed = self._listing_first(task_id, stored[0][0])
        if end is not None:
            names += [end.cancel_key, end.ended_key, end.stream, end.handoff_key]
        if listed is not None:
            names += listed[0]
        args: list[Any] = [
            self.ttl,
            "1" if events and refresh else "",
            self._alive_ttl if refresh else "",
            shown,
            PREVIEWS_KEPT,
            PREVIEWS_TTL,
            whole or b"",
            self.result_ttl,
            *(listed[1:] if listed is not None else ("", 0, 0)),
        ]
        if end is not None:
            args += [end.state, end.ttl, end.group, end.entry]
        for event, (data, kept) in zip(events, stored, strict=True):
            args += [event.seq, data, ("r" if kept is not None else "1") if event.terminal else "0"]
        try:
            if end is not None:
                answer: Any = await self._append_end(keys=names, args=args)
                if not isinstance(answer, list):
                    return False
                newest = answer[1]
                end.newest_handoff = newest.decode() if isinstance(newest, bytes) else str(newest)
                return True
            await self._append(keys=names, args=args)
            return True
        except rexc.OutOfMemoryError as exc:  # refused before anything was stored
            raise RedisFull(str(exc)) from exc  # kept and written again once Redis has room
        except rexc.ResponseError as exc:  # anything else is a bug: said, and not retried for ever
            log.error("task_id=%s: Redis refused its events: %s", task_id, exc)
            return None

    async def write_settled(self, attempt: RedisAttempt, feed: Feed, last: list[Event], end: Ending) -> bool | None:
        """A fleet worker's end of a job in one step (`APPEND_END`): the job's `last` events (not
        published yet, numbered after the feed's) stored with every event its recorder has not
        stored yet, when no cancel of its queue submission came first (`end`). True: stored (the
        recorder then skips them); False: a cancel came first, nothing stored; None: it cannot
        be done so (the feed no longer keeps all the events the log lacks, or Redis refused
        them). Retried while Redis is down, as the recorder retries."""
        unstored = feed.events_after(feed.recorded)
        if unstored is None:
            return None
        events = [*unstored, *last]
        delay = 0.1
        while True:
            try:
                stored = await self._write(attempt, events, None, True, end)
                break
            except (*DOWN, RedisFull) as exc:
                self._last_error = f"writing task {attempt.task_id}: {exc}"
                log.warning("task_id=%s: Redis is down (%s); its end is stored in %.1fs", attempt.task_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        if stored:
            feed.recorded = max(feed.recorded, events[-1].seq)
        return stored

    def index_task(self, pipe: Any, task_id: str, owner: str | None, workflow_id: str | None, at: float) -> None:
        """Add to `pipe` what lists the task (`list_tasks`): in every task's sorted set and its
        owner's, once (NX: a gateway's enqueue and its worker's first event both add it), the
        members past the retention dropped."""
        names, member, score, cutoff = self._listing(task_id, owner, workflow_id, at)
        for name in names:
            pipe.zadd(name, {member: score}, nx=True)
            pipe.zremrangebyscore(name, "-inf", cutoff)
            pipe.expire(name, self.ttl)

    def _listing(
        self, task_id: str, owner: str | None, workflow_id: str | None, at: float
    ) -> tuple[list[str], str, int, int]:
        """What lists a task: the sorted sets, its member, its score and the score before which
        members are dropped (`index_task`, and `APPEND` for a worker's first event)."""
        names = [keys.TASKS, keys.tasks_of(owner)] if owner else [keys.TASKS]
        return names, f"{task_id} {workflow_id or ''}", int(at * 1000), int((time.time() - self.ttl) * 1000)

    def _listing_first(self, task_id: str, first: bytes) -> tuple[list[str], str, int, int] | None:
        """What lists a task from its first event (whose it is, its workflow, when it was made);
        None for a first event that is not a progress event (a note of a dropped event: listed by
        its gateway, or not at all)."""
        try:
            data = json.loads(first)["data"]
            at = float(data["at"])
        except (ValueError, KeyError, TypeError):
            return None
        owner, workflow_id = data.get("owner"), data.get("workflow_id")
        return self._listing(
            task_id,
            owner if isinstance(owner, str) else None,
            workflow_id if isinstance(workflow_id, str) else None,
            at,
        )

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        """A page of the tasks, newest first (`serverless.status.tasklist`): with API keys, the
        caller's own sorted set only."""
        name = keys.TASKS if query.owner is None else keys.tasks_of(query.owner)
        top: Any = "+inf" if query.after is None else query.after[0]
        rows: list[TaskRow] = []
        admitted, offset = 0, 0
        with self._translated():
            while len(rows) < SCAN_BUDGET:
                batch: Any = await self.client.zrevrangebyscore(name, top, "-inf", offset, LIST_BATCH, withscores=True)
                if not batch:
                    return page(rows, query, True)
                offset += len(batch)
                found = [_listed(member, score) for member, score in batch]
                chosen = [
                    (task_id, created, workflow_id)
                    for task_id, created, workflow_id in found
                    if before(created, task_id, query.after)
                    and (query.workflow_id is None or workflow_id == query.workflow_id)
                ]
                summaries = await asyncio.gather(*(self.summary(task_id) for task_id, _, _ in chosen))
                for (task_id, created, workflow_id), summary in zip(chosen, summaries, strict=True):
                    if summary is None:
                        continue  # expired with its log
                    row = TaskRow(task_id, created, query.owner, workflow_id, summary)
                    rows.append(row)
                    admitted += query.admits(row)
                    if admitted >= query.limit:
                        return page(rows, query, True)
        return page(rows, query, False)

    async def _stored(self, event: Event, attempt: RedisAttempt) -> tuple[bytes, bytes | None]:
        """What goes into Redis for an event, and its whole form when that is kept apart: a
        terminal with base64 outputs is stored without them (marked when retried), and whole
        under its result key for FILE_LINK_EXPIRES seconds; an oversized event is replaced by a note."""
        if event.terminal:
            retried = attempt.number > 1
            if not retried and b'"base64"' not in event.data:
                return event.data, None
            if len(event.data) < BIG_TERMINAL:
                return split_terminal(event.data, retried)
            return await asyncio.to_thread(split_terminal, event.data, retried)
        return self.stored(event, attempt), None

    def stored(self, event: Event, attempt: RedisAttempt) -> bytes:
        """What goes into the stream for an event that is not terminal: itself, or a note when it
        is larger than MAX_EVENT_BYTES."""
        data = event.data
        if len(data) <= self.max_event_bytes:
            return data
        note = {
            "type": "serverless_dropped",
            "data": {"task_id": attempt.task_id, "seq": event.seq, "bytes": len(data), "limit": self.max_event_bytes},
        }
        return jsontext.dumps(note)

    # -- reading -----------------------------------------------------------------------------

    def validate(self, task_id: str) -> None:
        """InvalidParams for an id outside the rule of task ids (the file store's rule)."""
        validate_task_id(task_id)

    async def read(self, task_id: str, after: int = 0, attempt: int | None = None) -> bytes:
        """The status API's body for the current attempt (or attempt `attempt`): the payloads
        after the first `after`; `[]` for an unknown task or attempt; an attempt without a
        terminal whose owner stopped beating ends with an "instance lost" error."""
        if attempt is not None and attempt < 1:
            raise InvalidParams("attempt must be a whole number from 1", raw={"attempt": attempt})
        return json_array(await self._lines(task_id, after, attempt))

    async def _lines(self, task_id: str, after: int, attempt: int | None) -> list[bytes]:
        """The attempt's stored payloads after the first `after`, the "instance lost" error added
        (in its place: after the last) when its owner is gone without a terminal one."""
        current = await self.current(task_id)
        number = attempt or current
        if not number or number > current:
            return []
        key = keys.attempt(task_id, number)
        with self._translated():
            async with self.client.pipeline(transaction=True) as pipe:  # one snapshot, as `follow`'s
                pipe.xrange(key, min=f"0-{after + 1}")
                pipe.xrevrange(key, count=1)
                pipe.exists(keys.alive(task_id, number))
                entries, last, alive = await pipe.execute()
        lines = [fields[b"d"] for _, fields in entries]
        if entries and entries[-1][1].get(b"r") == b"1":
            lines[-1] = await self._whole(task_id, number, lines[-1])
        ended = bool(last) and last[0][1].get(b"t") == b"1"
        if not ended and not alive and after <= (_seq(last[0][0]) if last else 0):
            lines.append(self.lost_payload())
        return lines

    def lost_payload(self) -> bytes:
        lost = Unavailable(
            f"instance lost: the job's worker has given no news for {self.stale_after:g}s and no result",
            raw={"silent_s": self.stale_after},
        )
        return jsontext.dumps(lost.to_payload())

    async def known(self, task_id: str) -> bool:
        """Whether a gateway queued the task or an instance began it (its log may still be empty)."""
        validate_task_id(task_id)
        with self._translated():
            return bool(await self.client.exists(keys.attempts(task_id), keys.owner(task_id)))

    async def owner(self, task_id: str) -> str | None:
        """Whose the task is: what the gateway that queued it recorded, else the `owner` its
        current attempt's first event names (as the file store reads it); None when made without
        API keys; "" while not known yet (no such task, or nothing written yet)."""
        validate_task_id(task_id)
        with self._translated():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(keys.owner(task_id))
                pipe.get(keys.attempts(task_id))
                recorded, number = await pipe.execute()
            if recorded is not None:
                return recorded.decode() or None
            first: Any = await self.client.xrange(keys.attempt(task_id, int(number)), count=1) if number else []
        return owner_named(first[0][1][b"d"]) if first else ""

    async def summary(self, task_id: str) -> dict[str, Any] | None:
        """The task's summary (`summary.summarise`) from its current attempt, as the file store
        computes it; a queued task not begun yet is `queued`; None for an unknown task."""
        lines = await self._lines(task_id, 0, None)
        if not lines and not await self.known(task_id):
            return None
        return summarise(task_id, [json.loads(line) for line in lines])

    async def follow(
        self,
        task_id: str,
        after: int = 0,
        attempt: int | None = None,
        idle: float | None = None,
        previews: bool = False,
        unbegun: bool = False,
        last_only: bool = False,
    ) -> AsyncIterator[Entry | None]:
        """The task's payloads after `after` as they are stored, from any instance (XREAD BLOCK,
        no polling), until a terminal one; None after `idle` seconds of silence; nothing when
        resumed after the terminal one. Starts at attempt `attempt` (default the current one, or
        1 for a task not begun yet) and moves on to a newer attempt when one begins (a retry),
        its payloads numbered on from the last seen. An attempt whose owner is gone ends with
        "instance lost"; Redis unreachable for longer than `stale_after` ends with a 503 error.
        With `previews`, the attempt's previews stream is read with its log: of the previews
        stored since the last read, the newest comes (`Entry.preview`), after the log's entries.
        `unbegun`: attempt `attempt` was not begun when its caller queued it a moment ago: its
        first read is the watch's (from its start), not one of its own as well. `last_only`: of
        the entries a read brings, the last alone (the terminal one when it is among them), for a
        caller waiting for the end."""
        validate_task_id(task_id)
        loop = asyncio.get_running_loop()
        number = attempt or max(await self.current(task_id), 1)
        cursor, offset = after, 0
        silent_since = loop.time()
        down_since: float | None = None
        waiting = min(idle or BLOCK_SECONDS, BLOCK_SECONDS)
        wait = not after  # a resumed follow learns at once that its log has ended
        async with contextlib.AsyncExitStack() as registered:
            watched: tuple[str, asyncio.Event] | None = None
            shown: dict[str, str] = {}  # the previews stream -> the last entry id read of it
            while True:
                key = keys.attempt(task_id, number)
                fresh = watched is None or watched[0] != key
                if watched is None or watched[0] != key:  # its first attempt, or a retry's
                    await registered.aclose()
                    watched = (key, await registered.enter_async_context(self.watch.news(key, f"0-{cursor}")))
                    if previews:
                        shown = {keys.previews(task_id, number): "0-0"}
                        for name, since in shown.items():
                            await registered.enter_async_context(self.watch.news(name, since, watched[1]))
                news = watched[1]
                answer, down_since = await self._read_or_wait(
                    key, cursor, news, waiting if wait else 0.0, down_since, shown, watched=not fresh or unbegun
                )
                unbegun = False
                wait = True
                if down_since is not None and loop.time() - down_since > self.stale_after:
                    down = unavailable(self._last_down or ConnectionError("no answer"))
                    yield Entry(offset + cursor + 1, jsontext.dumps(down.to_payload()), True)
                    return
                for name, entries in answer or []:
                    name = name.decode() if isinstance(name, bytes) else name
                    if name in shown:
                        newest_id, newest = entries[-1]
                        shown[name] = newest_id.decode() if isinstance(newest_id, bytes) else newest_id
                        yield Entry(offset + cursor, newest[b"d"], False, preview=True)
                        continue
                    for index, (entry_id, fields) in enumerate(entries, start=1):
                        if last_only and index < len(entries):
                            continue
                        cursor = _seq(entry_id)
                        terminal = fields.get(b"t") == b"1"
                        data = fields[b"d"]
                        if terminal and fields.get(b"r") == b"1":
                            data = await self._whole(task_id, number, data)
                        yield Entry(offset + cursor, data, terminal, more=index < len(entries))
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
                tip = await self._attempt_state(task_id, number)
                seen_end = tip.last is not None and tip.last[1] and cursor >= tip.last[0]
                if tip.newest > number:  # retried elsewhere: go on with the new attempt
                    number, offset, cursor = tip.newest, offset + cursor, 0
                elif seen_end:
                    return  # resumed after its terminal payload
                elif tip.last is not None and tip.last[1]:
                    continue  # its terminal payload was stored since the read above: read it
                elif tip.newest == number and tip.alive is False:
                    if cursor <= (tip.last[0] if tip.last else 0):  # not resumed after the lost error
                        yield Entry(offset + cursor + 1, self.lost_payload(), True)
                    return

    async def _read_or_wait(
        self,
        key: str,
        cursor: int,
        news: asyncio.Event,
        wait: float,
        down_since: float | None,
        also: dict[str, str] | None = None,
        watched: bool = False,
    ) -> tuple[Any, float | None]:
        """The stream's entries after `cursor` (and those of the streams `also` names, after
        their ids) at once, else those that come within `wait` seconds (the watch says when: no
        connection is held meanwhile); and since when Redis has not answered (None: it answered).
        Once the watch has read the stream since `cursor` (`watched`: not the first read after
        registering), the entries it kept are taken instead of read again, and none kept after
        `cursor` means none stored: the follower waits without a read."""
        news.clear()  # before the read: an entry stored after it sets it again
        streams: dict[Any, Any] = {key: f"0-{cursor}", **(also or {})}
        kept = self.watch.after(key, cursor) if watched and not also else None
        try:
            answer: Any = [(key, kept)] if kept else None
            if kept is None:
                answer = await self.client.xread(streams, count=512)
            if not answer and wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await news.wait()
                if news.is_set():  # the watch read them: taken from it, else read (a wake for an outage)
                    kept = None if also else self.watch.after(key, cursor)
                    answer = [(key, kept)] if kept else await self.client.xread(streams, count=512)
            return answer, None
        except DOWN as exc:
            self._last_down = exc
            since = down_since or asyncio.get_running_loop().time()
            await asyncio.sleep(BLOCK_SECONDS / 2)
            return None, since

    async def _whole(self, task_id: str, number: int, stored: bytes) -> bytes:
        """A terminal payload whole (base64 outputs included) while its result key lives, else
        as the stream keeps it (each output's content null, with a note saying why)."""
        try:
            whole: Any = await self.client.get(keys.result(task_id, number))
        except DOWN:
            return stored
        return bytes(whole) if whole is not None else stored

    # -- what a fleet's workers tell its gateways ---------------------------------------------

    async def publish_object_info(self, answer: dict[str, Any]) -> None:
        """A worker's ComfyUI's `/object_info`, for gateways (which have no ComfyUI) to check
        hosted workflows against."""
        data = await asyncio.to_thread(jsontext.dumps, answer)
        with self._translated():
            await self.client.set(keys.OBJECT_INFO, data)

    async def publish_comfyui_info(self, answers: dict[str, Any]) -> None:
        """A worker's ComfyUI's other informational answers (path -> answer: `/system_stats`,
        `/embeddings`, `/models`...), which ComfyUI's own API on a gateway answers with."""
        mapping: dict[Any, Any] = {path: jsontext.dumps(answer) for path, answer in answers.items()}
        if mapping:
            with self._translated():
                await self.client.hset(keys.COMFYUI_INFO, mapping=mapping)

    async def comfyui_info(self, path: str) -> Any:
        """What a worker's ComfyUI answered to `path`; NotFound when no worker published it."""
        with self._translated():
            data: Any = await self.client.hget(keys.COMFYUI_INFO, path)
        if data is None:
            raise NotFound(f"no worker has published its ComfyUI's {path}")
        return jsontext.loads(data)

    async def object_info(self) -> dict[str, Any]:
        """The `/object_info` a worker published; Unavailable until one has."""
        with self._translated():
            data: Any = await self.client.get(keys.OBJECT_INFO)
        if data is None:
            raise Unavailable("no worker has published its ComfyUI's node list yet: start a worker (ROLE=worker)")
        answer = await asyncio.to_thread(jsontext.loads, data)
        return dict(answer)

    # -- a fleet's linked files --------------------------------------------------------------

    async def keep_file(self, name: str, content: bytes, mime: str) -> None:
        """Keep an output's bytes (as its download link serves them) for FILE_LINK_EXPIRES seconds."""
        with self._translated():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hset(keys.file(name), mapping={"mime": mime, "content": content})
                pipe.expire(keys.file(name), self.result_ttl)
                await pipe.execute()

    async def read_file(self, name: str) -> tuple[bytes, str] | None:
        """A kept output's (bytes, mime), None when it is not (or no longer) kept."""
        with self._translated():
            found: Any = await self.client.hgetall(keys.file(name))
        if not found:
            return None
        return bytes(found[b"content"]), found[b"mime"].decode()

    async def _attempt_state(self, task_id: str, number: int) -> Tip:
        """Where attempt `number` stands; `Tip(0, None)` when Redis does not answer."""
        key = keys.attempt(task_id, number)
        try:
            # One snapshot (MULTI): a retry begins its attempt, then removes the dead one's mark.
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(keys.attempts(task_id))
                pipe.exists(keys.alive(task_id, number))
                pipe.xrevrange(key, count=1)
                newest, alive, last = await pipe.execute()
        except DOWN:
            return Tip(0, None)
        end = (_seq(last[0][0]), last[0][1].get(b"t") == b"1") if last else None
        return Tip(int(newest or 0), bool(alive), end)

    async def append_event(self, task_id: str, attempt: int, payload: dict[str, Any]) -> None:
        """Add a payload (not a terminal one) to attempt `attempt`, numbered after its last; not
        when it has ended."""
        key = keys.attempt(task_id, attempt)
        with self._translated():
            last: Any = await self.client.xrevrange(key, count=1)
            if last and last[0][1].get(b"t") == b"1":
                return
            seq = _seq(last[0][0]) + 1 if last else 1
            # With its EXPIRE: the attempt may have stored nothing yet (its worker was killed
            # first), and this entry then makes the key.
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(key, {"d": jsontext.dumps(payload), "t": "0"}, id=f"0-{seq}")
                pipe.expire(key, self.ttl)
                await pipe.execute()

    async def append_terminal(self, task_id: str, attempt: int, error: ServerlessError) -> None:
        """End attempt `attempt` of a task with `error` (a lost worker, a cancelled queued job),
        numbered after its last stored payload."""
        key = keys.attempt(task_id, attempt)
        with self._translated():
            last: Any = await self.client.xrevrange(key, count=1)
            seq = _seq(last[0][0]) + 1 if last else 1
            if last and last[0][1].get(b"t") == b"1":
                return  # it ended after all
            payload = jsontext.dumps(error.to_payload())
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(key, {"d": payload, "t": "1"}, id=f"0-{seq}")
                pipe.expire(key, self.ttl)
                pipe.delete(keys.alive(task_id, attempt))
                await pipe.execute()

    async def ended(self, task_id: str, attempt: int) -> bool:
        """Whether attempt `attempt` stored its terminal payload."""
        with self._translated():
            last: Any = await self.client.xrevrange(keys.attempt(task_id, attempt), count=1)
        return bool(last) and last[0][1].get(b"t") == b"1"

    async def has_outputs(self, task_id: str, attempt: int) -> bool:
        """Whether attempt `attempt` stored an `executed` message with outputs (a GPU was used)."""
        with self._translated():
            entries: Any = await self.client.xrange(keys.attempt(task_id, attempt))
        for _, fields in entries:
            try:
                payload = json.loads(fields[b"d"])
            except ValueError:
                continue
            if payload.get("type") == "executed" and (payload.get("data") or {}).get("output"):
                return True
        return False

    async def record_webhook(self, task_id: str, record: bytes) -> None:
        """How the task's webhook went, kept as long as its log."""
        with self._translated():
            await self.client.set(keys.webhook(task_id), record, ex=self.ttl)

    async def webhook_record(self, task_id: str) -> bytes | None:
        validate_task_id(task_id)
        with self._translated():
            found: Any = await self.client.get(keys.webhook(task_id))
        return bytes(found) if found is not None else None

    # -- job control: cancels and idempotency keys -------------------------------------------

    async def request_cancel(self, task_id: str) -> int | None:
        """Leave a cancel request for the task's newest attempt (its instance looks for it with
        `cancels_asked`); returns the attempt, None for an unknown task. The Redis tier's queue
        has its own (`serverless.fleet.queue.RedisQueue.cancel`)."""
        number = await self.current(task_id)
        if not number:
            return None
        with self._translated():
            await sidecars.request_cancel(self.client, keys.cancel_request(task_id, number), self.ttl)
        return number

    async def cancels_asked(self, attempts: list[RedisAttempt]) -> list[RedisAttempt]:
        """Those of `attempts` another instance asked to cancel (one round trip for all)."""
        with self._translated():
            asked = await sidecars.cancels_asked(
                self.client, [keys.cancel_request(a.task_id, a.number) for a in attempts]
            )
        return [attempt for attempt, yes in zip(attempts, asked, strict=True) if yes]

    async def claim_key(self, key: str, task_id: str, digest: str) -> dict[str, Any] | None:
        """Claim an `Idempotency-Key` for the task (SET NX): None when claimed here, else the claim."""
        with self._translated():
            return await sidecars.claim_key(self.client, key, {"task_id": task_id, "digest": digest}, self.ttl)

    async def read_key(self, key: str) -> dict[str, Any]:
        with self._translated():
            return await sidecars.read_key(self.client, key)

    async def release_key(self, key: str, task_id: str) -> None:
        """Give a claim up: its job could not start."""
        with self._translated():
            await sidecars.release_key(self.client, key, task_id)

    # -- health ------------------------------------------------------------------------------

    async def writable(self) -> bool:
        """Whether Redis answers a PING now."""
        try:
            self._up = bool(await self.client.ping())
        except (*DOWN, rexc.RedisError) as exc:
            self._up = False
            self._last_error = f"{type(exc).__name__}: {exc}"
        return self._up

    def writable_now(self) -> bool | None:
        """Redis is asked (`writable`): one PING, answered or timed out within seconds."""
        return None

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
        await self.watch.aclose()
        await self.client.aclose()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            with translated():
                yield
        except Unavailable as exc:
            self._last_error = exc.message
            raise


async def _more_within(feed: Feed, seq: int, within: float) -> bool:
    """Whether the feed has an event after `seq` once `within` seconds have passed, or at once
    when it ends: the events published meanwhile are taken together after one wait, not each
    after a wake of its own (a short job's recorder sleeps from its first event to its end)."""
    if within > 0 and feed.terminal is None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await feed.wait()
    return feed.last_seq > seq


def handed_off(event: Event, attempt: RedisAttempt) -> Event:
    """What the log keeps in place of a `HandedOff` end: a `retrying` event (the attempt has no
    terminal payload; the next one, on another worker, ends the task)."""
    reason = event.error.message if event.error is not None else ""
    data = {"task_id": attempt.task_id, "state": "retrying", "attempt": attempt.number + 1, "at": time.time()}
    payload = {"type": "serverless_progress", "data": {**data, "reason": reason}}
    return Event(event.seq, jsontext.dumps(payload))


def _listed(member: bytes, score: float) -> tuple[str, int, str | None]:
    task_id, _, workflow_id = member.decode().partition(" ")
    return task_id, int(score), workflow_id or None


def split_terminal(data: bytes, retried: bool) -> tuple[bytes, bytes | None]:
    """The terminal payload as its stream keeps it (each output's base64 content left out with a
    note; `"retried": true` on a retried attempt's), and whole (None when nothing was left out).
    Untouched (same bytes) when there is nothing to do."""
    if not retried and b'"base64"' not in data:
        return data, None
    payload = json.loads(data)
    if retried:
        payload["retried"] = True
    whole = jsontext.dumps(payload) if retried else data
    kept_apart = False
    for result in (payload.get("data") or {}).get("results") or []:
        encoded = (result.get("output") or {}).get("base64")
        if isinstance(encoded, dict) and encoded.get("content") is not None:
            result["output"]["base64"] = {"content": None, "note": BASE64_NOTE}
            kept_apart = True
    if not kept_apart:
        return whole, None
    return jsontext.dumps(payload), whole


def stored_terminal(data: bytes, retried: bool) -> bytes:
    """The terminal payload as its stream keeps it (`split_terminal`'s first part)."""
    return split_terminal(data, retried)[0]


def _seq(entry_id: bytes) -> int:
    """Our sequence number from a stream entry id (`0-<seq>`)."""
    return int(entry_id.split(b"-")[1])
