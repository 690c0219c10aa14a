"""Workers advertise what they hold, in a heartbeat key each (`fleet:worker:<name>`, expiring
HEARTBEAT_TTL after its last beat; names in the sorted set `fleet:workers`): their lane, their
ComfyUI's node classes and model files (its `/object_info`: a loader's options are the files on
its disk), the models it holds resident (those its last job's loaders loaded: ComfyUI keeps the
last prompt's node outputs, so a loader whose inputs did not change does not run again), its
VRAM (its `/system_stats`) and whether it runs a job. Gateways and the other workers read them
(`live_workers`) to refuse a job no worker can run and to send a job where its models are."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from ..comfyui.client import ComfyUI
from ..errors import ServerlessError
from ..ops.metrics import Metrics
from ..status import keys
from ..status.redis import DOWN
from ..status.watch import still_cancelled
from .needs import Needs, model_files

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 1.0  # seconds between a worker's beats
HEARTBEAT_TTL = 5  # seconds a worker's heartbeat outlives its last beat (a worker silent that long is gone)
OBJECT_INFO_EVERY = 60.0  # seconds between readings of its ComfyUI's nodes and model files
FORGET_AFTER_MS = 3600_000  # a name silent this long leaves `fleet:workers`


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A live worker as its heartbeat tells it."""

    name: str
    lane: str
    nodes: frozenset[str]
    files: frozenset[str]
    resident: frozenset[str]
    busy: bool
    vram_total: int | None
    vram_free: int | None
    at: float

    def able(self, needs: Needs) -> bool:
        """Whether it can run a job at all: every node class, and every model file on its disk."""
        return needs.nodes <= self.nodes and needs.models <= self.files

    def holds(self, needs: Needs) -> bool:
        return bool(needs.models) and needs.models <= self.resident

    def shown(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lane": self.lane,
            "busy": self.busy,
            "resident_models": sorted(self.resident),
            "model_files": sorted(self.files),
            "nodes": len(self.nodes),
            "vram_total": self.vram_total,
            "vram_free": self.vram_free,
            "at": self.at,
        }

    @classmethod
    def of(cls, raw: bytes) -> WorkerView | None:
        try:
            data = json.loads(raw)
            return cls(
                str(data["name"]),
                str(data.get("lane", "")),
                frozenset(data.get("nodes", [])),
                frozenset(data.get("files", [])),
                frozenset(data.get("resident", [])),
                bool(data.get("busy")),
                data.get("vram_total"),
                data.get("vram_free"),
                float(data.get("at", 0)),
            )
        except (ValueError, KeyError, TypeError):
            return None


async def live_workers(client: aioredis.Redis) -> list[WorkerView]:
    """Every worker whose heartbeat has not expired."""
    now_ms = int(time.time() * 1000)
    names: Any = await client.zrangebyscore(keys.WORKERS, now_ms - HEARTBEAT_TTL * 1000, "+inf")
    if not names:
        return []
    found: Any = await client.mget([keys.worker(name.decode()) for name in names])
    return [view for raw in found if raw is not None and (view := WorkerView.of(raw)) is not None]


