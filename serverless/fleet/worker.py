"""A worker's consumer: one per ComfyUI this instance owns, running one job at a time and
queueing at most one more in its ComfyUI behind it.

    loop: a dead worker's job (XAUTOCLAIM, idle past REDIS_CLAIM_IDLE; looked for when the first
          pending entry can pass that threshold), else the next queued one (XREADGROUP, streams
          read high -> normal -> low), else wait for one (XREAD BLOCK; marked idle meanwhile,
          a worker alone in its lane is given the next job queued, taken for it, in the round
          trip that queues it: `queue.ENQUEUE`, `fleet:given:<name>`)
          -> read it (an entry that cannot be read is acknowledged and moved to `dead:jobs`)
          -> take it (SET NX run:<task>:<entry>; "cancelled" means a gateway removed it first)
          -> `Jobs.start(spec)` (the unchanged pipeline; its recorder writes to Redis)
          -> while it runs: keep the entry ours (XCLAIM, resetting its idle time), block on its
             cancel stream (from `watch.TOLD_AFTER` into the run) and stop it the moment a cancel
             comes; at its end decide in Redis whether a cancel came first, in the step that
             stores its last events and acknowledges its entry (`status.redis.APPEND_END`; a job
             whose attempt the worker did not begin: `queue.END`, then XACK once the terminal
             payload is stored).

Short jobs are pipelined. Each job taken is handled in a task of its own (`Holding`). Once the
running job's prompt is in ComfyUI's queue, the loop takes one more job without waiting for one
(QUEUED_BESIDE), when jobs wait (the running one had another behind it in its stream when it was
read: else the worker keeps up, and no round trip asks), the worker's last job ran under SHORT_JOB
seconds in ComfyUI, and no other live worker of the lane is free (heartbeats): ComfyUI then goes
from one prompt to the next with no gap, while the worker finishes the first job (outputs, terminal
payload, XACK) and prepares the second. The gap is a few milliseconds, which only short jobs
notice: after a job that ran SHORT_JOB or more, the next is taken when the running one ends (a
higher-priority job that comes meanwhile goes first), and none is taken beside a running job while
another worker is free (the job waits in the queue for that one). A worker with memory watermarks
(`healing`) holds one job at a time, so that its check between jobs finds ComfyUI idle. A cancel of
the job waiting in ComfyUI removes it from ComfyUI's queue; the running one is not touched (an
interrupt names its prompt).

A job claimed from a dead worker runs once more (a new attempt, its terminal marked `"retried":
true`) unless it was cancelled meanwhile (it then ends cancelled on the dead attempt, not run
again), the dead attempt already stored outputs, or was itself a retry: then it ends WORKER_LOST
(a GPU is not charged twice, and a job that kills its workers does not take the fleet down one by
one). A job this worker cannot finish itself, its drain having run out of time (SIGTERM past
DRAIN_TIMEOUT) or its ComfyUI having died under it, is handed back instead (`_hand_back`: no
terminal payload, its log says `retrying`, its entry claimable at once and free workers woken
through `fleet:handoffs`), unless it made outputs or is a retry already: a job runs at most twice.
A job's staged inputs (`staging`) are put back into its workflow before it starts, and deleted as
its entry is acknowledged. Redis down: the loop waits with backoff and goes on when it is back,
without a restart; the running job goes on too (its recorder keeps its events until they are
stored). Anything else that stops the loop is logged and the loop starts again after a pause
(`restarts` in health).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from ..core.credentials import Credentials
from ..core.request import validate_task_id
from ..errors import ComfyUIUnavailable, ExecutionInterrupted, ServerlessError, Unavailable, WorkerLost
from ..jobs.registry import Jobs
from ..jobs.spec import JobSpec
from ..settings import Settings
from ..status import keys
from ..status.redis import BACKOFF_MAX, BLOCK_SECONDS, DOWN, RedisAttempt, RedisStatus
from ..status.watch import HeldReads
from . import deadletters, staging
from .admission import Admission, stale_after
from .affinity import Affinity
from .healing import Healing
from .heartbeat import HEARTBEAT_TTL, Heartbeat
from .needs import needs_of_spec
from .queue import CANCELLED, END, EXPIRED, TAKE_FUNCTION, TRIM, cancelled_by_request
from .watch import Watch, state_of
from .wire import GROUP, PRIORITIES, decode_spec, encode_spec, stream

log = logging.getLogger(__name__)

PRIORITY_AGING = 30.0  # seconds a lower priority's jobs may wait unserved before they go first
AGING_LOOK = 1.0  # seconds between a consumer's looks at the lower priorities' waiting jobs
TRIM_EVERY = 1.0  # seconds between a consumer's removals of done queue entries
FORGET_EVERY = 60.0  # seconds between a consumer's looks for consumers gone for good
FORGET_AFTER = 3600.0  # seconds a consumer holding nothing may be silent before it is forgotten
IDLE_WAIT = 30.0  # longest wait for our ComfyUI to be idle before taking a job
RESTART_FIRST = 0.1  # seconds before a stopped consumer starts again (doubling up to BACKOFF_MAX)
# A queued submission taken in one step (`queue.TAKE_FUNCTION`).
TAKE = TAKE_FUNCTION + "return take(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])\n"
# The next queued entry for consumer ARGV[2] of group ARGV[1]: first a job given to it (its
# given stream KEYS[#KEYS - 1] holds an entry after ARGV[15]: `queue.ENQUEUE` gave it) -> {-1, its
# id, its fields}; else XREADGROUP of the streams KEYS[i] for i in ARGV[18..], in that order,
# until one hands an entry out -> {i, entry id, fields, took, more} (more: 1 when its stream
# holds an entry after it, one a worker may queue behind it).
# With ARGV[3] = "1" (no other worker it could be placed with), or "?" and no worker but ARGV[2]
# has beaten since ARGV[14] (the heartbeats' sorted set KEYS[#KEYS - 2]: `Affinity.place` would
# keep it), the entry is taken as it is read, as `TAKE` takes it: took is TAKE's answer (-1 not
# ours, 0 cancelled, n attempt n begun; ARGV[4] the keys' TTL, ARGV[5] the owner mark's), its keys
# named from the task id and entry id with the parts of `keys`' names around them (ARGV[6..8] the
# run claim's, [9..11] the cancel's, [12..13] the attempt counter's); else, or for a task id
# outside the rule of task ids, took is -2 (not asked). None handed out: {0, each stream's last
# delivered id ("0-0": no group), the newest `fleet:handoffs` entry's id (KEYS[#KEYS - 3]; "0-0":
# none)}, where the blocking wait starts from; with ARGV[16] = "1" the consumer is marked idle
# in its lane (KEYS[#KEYS], for ARGV[17] ms: its blocking read's length) for a gateway's enqueue
# to give it the next job. Any call first removes that mark when it is the consumer's own: it
# holds a job from now on, or marks itself again.
_NEXT_BODY = """
local streams = #KEYS - 4
local handoffs, workers, given, idle = streams + 1, streams + 2, streams + 3, streams + 4
if redis.call('GET', KEYS[idle]) == ARGV[2] then redis.call('DEL', KEYS[idle]) end
local gift = redis.call('XRANGE', KEYS[given], '(' .. ARGV[15], '+', 'COUNT', 1)
if #gift > 0 then return {-1, gift[1][1], gift[1][2]} end
local function alone()
  for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[workers], ARGV[14], '+inf')) do
    if name ~= ARGV[2] then return false end
  end
  return true
