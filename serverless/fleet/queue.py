"""The job queue in Redis streams, as gateways use it: enqueue, idempotency, cancel.

    jobs:<priority>             a stream per priority (high, normal, low), consumer group `workers`
    job:<task_id>               "<stream> <entry id>" of the task's newest submission
    task:<task_id>:owner        whose it is (`serverless.status.redis`): known, queued, from now on
    idem:<key>                  "<task_id> <fingerprint>" of the first request with that Idempotency-Key
                                (under an API key: idem:<owner>-<sha256 of the key>, its own namespace)
    run:<task_id>:<entry id>    who took that submission: a worker's name, or "cancelled" (SET NX)
    cancel:<task_id>:<entry id> a stream: one entry once a cancel was acknowledged ("cancelling")
    ended:<task_id>:<entry id>  a stream: one entry `state` once its worker decided how it ends
    dead:jobs                   queue entries no worker could read (dead letters, capped)
    staged:<task_id>:<name>     a submission's big inputs, apart from its entry (`staging`)
    (every key is named in `serverless.status.keys`)

Taking a submission and cancelling it race on one SET NX: a queued job cancelled first is ended
here, and the worker that reads its entry skips it (its entry is not deleted: a deletion past the
group's last read makes Redis unable to tell the lag, which KEDA scales on). A job a worker took
is stopped by that worker, which blocks on its cancel stream (XREAD) while the job runs and stops
it the moment a cancel comes. Its end and a cancel race in Redis, each in one script: the
gateway's cancel adds to `cancel:` only while `ended:` is empty (else 409), the worker writes
`ended:` before the terminal payload, or with it (`status.redis.APPEND_END`), and reads `cancel:`
in the same step; so a job whose cancel
was answered "cancelling" always ends EXECUTION_INTERRUPTED, and one that ended otherwise answers
its cancel 409. Workers remove the entries every worker is done with (`TRIM`, after their acks).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from ..auth import scoped_key
from ..core.request import validate_task_id
from ..errors import ExecutionInterrupted, InvalidParams, JobTimeout, NotFound, ServerlessError, Unavailable
from ..jobs.spec import JobSpec
from ..status import keys
from ..status.redis import RedisStatus, translated
from ..status.watch import WAKE_KEPT, WAKE_TTL
from ..tenants.usage import NoUsage, UsageStore
from . import staging
from .admission import Admission, held
from .heartbeat import HEARTBEAT_TTL
from .wire import GROUP, PRIORITIES, count_of, encode_spec, fingerprint, lane_of, stream

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
_T = "\x00"  # a task id or entry id never holds it: it splits key names into the parts around them
EXPIRED = "expired"  # the run claim of a job that waited past QUEUE_TTL: no worker runs it
PENDING = "pending"  # a submission's entry id until XADD has answered

# A gateway's cancel of submission <entry>: removed while queued (no worker took it), else asked of
# its worker unless it has ended (decided how it ends: `ended:` holds an entry; or QUEUE_TTL took
# it from the workers). One step, so that it and the worker's END cannot both win.
# -> "cancelled" | "cancelling" | "ended <state>"
CANCEL = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 'cancelled' end
if redis.call('GET', KEYS[1]) == ARGV[3] then return 'ended failed' end
local ended = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #ended > 0 then return 'ended ' .. ended[1][2][2] end
redis.call('XADD', KEYS[3], 'MAXLEN', '1', '*', 'cancel', '1')
redis.call('EXPIRE', KEYS[3], ARGV[2])
return 'cancelling'
"""
# A worker's end of submission <entry>, before its terminal payload is stored: 0 when a cancel
# was acknowledged first (it then ends cancelled), else 1 (it ends as ARGV[1] says). The entry
# added also wakes the worker's XREAD on both streams: the job's watch is over.
END = """
local won = 1
local state = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 1 then
    won = 0
    state = 'cancelled'
end
redis.call('XADD', KEYS[2], 'MAXLEN', '1', '*', 'state', state)
redis.call('EXPIRE', KEYS[2], ARGV[2])
return won
"""