@dataclass
class Heartbeat:
    """One worker's advertisement, kept current by `run_forever`; `ran` tells it each job's needs."""

    client: aioredis.Redis
    comfy: ComfyUI
    name: str
    lane: str
    metrics: Metrics
    busy: bool = False
    resident: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()
    files: frozenset[str] = frozenset()
    vram: tuple[int | None, int | None] = (None, None)
    known: bool = False  # its ComfyUI's nodes were read (until then it advertises nothing)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _switched: bool = True  # its models changed since VRAM was last read
    _listed: tuple[frozenset[str], frozenset[str], str] | None = None  # nodes, files and their JSON
    _told: tuple[frozenset[str], bool] | None = None  # the resident models and busy flag last advertised

    def _lists(self) -> str:
        """`"nodes": [...], "files": [...]` as JSON, made again only when they change (a beat
        follows every job: a real ComfyUI has hundreds of node classes)."""
        if self._listed is None or self._listed[:2] != (self.nodes, self.files):
            text = f'"nodes": {json.dumps(sorted(self.nodes))}, "files": {json.dumps(sorted(self.files))}'
            self._listed = (self.nodes, self.files, text)
        return self._listed[2]

    def ran(self, needs: Needs) -> None:
        """A job with `needs` ran here: its models are the ones held now (counted as a residency
        hit when they were already, else as a switch). Advertised at once when that changes what
        the last beat said (its models, or busy); else the next timed beat tells the same."""
        if needs.models:
            if needs.models <= self.resident:
                self.metrics.model_residency_hits.inc()
            else:
                self.metrics.model_switches.inc()
            self._switched = self._switched or needs.models != self.resident
            self.resident = needs.models
        if self._switched or self._told != (self.resident, self.busy):
            self._wake.set()

    def freed(self) -> None:
        """Its ComfyUI unloaded its models (`/free`, a restart)."""
        self.resident = frozenset()
        self._switched = True
        self._wake.set()

    def view(self) -> WorkerView:
        return WorkerView(
            self.name, self.lane, self.nodes, self.files, self.resident, self.busy, *self.vram, time.time()
        )

    async def run_forever(self) -> None:
        """Beat every HEARTBEAT_EVERY seconds and at once after a job, reading the ComfyUI's nodes
        every OBJECT_INFO_EVERY and its VRAM on the timed beats and after a model switch (a beat
        after a job whose models stayed asks ComfyUI nothing); a ComfyUI or Redis that does not
        answer is tried again next beat."""
        read_at = -OBJECT_INFO_EVERY
        vram_at = -HEARTBEAT_EVERY
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() - read_at >= OBJECT_INFO_EVERY:
                    info = await self.comfy.object_info()
                    self.nodes, self.files, self.known = frozenset(info), model_files(info), True
                    read_at = loop.time()
                if self._switched or loop.time() - vram_at >= HEARTBEAT_EVERY:
                    self._switched = False
                    self.vram = _vram(await self.comfy.read_info("/system_stats"))
                    vram_at = loop.time()
                await self.beat()
            except (ServerlessError, *DOWN) as exc:
                current = asyncio.current_task()
                if current is not None and current.cancelling():  # a cancel seen as a timeout: still a cancel
                    raise asyncio.CancelledError from exc
                log.debug("worker %s: heartbeat skipped (%s)", self.name, exc)
            self._wake.clear()
            still_cancelled()  # a cancel the Redis client swallowed still stops the loop
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for may swallow a cancel that
            # comes as it times out, and the instance's shutdown would wait for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_EVERY):
                    await self._wake.wait()

    async def beat(self) -> None:
        if not self.known:
            return
        view = self.view()
        data = {
            "name": view.name,
            "lane": view.lane,
            "resident": sorted(view.resident),
            "busy": view.busy,
            "vram_total": view.vram_total,
            "vram_free": view.vram_free,
            "at": view.at,
        }
        now_ms = int(view.at * 1000)
        advert = f"{json.dumps(data)[:-1]}, {self._lists()}}}"
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(keys.worker(self.name), advert, ex=HEARTBEAT_TTL)
            pipe.zadd(keys.WORKERS, {self.name: now_ms})
            pipe.zremrangebyscore(keys.WORKERS, "-inf", now_ms - FORGET_AFTER_MS)
            pipe.sadd(keys.LANES, self.lane)
            await pipe.execute()
        self._told = (view.resident, view.busy)

    async def leave(self) -> None:
        """Stop advertising (a drained worker takes no more jobs)."""
        try:
            async with asyncio.timeout(2.0):  # a stopping instance never waits on Redis for this
                await self.client.delete(keys.worker(self.name))
                await self.client.zrem(keys.WORKERS, self.name)
        except (*DOWN, TimeoutError) as exc:
            log.debug("worker %s: heartbeat not withdrawn (%s); it expires", self.name, exc)


def missing(needs: Needs, workers: list[WorkerView], lane: str) -> dict[str, list[str]] | None:
    """What no live worker of `lane` has of a job's needs (`{"nodes": [...], "models": [...]}`),
    None when nothing is missing, or when the lane has no live worker to judge by (its workers
    may be scaled to zero: the job waits for them)."""
    ours = [view for view in workers if view.lane == lane]
    if not ours:
        return None
    nodes = needs.nodes - frozenset().union(*(view.nodes for view in ours))
    models = needs.models - frozenset().union(*(view.files for view in ours))
    return {"nodes": sorted(nodes), "models": sorted(models)} if nodes or models else None


def _vram(stats: Any) -> tuple[int | None, int | None]:
    """The first device's VRAM total and free, as ComfyUI's `/system_stats` reports them."""
    devices = stats.get("devices") if isinstance(stats, dict) else None
    first = devices[0] if isinstance(devices, list) and devices and isinstance(devices[0], dict) else {}
    total, free = first.get("vram_total"), first.get("vram_free")
    return (total if isinstance(total, int) else None, free if isinstance(free, int) else None)
