"""Feeding batches: each live batch is fed by one instance at a time (the holder of its lease),
which keeps at most WINDOW of its items queued or running, watches them end, and records
their states, the batch's progress and its events in the batch store. The lease expires when its
holder dies or stops; any instance (a gateway, or a box restarted) then takes the batch over,
from what the store says.

    Feeders      one per app: takes the leases of live batches, a `Feeder` task each
    Feeder       one batch: requests (cancel, retry), active items, submissions, the end

Every step is: read the requests left by any instance; read the active items' summaries; stop
everything on a cancel; submit items while the window has room (`Busy` waits for the next step);
end the batch when nothing is left (its manifest beside the outputs with `output_oss`, then its
webhook, at least once); save.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ..core.credentials import Credentials
from ..errors import Busy, Conflict, NotFound, ServerlessError, Unavailable
from ..jobs.runner import JobRunner
from ..resources import Resources
from ..settings import BatchSettings
from ..status.summary import ENDED
from ..status.watch import still_cancelled
from . import view
from .items import submit_item
from .spec import Batch
from .store import BatchStore, Progress

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2  # seconds between two looks of a feeder at its batch's items (and of a batch's SSE)
WINDOW = 64  # items of one batch queued or running at once; the rest wait in the status store
STRANDED_EVERY = 5.0  # seconds between two asks whether a queued item can still run
READS_AT_ONCE = 16  # task summaries read together (the manifest, the active items)


class Feeders:
    """The batches this instance feeds; started and closed by the lifespan."""

    def __init__(
        self,
        resources: Resources,
        jobs: JobRunner,
        store: BatchStore,
        settings: BatchSettings,
        holder: str,
        feeds: bool = True,
    ) -> None:
        self.resources, self.jobs, self.store, self.settings, self.holder = resources, jobs, store, settings, holder
        self.feeds = feeds  # False on a fleet's worker: it answers, gateways feed
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._taking: set[str] = set()  # a lease asked for: another take (a retry's, the scan's) waits its turn

    async def run_forever(self) -> None:
        """Take every live batch whose lease is free, now and every third of a lease."""
        while True:
            try:
                for batch_id in await self.store.live():
                    await self.take(batch_id)
            except ServerlessError as exc:
                log.warning("batches could not be looked at: %s", exc.message)
            still_cancelled()  # a cancel the Redis client swallowed still stops the loop
            await asyncio.sleep(self.settings.lease_seconds / 3)

    async def take(self, batch_id: str) -> None:
        """Feed the batch here if nobody else does (here: one feeder a batch, however many ask)."""
        if not self.feeds or batch_id in self._tasks or batch_id in self._taking:
            return
        self._taking.add(batch_id)
        try:
            if not await self.store.lease(batch_id, self.holder, self.settings.lease_seconds):
                return
        finally:
            self._taking.discard(batch_id)
        feeder = Feeder(self, batch_id)
        task = asyncio.create_task(feeder.run(), name=f"batch {batch_id}")
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    async def aclose(self) -> None:
        """Stop feeding; the leases are given up so that another instance takes over at once."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Feeder:
    """One batch fed by this instance (see the module docstring)."""

    def __init__(self, feeders: Feeders, batch_id: str) -> None:
        self.feeders, self.batch_id = feeders, batch_id
        self.store = feeders.store
        self.settings = feeders.settings
        self.states: dict[int, str] = {}
        self.changed: dict[int, str] = {}
        self.events: list[bytes] = []
        self.cancels_sent: set[int] = set()
        self.stranded_check = time.monotonic()
        self.saved = ""  # the progress as last written

    async def run(self) -> None:
        try:
            batch, progress = await self.store.batch(self.batch_id), await self.store.progress(self.batch_id)
            if batch is None or progress is None:
                return
            self.batch, self.progress = batch, progress
            self.states = await self.store.states(self.batch_id)
            log.info(
                "batch_id=%s: fed by %s (%d of %d items submitted)",
                batch.batch_id,
                self.feeders.holder,
                progress.cursor,
                batch.total,
            )
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch_id=%s: its feeder stopped; another look takes it up again", self.batch_id)
        finally:
            try:
                await asyncio.shield(self.store.release(self.batch_id, self.feeders.holder))
            except ServerlessError:
                pass  # it expires

    async def _loop(self) -> None:
        renewed = time.monotonic()
        while True:
            if time.monotonic() - renewed > self.settings.lease_seconds / 3:
                if not await self.store.lease(self.batch_id, self.feeders.holder, self.settings.lease_seconds):
                    log.warning("batch_id=%s: its lease went to another instance", self.batch_id)
                    return
                renewed = time.monotonic()
            await self._requests()
            await self._watch()
            if self.progress.state == "cancelling":
                await self._cancel_rest()
            else:
                await self._submit()
            await self._end_if_done()
            await self._save()
            if self.progress.webhook_due:
                await self._deliver_webhook()
                await self._save()
            if not self.progress.live:
                return
            await asyncio.sleep(POLL_INTERVAL)

    def _set(self, index: int, state: str, **extra: Any) -> None:
        if self.states.get(index) == state and not extra:
            return
        self.states[index] = self.changed[index] = state
        data = {"batch_id": self.batch_id, "index": index, "task_id": self.batch.task_id(index), "state": state}
        self.events.append(view.event("batch_item", {**data, **extra}))

    async def _requests(self) -> None:
        progress = self.progress
        if progress.state == "running" and await self.store.cancel_asked(self.batch_id):
            progress.state = "cancelling"
            log.info("batch_id=%s: cancelling", self.batch_id)
        for index in await self.store.take_retries(self.batch_id):
            if progress.state in ("cancelling", "cancelled") or self.states.get(index) != "failed":
                continue
            if index in progress.retry or index in progress.active:
                continue
            progress.retry.append(index)
            self._set(index, "pending", retry=True)
        if progress.retry and progress.state in ("succeeded", "failed"):
            progress.state, progress.ended_at, progress.webhook, progress.webhook_due = "running", None, None, False
            log.info("batch_id=%s: running again (%d item(s) retried)", self.batch_id, len(progress.retry))

    async def _watch(self) -> None:
        """The active items' states from their tasks' logs; the ended ones leave the window."""
        active = list(self.progress.active)
        status = self.feeders.resources.status
        if time.monotonic() - self.stranded_check > STRANDED_EVERY:
            self.stranded_check = time.monotonic()
            for index in active:
                await self.feeders.jobs.end_if_stranded(self.batch.task_id(index))
        # A retried item's task is read once its new attempt has begun (asked first: a summary
        # read before the attempt began would be of the one before, which ended).
        begun = await _gather([self._new_attempt(index) for index in active])
        reading = [index for index, new in zip(active, begun, strict=True) if new]
        summaries = await _gather([status.summary(self.batch.task_id(index)) for index in reading])
        for index, summary in zip(reading, summaries, strict=True):
            state = summary["state"] if summary is not None else "queued"
            self._set(index, state)
            if state in ENDED:
                self.progress.active.remove(index)
                if self.progress.first_ended is None:
                    self.progress.first_ended = time.time()

    async def _new_attempt(self, index: int) -> bool:
        """Whether a retried item's task now reads from its new attempt (a fleet's worker begins
        it only when it takes the job); always so for an item run once, or once cancelling."""
        before = self.progress.attempts_before.get(str(index))
        if before is None or self.progress.state == "cancelling":
            return True
        if len(await self.feeders.resources.status.attempts(self.batch.task_id(index))) <= before:
            return False
        del self.progress.attempts_before[str(index)]
        return True

    async def _cancel_rest(self) -> None:
        """Nothing more is submitted; the active items are stopped through the ordinary cancel."""
        progress, batch = self.progress, self.batch
        for index in [*progress.retry, *range(progress.cursor, batch.total)]:
            self.states[index] = self.changed[index] = "cancelled"  # never submitted: no event each
        progress.retry, progress.cursor = [], batch.total
        for index in progress.active:
            if index in self.cancels_sent:
                continue
            self.cancels_sent.add(index)
            try:
                await self.feeders.jobs.cancel(batch.task_id(index))
            except (NotFound, Conflict) as exc:  # ended meanwhile, or not yet known: seen next step
                log.info("task_id=%s: not cancelled (%s)", batch.task_id(index), exc.message)
                if isinstance(exc, NotFound):
                    self.cancels_sent.discard(index)

    async def _submit(self) -> None:
        progress, batch, feeders = self.progress, self.batch, self.feeders
        while progress.state == "running" and len(progress.active) < WINDOW:
            retry = bool(progress.retry)
            if not retry and progress.cursor >= batch.total:
                return
            index = progress.retry[0] if retry else progress.cursor
            try:
                if retry:
                    attempts = await feeders.resources.status.attempts(batch.task_id(index))
                    progress.attempts_before[str(index)] = len(attempts)
                    await submit_item(feeders.resources, feeders.jobs, batch, index)
                elif not await feeders.resources.status.known(batch.task_id(index)):
                    await submit_item(feeders.resources, feeders.jobs, batch, index)
            except (Busy, Unavailable) as exc:  # room comes back: next step
                log.debug("batch_id=%s: item %d waits (%s)", batch.batch_id, index, exc.message)
                return
            except ServerlessError as exc:  # refused now (a workflow changed since): the item failed
                log.warning("batch_id=%s: item %d was refused: %s", batch.batch_id, index, exc.message)
                self._set(index, "failed", error=exc.to_payload())
            else:
                progress.active.append(index)
                self._set(index, "queued")
            if retry:
                progress.retry.pop(0)
            else:
                progress.cursor += 1

    async def _end_if_done(self) -> None:
        progress, batch = self.progress, self.batch
        if not progress.live or progress.webhook_due or progress.active or progress.retry:
            return
        if progress.state == "running" and progress.cursor < batch.total:
            return
        rolled = view.counts(batch.total, self.states)
        if progress.state == "cancelling":
            progress.state = "cancelled"
        else:
            progress.state = "failed" if rolled["failed"] else "succeeded"
        progress.ended_at = time.time()
        progress.counts = rolled
        if _true(batch.flags.get("output_oss")):
            progress.manifest = await self._upload_manifest()
        progress.webhook_due = batch.callback_url is not None
        self.events.append(view.event("batch_end", view.rollup(batch, progress)))
        log.info("batch_id=%s: %s %s", batch.batch_id, progress.state, json.dumps(rolled))

    async def _save(self) -> None:
        """Write what this step changed (nothing when it changed nothing: a quiet step is a read)."""
        if self.changed or self.events:
            self.progress.counts = view.counts(self.batch.total, self.states)
            if self.progress.live and self.changed:
                self.events.append(view.event("batch_progress", view.rollup(self.batch, self.progress)))
        self.progress.events += len(self.events)
        saved = self.progress.to_json()
        if saved == self.saved and not self.changed:
            return
        await self.store.save(self.batch_id, self.progress, self.changed, self.events)
        self.changed, self.events, self.saved = {}, [], saved

    async def _deliver_webhook(self) -> None:
        batch, progress = self.batch, self.progress
        assert batch.callback_url is not None
        body = view.event("serverless_batch", view.rollup(batch, progress))
        delivery = await self.feeders.resources.webhooks.deliver(batch.batch_id, batch.callback_url, body)
        progress.webhook, progress.webhook_due = delivery.to_payload(), False
        log.info(
            "batch_id=%s: webhook %s after %d attempt(s)",
            batch.batch_id,
            "delivered" if delivery.delivered else "not delivered",
            delivery.attempts,
        )

    async def _upload_manifest(self) -> dict[str, Any] | None:
        """The manifest, uploaded beside the outputs (with the instance's credentials)."""
        resources = self.feeders.resources
        if resources.storage is None:
            return None
        body = b"".join([line async for line in manifest(resources, self.batch, self.states)])
        credentials = Credentials.resolve({}, resources.settings.oss.credentials)
        try:
            uploaded = await resources.storage.upload(credentials, body, "jsonl", "application/x-ndjson")
        except ServerlessError as exc:
            log.warning("batch_id=%s: its manifest could not be uploaded: %s", self.batch_id, exc.message)
            return None
        return uploaded.to_payload()


async def manifest(resources: Resources, batch: Batch, states: dict[int, str]) -> AsyncIterator[bytes]:
    """The manifest's lines, item by item (the done ones' outputs read from their tasks)."""
    for start in range(0, batch.total, READS_AT_ONCE):
        indices = range(start, min(start + READS_AT_ONCE, batch.total))
        wanted = [states.get(index) == "succeeded" for index in indices]
        summaries = await _gather(
            [
                resources.status.summary(batch.task_id(i)) if want else _none()
                for i, want in zip(indices, wanted, strict=True)
            ]
        )
        for index, summary in zip(indices, summaries, strict=True):
            yield view.manifest_line(batch, index, states.get(index, "pending"), summary)


async def _none() -> None:
    return None


async def _gather(calls: list[Any]) -> list[Any]:
    """The calls' answers in order, READS_AT_ONCE at a time."""
    answers: list[Any] = []
    for start in range(0, len(calls), READS_AT_ONCE):
        answers += await asyncio.gather(*calls[start : start + READS_AT_ONCE])
    return answers


def _true(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false")


def progress_of(batch: Batch) -> Progress:
    """A new batch's first progress."""
    return Progress(started=time.time(), counts=view.counts(batch.total, {}))