# A queued submission taken in one step: its run claim (SET NX), whether a cancel of it was
# acknowledged, and, if not, the task's next attempt begun as `status.redis.BEGIN` begins one
# (the owner's mark named as `keys.alive` names it). -> -1: not ours; 0: ours, cancelled; n: attempt n.
# `takeable`: whether a task id read from an entry follows the rule of task ids (else not taken here).
TAKE_FUNCTION = """
local function take(claim, cancel, attempts, consumer, ttl, alive_ttl)
  if not redis.call('SET', claim, consumer, 'NX', 'EX', ttl) then return -1 end
  if redis.call('EXISTS', cancel) == 1 then return 0 end
  local number = redis.call('INCR', attempts)
  redis.call('EXPIRE', attempts, ttl)
  redis.call('SET', attempts .. ':' .. number .. ':alive', '1', 'EX', alive_ttl)
  return number
end
local function takeable(task)
  return task and #task <= 128 and not string.find(task, '[^%w%._%-]') and task ~= '.' and task ~= '..'
end
"""

# A submission in one step: the task's owner claimed (SET NX: never overwritten; ARGV[5] = "1"
# when the caller has checked a standing claim is the same owner's), its entry, the entry's
# ordinal, the task's pointer to it ("<stream> <entry id> <ordinal>"), the task listed (KEYS[6..]:
# ARGV[7] member, ARGV[8] score, past ARGV[9] dropped), and the task's newest attempt number read.
# ARGV[6]: its staged inputs' name ("": none). With ARGV[10] = "1", KEYS[6] is the gateway's
# stream watch's wake stream (`StreamWatch.hold`), given an entry (MAXLEN ~ARGV[11], ARGV[12]
# seconds) and the lists are KEYS[7..]. With ARGV[13] = "1", the job is given to the worker idle
# in its blocking read (`keys.idle_worker`: ARGV[14]) when it is the only worker that beat since
# ARGV[16] (the heartbeats' sorted set ARGV[15]) and no job waits in the lane's streams ARGV[25..]
# (group ARGV[24]): the job it would read next, taken for it as its `NEXT` takes one (its attempt
# begun, its run claim named from the parts ARGV[19..21]; ARGV[22] their TTL, ARGV[23] the owner
# mark's) and written first to its given stream (ARGV[17] .. name .. ARGV[18]), whose entry wakes
# its read with the job (a read is answered for the first of its streams written), then queued
# under the entry id it was given with and delivered to it (XREADGROUP): no round trip of its
# own. -> {1, number, entry id, given (0|1)}, or {0, number, owner held} when another claim stands.
ENQUEUE = """
local function give(fields)
  local worker = redis.call('GET', ARGV[14])
  if not worker then return false end
  for _, name in ipairs(redis.call('ZRANGEBYSCORE', ARGV[15], ARGV[16], '+inf')) do
    if name ~= worker then return false end
  end
  for i = 25, #ARGV do
    local groups = redis.pcall('XINFO', 'GROUPS', ARGV[i])
    if groups.err then return false end
    for _, info in ipairs(groups) do
      local group = {}
      for j = 1, #info, 2 do group[info[j]] = info[j + 1] end
      if group['name'] == ARGV[24] and group['lag'] ~= 0 then return false end
    end
  end
  redis.call('DEL', ARGV[14])
  local last = '0-0'
  local stream = redis.call('XINFO', 'STREAM', KEYS[1])
  for j = 1, #stream, 2 do
    if stream[j] == 'last-generated-id' then last = stream[j + 1] end
  end
  local dash = string.find(last, '-', 1, true)
  local last_ms, last_seq = tonumber(string.sub(last, 1, dash - 1)), tonumber(string.sub(last, dash + 1))
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local id = ms > last_ms and string.format('%d-0', ms) or string.format('%d-%d', last_ms, last_seq + 1)
  local number = redis.call('INCR', KEYS[5])
  redis.call('EXPIRE', KEYS[5], ARGV[22])
  redis.call('SET', KEYS[5] .. ':' .. number .. ':alive', '1', 'EX', ARGV[23])
  redis.call('SET', ARGV[19] .. ARGV[1] .. ARGV[20] .. id .. ARGV[21], worker, 'EX', ARGV[22])
  local given = ARGV[17] .. worker .. ARGV[18]
  redis.call('XADD', given, 'MAXLEN', '~', '16', '*', 'stream', KEYS[1], 'entry', id, 'took', number, unpack(fields))
  redis.call('EXPIRE', given, ARGV[22])
  redis.call('XADD', KEYS[1], id, unpack(fields))
  redis.call('XREADGROUP', 'GROUP', ARGV[24], worker, 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  return id
end
local number = redis.call('GET', KEYS[5]) or '0'
if ARGV[5] ~= '1' and not redis.call('SET', KEYS[4], ARGV[4], 'NX', 'EX', ARGV[3]) then
  return {0, number, redis.call('GET', KEYS[4])}
end
local fields = {'task_id', ARGV[1], 'spec', ARGV[2]}
if ARGV[6] ~= '' then  -- its big inputs staged apart, under this name
  fields = {'task_id', ARGV[1], 'spec', ARGV[2], 'inputs', ARGV[6]}
end
local entry = ARGV[13] == '1' and give(fields)
local given = entry and 1 or 0
if not entry then entry = redis.call('XADD', KEYS[1], '*', unpack(fields)) end
local ordinal = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[3], KEYS[1] .. ' ' .. entry .. ' ' .. ordinal, 'EX', ARGV[3])
redis.call('EXPIRE', KEYS[4], ARGV[3])
local lists = 6
if ARGV[10] == '1' then  -- its follower's watch reads the task's log from now on
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[11], '*', 'w', '1')
  redis.call('EXPIRE', KEYS[6], ARGV[12])
  lists = 7
end
for i = lists, #KEYS do  -- the task lists (`GET /api/tasks`): every task's, its owner's
  redis.call('ZADD', KEYS[i], 'NX', ARGV[8], ARGV[7])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[9])
  redis.call('EXPIRE', KEYS[i], ARGV[3])
end
return {1, number, entry, given}
"""

