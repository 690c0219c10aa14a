"""Affinity: a job goes to a worker that holds its models, and only to workers able to run it,
with Redis Streams' own primitives (the shared streams stay the one queue: priorities, queue
places, cancels, trims, dead workers' claims and KEDA's lag reading are unchanged).

    a free worker reads the next entry (XREADGROUP, as ever) and places it (`place`):
      - it runs it when it holds the job's models, when no other live worker of its lane does
        (heartbeats, `serverless.fleet.heartbeat`), or when the job has waited AFFINITY_WAIT;
      - else it hands the entry to a holder (XCLAIM: the entry becomes that worker's pending
        entry, still unclaimed: no `run:` key), preferring an idle one, and wakes it
        (`fleet:handoff:<name>`); then reads the next entry itself;
      - an entry needing node classes or model files it lacks goes the same way to an able worker.
    a worker looks at its own pending entries first (`handed`): one without a run claim was
      handed to it; it takes it (SET NX on `run:`, as any job is taken);
    an idle worker takes an entry handed to another worker that has waited AFFINITY_WAIT since
      (`overdue`: XPENDING IDLE, then XCLAIM with the same min idle time), so affinity never
      starves a job; and a dead holder's entry is claimed like any dead worker's (XAUTOCLAIM).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.asyncio as aioredis

from ..status import keys
from .heartbeat import Heartbeat, WorkerView, live_workers
from .needs import Needs, needs_of
from .wire import GROUP, decode_spec

log = logging.getLogger(__name__)

VIEW_FRESH = 0.2  # seconds the other workers' heartbeats are trusted
LOOK = 16  # pending entries looked at per stream

Found = tuple[str, str, dict[bytes, bytes]]  # (stream, entry id, fields) of an entry to take


class Affinity:
    """One worker's side of affinity (see the module docstring)."""

    def __init__(self, client: aioredis.Redis, heartbeat: Heartbeat, streams: tuple[str, ...], wait: float) -> None:
        self.client = client
        self.heartbeat = heartbeat
        self.name = heartbeat.name
        self.streams = streams
        self.wait = wait
        self.handed_over = 0
        self._views: tuple[float, list[WorkerView]] = (0.0, [])
        self._woken = "0-0"  # the last entry of our hand-off stream we woke for

    @property
    def overdue_after(self) -> float:
        """Seconds a handed entry waits for its worker before any able worker takes it."""
        return max(self.wait, 1.0)

    def look_every(self, block: float) -> float:
        """How long an idle worker blocks between looks for overdue hand-offs."""
        return min(block, max(self.overdue_after / 4, 0.05))

    async def others(self) -> list[WorkerView]:
        """The other live workers of this lane (heartbeats read at most every VIEW_FRESH)."""
        now = time.monotonic()
        if now - self._views[0] > VIEW_FRESH:
            self._views = (now, await live_workers(self.client))
        lane = self.heartbeat.lane
        return [view for view in self._views[1] if view.name != self.name and view.lane == lane]

    async def place(self, stream: str, entry: str, needs: Needs) -> bool:
        """True to run the entry here; False when it was handed to another worker."""
        me = self.heartbeat
        if not me.known:
            return True  # its ComfyUI not read yet: nothing to judge by
        able = needs.nodes <= me.nodes and needs.models <= me.files
        if able and (not needs.models or needs.models <= me.resident or self._waited(entry) >= self.wait):
            return True
        others = await self.others()
        if able:
            targets = [view for view in others if view.holds(needs) and view.able(needs)]
        else:
            targets = [view for view in others if view.able(needs)]
        log.debug(
            "worker %s: entry %s needs %s; holds %s; others %s",
            self.name,
            entry,
            sorted(needs.models),
            sorted(me.resident),
            [(view.name, sorted(view.resident), view.busy) for view in others],
        )
        if not targets:
            return True  # nobody better: run it here (a job no worker can run fails as ComfyUI says)
        target = min(targets, key=lambda view: (view.busy, not view.holds(needs)))
        await self._hand(stream, entry, target.name)
        return False

    def _waited(self, entry: str) -> float:
        return time.time() - int(entry.split("-")[0]) / 1000

    async def _hand(self, stream: str, entry: str, target: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xclaim(stream, GROUP, target, 0, [entry], justid=True)
            pipe.xadd(keys.handoff(target), {"entry": entry}, maxlen=1)
            pipe.expire(keys.handoff(target), 3600)
            await pipe.execute()
        self.handed_over += 1
        log.info("worker %s: entry %s of %s handed to %s (it holds the job's models)", self.name, entry, stream, target)

    async def handed(self) -> Found | None:
        """An entry another worker handed to this one (pending here, claimed by nobody)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xpending_range(stream, GROUP, min="-", max="+", count=LOOK, consumername=self.name)
            answers = await pipe.execute(raise_on_error=False)
        for stream, pending in zip(self.streams, answers, strict=True):
            if isinstance(pending, Exception):
                continue
            for item in pending:
                found = await self._unclaimed(stream, _text(item["message_id"]))
                if found is not None:
                    return found
        return None

    async def overdue(self) -> Found | None:
        """An entry handed to another worker that has not taken it in `overdue_after` seconds,
        now this worker's (XCLAIM with that min idle time: of two such workers one gets it)."""
        idle_ms = int(self.overdue_after * 1000)
        async with self.client.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xpending_range(stream, GROUP, min="-", max="+", count=LOOK, idle=idle_ms)
            answers = await pipe.execute(raise_on_error=False)
        for stream, pending in zip(self.streams, answers, strict=True):
            if isinstance(pending, Exception):
                continue
            for item in pending:
                if _text(item["consumer"]) == self.name:
                    continue
                entry = _text(item["message_id"])
                found = await self._unclaimed(stream, entry)
                if found is None or not self._able(found[2]):
                    continue
                moved: Any = await self.client.xclaim(stream, GROUP, self.name, idle_ms, [entry], justid=True)
                if moved:
                    log.info(
                        "worker %s: took entry %s of %s, handed to %s and not taken",
                        self.name,
                        entry,
                        stream,
                        _text(item["consumer"]),
                    )
                    return found
        return None

    def _able(self, fields: dict[bytes, bytes]) -> bool:
        """Whether this worker can run a queue entry's job (judged by its spec's workflow)."""
        try:
            needs = needs_of(decode_spec(fields[b"spec"], None).workflow)
        except Exception:
            return True  # not readable: taken, and made a dead letter as any such entry
        me = self.heartbeat
        return not me.known or (needs.nodes <= me.nodes and needs.models <= me.files)

    async def _unclaimed(self, stream: str, entry: str) -> Found | None:
        """The entry's fields when no worker has taken it (no `run:` key yet)."""
        found: Any = await self.client.xrange(stream, entry, entry)
        if not found:
            return None
        fields: dict[bytes, bytes] = found[0][1]
        task = fields.get(b"task_id")
        if task is None or await self.client.exists(keys.run_claim(task.decode(errors="replace"), entry)):
            return None
        return stream, entry, fields

    def wake_streams(self) -> dict[str, str]:
        """What an idle worker's blocking read also waits on: a hand-off to it."""
        return {keys.handoff(self.name): self._woken}

    def woke(self, answer: Any) -> bool:
        """Whether a blocking read's answer holds a hand-off to this worker (then look: `handed`)."""
        told = False
        for name, entries in answer or []:
            if _text(name) == keys.handoff(self.name) and entries:
                self._woken, told = _text(entries[-1][0]), True
        return told

    def handed_since(self, newest: Any) -> bool:
        """Whether our hand-off stream's newest entry (XREVRANGE COUNT 1) is one not seen yet."""
        if not newest or _text(newest[0][0]) == self._woken:
            return False
        self._woken = _text(newest[0][0])
        return True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
