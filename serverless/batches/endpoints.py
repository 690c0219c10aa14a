"""The batch endpoints, answered by any instance sharing the batch store:

    POST /api/batches                 a batch: `202 {"batch_id", "task_ids"}` once every item checked
    GET  /api/batches/{id}            its roll-up and a page of its items (`?offset=&limit=`)
    GET  /api/batches/{id}/events     its events as SSE, resumed after `Last-Event-ID` / `after=`
    POST /api/batches/{id}/cancel     the rest never submitted, the queued and running ones cancelled
    POST /api/batches/{id}/retry      the failed items run again (new attempts of the same tasks)
    GET  /api/batches/{id}/manifest   JSON lines: each item's parameters, task, state and outputs

With API keys a batch is its creator's key's, as a task is: another key is told it does not
exist (`_visible`, the one check).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..auth import may_see
from ..errors import Conflict, InvalidParams, NotFound
from ..jobs.feed import Event
from ..state import app_state
from ..status.log import parse_after
from ..transports.http import EventStream, read_json
from . import feeder as feeding
from . import spec, view
from .feeder import Feeders, manifest, progress_of
from .items import check_batch
from .spec import Batch, parse_batch
from .store import BatchStore, Progress, check_batch_id

PAGE = 100
MAX_PAGE = 1000


def _feeders(request: Request) -> Feeders:
    feeders = app_state(request).batches
    if feeders is None:
        raise NotFound("batches are not served here")
    return feeders


def _owner(request: Request) -> str | None:
    owner = request.scope.get("state", {}).get("owner")
    return owner if isinstance(owner, str) else None


async def _visible(request: Request) -> tuple[BatchStore, Batch, Progress]:
    """The batch the path names, if this caller may see it (with API keys: its own key's)."""
    store = _feeders(request).store
    batch_id = check_batch_id(request.path_params["batch_id"])
    batch, progress = await store.batch(batch_id), await store.progress(batch_id)
    if batch is None or progress is None or not may_see(_owner(request), batch.owner):
        raise NotFound(f"no batch {batch_id}", raw={"batch_id": batch_id})
    return store, batch, progress


async def create(request: Request) -> Response:
    """POST /api/batches."""
    feeders = _feeders(request)
    resources = app_state(request).resources
    settings = resources.settings
    document = await read_json(request, settings.inputs.max_body_bytes, settings.inputs.timeout)
    batch = parse_batch(
        document,
        request.query_params,
        spec.MAX_ITEMS,
        owner=_owner(request),
        base_url=str(request.base_url),
        created=time.time(),
    )
    await check_batch(resources, batch)
    await feeders.store.create(batch, progress_of(batch))
    await feeders.take(batch.batch_id)  # fed here from now on (unless this instance feeds none)
    task_ids = [batch.task_id(index) for index in range(batch.total)]
    return JSONResponse({"batch_id": batch.batch_id, "total": batch.total, "task_ids": task_ids}, status_code=202)


async def get(request: Request) -> Response:
    """GET /api/batches/{id}?offset=&limit=: the roll-up, and the page's items (outputs of the
    done ones)."""
    store, batch, progress = await _visible(request)
    offset, limit = _page(request.query_params)
    states = await store.states(batch.batch_id)
    status = app_state(request).resources.status
    indices = range(offset, min(offset + limit, batch.total))
    summaries = await asyncio.gather(
        *(status.summary(batch.task_id(i)) if states.get(i) == "succeeded" else _none() for i in indices)
    )
    items = [
        _item(batch, index, states.get(index, "pending"), summary)
        for index, summary in zip(indices, summaries, strict=True)
    ]
    answer = view.rollup(batch, progress)
    answer.update(items=items, offset=offset, next_offset=indices.stop if indices.stop < batch.total else None)
    return JSONResponse(answer)


def _item(batch: Batch, index: int, state: str, summary: dict[str, Any] | None) -> dict[str, Any]:
    item: dict[str, Any] = {"index": index, "task_id": batch.task_id(index), "state": state}
    item["parameters"] = batch.item(index)
    if state == "succeeded":
        item["outputs"] = view.outputs(summary)
    return item


def _page(query: Mapping[str, str]) -> tuple[int, int]:
    try:
        offset, limit = int(query.get("offset", "0")), int(query.get("limit", str(PAGE)))
    except ValueError:
        raise InvalidParams("offset and limit must be whole numbers") from None
    if offset < 0 or not 0 <= limit <= MAX_PAGE:
        raise InvalidParams(f"offset must be at least 0 and limit 0 to {MAX_PAGE}")
    return offset, limit


async def _none() -> None:
    return None


async def cancel(request: Request) -> Response:
    """POST /api/batches/{id}/cancel: 202 while its items stop; 409 once it has ended."""
    store, batch, progress = await _visible(request)
    if progress.state not in ("running", "cancelling"):
        raise Conflict(f"batch {batch.batch_id} has ended ({progress.state})", raw={"state": progress.state})
    await store.ask_cancel(batch.batch_id)
    await _feeders(request).take(batch.batch_id)  # if its feeder is gone, fed (and stopped) from here
    state = await _seen(request, batch.batch_id, lambda progress: progress.state != "running")
    return JSONResponse({"batch_id": batch.batch_id, "state": state}, status_code=202)


async def retry(request: Request) -> Response:
    """POST /api/batches/{id}/retry: its failed items run again, as new attempts of the same tasks
    (their ids stay; `?attempt=` of the status API reads the earlier ones)."""
    store, batch, progress = await _visible(request)
    if progress.state in ("cancelling", "cancelled"):
        raise Conflict(f"batch {batch.batch_id} was cancelled", raw={"state": progress.state})
    states = await store.states(batch.batch_id)
    failed = sorted(index for index, state in states.items() if state == "failed")
    state = progress.state
    if failed:
        await store.ask_retry(batch.batch_id, failed)
        await _feeders(request).take(batch.batch_id)
        state = await _seen(request, batch.batch_id, lambda progress: progress.live and not progress.webhook_due)
    task_ids = [batch.task_id(i) for i in failed]
    return JSONResponse({"batch_id": batch.batch_id, "state": state, "retried": len(failed), "task_ids": task_ids}, 202)


async def _seen(request: Request, batch_id: str, taken: Callable[[Progress], bool]) -> str:
    """The batch's state once its feeder has taken a request up (`taken`), so that a caller's next
    look sees it; or, when no feeder did within a lease's time, as it stands (it will)."""
    feeders = _feeders(request)
    deadline = time.monotonic() + feeders.settings.lease_seconds
    while True:
        progress = await feeders.store.progress(batch_id)
        if progress is None or taken(progress) or time.monotonic() > deadline:
            return progress.state if progress is not None else "unknown"
        await asyncio.sleep(feeding.POLL_INTERVAL)


async def manifest_lines(request: Request) -> Response:
    """GET /api/batches/{id}/manifest: one JSON line per item (`index`, `task_id`, `state`,
    `parameters`, `outputs`)."""
    store, batch, _ = await _visible(request)
    states = await store.states(batch.batch_id)
    lines = manifest(app_state(request).resources, batch, states)
    headers = {"Content-Disposition": f'attachment; filename="{batch.batch_id}.jsonl"'}
    return StreamingResponse(lines, media_type="application/x-ndjson", headers=headers)


async def events(request: Request) -> Response:
    """GET /api/batches/{id}/events: `batch_item`, `batch_progress` and last `batch_end`, as SSE
    with ids, resumed after `Last-Event-ID` (else `after=N`)."""
    store, batch, _ = await _visible(request)
    last_seen = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    settings = app_state(request).resources.settings
    source = BatchEvents(batch.batch_id, store, feeding.POLL_INTERVAL)
    return EventStream(source, settings, parse_after(last_seen))


class BatchEvents:
    """A batch's events as the SSE renderer reads a job's (`jobs.runner.EventSource`): read from
    the store as the feeder appends them, until `batch_end` with nothing after it."""

    def __init__(self, batch_id: str, store: BatchStore, poll: float) -> None:
        self.task_id = batch_id  # the renderer's name for what it follows
        self.store, self.poll = store, poll

    async def events(
        self, after: int | None = None, idle: float | None = None, previews: bool = False
    ) -> AsyncIterator[Event | None]:
        cursor, quiet = after or 0, 0.0
        while True:
            found = await self.store.events(self.task_id, cursor)
            ends = False  # a `batch_end` last, and the batch no longer live: the stream's end
            if found and found[-1][1].startswith(b'{"type": "batch_end"'):
                progress = await self.store.progress(self.task_id)
                ends = progress is None or not progress.live
            for index, (seq, data) in enumerate(found, 1):
                cursor = seq
                yield Event(seq, data, terminal=ends and index == len(found))
            if ends:
                return
            quiet = 0.0 if found else quiet + self.poll
            if idle is not None and quiet >= idle:
                quiet = 0.0
                yield None
            await asyncio.sleep(self.poll)

    async def finished(self) -> Event:
        raise NotImplementedError("a batch's stream is only rendered as SSE")

    async def more_after(self, seq: int, within: float) -> bool:
        return False
