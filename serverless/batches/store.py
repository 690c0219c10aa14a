"""Where batches live, whichever instance feeds them: the status folder on a box (`FileBatches`),
the fleet's Redis (`serverless.batches.redis.RedisBatches`, keys in `status.keys`).

A batch is its spec (`Batch`, immutable), its `Progress` and its items' states (written only by
the instance holding its lease, the feeder), its events (numbered from 1, appended by the
feeder), and the requests any instance leaves for the feeder: a cancel, items to retry.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import InvalidParams
from .spec import Batch

LIVE = ("running", "cancelling")
ENDED_ITEM = ("succeeded", "failed", "cancelled")
BATCH_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


@dataclass(slots=True)
class Progress:
    """How far a batch's feeder got. `state`: running, cancelling, then succeeded (every item
    did), failed (some item failed) or cancelled. Items before `cursor` were submitted (or
    cancelled unsubmitted); `active` holds those submitted and not yet ended; `retry` those to
    run again (before `cursor`'s)."""

    state: str = "running"
    cursor: int = 0
    active: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    attempts_before: dict[str, int] = field(default_factory=dict)  # a retried active item: its attempts before
    counts: dict[str, int] = field(default_factory=dict)
    events: int = 0  # events appended so far (the last one's number)
    started: float = 0.0
    first_ended: float | None = None  # when the first item ended (the ETA's clock)
    ended_at: float | None = None
    webhook: dict[str, Any] | None = None  # how the batch's webhook went
    webhook_due: bool = False  # ended, its webhook not yet sent: still fed (sent at least once)
    manifest: dict[str, Any] | None = None  # the manifest's object beside the outputs (`output_oss`)

    @property
    def live(self) -> bool:
        return self.state in LIVE or self.webhook_due

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str | bytes) -> Progress:
        return cls(**json.loads(data))


def check_batch_id(batch_id: str) -> str:
    """A batch id names a folder and keys: ours only (`batch-` and hex), else NotFound-like 400."""
    if not (6 < len(batch_id) <= 64 and batch_id.startswith("batch-") and set(batch_id) <= BATCH_ID_CHARS):
        raise InvalidParams("not a batch id", raw={"batch_id": batch_id[:64]})
    return batch_id


class BatchStore(Protocol):
    """What the endpoints and the feeders ask of the place batches live."""

    async def create(self, batch: Batch, progress: Progress) -> None:
        """Keep a new batch and its first progress; it is live (fed) from then on."""
        ...

    async def batch(self, batch_id: str) -> Batch | None: ...

    async def progress(self, batch_id: str) -> Progress | None: ...

    async def states(self, batch_id: str) -> dict[int, str]:
        """Every item's state the feeder recorded (an item absent is pending)."""
        ...

    async def save(self, batch_id: str, progress: Progress, states: dict[int, str], events: list[bytes]) -> None:
        """The feeder's step: items' new states, events (numbered after `progress.events` less
        their count), then the progress; a batch no longer live leaves the live ones."""
        ...

    async def events(self, batch_id: str, after: int) -> list[tuple[int, bytes]]:
        """The events after number `after`, numbered."""
        ...

    async def ask_cancel(self, batch_id: str) -> None: ...

    async def cancel_asked(self, batch_id: str) -> bool: ...

    async def ask_retry(self, batch_id: str, indices: list[int]) -> None:
        """Ask the feeder to run these items again; the batch is live again."""
        ...

    async def take_retries(self, batch_id: str) -> list[int]:
        """The items asked to run again since the last call (each once)."""
        ...

    async def live(self) -> list[str]:
        """The batches not ended: to feed."""
        ...

    async def lease(self, batch_id: str, holder: str, seconds: float) -> bool:
        """Take or renew the right to feed the batch for `seconds`: False when another holds it."""
        ...

    async def release(self, batch_id: str, holder: str) -> None:
        """Give the lease up (another instance may feed at once)."""
        ...


