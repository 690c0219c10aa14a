"""The Redis tier (`QUEUE_BACKEND=redis`): gateways enqueue jobs, workers run them.

`running` is what the app's lifespan enters: it yields the jobs object the transports use (a
gateway's `RemoteJobs`, or the app's own `Jobs` when there is no queue) and runs this instance's
consumer when its ROLE takes jobs. Job control's endpoints serve the tier too: a cancel goes
through the queue (`RemoteJobs.queue`), summaries and events are read from the status streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ..comfyui.client import ComfyUI
from ..errors import ServerlessError
from ..jobs.registry import Jobs
from ..jobs.runner import JobRunner
from ..resources import Resources
from ..settings import Settings, SettingsError
from ..status.redis import RedisStatus
from . import staging
from .admission import stale_after
from .affinity import Affinity
from .gateway import RemoteJobs
from .healing import Healing
from .heartbeat import Heartbeat
from .queue import RedisQueue
from .worker import Consumer

log = logging.getLogger(__name__)

PUBLISH_EVERY = 60.0  # seconds between a worker's announcements of its ComfyUI's nodes
INFO_PATHS = ("/system_stats", "/embeddings", "/models")
CONSUMER_STOP = 5.0  # seconds a drained worker's consumer has to acknowledge or hand back its last job


@dataclass(frozen=True, slots=True)
class Fleet:
    """What the transports start jobs with, and this instance's consumer (None: takes no jobs)."""

    jobs: JobRunner
    consumer: Consumer | None


@contextlib.asynccontextmanager
async def running(resources: Resources, jobs: Jobs) -> AsyncIterator[Fleet]:
    """The jobs object callers start jobs with, and (ROLE=all|worker) the consumer, for the life
    of the app. Without QUEUE_BACKEND=redis: `jobs` itself, nothing else."""
    settings = resources.settings
    if settings.fleet.queue_backend != "redis":
        yield Fleet(jobs, None)
        return
    status = resources.redis
    if status is None:
        raise SettingsError("QUEUE_BACKEND=redis needs STATUS_BACKEND=redis")  # settings refuse it already
    takes_jobs = settings.fleet.role in ("all", "worker")
    inputs_ttl = staging.ttl(
        settings.fleet.queue_ttl, settings.service.job_timeout, settings.fleet.claim_idle, status.ttl
    )
    stale = stale_after(settings.service.job_timeout, settings.fleet.queue_ttl, settings.fleet.claim_idle)
    queue = RedisQueue(status.client, status, stale, resources.tenants.usage, inputs_ttl)
    storage = resources.storage
    front = RemoteJobs(
        queue,
        status,
        jobs if takes_jobs else None,
        settings.fleet.max_queued_jobs,
        resources.metrics,
        settings.fleet.queue_ttl,
        caller_credentials_upload=storage is not None and storage.scheme == "oss",
    )
    consumer_task: asyncio.Task[None] | None = None
    consumer = None
    publisher: asyncio.Task[None] | None = None
    beating: asyncio.Task[None] | None = None
    heartbeat: Heartbeat | None = None
    if takes_jobs:
        publisher = asyncio.create_task(publish_object_info(resources, status), name="publish object_info")
        name = f"{settings.service.instance_id}:{settings.service.port}"
        lane = settings.scheduling.worker_lane
        heartbeat = Heartbeat(status.client, resources.comfy, name, lane, resources.metrics)
        beating = asyncio.create_task(heartbeat.run_forever(), name=f"heartbeat {name}")
        consumer = Consumer(status.client, status, jobs, settings, name)
        consumer.heartbeat = heartbeat
        consumer.affinity = Affinity(status.client, heartbeat, consumer.streams, settings.scheduling.affinity_wait)
        consumer.healing = Healing(
            resources.comfy,
            resources.supervisor,
            settings.scheduling,
            resources.metrics,
            heartbeat,
            settings.comfyui.startup_timeout,
        )
        consumer_task = asyncio.create_task(consumer.run_forever(), name=f"consumer {consumer.name}")
        log.info("worker %s takes jobs from Redis (lane %r) for ComfyUI at %s", name, lane, settings.comfyui.url)
    try:
        yield Fleet(front, consumer)
    finally:
        if consumer_task is not None and not jobs.accepting:  # drained: its job acknowledged or handed back
            if consumer is not None and consumer.waiting:
                consumer_task.cancel()  # idle in its blocking read: no job to finish, no wait for the read's end
            await asyncio.wait({consumer_task}, timeout=CONSUMER_STOP)
        for task in (consumer_task, publisher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if beating is not None:  # bounded: a beat stuck in a call to a stopping peer never holds the shutdown
            beating.cancel()
            await asyncio.wait([beating], timeout=2.0)
        if heartbeat is not None:
            await heartbeat.leave()


async def publish_object_info(resources: Resources, status: RedisStatus, every: float = PUBLISH_EVERY) -> None:
    """Tell gateways which nodes (and model files) this worker's ComfyUI has: at once, then every
    `every` seconds (a restarted ComfyUI may have gained custom nodes); a ComfyUI or Redis that
    does not answer is tried again a second later."""
    while True:
        try:
            await status.publish_object_info(await resources.comfy.object_info())
            await status.publish_comfyui_info(await comfyui_info(resources.comfy))
        except ServerlessError as exc:
            log.info("object_info not published yet (%s); again in 1s", exc.message)
            await asyncio.sleep(1.0)
            continue
        await asyncio.sleep(every)


async def comfyui_info(comfy: ComfyUI) -> dict[str, Any]:
    """The informational answers ComfyUI's own API serves on a gateway, as this worker's ComfyUI
    gives them (`/models/<folder>` for each folder `/models` lists); one it does not answer is
    left out (a gateway then answers 404 for it)."""
    answers: dict[str, Any] = {}
    paths = list(INFO_PATHS)
    while paths:
        path = paths.pop(0)
        try:
            answers[path] = await comfy.read_info(path)
        except ServerlessError:
            continue
        if path == "/models" and isinstance(answers[path], list):
            paths += [f"/models/{quote(str(folder), safe='')}" for folder in answers[path]]
    return answers


def health(settings: Settings, consumer: Consumer | None) -> dict[str, Any]:
    """The tier's part of the health answer."""
    taking = None if consumer is None else consumer.health()
    return {"role": settings.fleet.role, "queue": settings.fleet.queue_backend, "consumer": taking}
