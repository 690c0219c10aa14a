"""The app's long-lived resources, opened and closed by the lifespan (`Resources.open`).

One aiohttp session for ComfyUI, one guarded session for input downloads, the OSS client, the
status log folder, the ComfyUI supervisor when this instance starts ComfyUI itself; and, built
from them once, the `Runtime` every job receives: what it calls, never a bag to reach into.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from .comfyui import client as comfyui_client
from .comfyui.client import ComfyUI, Timeouts
from .comfyui.folders import Folders, started_folders
from .comfyui.supervisor import Supervisor, comfyui_command
from .core.conversion import Conversion
from .core.credentials import Credentials
from .delivery import convert, converted, links, outputs
from .delivery import webhooks as webhook_delivery
from .delivery.convert import Converter
from .delivery.converted import ConvertedFiles
from .delivery.oss_config import OssConfig, read_rules
from .delivery.outputs import Keeper, OutputCollector, ReadyCallback
from .delivery.recent import RecentFiles
from .delivery.s3_config import config_from_settings
from .delivery.storage import Source, Storage
from .delivery.webhooks import Webhooks
from .errors import ComfyUIUnavailable, InputError, InvalidParams, OutputError, ServerlessError
from .inputs import verify
from .inputs.budget import ByteBudget
from .inputs.download import DownloadPolicy, create_download_session, download, post
from .inputs.resolve import LOADER_INPUTS, InputLimits, resolve_inputs
from .jobs import previews
from .jobs.job import Publish, Release, Runtime, Workflow
from .jobs.spec import OutputPolicy
from .models import fetch, listing
from .models.metrics import ModelMetrics
from .models.needs import preload
from .models.refs import ModelRef, model_loaders
from .models.resolve import check_references, resolve_models
from .models.store import ModelStore
from .models.tasks import run_task
from .ops.metrics import Metrics
from .settings import Settings, SettingsError
from .status import log as status_log
from .status import redis as redis_status
from .status.log import StatusLog
from .status.redis import RedisStatus, connect
from .status.store import StatusStore
from .tenants.limits import MemoryRate, RedisRate
from .tenants.service import Tenants
from .tenants.usage import BufferedUsage, FileUsage, RedisUsage

if TYPE_CHECKING:  # the bucket's clients load oss2 or obstore: only an instance with that bucket does
    from .delivery.oss import OssStore
    from .delivery.s3 import S3Store
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
    storage: Storage | None  # the bucket STORAGE names (OSS or S3)
    supervisor: Supervisor | None
    reserved_output_dirs: tuple[tuple[str, ...], ...]
    workflows: HostedWorkflows
    input_budget: ByteBudget
    webhooks: Webhooks
    metrics: Metrics
    converted: ConvertedFiles
    redis: RedisStatus | None = None  # the status store again when it is Redis: the fleet's queue shares it
    tenants: Tenants = field(default_factory=Tenants)  # rate limits, a box's key gates, usage per key
    models: ModelStore | None = None  # MODELS_DIR's store, where this instance runs jobs
    recent: RecentFiles = field(default_factory=RecentFiles)  # a box's newest outputs of ComfyUI's API

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[Resources]:
        """Everything the app needs, opened in order and closed in reverse; what they do is
        counted in `metrics`."""
        metrics = metrics or Metrics()
        timeouts = Timeouts(
            comfyui_client.CONNECT_TIMEOUT, comfyui_client.REQUEST_TIMEOUT, settings.comfyui.startup_timeout
        )
        command = comfyui_command(settings.comfyui.cmd, settings.comfyui.dir, settings.comfyui.port)
        runs_jobs = settings.fleet.role != "gateway"  # a fleet's gateway has no ComfyUI: no websocket to it
        async with ComfyUI.open(settings.comfyui.url, timeouts, comfyui_folders(settings, command), runs_jobs) as comfy:
            supervisor = None
            if command and runs_jobs:
                supervisor = Supervisor(
                    command,
                    comfy.answers,
                    settings.comfyui.dir or None,
                    address=(settings.comfyui.host, settings.comfyui.port),
                )
            if supervisor is not None:
                metrics.watch_comfyui_restarts(lambda: supervisor.generation)
            status, redis = await open_status(settings, metrics)
            policy = download_policy(settings)
            budget = input_budget(settings)
            store = await open_storage(settings, metrics.oss_retried)
            hooks_policy = webhook_policy(settings)
            models_policy = model_policy(settings)
            # Untrusted input, webhook and model URLs get their own sessions: guarded resolver and connector.
            async with (
                create_download_session(policy) as downloads,
                create_download_session(hooks_policy) as hooks,
                create_download_session(models_policy) as model_downloads,
            ):
                webhooks = Webhooks(
                    partial(post, hooks),
                    hooks_policy,
                    settings.security.webhook_secret,
                    webhook_delivery.TIMEOUT,
                    status.record_webhook,
                    metrics.webhook_delivered,
                )
                try:
                    async with _running(supervisor):
                        fetch_url = metrics.metered_fetch(partial(download, downloads, policy=policy), "url")
                        reserved = settings.reserved_output_dirs  # resolved once: it reads the disk
                        workflows = hosted_workflows(settings, comfy, supervisor, redis)
                        model_store = None
                        if runs_jobs and settings.models.cache is not None:
                            model_store = await asyncio.to_thread(
                                open_model_store,
                                settings,
                                partial(_download_model, model_downloads, models_policy, settings, store),
                                ModelMetrics(metrics.registry),
                                partial(
                                    _changed, workflows, redis if settings.fleet.queue_backend == "redis" else None
                                ),
                            )
                            if redis is not None and settings.fleet.queue_backend == "redis":
                                await _publish_models(redis, settings.service.instance_id, model_store)
                            if settings.models.preload_workflows:  # before the app answers: before ready
                                await preload(
                                    model_store,
                                    workflows.store,
                                    settings.models.preload_workflows,
                                    model_loaders(settings.models.inputs),
                                    Credentials.resolve({}, settings.oss.credentials),
                                )
                        try:
                            yield cls(
                                settings,
                                comfy,
                                status,
                                fetch_url,
                                store,
                                supervisor,
                                reserved,
                                workflows,
                                budget,
                                webhooks,
                                metrics,
                                converted_files(settings),
                                redis,
                                open_tenants(settings, redis),
                                model_store,
                            )
                        finally:  # the jobs are drained by now: their webhooks are the last to wait for
                            await webhooks.drain(webhook_delivery.TIMEOUT + 1)
                            if model_store is not None:
                                await model_store.aclose()
                finally:
                    await status.aclose()
                    if store is not None:
                        store.close()

    def runtime(self) -> Runtime:
        """The collaborators every job uses."""
        return Runtime(
            comfy=self.comfy,
            resolve_inputs=self.resolve_inputs,
            collect_outputs=self.output_collector,
            comfyui_ready=self.comfyui_ready,
            comfyui_generation=self.comfyui_generation,
            instance_id=self.settings.service.instance_id,
            job_timeout=self.settings.service.job_timeout,
            max_result_bytes=self.settings.fleet.result_inline_max_bytes if self.fleet_worker else 0,
            preview_max_fps=previews.MAX_FPS,
            preview_in_status=self.settings.stream.preview_in_status,
            resolve_models=self.resolve_models,
            model_tasks=self.model_tasks,
            out_of_memory=self.metrics.comfyui_ooms.inc,
            freed=self.metrics.comfyui_frees.inc,
        )

    @property
    def model_loaders(self) -> dict[tuple[str, str], str]:
        """The loader inputs MODEL_INPUTS adds to the built-in ones (`serverless.models.refs`)."""
        return model_loaders(self.settings.models.inputs)

    def check_models(self, workflow: Workflow) -> None:
        """Refuse a malformed model reference, or a URL the host policy blocks, before a job
        starts (a gateway too: no GPU time is spent on it)."""
        check_references(workflow, self.model_loaders, model_policy(self.settings))

    async def resolve_models(
        self, workflow: Workflow, credentials: Credentials | None
    ) -> tuple[Workflow, list[dict[str, Any]], Release]:
        """Model references fetched into the store and placed; held in use until released."""
        resolved = await resolve_models(workflow, self.models, self.model_loaders, credentials)
        return resolved.workflow, resolved.models, resolved.release or _nothing

    async def model_tasks(
        self, task: dict[str, Any], credentials: Credentials | None, publish: Publish
    ) -> dict[str, Any]:
        """An import, delete or pin of the models API, here where the models live."""
        if self.models is None:
            raise InvalidParams("this instance has no model store (set MODELS_DIR)")
        return await run_task(self.models, task, credentials, publish)

    @property
    def fleet_worker(self) -> bool:
        """Whether this instance runs jobs for a fleet's gateways: what its jobs deliver must
        travel through Redis (base64 outputs, linked files), bounded by RESULT_INLINE_MAX_BYTES."""
        return (
            self.redis is not None
            and self.settings.fleet.queue_backend == "redis"
            and self.settings.fleet.role != "gateway"
        )

    def comfyui_generation(self) -> int:
        """Changes whenever a supervised ComfyUI dies: prompts submitted before are lost."""
        return self.supervisor.generation if self.supervisor else 0

    async def comfyui_ready(self) -> int:
        """Jobs arriving while a supervised ComfyUI (re)starts wait for it, bounded; returns the
        generation they will run on."""
        timeout = self.settings.comfyui.startup_timeout
        if self.supervisor and not await self.supervisor.wait_ready(timeout):
            raise ComfyUIUnavailable(f"ComfyUI is not ready after {timeout:g}s (starting or restarting)")
        return self.comfyui_generation()

    async def resolve_inputs(self, workflow: Workflow, credentials: Credentials | None) -> Workflow:
        """Loader inputs (URLs, base64, oss://, s3://) fetched and uploaded; file names left as is."""
        read_oss = read_s3 = None
        if self.storage is not None:
            read = partial(self.storage.read, credentials, max_bytes=self.settings.inputs.max_bytes)
            if self.storage.scheme == "s3":
                read_s3 = self.metrics.metered_fetch(read, "s3")
            else:
                read_oss = self.metrics.metered_fetch(read, "oss")
        return await resolve_inputs(
            workflow,
            loaders=LOADER_INPUTS | set(self.settings.inputs.loaders),
            fetch_url=self.fetch_url,
            read_oss=read_oss,
            read_s3=read_s3,
            upload=self.comfy.upload_input,
            # Co-located: a big base64 input is written in the worker thread that decoded it.
            write_here=self.comfy.write_input_here if self.comfy.folders.input is not None else None,
            limits=input_limits(self.settings),
            budget=self.input_budget,
        )

    def output_collector(
        self, policy: OutputPolicy, credentials: Credentials | None, on_ready: ReadyCallback | None = None
    ) -> OutputCollector:
        """Reads a job's outputs (converts them, uploads them to OSS, links them, when asked);
        `on_ready` is told of each as soon as it is done."""
        uploader = None
        storage = self.storage
        if policy.oss and storage is not None and storage.missing_credentials(credentials) is None:
            uploader = partial(_upload, storage, credentials, self.metrics)
        keep = None
        if (policy.url is not None or policy.keep) and self.fleet_worker:
            keep = self._file_keeper(policy)
        # One box's outputs of ComfyUI's API: kept a moment in memory for its `/view` (`recent`).
        recent = self.recent if policy.keep and not self.fleet_worker else None
        return OutputCollector(
            self.comfy,
            with_content=policy.base64,
            uploader=uploader,
            concurrency=outputs.CONCURRENCY,
            empty_oss=self.empty_oss(),
            conversion=policy.convert,
            on_ready=on_ready,
            link=partial(self.file_link, policy) if policy.url is not None else None,
            keep=keep,
            converter=self.converted.converter,
            recent=recent,
        )

    def _file_keeper(self, policy: OutputPolicy) -> Keeper:
        """Keeps a job's linked outputs in Redis, where every gateway serves their links from
        (gateways have no ComfyUI to read them from), up to RESULT_INLINE_MAX_BYTES a job."""
        assert self.redis is not None
        store, limit, kept = self.redis, self.settings.fleet.result_inline_max_bytes, [0]

        async def keep(item: Mapping[str, Any], content: bytes, mime: str) -> None:
            kept[0] += len(content)
            if kept[0] > limit:
                raise OutputError(too_big_to_travel(kept[0], limit), raw={"bytes": kept[0], "limit": limit})
            await store.keep_file(links.stored_name(item, policy.convert), content, mime)

        return keep

    async def stored_file(self, item: Mapping[str, Any], conversion: Conversion) -> tuple[bytes, str] | None:
        """A linked output a fleet's worker kept in Redis (as served: converted); None on one
        box, or when it is not (or no longer) kept."""
        if self.redis is None or self.settings.fleet.queue_backend != "redis":
            return None
        return await self.redis.read_file(links.stored_name(item, conversion))

    async def recent_output(self, item: Mapping[str, Any]) -> tuple[bytes, str] | None:
        """On one box, an output of ComfyUI's API its job read a moment ago, or is reading
        (`recent`): its bytes and content type as `/view` serves them from ComfyUI's folder; None
        on a fleet (its workers keep theirs in Redis: `stored_file`), or when it is not (or no
        longer) kept."""
        if self.redis is not None and self.settings.fleet.queue_backend == "redis":
            return None
        return await self.recent.wait_get(item)

    def file_link(self, policy: OutputPolicy, item: Mapping[str, Any]) -> str:
        """The signed download link of an output, under the base URL the caller reached us at."""
        assert policy.url is not None
        expires = int(time.time()) + self.settings.outputs.link_expires
        token = links.sign(self.settings.security.file_link_secret.encode(), item, expires, policy.convert)
        return f"{policy.url.rstrip('/')}/api/files/{token}"

    def empty_oss(self) -> dict[str, Any]:
        """The `oss` object of an output that was not uploaded: where it would go, no object."""
        storage = self.storage
        return {
            "region": storage.region if storage else None,
            "bucket": storage.bucket if storage else None,
            "object": None,
            "url": None,
            "expire": None,
        }


USAGE_FOLDER = "~usage"  # in STATUS_DIR; `~` is in no task id, so no task's log can take its name


def open_tenants(settings: Settings, redis: RedisStatus | None) -> Tenants:
    """Rate limits and usage where the status is: in memory and the status folder on a box,
    in Redis (shared by every gateway) when the status store is Redis."""
    days = settings.status.retention_days
    if redis is not None:
        return Tenants(RedisRate(redis.client), BufferedUsage(RedisUsage(redis.client, days)))
    return Tenants(MemoryRate(), BufferedUsage(FileUsage(settings.status.dir / USAGE_FOLDER, days)))


async def open_status(settings: Settings, metrics: Metrics) -> tuple[StatusStore[Any], RedisStatus | None]:
    """The status store STATUS_BACKEND names, probed once at start-up (loudly when unusable);
    the Redis store a second time when it is the one (a fleet's queue shares its client)."""
    if settings.status.backend == "redis":
        store = RedisStatus(
            connect(settings.fleet.redis_url),
            settings.status.stale_after,
            settings.status.retention_days,
            redis_status.MAX_EVENT_BYTES,
            result_ttl=settings.outputs.link_expires,
            # A fleet: a job whose worker died is claimed by another after REDIS_CLAIM_IDLE.
            retry_grace=2 * settings.fleet.claim_idle + 1.0 if settings.fleet.queue_backend == "redis" else 0.0,
        )
        if not await store.writable():
            log.error(
                "Redis cannot be reached (%s): jobs are refused until it answers",
                store.health()["not_writable_because"],
            )
        return store, store
    status = StatusLog(
        settings.status.dir,
        settings.status.stale_after,
        io_timeout=status_log.IO_TIMEOUT,
        on_append=metrics.status_appended,
    )
    await status.check_at_startup()
    return status, None


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


def comfyui_folders(settings: Settings, command: list[str] | None) -> Folders:
    """ComfyUI's folders on our disk: when we start ComfyUI from COMFYUI_DIR, those it will use
    (COMFYUI_OUTPUT_DIR, when named, for its output); a ComfyUI we do not start: COMFYUI_OUTPUT_DIR
    named, with the `temp` and `input` folders beside it where they exist (ComfyUI's own layout
    under its base directory); none otherwise (ComfyUI elsewhere: its HTTP API)."""
    output = settings.comfyui.disk_output_dir
    if command and settings.comfyui.dir:
        started = started_folders(command, settings.comfyui.dir)
        return Folders(output=output or started.output, temp=started.temp, input=started.input)
    if output is None:
        return Folders()
    temp, beside = output.parent / "temp", output.parent / "input"
    return Folders(output=output, temp=temp if temp.is_dir() else None, input=beside if beside.is_dir() else None)


def hosted_workflows(
    settings: Settings, comfy: ComfyUI, supervisor: Supervisor | None, redis: RedisStatus | None
) -> HostedWorkflows:
    """The hosted workflows' folder, checked against `/object_info` read once per ComfyUI process
    (a fleet's gateway, which has no ComfyUI, reads the one its workers publish in Redis)."""
    generation = (lambda: supervisor.generation) if supervisor else (lambda: 0)
    fetch = redis.object_info if redis is not None and settings.fleet.role == "gateway" else comfy.object_info
    object_info = ObjectInfoCache(fetch, generation)
    loaders = LOADER_INPUTS | set(settings.inputs.loaders)
    return HostedWorkflows(WorkflowStore(settings.status.workflows_dir), object_info, loaders)


def too_big_to_travel(size: int, limit: int) -> str:
    """Why a fleet job's result could not reach its caller."""
    return (
        f"the job's outputs ({size} bytes) are more than a fleet passes back through Redis "
        f"(RESULT_INLINE_MAX_BYTES={limit}): ask for output_oss, or raise the setting"
    )


def converted_files(settings: Settings) -> ConvertedFiles:
    """The instance's bounded conversions, and the converted download links it keeps."""
    converter = Converter(convert.MAX_PIXELS, convert.CONCURRENCY)
    return ConvertedFiles(converter, converted.CACHE_BYTES)


def webhook_policy(settings: Settings) -> DownloadPolicy:
    """The webhook address rules: public addresses only, unless WEBHOOK_ALLOWED_HOSTS allows."""
    try:
        return DownloadPolicy(
            total_timeout=webhook_delivery.TIMEOUT,
            connect_timeout=min(10.0, webhook_delivery.TIMEOUT),
            read_timeout=webhook_delivery.TIMEOUT,
            allowed_hosts=frozenset(settings.outputs.webhook_allowed_hosts),
        )
    except ValueError as exc:
        raise SettingsError(f"WEBHOOK_ALLOWED_HOSTS: {exc}") from exc


def model_policy(settings: Settings) -> DownloadPolicy:
    """The model download rules: public addresses unless MODEL_ALLOWED_HOSTS allows, at most
    MODEL_CACHE_MAX_BYTES (when set) a file, within `fetch.DOWNLOAD_TIMEOUT`."""
    models = settings.models
    try:
        return DownloadPolicy(
            max_bytes=models.cache_max_bytes or fetch.MAX_BYTES,
            total_timeout=fetch.DOWNLOAD_TIMEOUT,
            read_timeout=60.0,
            allowed_hosts=frozenset(models.allowed_hosts),
        )
    except ValueError as exc:
        raise SettingsError(f"MODEL_ALLOWED_HOSTS: {exc}") from exc


def open_model_store(
    settings: Settings,
    download: Any,
    metrics: ModelMetrics,
    on_changed: Callable[[ModelStore], Awaitable[None]],
) -> ModelStore:
    """The store under MODEL_CACHE_DIR (blocking: it makes its folders)."""
    models = settings.models
    assert models.dir is not None and models.cache is not None
    try:
        return ModelStore(
            models.dir,
            models.cache,
            download,
            metrics,
            models.cache_max_bytes,
            on_changed,
            settings.service.instance_id,
        )
    except OSError as exc:
        raise SettingsError(f"MODELS_DIR / MODEL_CACHE_DIR cannot be used: {exc.strerror or exc}") from exc


async def _download_model(
    session: Any,
    policy: DownloadPolicy,
    settings: Settings,
    storage: Storage | None,
    ref: ModelRef,
    partial_file: Any,
    credentials: Credentials | None,
    progress: Any,
) -> tuple[int, str]:
    """One model's bytes into `partial_file`: over HTTP(S) (resumable), or from the bucket."""
    if ref.kind == "url":
        got = await fetch.fetch_to(session, ref.location, partial_file, policy, settings.models.auth_headers, progress)
        return got.size, got.sha256
    if storage is None or storage.scheme != ref.kind:
        needed = "OSS to be configured (OSS_BUCKET_DOMAIN)" if ref.kind == "oss" else "S3 (STORAGE=s3, S3_BUCKET)"
        raise InputError(f"{ref.kind}:// models need {needed} on this instance")
    stored = await storage.download(credentials, ref.location, partial_file, policy.max_bytes)
    return stored.size, stored.sha256


async def _changed(workflows: HostedWorkflows, redis: RedisStatus | None, store: ModelStore) -> None:
    """The store changed: the /object_info jobs and schemas are checked with is read again; a
    fleet's gateways are told (that answer, and the store's listing)."""
    try:
        info = await workflows.object_info.get(refresh=True)
        if redis is not None:
            await redis.publish_object_info(info)
            await _publish_models(redis, store.instance, store)
    except Exception as exc:  # the model is placed; the next read catches up
        log.warning("object_info not refreshed after the model store changed: %s", exc)


async def _publish_models(redis: RedisStatus, instance: str, store: ModelStore) -> None:
    try:
        await listing.publish(redis.client, instance, store.store_id, await store.listing())
    except ServerlessError as exc:
        log.warning("model listing not published: %s", exc.message)


def _nothing() -> None:
    return None


def download_policy(settings: Settings) -> DownloadPolicy:
    """The input download rules; a bad INPUT_ALLOWED_HOSTS entry fails start-up, named."""
    try:
        return DownloadPolicy(
            max_bytes=settings.inputs.max_bytes,
            total_timeout=settings.inputs.timeout,
            allowed_hosts=frozenset(settings.inputs.allowed_hosts),
        )
    except ValueError as exc:
        raise SettingsError(f"INPUT_ALLOWED_HOSTS: {exc}") from exc


def input_limits(settings: Settings) -> InputLimits:
    return InputLimits(
        max_fetch_bytes=settings.inputs.max_bytes,
        max_base64_bytes=settings.inputs.max_bytes,
        max_job_bytes=settings.inputs.max_job_bytes,
        max_pixels=verify.MAX_PIXELS,
        budget_timeout=settings.inputs.timeout,
    )


def input_budget(settings: Settings) -> ByteBudget:
    """The instance's shared input byte budget: room for one request at its limits."""
    return ByteBudget(settings.inputs.max_inflight_bytes)


async def _upload(
    store: Storage, credentials: Credentials | None, metrics: Metrics, source: Source, size: int, name: str, mime: str
) -> dict[str, Any]:
    ext = PurePosixPath(name).suffix.lstrip(".") or "bin"
    try:
        uploaded = await store.upload(credentials, source, ext, mime)
    except OutputError:
        metrics.oss_upload_failures.inc()
        raise
    metrics.oss_uploaded(size)
    return uploaded.to_payload()


async def open_storage(settings: Settings, on_retry: Callable[[], None] | None = None) -> Storage | None:
    """The bucket STORAGE names: OSS when OSS_BUCKET_DOMAIN is set, or S3; bad settings fail
    start-up, named. (An AWS profile is read from disk: in a thread.)"""
    if settings.outputs.storage == "s3":
        return await asyncio.to_thread(s3_store, settings)
    return oss_store(settings, on_retry)


def s3_store(settings: Settings) -> S3Store:
    """The S3 client of STORAGE=s3 (blocking: it may read an AWS profile)."""
    s3 = settings.s3
    try:
        config = config_from_settings(
            s3.bucket,
            s3.region,
            s3.endpoint_url,
            s3.addressing,
            s3.input_buckets,
            settings.oss.key_prefix,
            settings.oss.expires_in,
            s3.aws,
        )
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
    from .delivery.s3 import S3Store

    return S3Store(config)


def oss_store(settings: Settings, on_retry: Callable[[], None] | None = None) -> OssStore | None:
    """The OSS client when OSS_BUCKET_DOMAIN is set; bad OSS settings fail start-up, named."""
    try:
        config = OssConfig.from_values(
            settings.oss.bucket_domain,
            settings.oss.endpoint,
            settings.oss.sign_endpoint,
            settings.oss.key_prefix,
            settings.oss.expires_in,
        )
        if config is None:
            return None
        read_allowed = read_rules(settings.oss.input_allowed, config)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
    from .delivery.oss import OssStore

    return OssStore(config, read_allowed=read_allowed, on_retry=on_retry)