# Remove the entries every worker is done with (their request bodies with them): those before the
# first one a worker still holds, else before the last one handed out. XTRIM MINID, not XDEL: the
# group's lag stays exact (a deletion at or past its last read would make Redis unable to tell it).
TRIM = """
local removed = 0
for _, stream in ipairs(KEYS) do
  if redis.call('EXISTS', stream) == 1 then
    for _, fields in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local group = {}
      for i = 1, #fields, 2 do group[fields[i]] = fields[i + 1] end
      if group['name'] == ARGV[1] then
        local keep = group['last-delivered-id']
        local pending = redis.call('XPENDING', stream, ARGV[1])
        if pending[1] > 0 then keep = pending[2] end
        removed = removed + redis.call('XTRIM', stream, 'MINID', keep)
      end
    end
  end
end
return removed
"""


class TaskConflict(InvalidParams):
    """409: an Idempotency-Key reused with another body, or a cancel of a task that has ended."""

    status_code = 409


def cancelled_by_request() -> ExecutionInterrupted:
    return ExecutionInterrupted("cancelled by request")


@dataclass(frozen=True, slots=True)
class Submitted:
    """A submission: the task to follow, from which attempt (None: the current one), and whether
    it attached to an earlier request with the same Idempotency-Key."""

    task_id: str
    attempt: int | None
    attached: bool
    # The status watch's registration of the followed attempt's log, made before it was queued
    # (`StreamWatch.hold`): its follower releases it once registered itself.
    held: tuple[str, asyncio.Event] | None = None


