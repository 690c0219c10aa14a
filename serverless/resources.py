"""The app's long-lived resources, opened and closed by the lifespan (`Resources.open`).

One aiohttp session for ComfyUI, one guarded session for input downloads, the OSS client, the
status log folder, the ComfyUI supervisor when this instance starts ComfyUI itself; and, built
from them once, the `Runtime` every job receives: what it calls, never a bag to reach into.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath
from typing import Any

from .comfyui.client import ComfyUI, Timeouts
from .comfyui.supervisor import Supervisor, comfyui_command
from .delivery.oss import Credentials, OssConfig, OssStore
from .delivery.outputs import OutputCollector
from .errors import ComfyUIUnavailable
from .inputs.download import DownloadPolicy, create_download_session, download
from .inputs.resolve import LOADER_INPUTS, resolve_inputs
from .jobs.job import Runtime, Workflow
from .jobs.spec import OutputPolicy
from .settings import Settings, SettingsError
from .status.log import StatusLog
from .status.redis import RedisStatus, connect
from .status.store import StatusStore
from .workflows.hosting import HostedWorkflows, ObjectInfoCache
from .workflows.store import WorkflowStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resources:
    """What the app holds for its whole life."""

    settings: Settings
    comfy: ComfyUI
    status: StatusStore[Any]
    fetch_url: Callable[[str], Awaitable[bytes]]
    oss: OssStore | None
    supervisor: Supervisor | None
    reserved_output_dirs: tuple[tuple[str, ...], ...]
    workflows: HostedWorkflows

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Resources]:
        """Everything the app needs, opened in order and closed in reverse."""
        timeouts = Timeouts(settings.connect_timeout, settings.request_timeout, settings.reconnect_timeout)
        async with ComfyUI.open(settings.comfyui_url, timeouts) as comfy:
            command = comfyui_command(settings.comfyui_cmd, settings.comfyui_dir, settings.comfyui_port)
            supervisor = None
            if command and settings.role != "gateway":  # a Redis-tier gateway has no ComfyUI
                supervisor = Supervisor(
                    command,
                    comfy.answers,
                    settings.comfyui_dir or None,
                    address=(settings.comfyui_host, settings.comfyui_port),
                )
            status = await open_status(settings)
            policy = download_policy(settings)
            oss = oss_store(settings)
            # Untrusted input URLs get their own session: guarded resolver and connector.
            async with create_download_session(policy) as downloads:
                try:
                    async with _running(supervisor):
                        fetch_url = partial(download, downloads, policy=policy)
                        reserved = settings.reserved_output_dirs  # resolved once: it reads the disk
                        workflows = hosted_workflows(settings, comfy, supervisor)
                        yield cls(settings, comfy, status, fetch_url, oss, supervisor, reserved, workflows)
                finally:
                    await status.aclose()
                    if oss is not None:
                        oss.close()

    def runtime(self) -> Runtime:
        """The collaborators every job uses."""
        return Runtime(
            comfy=self.comfy,
            resolve_inputs=self.resolve_inputs,
            collect_outputs=self.output_collector,
            comfyui_ready=self.comfyui_ready,
            comfyui_generation=self.comfyui_generation,
            instance_id=self.settings.instance_id,
            job_timeout=self.settings.job_timeout,
        )

    def comfyui_generation(self) -> int:
        """Changes whenever a supervised ComfyUI dies: prompts submitted before are lost."""
        return self.supervisor.generation if self.supervisor else 0

    async def comfyui_ready(self) -> int:
        """Jobs arriving while a supervised ComfyUI (re)starts wait for it, bounded; returns the
        generation they will run on."""
        timeout = self.settings.startup_timeout
        if self.supervisor and not await self.supervisor.wait_ready(timeout):
            raise ComfyUIUnavailable(f"ComfyUI is not ready after {timeout:g}s (starting or restarting)")
        return self.comfyui_generation()

    async def resolve_inputs(self, workflow: Workflow, credentials: Credentials | None) -> Workflow:
        """Loader inputs (URLs, base64, oss://) fetched and uploaded; file names left as is."""
        read_oss = None
        if self.oss is not None:
            read_oss = partial(self.oss.read, credentials, max_bytes=self.settings.input_max_bytes)
        return await resolve_inputs(
            workflow,
            loaders=LOADER_INPUTS | set(self.settings.input_loaders),
            fetch_url=self.fetch_url,
            read_oss=read_oss,
            upload=self.comfy.upload_input,
            max_base64_bytes=self.settings.input_max_base64_bytes,
        )

    def output_collector(self, policy: OutputPolicy, credentials: Credentials | None) -> OutputCollector:
        """Reads a job's outputs (and uploads them to OSS when asked)."""
        uploader = None
        if policy.oss and self.oss is not None and credentials is not None:
            uploader = partial(_upload, self.oss, credentials)
        return OutputCollector(
            self.comfy,
            with_content=policy.base64,
            uploader=uploader,
            concurrency=self.settings.output_concurrency,
            empty_oss=self.empty_oss(),
        )

    def empty_oss(self) -> dict[str, Any]:
        """The `oss` object of an output that was not uploaded: where it would go, no object."""
        config = self.oss.config if self.oss is not None else None
        return {
            "region": config.region if config else None,
            "bucket": config.bucket if config else None,
            "object": None,
            "url": None,
            "expire": None,
        }


async def open_status(settings: Settings) -> StatusStore[Any]:
    """The status store STATUS_BACKEND names, probed once at start-up (loudly when unusable)."""
    if settings.status_backend == "redis":
        store = RedisStatus(
            connect(settings.redis_url),
            settings.status_stale_after,
            settings.status_retention_days,
            settings.redis_max_event_bytes,
        )
        if not await store.writable():
            log.error(
                "Redis cannot be reached (%s): jobs are refused until it answers",
                store.health()["not_writable_because"],
            )
        return store
    status = StatusLog(settings.status_dir, settings.status_stale_after)
    await status.check_at_startup()
    return status


@asynccontextmanager
async def _running(supervisor: Supervisor | None) -> AsyncIterator[None]:
    """Run the supervisor (if any) for the life of the app; stop ComfyUI after."""
    if supervisor is None:
        yield
        return
    await supervisor.check_port()  # a ComfyUI we did not start already answers: refuse to start
    task = asyncio.create_task(supervisor.run(), name="comfyui supervisor")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def hosted_workflows(settings: Settings, comfy: ComfyUI, supervisor: Supervisor | None) -> HostedWorkflows:
    """The hosted workflows' folder, checked against `/object_info` read once per ComfyUI process."""
    generation = (lambda: supervisor.generation) if supervisor else (lambda: 0)
    object_info = ObjectInfoCache(comfy.object_info, generation)
    loaders = LOADER_INPUTS | set(settings.input_loaders)
    return HostedWorkflows(WorkflowStore(settings.workflows_dir), object_info, loaders)


def download_policy(settings: Settings) -> DownloadPolicy:
    """The input download rules; a bad INPUT_ALLOWED_HOSTS entry fails start-up, named."""
    try:
        return DownloadPolicy(
            max_bytes=settings.input_max_bytes,
            total_timeout=settings.input_timeout,
            allow_private=settings.input_allow_private,
            allowed_hosts=frozenset(settings.input_allowed_hosts),
        )
    except ValueError as exc:
        raise SettingsError(f"INPUT_ALLOWED_HOSTS: {exc}") from exc


async def _upload(store: OssStore, credentials: Credentials, content: bytes, name: str, mime: str) -> dict[str, Any]:
    ext = PurePosixPath(name).suffix.lstrip(".") or "bin"
    uploaded = await store.upload(credentials, content, ext, mime)
    return uploaded.to_payload()


def oss_store(settings: Settings) -> OssStore | None:
    """The OSS client when OSS_BUCKET_DOMAIN is set; bad OSS settings fail start-up, named."""
    try:
        config = OssConfig.from_values(
            settings.oss_bucket_domain,
            settings.oss_endpoint,
            settings.oss_sign_endpoint,
            settings.oss_key_prefix,
            settings.oss_expires_in,
        )
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
    return OssStore(config) if config is not None else None
