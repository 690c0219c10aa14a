"""Usage per API key, kept by the hour where the status logs are: files under STATUS_DIR/~usage on
a box, hashes in Redis on a fleet (kept the status retention).

    jobs_submitted, jobs_succeeded, jobs_failed, jobs_cancelled   jobs by state
    gpu_seconds        ComfyUI's execution time of its jobs (queued and output time aside)
    bytes_out          bytes of the results its jobs sent (the terminal payloads, base64 included)
    models_downloaded  models fetched for its jobs (`count(owner, {"models_downloaded": 1})`)

A job is counted where it runs (a box, a fleet's worker) when it ends; `jobs_submitted` where it
is started (a box, a gateway). Jobs made without API keys are counted under the owner `-`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis

from ..status import keys
from ..status.redis import translated
from ..status.watch import still_cancelled

log = logging.getLogger(__name__)

FIELDS = (
    "jobs_submitted",
    "jobs_succeeded",
    "jobs_failed",
    "jobs_cancelled",
    "gpu_seconds",
    "bytes_out",
    "models_downloaded",
)
ANONYMOUS = "-"  # the owner of jobs made without API keys
HOUR = 3600


def hour_of(at: float) -> int:
    return int(at // HOUR)


def owner_key(owner: str | None) -> str:
    return owner or ANONYMOUS


class UsageStore(Protocol):
    async def count(self, owner: str | None, amounts: Mapping[str, float], at: float | None = None) -> None:
        """Add `amounts` (of FIELDS) to the key's usage of the hour of `at` (default now)."""
        ...

    async def read(self, owners: Iterable[str], since: float) -> dict[str, dict[str, float]]:
        """Each owner's usage from the hour of `since` on (every field, 0 when none)."""
        ...


def _zero() -> dict[str, float]:
    return dict.fromkeys(FIELDS, 0.0)


class FileUsage:
    """One line of JSON appended per count, a file per key and hour (O_APPEND: several instances
    sharing the folder never tear each other's lines); read by summing the lines."""

    def __init__(self, folder: Path, retention_days: float) -> None:
        self.folder = folder
        self.retention = retention_days * 86400

    async def count(self, owner: str | None, amounts: Mapping[str, float], at: float | None = None) -> None:
        line = json.dumps({k: v for k, v in amounts.items() if k in FIELDS}, separators=(",", ":")) + "\n"
        path = self.folder / owner_key(owner) / f"{hour_of(time.time() if at is None else at)}.jsonl"
        await asyncio.to_thread(_append, path, line.encode())

    async def read(self, owners: Iterable[str], since: float) -> dict[str, dict[str, float]]:
        return await asyncio.to_thread(self._read, list(owners), since)

    def _read(self, owners: list[str], since: float) -> dict[str, dict[str, float]]:
        first = hour_of(max(since, time.time() - self.retention))
        found = {}
        for owner in owners:
            totals = _zero()
            folder = self.folder / owner
            for path in folder.glob("*.jsonl") if folder.is_dir() else ():
                if path.stem.isdigit() and int(path.stem) >= first:
                    for line in path.read_text().splitlines():
                        _add(totals, line)
            found[owner] = totals
        return found


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _add(totals: dict[str, float], line: str) -> None:
    try:
        counted = json.loads(line)
    except ValueError:
        return  # a line cut by a crash: not counted
    if isinstance(counted, dict):
        for name, value in counted.items():
            if name in totals and isinstance(value, int | float):
                totals[name] += value


class RedisUsage:
    """A hash per key and hour (HINCRBYFLOAT), kept the status retention."""

    def __init__(self, client: aioredis.Redis, retention_days: float) -> None:
        self.client = client
        self.retention = retention_days * 86400

    async def count(self, owner: str | None, amounts: Mapping[str, float], at: float | None = None) -> None:
        name = keys.usage(owner_key(owner), hour_of(time.time() if at is None else at))
        with translated():
            async with self.client.pipeline(transaction=True) as pipe:
                for field, value in amounts.items():
                    if field in FIELDS and value:
                        pipe.hincrbyfloat(name, field, value)
                pipe.expire(name, int(self.retention) + HOUR)
                await pipe.execute()

    async def read(self, owners: Iterable[str], since: float) -> dict[str, dict[str, float]]:
        now = time.time()
        hours = range(hour_of(max(since, now - self.retention)), hour_of(now) + 1)
        owners = list(owners)
        with translated():
            async with self.client.pipeline(transaction=False) as pipe:
                for owner in owners:
                    for hour in hours:
                        pipe.hgetall(keys.usage(owner, hour))
                answers: list[Any] = await pipe.execute()
        found = {}
        for index, owner in enumerate(owners):
            totals = _zero()
            for counted in answers[index * len(hours) : (index + 1) * len(hours)]:
                for name, value in counted.items():
                    name = name.decode() if isinstance(name, bytes) else name
                    if name in totals:
                        totals[name] += float(value)
            found[owner] = totals
        return found


def job_usage(state: str, timings: Mapping[str, float], result_bytes: int) -> dict[str, float]:
    """What one ended job adds: its state, its execution time, the bytes of its result."""
    return {f"jobs_{state}": 1, "gpu_seconds": timings.get("execution_s", 0.0), "bytes_out": result_bytes}


class NoUsage:
    """Counts nothing (an app built without its resources' stores, as some tests do)."""

    async def count(self, owner: str | None, amounts: Mapping[str, float], at: float | None = None) -> None:
        return None

    async def read(self, owners: Iterable[str], since: float) -> dict[str, dict[str, float]]:
        return {owner: _zero() for owner in owners}


class BufferedUsage:
    """Counts added up in memory and written to `store` every `interval` seconds, a bucket (key
    and hour) a write: a job's start and end cost no I/O on its caller's path, and Redis or the
    folder sees one write per key a second however many jobs there are. A read writes what is
    pending first; a write that fails is kept for the next one (logged)."""

    def __init__(self, store: UsageStore, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self._pending: dict[tuple[str, int], dict[str, float]] = {}
        self._lock = asyncio.Lock()

    def add(self, owner: str | None, amounts: Mapping[str, float], at: float | None = None) -> None:
        """Count `amounts` for the key (no I/O: written with the next flush)."""
        bucket = self._pending.setdefault((owner_key(owner), hour_of(time.time() if at is None else at)), {})
        for name, value in amounts.items():
            if name in FIELDS and value:
                bucket[name] = bucket.get(name, 0.0) + value

    async def count(self, owner: str | None, amounts: Mapping[str, float], at: float | None = None) -> None:
        self.add(owner, amounts, at)

    async def read(self, owners: Iterable[str], since: float) -> dict[str, dict[str, float]]:
        await self.flush()
        return await self.store.read(owners, since)

    async def flush(self) -> None:
        async with self._lock:
            pending, self._pending = self._pending, {}
            for (owner, hour), amounts in pending.items():
                try:
                    await self.store.count(owner, amounts, at=hour * HOUR)
                except Exception as exc:
                    log.warning("usage of key %s not written yet (%s): kept for the next try", owner, exc)
                    again = self._pending.setdefault((owner, hour), {})
                    for name, value in amounts.items():
                        again[name] = again.get(name, 0.0) + value

    async def flush_forever(self) -> None:
        """Write what is pending every `interval` seconds until cancelled (then once more)."""
        try:
            while True:
                still_cancelled()  # a cancel the Redis client swallowed still stops the loop
                await asyncio.sleep(self.interval)
                await self.flush()
        finally:
            await asyncio.shield(self.flush())
