"""The app's long-lived resources, created and closed by the lifespan (`Services.open`).

One aiohttp session for ComfyUI; what jobs need from it (inputs, outputs) is built here, so the
runner receives ready-made collaborators and never reaches for globals.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath
from typing import Any

import aiohttp

from .comfyui.client import ComfyUI
from .comfyui.supervisor import Supervisor, comfyui_command
from .core.request import RunRequest
from .delivery.oss import Credentials, OssConfig, OssStore, read_rules
from .delivery.outputs import OutputCollector
from .errors import ComfyUIUnavailable, InvalidParams
from .inputs.budget import ByteBudget
from .inputs.download import DownloadPolicy, create_download_session, download
from .inputs.resolve import LOADER_INPUTS, InputLimits, resolve_inputs
from .settings import Settings, SettingsError
from .status.log import StatusLog


@dataclass(slots=True)
class Services:
    settings: Settings
    session: aiohttp.ClientSession
    comfy: ComfyUI
    status: StatusLog
    downloads: aiohttp.ClientSession
    download_policy: DownloadPolicy
    oss: OssStore | None = None
    supervisor: Supervisor | None = None
    input_budget: ByteBudget | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Services]:
        """Everything the app needs, opened in order and closed in reverse."""
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            comfy = ComfyUI(session, settings.comfyui_url, settings.request_timeout)
            command = comfyui_command(settings.comfyui_cmd, settings.comfyui_dir, settings.comfyui_port)
            supervisor = Supervisor(command, comfy.answers, settings.comfyui_dir or None) if command else None
            status = StatusLog(settings.status_dir, settings.status_stale_after)
            policy = download_policy(settings)
            budget = input_budget(settings)
            oss = oss_store(settings)
            # Untrusted input URLs get their own session: guarded resolver and connector.
            async with create_download_session(policy) as downloads:
                services = cls(settings, session, comfy, status, downloads, policy, oss, supervisor, budget)
                try:
                    async with _running(supervisor):
                        yield services
                finally:
                    if oss is not None:
                        oss.close()

    @property
    def comfyui_generation(self) -> int:
        """Changes whenever a supervised ComfyUI dies: prompts submitted before are lost."""
        return self.supervisor.generation if self.supervisor else 0

    async def wait_for_comfyui(self) -> None:
        """Jobs arriving while a supervised ComfyUI (re)starts wait for it, bounded."""
        if self.supervisor and not await self.supervisor.wait_ready(self.settings.startup_timeout):
            raise ComfyUIUnavailable(
                f"ComfyUI is not ready after {self.settings.startup_timeout:g}s (starting or restarting)"
            )

    def credentials(self, headers: Mapping[str, str]) -> Credentials | None:
        """OSS credentials of a request: its `x-fc-access-key-*` headers, else the environment."""
        return Credentials.resolve(headers, os.environ)

    def check_supported(self, request: RunRequest, credentials: Credentials | None) -> None:
        """Refuse, before anything runs, what this instance is not configured for."""
        if request.output_oss and self.oss is None:
            raise InvalidParams("output_oss was asked but OSS is not configured (set OSS_BUCKET_DOMAIN)")
        if request.output_oss and credentials is None:
            raise InvalidParams(
                "output_oss was asked but there are no OSS credentials (x-fc-access-key-* headers "
                "or ALIBABA_CLOUD_ACCESS_KEY_ID/SECRET)"
            )

    async def resolve_inputs(self, workflow: dict[str, Any], credentials: Credentials | None) -> dict[str, Any]:
        """Loader inputs (URLs, base64, oss://) fetched and uploaded; file names left as is."""
        read_oss = None
        if self.oss is not None:
            read_oss = partial(self.oss.read, credentials, max_bytes=self.settings.input_max_bytes)
        return await resolve_inputs(
            workflow,
            loaders=LOADER_INPUTS | set(self.settings.input_loaders),
            fetch_url=partial(download, self.downloads, policy=self.download_policy),
            read_oss=read_oss,
            upload=self.comfy.upload_input,
            limits=input_limits(self.settings),
            budget=self.input_budget,
        )

    def output_collector(self, request: RunRequest, credentials: Credentials | None) -> OutputCollector:
        uploader = None
        if request.output_oss and self.oss is not None and credentials is not None:
            uploader = partial(_upload, self.oss, credentials)
        return OutputCollector(
            self.comfy,
            with_content=request.output_base64,
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
            "object": None, "url": None, "expire": None,
        }


@asynccontextmanager
async def _running(supervisor: Supervisor | None) -> AsyncIterator[None]:
    """Run the supervisor (if any) for the life of the app; stop ComfyUI after."""
    if supervisor is None:
        yield
        return
    task = asyncio.create_task(supervisor.run(), name="comfyui supervisor")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


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


def input_limits(settings: Settings) -> InputLimits:
    return InputLimits(
        max_fetch_bytes=settings.input_max_bytes,
        max_base64_bytes=settings.input_max_base64_bytes,
        max_job_bytes=settings.max_input_bytes_per_job,
        max_pixels=settings.input_max_pixels,
        budget_timeout=settings.input_timeout,
    )


def input_budget(settings: Settings) -> ByteBudget:
    """The instance's shared input byte budget; one too small for a single request fails start-up."""
    needed = settings.max_input_bytes_per_job + max(settings.input_max_bytes, settings.input_max_base64_bytes)
    if settings.input_max_inflight_bytes < needed:
        raise SettingsError(
            f"INPUT_MAX_INFLIGHT_BYTES={settings.input_max_inflight_bytes} must be at least "
            f"MAX_INPUT_BYTES_PER_JOB + max(INPUT_MAX_BYTES, INPUT_MAX_BASE64_BYTES) = {needed}"
        )
    return ByteBudget(settings.input_max_inflight_bytes)


async def _upload(store: OssStore, credentials: Credentials, content: bytes, name: str, mime: str) -> dict[str, Any]:
    ext = PurePosixPath(name).suffix.lstrip(".") or "bin"
    uploaded = await store.upload(credentials, content, ext, mime)
    return uploaded.to_payload()


def oss_store(settings: Settings) -> OssStore | None:
    """The OSS client when OSS_BUCKET_DOMAIN is set; bad OSS settings fail start-up, named."""
    try:
        config = OssConfig.from_values(
            settings.oss_bucket_domain, settings.oss_endpoint, settings.oss_sign_endpoint,
            settings.oss_key_prefix, settings.oss_expires_in,
        )
        if config is None:
            return None
        return OssStore(config, read_allowed=read_rules(settings.oss_input_allowed, config))
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
