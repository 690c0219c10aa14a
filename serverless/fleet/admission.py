"""A key's `concurrency=N` on a fleet: at most N of its jobs in the shared queue or running; the
rest wait in the key's own stream and are moved to the queue, oldest first, as its admitted
ones end. So one key's flood never stands in the shared queue ahead of another key's first job:
a worker meets at most N of its jobs before the other key's.

    key:<owner>:admitted   a sorted set: its task ids admitted (queued or running), by time
    key:<owner>:held       a stream: its jobs waiting for a place (fields task_id, spec, priority)
    key:<owner>:limit      its concurrency, as the gateway that last admitted one of its jobs read it

Both steps are one Lua script each, so gateways and workers never race: `admit` (a gateway, as it
queues a job) and `release` (a worker when a job of the key ends, or a gateway when it ends a
queued one: a cancel, QUEUE_TTL). Each first moves what now fits. A held job has a submission as
a queued one has (`job:<id>` names the held stream and entry), so a cancel claims its run
(`run:<id>:<entry>`, SET NX) as it claims a queued one's, and the move skips a job so claimed.
An admitted job whose end was never told (its gateway and worker both lost) leaves the set after
`stale` seconds (the longest a job may wait and run).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.asyncio as aioredis

from ..jobs.spec import JobSpec
from ..status import keys
from .wire import PRIORITIES, stream

log = logging.getLogger(__name__)

PROMOTED = "promoted"  # the run claim of a held entry moved to the queue
_T = "\x00"  # a placeholder, cut out of the key templates the script fills in

# KEYS: admitted, held, limit, then each priority's stream and its added counter (PRIORITIES order)
# ARGV[1..6]: now (ms), stale (ms), ttl (s), the submission key's prefix and suffix, the run
# claim's three parts; then for `admit`: task id, spec, priority, limit, staged inputs' name.
_COMMON = """
local now, stale, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function where(priority)
  if priority == 'high' then return KEYS[4], KEYS[5] end
  if priority == 'low' then return KEYS[8], KEYS[9] end
  return KEYS[6], KEYS[7]
end
local function enqueue(task, spec, priority, inputs)
  local name, added = where(priority)
  local fields = {'task_id', task, 'spec', spec}
  if inputs and inputs ~= '' then  -- its big inputs staged apart (`fleet.staging`), under this name
    fields[#fields + 1], fields[#fields + 2] = 'inputs', inputs
  end
  local id = redis.call('XADD', name, '*', unpack(fields))
  local ordinal = redis.call('INCR', added)
  redis.call('SET', ARGV[4] .. task .. ARGV[5], name .. ' ' .. id .. ' ' .. ordinal, 'EX', ttl)
  redis.call('ZADD', KEYS[1], now, task)
  redis.call('EXPIRE', KEYS[1], ttl)
  return {id, ordinal}
end
local function promote()
  local limit = tonumber(redis.call('GET', KEYS[3]) or '1')
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - stale)
  local moved = 0
  while redis.call('ZCARD', KEYS[1]) < limit do
    local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    if #first == 0 then break end
    local id, flat = first[1][1], first[1][2]
    local f = {}
    for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
    redis.call('XDEL', KEYS[2], id)
    local claim = ARGV[6] .. f['task_id'] .. ARGV[7] .. id .. ARGV[8]
    if redis.call('SET', claim, 'promoted', 'NX', 'EX', ttl) then
      enqueue(f['task_id'], f['spec'], f['priority'], f['inputs'])
      moved = moved + 1
    end
  end
  return moved
end
"""
ADMIT = (
    _COMMON
    + """
local task, spec, priority, limit, inputs = ARGV[9], ARGV[10], ARGV[11], tonumber(ARGV[12]), ARGV[13]
redis.call('SET', KEYS[3], limit, 'EX', ttl)
promote()
if redis.call('ZCARD', KEYS[1]) < limit and redis.call('XLEN', KEYS[2]) == 0 then
  local queued = enqueue(task, spec, priority, inputs)
  return {'queued', queued[1], queued[2]}
end
local fields = {'task_id', task, 'spec', spec, 'priority', priority}
if inputs ~= '' then fields[#fields + 1], fields[#fields + 2] = 'inputs', inputs end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('SET', ARGV[4] .. task .. ARGV[5], KEYS[2] .. ' ' .. id .. ' 0', 'EX', ttl)
return {'held', id, 0}
"""
)
RELEASE = (
    _COMMON
    + """
redis.call('ZREM', KEYS[1], ARGV[9])
return promote()
"""
)


def _keys(owner: str) -> list[str]:
    names = [keys.key_admitted(owner), keys.key_held(owner), keys.key_limit(owner)]
    for priority in PRIORITIES:
        names += [stream(priority), keys.queue_count(priority)]
    return names


def _templates(now: float, stale: float, ttl: int) -> list[Any]:
    before, after = keys.submission(_T).split(_T)
    claim = keys.run_claim(_T, _T).split(_T)
    return [int(now * 1000), int(stale * 1000), ttl, before, after, *claim]


def held(name: str) -> bool:
    """Whether a submission's stream is a key's held stream (not the shared queue)."""
    return name.startswith("key:") and name.endswith(":held")


class Admission:
    """The two scripts, registered once per client."""

    def __init__(self, client: aioredis.Redis, ttl: int, stale: float) -> None:
        self.client = client
        self.ttl = ttl
        self.stale = stale
        self._admit = client.register_script(ADMIT)
        self._release = client.register_script(RELEASE)

    async def admit(
        self, spec: JobSpec, task_id: str, priority: str, encoded: bytes, inputs: str = ""
    ) -> tuple[str, str, int]:
        """Queue the job, or hold it behind its key's own: ("queued" | "held", entry id, ordinal);
        `inputs`: the name its big inputs are staged under (`fleet.staging`), if any."""
        owner = spec.owner or ""
        args = [*_templates(time.time(), self.stale, self.ttl), task_id, encoded, priority, spec.concurrency, inputs]
        answer: Any = await self._admit(keys=_keys(owner), args=args)
        state, entry, ordinal = (_text(part) for part in answer)
        if state == "held":
            log.info("task_id=%s: held behind its key's own jobs (concurrency=%d)", task_id, spec.concurrency)
        return state, entry, int(ordinal)

    async def release(self, owner: str | None, task_id: str) -> None:
        """A job of `owner` ended (or will never run): its place goes to its next held job."""
        if not owner:
            return
        args = [*_templates(time.time(), self.stale, self.ttl), task_id]
        moved: Any = await self._release(keys=_keys(owner), args=args)
        if moved:
            log.info("task_id=%s ended: %s job(s) of its key moved to the queue", task_id, moved)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stale_after(job_timeout: float, queue_ttl: float, claim_idle: float) -> float:
    """The longest an admitted job may wait for a worker and run (a day when QUEUE_TTL=0), with
    room for a dead worker's job to be claimed again."""
    return (queue_ttl or 86400.0) + job_timeout + 2 * claim_idle + 60.0