class RedisQueue:
    """Gateways' side of the queue."""

    def __init__(
        self,
        client: aioredis.Redis,
        status: RedisStatus,
        stale: float = 86400.0,
        usage: UsageStore | None = None,
        inputs_ttl: int = 0,
    ) -> None:
        self.client = client
        self.status = status
        self.usage = usage or NoUsage()  # jobs ended here, never run, in their key's usage
        self.admission = Admission(client, status.ttl, stale)  # a key's concurrency (`fleet.admission`)
        self.inputs_ttl = inputs_ttl or status.ttl  # how long staged inputs are kept (`staging.ttl`)
        self._cancel = client.register_script(CANCEL)
        self._enqueue_script = client.register_script(ENQUEUE)
        self._grouped: set[str] = set()  # lanes whose streams have the workers' group (made by us, or a worker)

    async def submit(
        self, spec: JobSpec, priority: str, idempotency_key: str | None, followed: bool = False
    ) -> Submitted:
        """Enqueue `spec` (XADD); with an Idempotency-Key, the first request claims it (SET NX) and
        a repeat attaches to its task. Redis down: Unavailable, nothing enqueued. `followed`: its
        caller follows it from now on: a new task's log is registered with the status watch
        first, and the watch woken in the round trip that queues it (`Submitted.held`)."""
        task_id = spec.task_id or str(uuid.uuid4())
        if followed and spec.task_id is None and idempotency_key is None:
            return await self._submit_held(spec, task_id, priority)
        with translated():
            if idempotency_key is not None:
                validate_task_id(idempotency_key)
                mark = f"{task_id} {fingerprint(spec)}"
                claimed = await self.client.set(_idem(idempotency_key, spec), mark, nx=True, ex=self.status.ttl)
                if not claimed:
                    return await self._attach(idempotency_key, spec)
            try:
                following, entry = await self._enqueue(spec, task_id, priority)
            except BaseException:
                if idempotency_key is not None:  # a repeat must not attach to a job that never was
                    with contextlib.suppress(Exception):
                        await self.client.delete(_idem(idempotency_key, spec))
                raise
        log.info("task_id=%s queued on %s as %s", task_id, stream(priority, spec.lane), entry.decode())
        return Submitted(task_id, following, False)

    async def _submit_held(self, spec: JobSpec, task_id: str, priority: str) -> Submitted:
        """`submit` of a new task (its first attempt is 1) whose caller follows it at once: named
        by the status watch when it has a spare (its read names the log already), else its log
        registered and the watch woken in the round trip that queues it."""
        watch = self.status.watch
        spare = watch.spare()
        if spare is not None:
            task_id, key, held = spare
        else:
            key = keys.attempt(task_id, 1)
            held = watch.hold(key)
        try:
            with translated():
                following, entry = await self._enqueue(spec, task_id, priority, None if spare else watch.wake_key)
        except BaseException:
            watch.release(key, held)
            raise
        log.info("task_id=%s queued on %s as %s", task_id, stream(priority, spec.lane), entry.decode())
        return Submitted(task_id, following, False, (key, held))

    async def _make_groups(self, lane: str) -> None:
        """The workers' group on every queue stream of a lane, made before its first job is
        queued: a queue with no worker yet still tells its lag (KEDA scales workers up from zero
        on it). The lane is listed in `fleet:lanes` (admission counts every lane's jobs)."""
        for priority in PRIORITIES:
            try:
                await self.client.xgroup_create(stream(priority, lane), GROUP, id="0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        await self.client.sadd(keys.LANES, lane)
        self._grouped.add(lane)

    async def _enqueue(self, spec: JobSpec, task_id: str, priority: str, wake: str | None = None) -> tuple[int, Any]:
        """Queue the spec (`ENQUEUE`: one round trip, the task listed for `GET /api/tasks` in it):
        the task is the key's that first queued it ("": anyone's); another key naming it is
        refused before anything is queued. Returns the attempt its caller follows and the entry id.
        `wake`: the status watch's wake stream, given an entry in that round trip (`submit`);
        a job held behind its key's own (`admission`) wakes it apart."""
        if spec.lane not in self._grouped:
            await self._make_groups(spec.lane)
        validate_task_id(task_id)
        owner = spec.owner or ""
        # Big inputs travel apart (`staging`): the entry holds the workflow without them.
        light, staged = staging.split(spec.workflow)
        name = ""
        if staged:
            name = staging.new_name()
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(keys.staged_inputs(task_id, name), mapping=staged)  # type: ignore[arg-type]
                pipe.expire(keys.staged_inputs(task_id, name), self.inputs_ttl)
                await pipe.execute()
        encoded = encode_spec(_travelling(spec, task_id, light))
        if spec.owner and spec.concurrency and not spec.lane:  # queued, or held behind its key's own
            following = await self.status.current(task_id) + 1
            await self._claim_owner(task_id, owner)
            _, entry, _ = await self.admission.admit(spec, task_id, priority, encoded, name)
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.expire(keys.owner(task_id), self.status.ttl)
                self.status.index_task(pipe, task_id, spec.owner, spec.workflow_id, time.time())
                if wake is not None:
                    pipe.xadd(wake, {"w": "1"}, maxlen=WAKE_KEPT, approximate=True)
                    pipe.expire(wake, WAKE_TTL)
                await pipe.execute()
            return following, entry.encode()
        queue = stream(priority, spec.lane)
        names = [queue, count_of(queue), keys.submission(task_id), keys.owner(task_id), keys.attempts(task_id)]
        names += [] if wake is None else [wake]
        names += [keys.TASKS, keys.tasks_of(owner)] if owner else [keys.TASKS]  # listed (`GET /api/tasks`)
        now = time.time()
        member = f"{task_id} {spec.workflow_id or ''}"
        listing = [member, int(now * 1000), int((now - self.status.ttl) * 1000)]
        waking = ["", "", ""] if wake is None else ["1", WAKE_KEPT, WAKE_TTL]
        args: list[Any] = [task_id, encoded, self.status.ttl, owner, "0", name, *listing, *waking]
        args += self._giving(spec.lane, now)
        answer: Any = await self._enqueue_script(keys=names, args=args)
        if not int(answer[0]):  # the task was queued before: by the same key, it is queued again
            taken_by = answer[2] if len(answer) > 2 else None
            if taken_by and not hmac.compare_digest(taken_by, owner.encode()):
                if name:
                    await self.client.delete(keys.staged_inputs(task_id, name))
                raise TaskConflict(f"task id {task_id} is taken: name another task", raw={"task_id": task_id})
            answer = await self._enqueue_script(keys=names, args=[*args[:4], "1", *args[5:]])
        return int(answer[1]) + 1, answer[2]

    def _giving(self, lane: str, now: float) -> list[Any]:
        """`ENQUEUE`'s arguments that give the job to the lane's idle worker, when it is the only
        live one (ARGV[13..]: see `ENQUEUE`)."""
        status = self.status
        beaten_since = int((now - HEARTBEAT_TTL) * 1000)
        parts = [*keys.given(_T).split(_T), *keys.run_claim(_T, _T).split(_T)]
        lane_streams = [stream(priority, lane) for priority in PRIORITIES]
        marker = keys.idle_worker(lane)
        return ["1", marker, keys.WORKERS, beaten_since, *parts, status.ttl, status.alive_ttl, GROUP, *lane_streams]

    async def _add(self, task_id: str, name: str, fields: dict[str, Any], spec: JobSpec | None) -> Any:
        """One step: the entry, its ordinal, and a submission mark that a follower never reads as
        "lost" (`end_if_stranded`) before the entry's own id replaces it. The task is listed
        (`GET /api/tasks`) from its first submission (`spec`)."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(keys.submission(task_id), f"{name} {PENDING} 0", ex=self.status.ttl)
            pipe.expire(keys.owner(task_id), self.status.ttl)
            pipe.xadd(name, fields)  # type: ignore[arg-type]
            pipe.incr(count_of(name))
            if spec is not None:
                self.status.index_task(pipe, task_id, spec.owner, spec.workflow_id, time.time())
            _, _, entry, ordinal, *_ = await pipe.execute()
        where = f"{name} {entry.decode()} {ordinal}"
        await self.client.set(keys.submission(task_id), where, ex=self.status.ttl)
        return entry

    async def requeue(self, task_id: str, name: str, fields: dict[bytes, bytes]) -> str:
        """Queue a dead letter's entry again in its stream `name` (`deadletters.taken_back`): a
        new submission of its task, run as its next attempt. Returns the new entry's id."""
        lane = lane_of(name)
        with translated():
            if lane not in self._grouped:
                await self._make_groups(lane)
            entry = await self._add(task_id, name, {key.decode(): value for key, value in fields.items()}, None)
        log.info("task_id=%s queued again from the dead letters on %s as %s", task_id, name, entry.decode())
        return str(entry.decode())

    async def _claim_owner(self, task_id: str, owner: str) -> None:
        """The task is the key's that first queued it ("": anyone's): SET NX, never overwritten;
        another key naming it is refused before anything is queued."""
        if await self.client.set(keys.owner(task_id), owner, nx=True, ex=self.status.ttl):
            return
        taken_by: Any = await self.client.get(keys.owner(task_id))
        if taken_by and not hmac.compare_digest(taken_by, owner.encode()):
            raise TaskConflict(f"task id {task_id} is taken: name another task", raw={"task_id": task_id})

    async def _attach(self, key: str, spec: JobSpec) -> Submitted:
        value: Any = await self.client.get(_idem(key, spec))
        if value is None:  # expired in between: a new request after all
            raise TaskConflict("the Idempotency-Key expired while it was used; send the request again")
        task_id, _, used = value.decode().partition(" ")
        if used != fingerprint(spec):  # which task, only its own caller may learn (it may be another key's)
            raise TaskConflict(f"Idempotency-Key {key} was used with another request", raw={"idempotency_key": key})
        log.info("Idempotency-Key %s: attached to task_id=%s", key, task_id)
        return Submitted(task_id, None, True)

    async def cancel(self, task_id: str) -> str:
        """Cancel a task's newest submission: "cancelled" when it was still queued (removed, ended
        here), "cancelling" when a worker runs it (its worker stops it: it ends
        EXECUTION_INTERRUPTED). NotFound for an unknown task, TaskConflict for one that has ended
        or whose worker already decided how it ends."""
        validate_task_id(task_id)
        with translated():
            name, entry = await self._submission(task_id)
            if held(name):  # waiting behind its key's own jobs: claimed here, or moved to the queue meanwhile
                if await self.client.set(keys.run_claim(task_id, entry), CANCELLED, nx=True, ex=self.status.ttl):
                    await self._remove_queued(task_id, name, entry)
                    return "cancelled"
                name, entry = await self._submission(task_id)
            ended = await self._ended(task_id)
            if ended is None:
                names = [keys.run_claim(task_id, entry), keys.queue_ended(task_id, entry)]
                names.append(keys.queue_cancel(task_id, entry))
                answer: Any = await self._cancel(keys=names, args=[CANCELLED, self.status.ttl, EXPIRED])
                state = answer.decode() if isinstance(answer, bytes) else str(answer)
                if state == "cancelled":
                    await self._remove_queued(task_id, name, entry)
                    return "cancelled"
                ended = state.removeprefix("ended ") if state.startswith("ended ") else None
            if ended is not None:
                raise TaskConflict(f"task {task_id} has ended ({ended})", raw={"task_id": task_id, "state": ended})
        log.info("task_id=%s: cancel requested from its worker", task_id)
        return "cancelling"

    async def _submission(self, task_id: str) -> tuple[str, str]:
        """The stream and entry id of the task's newest submission (waiting briefly for the id of
        one being queued this moment); NotFound for an unknown task."""
        for _ in range(50):
            where: Any = await self.client.get(keys.submission(task_id))
            if where is None:
                raise NotFound(f"no task {task_id}", raw={"task_id": task_id, "state": "unknown"})
            name, entry = where.decode().split(" ")[:2]
            if entry != PENDING:
                return name, entry
            await asyncio.sleep(0.01)  # XADD has not answered its gateway yet: milliseconds
        raise Unavailable("the task is being queued; cancel it again in a moment", raw={"task_id": task_id})

    async def end_if_stranded(self, task_id: str, queue_ttl: float, submitted: bool = False) -> bool:
        """End a task no worker has begun when it can no longer run: it waited in the queue past
        `queue_ttl` seconds (TIMEOUT), or, for a task its caller knows was `submitted`, the queue
        no longer holds it (Redis lost its data: UNAVAILABLE); a task nobody submitted stays
        unknown. True when it was ended here (its followers then read the terminal payload)."""
        with translated():
            if await self.status.current(task_id):
                return False  # a worker began it: its log says the rest
            where: Any = await self.client.get(keys.submission(task_id))
            if where is None:
                if not submitted:
                    return False
                error: ServerlessError = Unavailable(
                    "the queue no longer holds this job (Redis lost its data?): submit it again",
                    raw={"task_id": task_id},
                )
                return await self._end_unbegun(task_id, None, error)
            entry = where.decode().split(" ")[1]
            if entry == PENDING:
                return False
            waited = time.time() - int(entry.split("-")[0]) / 1000
            if not queue_ttl or waited <= queue_ttl:
                return False
            error = JobTimeout(
                f"the job waited {waited:.0f}s for a worker, longer than QUEUE_TTL={queue_ttl:g}s, and was not run",
                raw={"task_id": task_id, "waited_s": round(waited, 1), "queue_ttl": queue_ttl},
            )
            return await self._end_unbegun(task_id, entry, error)

    async def _end_unbegun(self, task_id: str, entry: str | None, error: ServerlessError) -> bool:
        """Take the submission from the workers (the run claim, as a cancel does) and end it."""
        if entry is not None and not await self.client.set(
            keys.run_claim(task_id, entry), EXPIRED, nx=True, ex=self.status.ttl
        ):
            return False  # a worker took it meanwhile
        attempt = await self.status.begin(task_id)
        await self.status.append_terminal(task_id, attempt.number, error)
        log.warning("task_id=%s: %s", task_id, error.message)
        await self._release(task_id, "failed")
        return True

    async def depth(self) -> int:
        """Jobs waiting for a worker, every priority of every lane together (each group's lag:
        the entries it has not handed out yet)."""
        with translated():
            lanes: Any = await self.client.smembers(keys.LANES)
            every = {""} | {lane.decode() for lane in lanes}
            return sum(group.lag for group in (await self._groups(sorted(every))).values())

    async def position(self, task_id: str) -> int | None:
        """How many jobs a worker takes before this task's newest submission (those of higher
        priorities, and those before it in its own); None when no worker took it yet is not
        known (it was taken, or the queue cannot tell)."""
        with translated():
            where: Any = await self.client.get(keys.submission(task_id))
            if where is None:
                return None
            parts = where.decode().split(" ")
            if len(parts) < 3 or parts[1] == PENDING:
                return None
            name, ordinal = parts[0], int(parts[2])
            lane = lane_of(name)
            groups = await self._groups([lane])
        own = groups.get(name)
        if own is None or own.read is None or own.read >= ordinal:
            return None  # handed to a worker already (or the group's counter is unknown)
        ahead = ordinal - own.read - 1
        for priority in PRIORITIES:  # the higher priorities of its lane go first
            if stream(priority, lane) == name:
                break
            ahead += groups[stream(priority, lane)].lag if stream(priority, lane) in groups else 0
        return ahead

    async def groups(self) -> dict[str, GroupState]:
        """Each priority's stream of the default lane as its consumer group sees it."""
        with translated():
            groups = await self._groups([""])
        return {priority: groups[stream(priority)] for priority in PRIORITIES if stream(priority) in groups}

    async def _groups(self, lanes: list[str]) -> dict[str, GroupState]:
        """Each queue stream's consumer group of `lanes`: its lag and its read counter (Redis 7)."""
        names = [stream(priority, lane) for lane in lanes for priority in PRIORITIES]
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.xinfo_groups(name)
                pipe.get(count_of(name))
            answers = await pipe.execute(raise_on_error=False)
        found: dict[str, GroupState] = {}
        for index, name in enumerate(names):
            groups, added = answers[2 * index], answers[2 * index + 1]
            if isinstance(groups, Exception):
                continue  # no such stream yet: nothing waits in it
            for group in groups:
                if group["name"] in (GROUP, GROUP.encode()):
                    found[name] = GroupState.of(group, int(added or 0))
        return found

    async def _remove_queued(self, task_id: str, name: str, entry: str) -> None:
        """End a queued job cancelled before any worker took it; its entry stays for a worker
        to skip (see the module docstring)."""
        attempt = await self.status.begin(task_id)
        await self.status.append_terminal(task_id, attempt.number, cancelled_by_request())
        log.info("task_id=%s: cancelled while queued in %s (entry %s is skipped)", task_id, name, entry)
        await self._release(task_id, "cancelled")

    async def _release(self, task_id: str, state: str) -> None:
        """A job that will never run: counted in its key's usage as ended `state`, and its key's
        place goes to the key's next held job."""
        held: Any = await self.client.get(keys.owner(task_id))
        owner = held.decode() if held else None
        await self.usage.count(owner, {f"jobs_{state}": 1})
        if owner:
            await self.admission.release(owner, task_id)

    async def _ended(self, task_id: str) -> str | None:
        """The final state of the task's current attempt, None while it is queued or runs."""
        number = await self.status.current(task_id)
        if not number:
            return None
        last: Any = await self.client.xrevrange(keys.attempt(task_id, number), count=1)
        if not last or last[0][1].get(b"t") != b"1":
            return None
        data = last[0][1][b"d"]
        if b'"serverless_api"' in data[:64]:
            return "succeeded"
        return "cancelled" if b"EXECUTION_INTERRUPTED" in data else "failed"


@dataclass(frozen=True, slots=True)
class GroupState:
    """A queue stream's consumer group as admission and queue places read it: how many entries
    it has not handed out (`lag`) and the ordinal of the last one it handed out (`read`)."""

    lag: int
    read: int | None
    pending: int = 0  # handed to a worker and not acknowledged
    consumers: int = 0

    @classmethod
    def of(cls, info: dict[Any, Any], added: int) -> GroupState:
        read = info.get("entries-read", info.get(b"entries-read"))
        lag = info.get("lag", info.get(b"lag"))
        if lag is None:  # Redis cannot tell after a deletion: count from our own ordinals
            lag = max(0, added - int(read or 0))
        pending, consumers = info.get("pending", 0), info.get("consumers", 0)
        return cls(int(lag), None if read is None else int(read), int(pending), int(consumers))


def _idem(key: str, spec: JobSpec) -> str:
    """Where an Idempotency-Key is claimed: in the namespace of the caller's API key."""
    return keys.queue_idempotency(scoped_key(key, spec.owner))


def _travelling(spec: JobSpec, task_id: str, workflow: dict[str, Any]) -> JobSpec:
    """The spec as its queue entry carries it: its workflow without the inputs staged apart, and
    its task id, under which a worker records it (one made here for its caller, who learns it
    from the answer, is `id_made`: a sync job's log then holds what one box's would)."""
    if spec.task_id == task_id and workflow is spec.workflow:
        return spec
    made = spec.id_made or spec.task_id is None
    return replace(spec, workflow=workflow, task_id=task_id, id_made=made)