class FileBatches:
    """Batches in the status folder (`<STATUS_DIR>/~batches/<id>/`): one box, or instances sharing
    the NAS folder (their leases are files with an expiry: best effort, not atomic)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _dir(self, batch_id: str) -> Path:
        return self.directory / check_batch_id(batch_id)

    async def create(self, batch: Batch, progress: Progress) -> None:
        def write() -> None:
            folder = self._dir(batch.batch_id)
            folder.mkdir(parents=True, exist_ok=True)
            _write(folder / "batch.json", batch.to_json())
            _write(folder / "progress.json", progress.to_json())

        await asyncio.to_thread(write)

    async def batch(self, batch_id: str) -> Batch | None:
        text = await asyncio.to_thread(_read, self._dir(batch_id) / "batch.json")
        return Batch.from_json(text) if text is not None else None

    async def progress(self, batch_id: str) -> Progress | None:
        text = await asyncio.to_thread(_read, self._dir(batch_id) / "progress.json")
        return Progress.from_json(text) if text is not None else None

    async def states(self, batch_id: str) -> dict[int, str]:
        text = await asyncio.to_thread(_read, self._dir(batch_id) / "states.jsonl")
        states: dict[int, str] = {}
        for line in (text or "").splitlines():
            try:
                index, state = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-append: the feeder writes it again
            states[int(index)] = str(state)
        return states

    async def save(self, batch_id: str, progress: Progress, states: dict[int, str], events: list[bytes]) -> None:
        def write() -> None:
            folder = self._dir(batch_id)
            if states:
                _append(folder / "states.jsonl", (json.dumps([index, state]) for index, state in states.items()))
            if events:
                _append(folder / "events.jsonl", (event.decode() for event in events))
            _write(folder / "progress.json", progress.to_json())

        await asyncio.to_thread(write)

    async def events(self, batch_id: str, after: int) -> list[tuple[int, bytes]]:
        text = await asyncio.to_thread(_read, self._dir(batch_id) / "events.jsonl")
        lines = (text or "").splitlines()
        return [(number, line.encode()) for number, line in enumerate(lines, 1) if number > after]

    async def ask_cancel(self, batch_id: str) -> None:
        await asyncio.to_thread(_write, self._dir(batch_id) / "cancel", str(time.time()))

    async def cancel_asked(self, batch_id: str) -> bool:
        return await asyncio.to_thread((self._dir(batch_id) / "cancel").exists)

    async def ask_retry(self, batch_id: str, indices: list[int]) -> None:
        await asyncio.to_thread(_append, self._dir(batch_id) / "retry.jsonl", [json.dumps(indices)])

    async def take_retries(self, batch_id: str) -> list[int]:
        def take() -> list[int]:
            asked, taken = self._dir(batch_id) / "retry.jsonl", self._dir(batch_id) / "retry.taken"
            try:
                os.replace(asked, taken)
            except FileNotFoundError:
                return []
            lines = taken.read_text().splitlines()
            taken.unlink()
            return [int(index) for line in lines if line.strip() for index in json.loads(line)]

        return await asyncio.to_thread(take)

    async def live(self) -> list[str]:
        def scan() -> list[str]:
            try:
                folders = [entry.name for entry in os.scandir(self.directory) if entry.is_dir()]
            except FileNotFoundError:
                return []
            found = []
            for name in folders:
                text = _read(self.directory / name / "progress.json")
                retried = (self.directory / name / "retry.jsonl").exists()
                if text is not None and (Progress.from_json(text).live or retried):
                    found.append(name)
            return found

        return await asyncio.to_thread(scan)

    async def lease(self, batch_id: str, holder: str, seconds: float) -> bool:
        def take() -> bool:
            path = self._dir(batch_id) / "lease.json"
            text = _read(path)
            if text is not None:
                held = json.loads(text)
                if held["holder"] != holder and held["until"] > time.time():
                    return False
            _write(path, json.dumps({"holder": holder, "until": time.time() + seconds}))
            return True

        return await asyncio.to_thread(take)

    async def release(self, batch_id: str, holder: str) -> None:
        def give_up() -> None:
            path = self._dir(batch_id) / "lease.json"
            text = _read(path)
            if text is not None and json.loads(text)["holder"] == holder:
                path.unlink(missing_ok=True)

        await asyncio.to_thread(give_up)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a temp name of this thread's own, then a rename."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


def _append(path: Path, lines: Iterable[str]) -> None:
    with path.open("a") as file:
        file.write("".join(line + "\n" for line in lines))
