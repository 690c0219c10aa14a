"""Batches and sweeps: thousands of jobs as one durable unit (`POST /api/batches`).

    spec       a batch as asked (pure): workflow, items or a sweep, the run flags
    items      each item checked before anything runs, then started as an async task of ours
    store      where batches live: `FileBatches` (the status folder) or `RedisBatches` (the fleet)
    feeder     one instance (the lease holder) keeps a bounded window of a batch's items in flight
    view       roll-up, outputs, manifest lines, events (pure)
    endpoints  the HTTP API

Each item is an ordinary task (`<batch id>-<index>`): its own status, events and outputs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.routing import BaseRoute, Route

from ..state import AppState
from . import endpoints
from .feeder import Feeders
from .redis import RedisBatches
from .store import BatchStore, FileBatches


def routes() -> list[BaseRoute]:
    return [
        Route("/api/batches", endpoints.create, methods=["POST"]),
        Route("/api/batches/{batch_id}", endpoints.get, methods=["GET"]),
        Route("/api/batches/{batch_id}/events", endpoints.events, methods=["GET"]),
        Route("/api/batches/{batch_id}/cancel", endpoints.cancel, methods=["POST"]),
        Route("/api/batches/{batch_id}/retry", endpoints.retry, methods=["POST"]),
        Route("/api/batches/{batch_id}/manifest", endpoints.manifest_lines, methods=["GET"]),
    ]


@asynccontextmanager
async def feeding(state: AppState) -> AsyncIterator[None]:
    """This app's batches (`state.batches`): fed here unless it is a fleet's worker (workers run
    items; gateways, or one box, feed them)."""
    resources = state.resources
    settings = resources.settings
    store: BatchStore
    if resources.redis is not None:
        store = RedisBatches(resources.redis.client, resources.redis.ttl)
    else:
        store = FileBatches(settings.status.dir / "~batches")
    holder = f"{settings.service.instance_id}-{uuid.uuid4().hex[:8]}"  # a restarted instance is another holder
    feeders = Feeders(resources, state.jobs, store, settings.batches, holder, feeds=settings.fleet.role != "worker")
    state.batches = feeders
    looking = asyncio.create_task(feeders.run_forever(), name="batches") if feeders.feeds else None
    try:
        yield
    finally:
        if looking is not None:
            looking.cancel()
            await asyncio.gather(looking, return_exceptions=True)
        await feeders.aclose()