end
for i = 18, #ARGV do
  local stream = KEYS[tonumber(ARGV[i])]
  local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', stream, '>')
  if got then
    local id, fields = got[1][2][1][1], got[1][2][1][2]
    local took = -2
    local task
    for j = 1, #fields, 2 do
      if fields[j] == 'task_id' then task = fields[j + 1] end
    end
    if takeable(task) and (ARGV[3] == '1' or (ARGV[3] == '?' and alone())) then
      took = take(ARGV[6] .. task .. ARGV[7] .. id .. ARGV[8], ARGV[9] .. task .. ARGV[10] .. id .. ARGV[11],
                  ARGV[12] .. task .. ARGV[13], ARGV[2], ARGV[4], ARGV[5])
    end
    local after = redis.call('XRANGE', stream, '(' .. id, '+', 'COUNT', 1)
    return {tonumber(ARGV[i]), id, fields, took, #after}
  end
end
local since = {}
for i = 1, streams do
  since[i] = '0-0'
  for _, fields in ipairs(redis.call('XINFO', 'GROUPS', KEYS[i])) do
    local group = {}
    for j = 1, #fields, 2 do group[fields[j]] = fields[j + 1] end
    if group['name'] == ARGV[1] then since[i] = group['last-delivered-id'] end
  end
end
local newest = redis.call('XREVRANGE', KEYS[handoffs], '+', '-', 'COUNT', 1)
if ARGV[16] == '1' then redis.call('SET', KEYS[idle], ARGV[2], 'PX', ARGV[17]) end
return {0, since, #newest > 0 and newest[1][1] or '0-0'}
"""
NEXT = TAKE_FUNCTION + _NEXT_BODY
# Remove a consumer's idle mark (KEYS[1]) when it is still its own (ARGV[1]).
UNMARK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
IDLE_MARGIN_MS = 250  # an idle mark outlives the blocking read it was made for by this much
_T = "\x00"  # a task id or entry id never holds it: it splits key names into the parts around them
STAGED_IN_THREAD = 1 << 20  # staged inputs from this size on are put back in a worker thread
HANDED_BACK_IDLE_MS = 86_400_000  # a handed-back entry's idle time: past any REDIS_CLAIM_IDLE
HANDOFFS_KEPT = 100  # `fleet:handoffs` entries kept (MAXLEN ~): only the newest wakes anyone
QUEUED_BESIDE = 1  # jobs a worker queues in its ComfyUI behind the running one (see the docstring)
SHORT_JOB = 0.5  # seconds of ComfyUI's run under which a worker's jobs are pipelined (the docstring)


def lane_streams(lane: str) -> tuple[str, ...]:
    """The queue streams of a lane, in the order workers read them (highest priority first)."""
    return tuple(stream(priority, lane) for priority in PRIORITIES)


@dataclass(frozen=True, slots=True)
class Taken:
    """A queue entry this consumer holds, read."""

    stream: str
    entry: str
    task_id: str
    spec: JobSpec
    reclaimed: bool
    inputs: str | None = None  # the name of its staged inputs (`staging`), None when none were
    handed: bool = False  # handed to this worker by another (affinity), or taken over from one
    took: int | None = None  # taken as it was read (`NEXT`): `TAKE`'s answer; None: take it (`_take`)


@dataclass(eq=False, slots=True)
class Holding:
    """A job this consumer holds, handled in its own task; `queued` is set once its prompt is in
    ComfyUI's queue, or it will never be (the job ended, or was not run)."""

    task: asyncio.Task[None]
    queued: asyncio.Event


class Consumer:
    """Takes jobs for one ComfyUI (see the module docstring)."""

    def __init__(self, client: aioredis.Redis, status: RedisStatus, jobs: Jobs, settings: Settings, name: str) -> None:
        self.client = client
        self.status = status
        self.jobs = jobs
        self.settings = settings
        self.name = name
        self.claim_idle_ms = int(settings.fleet.claim_idle * 1000)
        self.taken = 0
        self.running = 0  # jobs of ours between their start and their end (at most 1 + QUEUED_BESIDE)
        self._held: list[Holding] = []  # in the order taken
        self._last_run: float | None = None  # seconds ComfyUI ran our last job that ran (None: none yet)
        self._more_queued = True  # the last entry read had another behind it in its stream (`NEXT`)
        self.alive = False  # the loop runs (False while it waits to start again after a failure)
        self.restarts = 0
        self.dead_letters = 0
        self.last_error: str | None = None
        self._next_claim = 0.0
        self._end = client.register_script(END)
        self._take_script = client.register_script(TAKE)
        self._next_script = client.register_script(NEXT)
        stale = stale_after(settings.service.job_timeout, settings.fleet.queue_ttl, settings.fleet.claim_idle)
        self.admission = Admission(client, status.ttl, stale)
        self._trim = client.register_script(TRIM)
        self._next_trim = 0.0
        self._next_forget = 0.0
        self._next_aging_look = 0.0
        self._waiting_since: dict[str, float] = {}  # a lower priority's stream -> since when it has waited
        self._idle_known = False  # our ComfyUI was seen idle since our last job (no look needed)
        self._look_handed = True  # a job may have been handed to us (affinity) since we last looked
        self._next_overdue = 0.0  # when to look next for another worker's overdue hand-off
        self._news: set[str] | None = None  # the streams the last wait saw new entries in (None: any)
        self._handoffs_seen: bytes | None = None  # the newest `fleet:handoffs` entry seen (None: not looked yet)
        self.streams = lane_streams(settings.scheduling.worker_lane)
        self.heartbeat: Heartbeat | None = None  # what this worker advertises (`serverless.fleet.heartbeat`)
        self.affinity: Affinity | None = None  # set with the heartbeat: jobs go where their models are
        self.healing: Healing | None = None  # the memory check between jobs (`serverless.fleet.healing`)
        self.waiting = False  # in the blocking read for news, holding no job
        self.lane = settings.scheduling.worker_lane
        self._given_seen = "0-0"  # the last entry of our `fleet:given:<name>` stream read (`_groups`)
        self._idle_marked = False  # our last `NEXT` marked us idle (`keys.idle_worker`)
        self._unmark = client.register_script(UNMARK)
        self._reads = HeldReads(client)  # the blocking read for news, on a connection of its own
        self._acknowledged: dict[str, str | None] = {}  # entry -> newest hand-off id, acknowledged with its end

    def health(self) -> dict[str, Any]:
        """The consumer's part of the health answer."""
        return {
            "name": self.name,
            "alive": self.alive,
            "busy": self.busy,
            "held": len(self._held),
            "taken": self.taken,
            "restarts": self.restarts,
            "dead_letters": self.dead_letters,
            "last_error": self.last_error,
        }

    @property
    def busy(self) -> bool:
        """Whether a job of ours runs (or waits in ComfyUI's queue)."""
        return self.running > 0

    async def run_forever(self) -> None:
        """Take and run jobs until the instance drains. A loop that stops for any reason but a
        drain (a bug, an answer from Redis it does not expect) is logged and started again after a
        pause, doubling up to BACKOFF_MAX (from the first again after a minute of work)."""
        loop = asyncio.get_running_loop()
        delay = RESTART_FIRST
        while self.jobs.accepting:
            began = loop.time()
            self.alive = True
            try:
                await self._consume()
            except Exception as exc:
                self.alive = False
                self.restarts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                delay = RESTART_FIRST if loop.time() - began > 60 else delay
                log.exception("consumer %s stopped (%s); starting again in %.1fs", self.name, self.last_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
            finally:
                self.alive = False

    async def _consume(self) -> None:
        """Take and run jobs until the instance drains; outlive Redis outages. The jobs held when
        it stops are waited for (a drain finishes them or hands them back), or stopped with it."""
        delay = 0.1
        await self._groups()
        try:
            while self.jobs.accepting:
                try:
                    self._reap()  # a held job's failure is handled here, as if the loop had run it
                    if self._held:
                        await self._take_beside()
                    else:
                        await self._take_when_free()
                    delay = 0.1
                except (*DOWN, ComfyUIUnavailable, Unavailable) as exc:  # the entry stays ours: claimed again later
                    log.warning("consumer %s: Redis is down (%s); again in %.1fs", self.name, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                except rexc.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    log.warning("consumer %s: the queue's group is gone (Redis lost its data?): creating it", self.name)
                    await self._groups()
        except asyncio.CancelledError:
            for holding in self._held:
                holding.task.cancel()
            raise
        finally:
            await self._reads.aclose()
            if not self.jobs.accepting:
                await self._give_back_given()
            await self._let_held_end()

    async def _take_when_free(self) -> None:
        """Holding no job: wait (bounded) for one and take it."""
        # Looked at once after each job, not after each wait: a job that comes finds it known idle.
        if not self._idle_known and not await self._comfyui_idle():
            return
        self._idle_known = True
        taken = await self._claim_when_due() or await self._handed()
        if taken is not None:
            await self._not_idle()
        else:
            taken = await self._next()
        if taken is not None:
            self._hold(taken)

    async def _take_beside(self) -> None:
        """Holding a job: once its prompt is in ComfyUI's queue, take one more queued now to wait
        there behind it, when no other worker is free (see the module docstring); else wait for a
        held job to end."""
        if len(self._held) <= QUEUED_BESIDE and await self._may_queue_beside(self._held[-1]):
            taken = await self._claim_when_due() or await self._handed() or await self._next(wait=False)
            if taken is not None:
                self._hold(taken)
                return
        await asyncio.wait([holding.task for holding in self._held], return_when=asyncio.FIRST_COMPLETED)

    async def _may_queue_beside(self, last: Holding) -> bool:
        """Whether a job may be queued in our ComfyUI behind `last` (waited for until its prompt
        is there): not while draining, nor with memory watermarks, nor while another worker of
        the lane is free (or unknown: no heartbeat yet), nor after a long job."""
        if self.healing is not None and self.healing.watching:
            return False
        if self._last_run is None or self._last_run >= SHORT_JOB:
            return False
        if not self._more_queued:  # none was left when the last job was read: no round trip to ask
            return False
        if self.affinity is None or not self.affinity.heartbeat.known:
            return False
        queued = asyncio.ensure_future(last.queued.wait())
        try:
            await asyncio.wait([queued, last.task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            queued.cancel()
        if last.task.done() or not self.jobs.accepting:
            return False
        return all(view.busy for view in await self.affinity.others())

    def _hold(self, taken: Taken) -> None:
        """Handle the job in a task of its own."""
        self._idle_known = False  # a run that succeeds sets it again (`_run`)
        self._news = None  # what a wait saw before this job is not news after it
        queued = asyncio.Event()
        task = asyncio.create_task(self._handle(taken, queued.set), name=f"job {taken.task_id}")
        self._held.append(Holding(task, queued))

    def _reap(self) -> None:
        """Forget the held jobs that ended; the first failure among them is raised."""
        done = [holding for holding in self._held if holding.task.done()]
        self._held = [holding for holding in self._held if not holding.task.done()]
        failures = [exc for h in done if not h.task.cancelled() and (exc := h.task.exception()) is not None]
        for exc in failures[1:]:  # the others' failures are logged, not lost
            log.error("consumer %s: a job's handling failed", self.name, exc_info=exc)
        if failures:
            raise failures[0]

    async def _let_held_end(self) -> None:
        """Wait for the held jobs' ends (a failure is logged: the loop has stopped already)."""
        while self._held:
            holding = self._held.pop(0)
            try:
                await holding.task
            except asyncio.CancelledError:
                if not holding.task.cancelled():
                    raise
            except Exception:
                log.exception("consumer %s: a job's handling failed", self.name)

    async def _comfyui_idle(self) -> bool:
        """Wait (bounded) until our ComfyUI runs nothing and holds nothing: a job stopped a moment
        ago may still be finishing there, and the next one must not queue behind it, nor meet its
        interrupt. False when ComfyUI did not answer (after a pause)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + IDLE_WAIT
        try:
            while True:
                queue = await self.jobs.runtime.comfy.queue()
                if not queue.running and not queue.pending:
                    return True
                if loop.time() > deadline:
                    log.warning(
                        "consumer %s: ComfyUI still holds %d prompt(s); taking a job anyway",
                        self.name,
                        len(queue.running) + len(queue.pending),
                    )
                    return True
                await asyncio.sleep(0.005)  # a finished prompt leaves ComfyUI's queue within milliseconds
        except ServerlessError as exc:
            log.warning("consumer %s: ComfyUI does not answer (%s); no job taken", self.name, exc.message)
            await asyncio.sleep(1.0)
            return False

    async def _groups(self) -> None:
        """The consumer group on every queue stream (from the start: jobs queued before the first
        worker came are taken too). Jobs given to an earlier life of this name (`fleet:given:`)
        are not read as given: they are pending entries of ours, claimed as a dead worker's are."""
        delay = 0.1
        while True:
            try:
                if self._given_seen == "0-0":
                    newest: Any = await self.client.xrevrange(keys.given(self.name), count=1)
                    if newest:
                        self._given_seen = newest[0][0].decode()
                for name in self.streams:
                    try:
                        await self.client.xgroup_create(name, GROUP, id="0", mkstream=True)
                    except rexc.ResponseError as exc:
                        if "BUSYGROUP" not in str(exc):
                            raise
                return
            except DOWN as exc:
                log.warning("consumer %s: Redis is down (%s); again in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    # -- taking ------------------------------------------------------------------------------

    async def _claim_when_due(self) -> Taken | None:
        """A dead worker's job, looked for when the first pending entry can have passed the idle
        threshold (`_until_claimable`), not before every job: round trips fewer on a busy queue,
        and a dead worker's job is taken REDIS_CLAIM_IDLE (and at most BLOCK_SECONDS) after its
        worker's last sign of life, if this consumer is free then."""
        now = asyncio.get_running_loop().time()
        if now < self._next_claim:
            return None
        taken = await self._claim()
        if taken is None:
            self._next_claim = now + await self._until_claimable()
        return taken

    async def _until_claimable(self) -> float:
        """Seconds until a pending entry passes the idle threshold (at most half of it: a worker
        that dies now is noticed in time). Running workers refresh theirs every third of it, so
        only a dead worker's entry comes due (ours too, left by an earlier life of this name)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for name in self.streams:
                pipe.xpending_range(name, GROUP, min="-", max="+", count=64)
            answers = await pipe.execute()
        soonest = self.claim_idle_ms / 2
        for pending in answers:
            for entry in pending:
                soonest = min(soonest, self.claim_idle_ms - int(entry["time_since_delivered"]))
        return max(soonest, 10) / 1000

    async def _claim(self) -> Taken | None:
        """A job whose consumer has been silent past the idle threshold (it died)."""
        for name in self.streams:
            claimed: Any = await self.client.xautoclaim(
                name, GROUP, self.name, self.claim_idle_ms, start_id="0-0", count=1
            )
            _, entries, deleted = claimed
            if deleted:
                await self.client.xack(name, GROUP, *deleted)
            for entry, fields in entries:
                if not fields:
                    await self.client.xack(name, GROUP, entry)
                    continue
                taken = await self._read(name, entry, fields, reclaimed=True)
                if taken is not None:
                    return taken
        return None

    async def _next(self, wait: bool = True) -> Taken | None:
        """The next queued job, highest priority first (but a priority that has waited
        PRIORITY_AGING seconds without being served goes first: low never starves); waits up to
        BLOCK_SECONDS for one (`wait`)."""
        news, self._news = self._news, None
        # The wait saw nothing new in the others: not asked. One round trip (`NEXT`) for them all,
        # and the entry taken in it when no other worker could be given it (affinity's place).
        asked = [self.streams.index(name) + 1 for name in await self._reading_order() if news is None or name in news]
        take = "1" if self._placed_here_whatever() else "?"  # "?": when no other worker beats (asked in NEXT)
        status = self.status
        names = [*keys.run_claim(_T, _T).split(_T), *keys.queue_cancel(_T, _T).split(_T), *keys.attempts(_T).split(_T)]
        beaten_since = int(time.time() * 1000) - HEARTBEAT_TTL * 1000
        # Free and about to wait: marked idle, for as long as the wait lasts, so that the next job
        # queued is given to it in the round trip that queues it (`queue.ENQUEUE`).
        idle = "1" if wait and self.jobs.accepting else ""
        idle_ms = int(self._block() * 1000) + IDLE_MARGIN_MS
        args: list[Any] = [GROUP, self.name, take, status.ttl, status.alive_ttl, *names, beaten_since]
        args += [self._given_seen, idle, idle_ms, *asked]
        lane_keys = [keys.HANDOFFS, keys.WORKERS, keys.given(self.name), keys.idle_worker(self.lane)]
        answer: Any = await self._next_script(keys=[*self.streams, *lane_keys], args=args)
        self._idle_marked = bool(idle) and not int(answer[0])
        if int(answer[0]) == -1:  # a job given to us as it was queued, not read yet
            self._more_queued = False
            return await self._given(answer[1], answer[2])
        self._more_queued = bool(int(answer[0])) and bool(int(answer[4]))
        if int(answer[0]):
            name = self.streams[int(answer[0]) - 1]
            flat, took = answer[2], int(answer[3])
            self._waiting_since.pop(name, None)
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            taken = await self._read(name, answer[1], fields, reclaimed=False, took=took)
            if taken is None or taken.took is not None:
                return taken
            return taken if await self._placed_here(taken) else None
        await self._trim_when_due()  # nothing queued: a good moment to drop what is done
        if wait:
            return await self._wait_for_news(answer[1], answer[2])
        return None

    async def _reading_order(self) -> list[str]:
        """The streams in priority order, a starved one first: looked at every AGING_LOOK
        seconds (one round trip), when a lower priority has had jobs waiting, unserved by this
        worker, for PRIORITY_AGING seconds."""
        now = asyncio.get_running_loop().time()
        if now >= self._next_aging_look:
            self._next_aging_look = now + AGING_LOOK
            async with self.client.pipeline(transaction=False) as pipe:
                for name in self.streams[1:]:
                    pipe.xinfo_groups(name)
                answers = await pipe.execute(raise_on_error=False)
            for name, groups in zip(self.streams[1:], answers, strict=True):
                ours = (
                    [] if isinstance(groups, Exception) else [g for g in groups if g["name"] in (GROUP, GROUP.encode())]
                )
                if ours and (ours[0].get("lag") or 0) > 0:
                    self._waiting_since.setdefault(name, now)
                else:
                    self._waiting_since.pop(name, None)
        starved = [name for name, since in self._waiting_since.items() if now - since >= PRIORITY_AGING]
        return sorted(starved, key=self.streams.index) + [name for name in self.streams if name not in starved]

    def _placed_here_whatever(self) -> bool:
        """Whether any entry read now is run here, whatever the other workers: no affinity, or
        its ComfyUI not read yet (`Affinity.place` then keeps every entry). Else NEXT asks
        whether another worker beats, in the round trip that reads the entry."""
        return self.affinity is None or not self.affinity.heartbeat.known

    async def _placed_here(self, taken: Taken) -> bool:
        """Whether this worker runs a job it read (affinity: else handed to a worker holding its
        models, or able to run it)."""
        if self.affinity is None:
            return True
        needs = await needs_of_spec(taken.spec.workflow, taken.spec.big)
        return await self.affinity.place(taken.stream, taken.entry, needs)

    async def _handed(self) -> Taken | None:
        """A job another worker handed to this one, else one handed to a worker that did not take
        it within AFFINITY_WAIT (`serverless.fleet.affinity`)."""
        if self.affinity is None:
            return None
        found = None
        if self._look_handed:  # told by our hand-off stream (or not looked since we began)
            found = await self.affinity.handed()
            self._look_handed = found is not None  # another may wait behind it
        now = asyncio.get_running_loop().time()
        if found is None and now >= self._next_overdue:
            found = await self.affinity.overdue()
            if found is None:
                self._next_overdue = now + self.affinity.look_every(BLOCK_SECONDS)
        if found is None:
            return None
        taken = await self._read(*found, reclaimed=False)
        return None if taken is None else replace(taken, handed=True)

    async def _read(
        self, name: str, entry: bytes | str, fields: dict[bytes, bytes], reclaimed: bool, took: int = -2
    ) -> Taken | None:
        """The job a queue entry holds, `took` as `NEXT` took it (-2: not asked, `Taken.took`
        None); None for one that cannot be read (a dead letter now; the attempt begun as it was
        taken, if one was, ended with why)."""
        entry_id = entry.decode() if isinstance(entry, bytes) else entry
        try:
            task_id = fields[b"task_id"].decode()
            validate_task_id(task_id)
            credentials = Credentials.resolve({}, self.settings.oss.credentials)
            spec = decode_spec(fields[b"spec"], credentials)
        except Exception as exc:  # what a gateway never writes: not a job (a pure decode, no I/O)
            await self._dead_letter(name, entry_id, fields, f"{type(exc).__name__}: {exc}", max(took, 0))
            return None
        inputs = fields.get(b"inputs")
        staged = inputs.decode() if inputs else None
        return Taken(name, entry_id, task_id, spec, reclaimed, staged, took=None if took == -2 else took)

    async def _dead_letter(
        self, name: str, entry: str, fields: dict[bytes, bytes], reason: str, begun: int = 0
    ) -> None:
        """An entry no worker can run, moved aside (`deadletters.bury`) and counted."""
        await deadletters.bury(self.client, self.status, name, entry, fields, reason, self.name, begun)
        self.dead_letters += 1
        self.jobs.metrics.queue_dead_letters.inc()

    def _block(self) -> float:
        """Seconds the blocking read for news lasts (a worker with affinity looks for overdue
        hand-offs often)."""
        return BLOCK_SECONDS if self.affinity is None else self.affinity.look_every(BLOCK_SECONDS)

    async def _wait_for_news(self, delivered: list[bytes], newest: bytes) -> Taken | None:
        """Block until an entry no consumer has been given arrives in any stream, a job is
        handed back (`fleet:handoffs`: then it is claimed next), or a job is given to this worker
        as it is queued (`fleet:given:<name>`: returned, taken already): XREAD from each group's
        last `delivered` id (as `NEXT` found none to hand out) wakes at once if one arrived since;
        `newest` is the newest hand-off then."""
        since: dict[Any, Any] = dict(zip(self.streams, delivered, strict=True))
        if self._handoffs_seen is not None and newest != self._handoffs_seen:
            self._next_claim = 0.0  # handed back since our last look: claim it now
        self._handoffs_seen = newest
        since[keys.HANDOFFS] = newest
        given = keys.given(self.name)
        since[given] = self._given_seen
        if self.affinity is not None:  # a job handed here wakes it; overdue ones are looked for often
            since.update(self.affinity.wake_streams())
        if not self.jobs.accepting:
            return None  # draining: no job is taken any more, so none is waited for
        self.waiting = True  # idle in the blocking read: a drain may cut it (nothing to hand back)
        try:
            answer: Any = await self._reads.xread(since, 1, int(self._block() * 1000))
        finally:
            self.waiting = False
        if self.affinity is not None and self.affinity.woke(answer):
            self._look_handed = True
        # Only the queue streams with news are asked next (the others had nothing new; what comes
        # there since ends the next wait at once); none: all of them.
        news = set()
        gift = None
        for stream_name, entries in answer or []:
            named = stream_name.decode() if isinstance(stream_name, bytes) else stream_name
            if named == keys.HANDOFFS:
                self._handoffs_seen = entries[-1][0]
                self._next_claim = 0.0
            elif named in self.streams:
                news.add(named)
            elif named == given and entries:
                gift = entries[0]
        self._news = news or None
        if gift is None:
            return None
        self._idle_marked = False  # the gateway that gave it removed the mark
        return await self._given(gift[0], gift[1])

    async def _given(self, entry: bytes | str, note: Any) -> Taken | None:
        """A job a gateway gave to this worker as it queued it (`queue.ENQUEUE`): the queue entry
        read and taken for us (`took`, as `NEXT` takes one), or None when it cannot be read."""
        self._given_seen = entry.decode() if isinstance(entry, bytes) else entry
        fields = dict(zip(note[::2], note[1::2], strict=True)) if isinstance(note, list) else dict(note)
        name, queued, took = fields.pop(b"stream").decode(), fields.pop(b"entry"), int(fields.pop(b"took"))
        self._waiting_since.pop(name, None)
        return await self._read(name, queued, fields, reclaimed=False, took=took)

    async def _give_back_given(self) -> None:
        """Draining: our idle mark removed, and a job a gateway gave us that we have not read (given
        as the drain began) handed back to the queue at once, for another worker (`_hand_back`)."""
        try:
            await self._unmark(keys=[keys.idle_worker(self.lane)], args=[self.name])
            while True:
                found: Any = await self.client.xrange(keys.given(self.name), f"({self._given_seen}", "+", count=1)
                taken = await self._given(*found[0]) if found else None
                if not found:
                    return
                if taken is not None:
                    await self._hand_back(taken)
        except DOWN as exc:  # its entry stays ours: claimed once this worker is gone, as a dead one's
            log.warning("consumer %s: a job given to it was not handed back (%s)", self.name, exc)

    async def _not_idle(self) -> None:
        """Remove our idle mark (a job came otherwise than from `NEXT`): no job is given to a
        busy worker."""
        if self._idle_marked:
            self._idle_marked = False
            await self._unmark(keys=[keys.idle_worker(self.lane)], args=[self.name])

    # -- running -----------------------------------------------------------------------------

    async def _handle(self, taken: Taken, queued: Callable[[], None]) -> None:
        try:
            await self._handle_taken(taken, queued)
        finally:
            queued()  # its prompt went to ComfyUI's queue, or never will

    async def _handle_taken(self, taken: Taken, queued: Callable[[], None]) -> None:
        if taken.took is not None:  # taken as it was read (`NEXT`)
            ours, cancel_asked, begun = taken.took >= 0, taken.took == 0, max(taken.took, 0)
        else:
            ours, cancel_asked, begun = await self._take(taken)
        if ours:
            dead = await self.status.current(taken.task_id) if taken.reclaimed else 0
            if dead and await self.status.ended(taken.task_id, dead):
                log.info("task_id=%s: its worker died after it ended; acknowledging it", taken.task_id)
            elif cancel_asked:
                await self._end_here(taken, dead, cancelled_by_request())
            elif not (dead and await self._lost_for_good(taken, dead)) and not await self._run(
                taken, dead, begun, queued
            ):
                return  # handed back: not acknowledged (its key's place kept), another worker takes it
        elif taken.handed and await self._run_elsewhere(taken):
            return  # the worker it was handed to took it in the meantime: its acknowledgement
        if ours:  # a job a gateway ended unrun (cancel, QUEUE_TTL) was released by that gateway
            await self._release(taken)
        await self._ack(taken)

    async def _run_elsewhere(self, taken: Taken) -> bool:
        found: Any = await self.client.get(keys.run_claim(taken.task_id, taken.entry))
        return (found or b"").decode() not in (CANCELLED, EXPIRED, "")

    async def _release(self, taken: Taken) -> None:
        """Its key's place in the queue goes to the key's next held job (`fleet.admission`);
        Redis down: the place frees itself once stale."""
        try:
            await self.admission.release(taken.spec.owner, taken.task_id)
        except DOWN as exc:
            log.warning("task_id=%s: its key's next job was not moved to the queue (%s)", taken.task_id, exc)

    async def _take(self, taken: Taken) -> tuple[bool, bool, int]:
        """Make the submission ours (SET NX): False when a gateway took it from the workers first
        (a cancel of a queued job, or QUEUE_TTL) or another consumer took it; a dead worker's
        becomes ours. And whether a cancel of it was acknowledged (read after taking it), and
        the attempt begun for it (0: none): a queued one's in the same round trip (`TAKE`)."""
        key, cancel = keys.run_claim(taken.task_id, taken.entry), keys.queue_cancel(taken.task_id, taken.entry)
        if not taken.reclaimed:
            names = [key, cancel, keys.attempts(taken.task_id)]
            took = int(await self._take_script(keys=names, args=[self.name, self.status.ttl, self.status.alive_ttl]))
            return took >= 0, took == 0, max(took, 0)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(key, self.name, nx=True, ex=self.status.ttl)
            pipe.exists(cancel)
            took, asked = await pipe.execute()
        if took:
            return True, bool(asked), 0
        found: Any = await self.client.get(key)
        if (found or b"").decode() in (CANCELLED, EXPIRED):
            return False, False, 0
        await self.client.set(key, self.name, ex=self.status.ttl)
        return True, bool(await self.client.exists(cancel)), 0

    async def _trim_when_due(self) -> None:
        """The queue's done entries removed (`queue.TRIM`): their bodies go, the lag stays exact."""
        now = asyncio.get_running_loop().time()
        if now < self._next_trim:
            return
        self._next_trim = now + TRIM_EVERY
        removed = await self._trim(keys=list(self.streams), args=[GROUP])
        if removed:
            log.debug("consumer %s: %s done entries removed from the queue", self.name, removed)
        if now >= self._next_forget:
            self._next_forget = now + FORGET_EVERY
            await self._forget_dead_consumers()

    async def _forget_dead_consumers(self) -> None:
        """Remove from the group the consumers (workers gone for good) that hold no entry and
        have not asked for one in FORGET_AFTER seconds: a live worker asks every few seconds,
        and one removed by mistake is made again by its next read."""
        for name in self.streams:
            consumers: Any = await self.client.xinfo_consumers(name, GROUP)
            for consumer in consumers:
                gone = consumer["name"] if isinstance(consumer["name"], str) else consumer["name"].decode()
                if gone != self.name and not consumer["pending"] and consumer["idle"] > FORGET_AFTER * 1000:
                    await self.client.xgroup_delconsumer(name, GROUP, gone)
                    log.info("consumer %s: forgot consumer %s of %s (gone, holding nothing)", self.name, gone, name)

    def _watch(self, taken: Taken) -> Watch:
        return Watch(self.client, self._end, taken.stream, taken.entry, taken.task_id, self.name, self.status.ttl)

    async def _run(self, taken: Taken, dead: int, begun: int = 0, queued: Callable[[], None] | None = None) -> bool:
        """Run the job to its end (True: acknowledge its entry), or until it is handed back to
        the queue for another worker (False: `_hand_back` made it claimable at once)."""
        watch = self._watch(taken)
        if dead:  # how the dead attempt was to end is void: it runs again, and may be cancelled
            await self.client.delete(watch.ended_key)
        if dead and not await self._told_retrying(taken.task_id, dead):
            # its followers read why it begins again before the new attempt's events
            retrying = {"task_id": taken.task_id, "state": "retrying", "attempt": dead + 1, "at": time.time()}
            await self.status.append_event(taken.task_id, dead, {"type": "serverless_progress", "data": retrying})
        try:
            spec = await self._with_inputs(taken)
        except Unavailable as exc:  # its staged inputs are gone: it cannot run
            await self._end_here(taken, dead or begun, exc)
            return True
        if not begun:
            # Run as an async job: `Jobs.start` begins its attempt, or refuses it (and we retry)
            # rather than run it without a status log, which is the only way its caller hears of
            # it. One begun as it was taken runs in its caller's mode (what it may observe).
            spec = replace(spec, mode="async")
        try:
            job = await self.jobs.start(spec, attempt=RedisAttempt(taken.task_id, begun) if begun else None)
        except Unavailable:
            if self.jobs.accepting:
                raise
            await self._hand_back(taken)  # this instance began draining since it took the job
            return False
        # Before the run's first step (`start` returns the job without yielding once its task is
        # made): the job's end asks Redis whether a cancel came first.
        job.settle = watch.settler()
        if begun:  # the attempt its log is: the end is decided as its last events are stored
            job.settle_recorded = watch.settler_recorded(self.status, RedisAttempt(taken.task_id, begun), job.feed)
        job.on_queued = queued
        job.may_hand_off = not dead  # a retry is not given back again: at most two runs
        if dead:  # its owner is gone: readers of that attempt are told at once (the new one is begun)
            await self.client.delete(keys.alive(taken.task_id, dead))
        self.taken += 1
        self.running += 1
        if self.heartbeat is not None:
            self.heartbeat.busy = True
        try:
            await watch.follow(job, self.settings.fleet.claim_idle / 3)
        finally:
            self.running -= 1
            if self.heartbeat is not None:  # what its ComfyUI holds now, advertised at once
                self.heartbeat.busy = self.busy
                self.heartbeat.ran(await needs_of_spec(taken.spec.workflow, taken.spec.big))
        if job.clock.started is not None and job.clock.ended is not None:
            self._last_run = job.clock.ended - job.clock.started
        if watch.acknowledged:  # its entry acknowledged with its last events: `_ack` has less to do
            self._acknowledged[taken.entry] = watch.newest_handoff
        if job.handed_off:
            await job.terminal_recorded()  # its log ends with `retrying` before another worker begins
            await self._hand_back(taken)
            return False
        acted = await self.healing.check() if self.healing is not None else None  # free or restart past a watermark
        # A run that succeeded saw ComfyUI finish its prompt (`executing` None comes after its
        # queue let go of it): the next job needs no look at ComfyUI's queue first. Said by the
        # job taken last only (one taken before it may end after it, and says nothing of it).
        terminal = job.feed.terminal
        if not self._held or self._held[-1].task is asyncio.current_task():
            self._idle_known = acted is None and terminal is not None and terminal.error is None
        return True

    async def _with_inputs(self, taken: Taken) -> JobSpec:
        """The job's spec with its staged inputs back in its workflow (`staging`)."""
        if taken.inputs is None:
            return taken.spec
        staged = await staging.fetch(self.client, taken.task_id, taken.inputs)
        workflow = taken.spec.workflow  # decoded from the entry for this run: ours to change
        if sum(len(value) for value in staged.values()) > STAGED_IN_THREAD:
            workflow = await asyncio.to_thread(staging.join, workflow, staged)
        else:
            workflow = staging.join(workflow, staged)
        return replace(taken.spec, workflow=workflow)

    async def _told_retrying(self, task_id: str, attempt: int) -> bool:
        """Whether the attempt's log ends with `retrying` already (its worker handed it back)."""
        last: Any = await self.client.xrevrange(keys.attempt(task_id, attempt), count=1)
        return bool(last) and b'"retrying"' in last[0][1].get(b"d", b"")

    async def _hand_back(self, taken: Taken) -> None:
        """Give the entry back to the queue, claimable at once (its idle time set past any
        REDIS_CLAIM_IDLE), and wake the free workers (`fleet:handoffs`): the first to claim it
        runs the job again. Retried until Redis answers, as an acknowledgement is."""
        delay = 0.1
        while True:
            try:
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.xclaim(taken.stream, GROUP, self.name, 0, [taken.entry], idle=HANDED_BACK_IDLE_MS, justid=True)
                    note: dict[Any, Any] = {"stream": taken.stream, "entry": taken.entry, "task_id": taken.task_id}
                    pipe.xadd(keys.HANDOFFS, note, maxlen=HANDOFFS_KEPT, approximate=True)
                    await pipe.execute()
                log.warning(
                    "task_id=%s handed back to the queue (entry %s of %s)", taken.task_id, taken.entry, taken.stream
                )
                return
            except DOWN as exc:
                log.warning("task_id=%s: could not hand back (%s); again in %.1fs", taken.task_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _lost_for_good(self, taken: Taken, number: int) -> bool:
        """A dead worker's job, whose attempt `number` it began and did not end: end it
        WORKER_LOST (True) when that attempt stored outputs or was a retry already; False to run
        it once more."""
        error: ServerlessError | None = None
        if number >= 2:
            error = WorkerLost(
                f"the job's worker died on attempt {number} too: it is not run again", raw={"attempt": number}
            )
        elif await self.status.has_outputs(taken.task_id, number):
            error = WorkerLost(
                "the job's worker died after its outputs were made: it is not run again, "
                "so that a GPU is not charged twice",
                raw={"attempt": number},
            )
        if error is None:
            log.warning("task_id=%s: its worker died; running it again here (%s)", taken.task_id, self.name)
            return False
        await self._end_here(taken, number, error)
        if number >= 2:  # it killed its workers twice: an operator may look and queue it again
            fields = {"task_id": taken.task_id, "spec": encode_spec(taken.spec)}
            await deadletters.keep(self.client, taken.stream, taken.entry, fields, error.message, self.name)
        return True

    async def _end_here(self, taken: Taken, number: int, error: ServerlessError) -> None:
        """End the job without running it: with `error`, or cancelled when a cancel was
        acknowledged first (a dead worker's job: "while its worker was lost", not run again); on
        attempt `number` (0: a new one, as the caller's log needs one)."""
        if not await self._watch(taken).settle(state_of(error)):
            error = cancelled_by_request()
            if taken.reclaimed:
                error = ExecutionInterrupted(
                    "cancelled by request while its worker was lost: not run again", raw={"worker_lost": True}
                )
        log.warning("task_id=%s: %s", taken.task_id, error.message)
        if not number:
            number = (await self.status.begin(taken.task_id)).number
        await self.status.append_terminal(taken.task_id, number, error)

    async def _ack(self, taken: Taken) -> None:
        """XACK, retried until Redis answers: an unacknowledged job would run again (not for one
        acknowledged with its last events: `APPEND_END`); then, at most every TRIM_EVERY seconds,
        the entries every worker is done with are removed."""
        acknowledged = taken.entry in self._acknowledged
        newest = self._acknowledged.pop(taken.entry, None)
        if acknowledged and self.affinity is not None and self.affinity.handed_since([(newest, {})] if newest else []):
            self._look_handed = True
        delay = 0.1
        while True:
            try:
                if acknowledged and taken.inputs is None:  # with its last events (`APPEND_END`)
                    await self._trim_when_due()
                    return
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.xack(taken.stream, GROUP, taken.entry)
                    if taken.inputs is not None:  # its staged inputs go with it
                        pipe.delete(keys.staged_inputs(taken.task_id, taken.inputs))
                    if self.affinity is not None:  # a job handed to us while this one ran
                        pipe.xrevrange(keys.handoff(self.name), count=1)
                    answers = await pipe.execute()
                if self.affinity is not None and self.affinity.handed_since(answers[-1]):
                    self._look_handed = True
                await self._trim_when_due()
                return
            except DOWN as exc:
                log.warning("task_id=%s: could not acknowledge (%s); again in %.1fs", taken.task_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
