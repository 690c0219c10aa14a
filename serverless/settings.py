"""Settings, read once from the environment at start-up into a frozen dataclass.

Every setting is an environment variable (see README, "Settings"). A bad value fails start-up with
a message naming the variable. The instance's OSS credentials (ALIBABA_CLOUD_*) are kept out of
every `repr`; a request's own credentials are never stored here.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MiB = 1024 * 1024
CLOUD_CREDENTIALS = ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_SECURITY_TOKEN")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
STATUS_BACKENDS = ("file", "redis")
QUEUE_BACKENDS = ("none", "redis")
ROLES = ("all", "gateway", "worker")
LANE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")  # a lane names a queue stream: jobs:<lane>:<priority>
# A DNS name as the download policy matches it: labels of letters, digits and '-', a final dot allowed.
_HOST_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\.?", re.IGNORECASE)
# What can only be meant as an address or a network (IPv6 literals aside, which parse).
_IP_LIKE = re.compile(r"[\d.:\[\]]+|.*/.*")


class SettingsError(ValueError):
    """A setting has a value the adapter cannot use; the message names the variable
    (`NAME='value': reason`), so that one line says what to fix."""


def _bad(name: str, raw: str, reason: str) -> SettingsError:
    return SettingsError(f"{name}={raw!r}: {reason}")


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def _number(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad(name, raw, "not a number") from None
    if not value >= minimum:  # NaN included
        raise _bad(name, raw, f"must be at least {minimum:g}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    value = _number(env, name, default, minimum)
    raw = env.get(name, "").strip()
    if not float(value).is_integer():  # inf included
        raise _bad(name, raw, "must be a whole number")
    if maximum is not None and value > maximum:
        raise _bad(name, raw, f"must be at most {maximum}")
    return int(value)


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise _bad(name, raw, "must be true or false")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() not in choices:
        raise _bad(name, raw, f"must be one of {', '.join(choices)}")
    return raw.lower()


def _log_level(env: Mapping[str, str], name: str, default: str) -> str:
    return _choice(env, name, default.lower(), LOG_LEVELS).upper()


def _host(env: Mapping[str, str], name: str, default: str) -> str:
    """An address to listen on: an IP literal or a host name."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return str(ipaddress.ip_address(raw.removeprefix("[").removesuffix("]")))
    except ValueError:
        pass
    if _IP_LIKE.fullmatch(raw) or not _HOST_NAME.fullmatch(raw):
        raise _bad(name, raw, "not an IP address or host name")
    return raw


def _folder(env: Mapping[str, str], name: str) -> Path | None:
    """A folder named explicitly (unset or empty: None)."""
    value = env.get(name, "").strip()
    return Path(value) if value else None


def _redis_url(env: Mapping[str, str], name: str, default: str) -> str:
    """redis://, rediss:// or unix:// (the password, if any, is never echoed back)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise SettingsError(f"{name}: must be a redis://, rediss:// or unix:// URL")
    return raw


def _names(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in env.get(name, "").split(",") if part.strip())


def _allowed_hosts(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Host names, IP addresses and CIDR networks. An entry that looks like an address (digits,
    dots, colons, or a '/') must parse as one: `10.0.0.0/33` is a mistake, not a host name."""
    hosts = _names(env, name)
    for entry in hosts:
        try:
            ipaddress.ip_network(entry.removeprefix("[").removesuffix("]"), strict=False)
            continue
        except ValueError as exc:
            if _IP_LIKE.fullmatch(entry):
                raise _bad(name, env.get(name, ""), f"{entry!r} is not an IP address or network: {exc}") from None
        if not _HOST_NAME.fullmatch(entry):
            raise _bad(name, env.get(name, ""), f"{entry!r} is not a host name, IP address or network")
    return hosts


def _loader_pairs(env: Mapping[str, str], name: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _names(env, name):
        class_type, dot, input_name = item.rpartition(".")
        if not dot or not class_type or not input_name:
            raise _bad(name, env.get(name, ""), f"{item!r} is not of the form ClassType.input")
        pairs.append((class_type, input_name))
    return tuple(pairs)


def _api_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """API_KEYS (comma-separated): keys with every right. API_KEYS_FILE is `TenantSettings`'."""
    keys = _names(env, "API_KEYS")
    for key in keys:
        if len(key) < 16 or any(c.isspace() or c == "," for c in key):
            raise SettingsError("API_KEYS: every key must be at least 16 characters, without spaces or commas")
    return keys


@dataclass(frozen=True, slots=True)
class TenantSettings:
    """API keys with scopes and limits (`serverless.tenants`): API_KEYS_FILE, one key a line
    (`serverless.tenants.keyfile`), checked here at start-up and looked at again while the app
    runs (`tenants.keys.POLL_INTERVAL`; a change counts from the next request)."""

    keys_file: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TenantSettings:
        from .tenants.keyfile import KeyFileError, parse  # pure; imported here to keep settings light

        source = _folder(env, "API_KEYS_FILE")
        if source is not None:
            try:
                parse(source.read_text())
            except OSError as exc:
                raise SettingsError(f"API_KEYS_FILE={str(source)!r}: cannot be read ({exc.strerror or exc})") from None
            except KeyFileError as exc:
                raise SettingsError(f"API_KEYS_FILE={str(source)!r}: {exc}") from None
        return cls(keys_file=source)


STORAGES = ("oss", "s3")
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


@dataclass(frozen=True, slots=True)
class S3Settings:
    """`STORAGE=s3`: the output bucket, its endpoint and addressing, the other buckets `s3://` inputs
    may read, and the instance's AWS variables (kept out of every `repr`). Checked, and a profile
    read, where they are used (`delivery.s3.config_from_settings`)."""

    endpoint_url: str = ""
    bucket: str = ""
    region: str = ""
    addressing: str = "auto"
    input_buckets: tuple[str, ...] = ()
    aws: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Settings:
        region = _text(env, "S3_REGION", "") or _text(env, "AWS_REGION", "") or _text(env, "AWS_DEFAULT_REGION", "")
        return cls(
            endpoint_url=_text(env, "S3_ENDPOINT_URL", ""),
            bucket=_text(env, "S3_BUCKET", ""),
            region=region,
            addressing=_choice(env, "S3_ADDRESSING", "auto", ("auto", "path", "virtual")),
            input_buckets=_names(env, "S3_INPUT_BUCKETS"),
            aws={name: env[name].strip() for name in AWS_VARIABLES if env.get(name, "").strip()},
        )


# Old names that still work: the value moves to the new name (which wins when both are set) and
# start-up logs one line saying so (`Settings.deprecated`).
RENAMED = {
    "INPUT_MAX_BASE64_BYTES": "INPUT_MAX_BYTES",  # one limit for an input, however it arrives
    "MAX_INPUT_BYTES_PER_JOB": "INPUT_MAX_JOB_BYTES",
    "BODY_TIMEOUT": "INPUT_TIMEOUT",  # a request body is an input arriving, like a download
    "COMFYUI_RECONNECT_TIMEOUT": "COMFYUI_STARTUP_TIMEOUT",  # coming back is starting again
    "GENSTUDIO_TOKEN_SECRET": "FILE_LINK_SECRET",  # one secret signs what only we verify (links, prompt tokens)
}

# Names no longer read: start-up logs one line for each one set ("X is no longer read: <why>"),
# and the service goes on without it. Each became a module constant where it is used, or is
# derived from another setting.
REMOVED = {
    "API_KEYS_POLL_INTERVAL": "API_KEYS_FILE is looked at every 0.5 s (tenants.keys.POLL_INTERVAL)",
    "BATCH_POLL_INTERVAL": "a batch's feeder looks at its items every 0.2 s (batches.feeder.POLL_INTERVAL)",
    "BATCH_LEASE_SECONDS": "a feeder's lease on a batch lasts STATUS_STALE_AFTER/8 (15 s by default)",
    "BATCH_MAX_ITEMS": "a batch holds at most 10000 items (batches.spec.MAX_ITEMS): split a bigger one",
    "BATCH_WINDOW": "64 items of a batch are queued or running at once (batches.feeder.WINDOW)",
    "COMFYUI_CONNECT_TIMEOUT": "ComfyUI is connected to within 5 s (comfyui.client.CONNECT_TIMEOUT)",
    "COMFYUI_REQUEST_TIMEOUT": "one ComfyUI HTTP call may take 60 s (comfyui.client.REQUEST_TIMEOUT)",
    "COMFYUI_INPUT_DIR": "ComfyUI's input folder is read from the command we start it with, "
    "else it is the 'input' folder beside COMFYUI_OUTPUT_DIR",
    "COMFYUI_TEMP_DIR": "ComfyUI's temp folder is read from the command we start it with, "
    "else it is the 'temp' folder beside COMFYUI_OUTPUT_DIR",
    "QUEUE_STALL_AFTER": "health reports ComfyUI's queue stuck after 30 s without a prompt running "
    "(lifecycle.QUEUE_STALL_AFTER)",
    "ACCESS_LOG": "LOG_LEVEL=debug logs a line per HTTP request",
    "INPUT_ALLOW_PRIVATE": "list the private hosts or networks inputs may reach in INPUT_ALLOWED_HOSTS "
    "(0.0.0.0/0,::/0 allows every address)",
    "INPUT_MAX_INFLIGHT_BYTES": "an instance holds at most INPUT_MAX_JOB_BYTES + INPUT_MAX_BYTES of inputs at once",
    "OUTPUT_CONCURRENCY": "a job reads (and uploads) 8 outputs at once (delivery.outputs.CONCURRENCY)",
    "FILE_LINK_MAX_EXPIRES": "no link lives longer than FILE_LINK_EXPIRES (a caller may ask for shorter)",
    "INPUT_MAX_PIXELS": "an input image may have 100 megapixels (inputs.verify.MAX_PIXELS)",
    "CONVERT_MAX_PIXELS": "conversions take images of at most 32 megapixels (delivery.convert.MAX_PIXELS)",
    "CONVERT_CONCURRENCY": "an instance converts 2 images at once (delivery.convert.CONCURRENCY)",
    "CONVERT_CACHE_BYTES": "256 MiB of converted link files are kept (delivery.converted.CACHE_BYTES)",
    "WEBHOOK_TIMEOUT": "a webhook delivery may take 30 s, all attempts (delivery.webhooks.TIMEOUT)",
    "STATUS_IO_TIMEOUT": "one status-folder operation may take 10 s (status.log.IO_TIMEOUT)",
    "STREAM_PING_INTERVAL": "a stream sends ': ping' after 15 s of silence (transports.http.PING_INTERVAL)",
    "STREAM_BUFFER_EVENTS": "a reader 10000 events behind is dropped (jobs.feed.READER_LAG)",
    "JOB_MAX_EVENT_BYTES": "a job publishes at most 64 MiB of events (jobs.feed.MAX_JOB_BYTES)",
    "STREAM_WRITE_TIMEOUT": "a write to a caller may wait 60 s (transports.caller.WRITE_TIMEOUT)",
    "PREVIEW_MAX_FPS": "previews are shown 4 times a second at most (jobs.previews.MAX_FPS)",
    "REDIS_MAX_EVENT_BYTES": "an event of more than 1 MiB is not stored in Redis (status.redis.MAX_EVENT_BYTES)",
    "MODEL_MAX_BYTES": "a model file is bounded by MODEL_CACHE_MAX_BYTES when set, "
    "else 64 GiB (models.fetch.MAX_BYTES)",
    "MODEL_DOWNLOAD_TIMEOUT": "a model download may take an hour (models.fetch.DOWNLOAD_TIMEOUT)",
}


def _renamed(env: Mapping[str, str]) -> tuple[Mapping[str, str], tuple[str, ...]]:
    """`env` with each old name's value under its new name, and a warning line per old name set
    (renamed or no longer read)."""
    moved: dict[str, str] = {}
    notes: list[str] = []
    for old, new in RENAMED.items():
        value = env.get(old, "").strip()
        if not value:
            continue
        if env.get(new, "").strip() or new in moved:
            notes.append(f"{old} is deprecated and ignored: {new} is set")
        else:
            moved[new] = value
            notes.append(f"{old} is deprecated: read as {new}" + ("" if _secret(new) else f"={value}"))
    notes += [f"{old} is no longer read: {why}" for old, why in REMOVED.items() if env.get(old, "").strip()]
    return ({**env, **moved} if moved else env), tuple(notes)


def _secret(name: str) -> bool:
    return name.endswith(("_SECRET", "_TOKEN"))


@dataclass(frozen=True, slots=True)
class ComfyUISettings:
    """The ComfyUI beside us: where it listens, how it is started, how long we wait for it, and
    its output folder on our disk (named explicitly: outputs read there, and inputs written to the
    `input` folder beside it, previews read from the `temp` one, as ComfyUI lays them out)."""

    url: str = "http://127.0.0.1:8188"
    cmd: str = ""
    dir: str = ""
    startup_timeout: float = 60.0  # to come up, or back after a break (its websocket reopened)
    output_dir: Path = field(default_factory=lambda: Path("/mnt/auto/output"))
    disk_output_dir: Path | None = None
    prewarm_prompt: str = ""

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 8188

    @classmethod
    def from_env(cls, env: Mapping[str, str], mount: str) -> ComfyUISettings:
        d = cls()
        return cls(
            url=_text(env, "COMFYUI_URL", d.url).rstrip("/"),
            cmd=_text(env, "COMFYUI_CMD", ""),
            dir=_text(env, "COMFYUI_DIR", ""),
            startup_timeout=_number(env, "COMFYUI_STARTUP_TIMEOUT", d.startup_timeout, 0),
            output_dir=Path(_text(env, "COMFYUI_OUTPUT_DIR", f"{mount}/output")),
            disk_output_dir=_folder(env, "COMFYUI_OUTPUT_DIR"),
            prewarm_prompt=_text(env, "PREWARM_PROMPT", ""),
        )


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """This instance: its address, logs, jobs' deadline and admission, and shutdown."""

    instance_id: str = "local"
    host: str = "127.0.0.1"
    port: int = 9000
    on_fc: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    job_timeout: float = 1800.0
    max_pending_jobs: int = 256  # generous: the suite opens 200 streams at once, the benchmark 100
    drain_timeout: float = 600.0

    @property
    def access_log(self) -> bool:
        """A line per HTTP request (uvicorn's access log) at LOG_LEVEL=debug."""
        return self.log_level == "DEBUG"

    @classmethod
    def from_env(cls, env: Mapping[str, str], on_fc: bool) -> ServiceSettings:
        d = cls()
        return cls(
            instance_id=_text(env, "FC_INSTANCE_ID", socket.gethostname() or "local"),
            # On FC the platform's proxy reaches us from outside; elsewhere loopback, as ComfyUI does.
            host=_host(env, "HOST", "0.0.0.0" if on_fc else d.host),
            port=_integer(env, "FC_CUSTOM_LISTEN_PORT", d.port, 1, 65535),
            on_fc=on_fc,
            log_level=_log_level(env, "LOG_LEVEL", d.log_level),
            log_format=_choice(env, "LOG_FORMAT", d.log_format, LOG_FORMATS),
            job_timeout=_number(env, "JOB_TIMEOUT", d.job_timeout, 1),
            max_pending_jobs=_integer(env, "MAX_PENDING_JOBS", d.max_pending_jobs, 0),
            drain_timeout=_number(env, "DRAIN_TIMEOUT", d.drain_timeout, 0),
        )


@dataclass(frozen=True, slots=True)
class InputSettings:
    """What a request may bring: its body, each input (downloaded or base64), a job's inputs
    together, and where downloads may go. The instance's inputs in flight are bounded by
    `max_inflight_bytes`: room for one request at its limits (others' inputs wait for room)."""

    max_body_bytes: int = 100 * MiB
    timeout: float = 60.0  # a request body to arrive, or one input to download
    max_bytes: int = 50 * MiB
    max_job_bytes: int = 200 * MiB
    allowed_hosts: tuple[str, ...] = ()
    loaders: tuple[tuple[str, str], ...] = ()

    @property
    def max_inflight_bytes(self) -> int:
        return self.max_job_bytes + self.max_bytes

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InputSettings:
        d = cls()
        return cls(
            max_body_bytes=_integer(env, "MAX_BODY_BYTES", d.max_body_bytes, 1024),
            timeout=_number(env, "INPUT_TIMEOUT", d.timeout, 0.1),
            max_bytes=_integer(env, "INPUT_MAX_BYTES", d.max_bytes, 1),
            max_job_bytes=_integer(env, "INPUT_MAX_JOB_BYTES", d.max_job_bytes, 1),
            allowed_hosts=_allowed_hosts(env, "INPUT_ALLOWED_HOSTS"),
            loaders=_loader_pairs(env, "INPUT_LOADERS"),
        )


@dataclass(frozen=True, slots=True)
class OssSettings:
    """Alibaba OSS: the output bucket, its endpoints and key prefix, signed URLs' lifetime, the
    buckets `oss://` inputs may read, and the instance's credentials (kept out of every `repr`)."""

    bucket_domain: str = ""
    endpoint: str = ""
    sign_endpoint: str = ""
    key_prefix: str = "serverless-api-output"
    expires_in: int = 0
    input_allowed: tuple[str, ...] | None = None  # None: the OSS_BUCKET_DOMAIN bucket only
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OssSettings:
        d = cls()
        return cls(
            bucket_domain=_text(env, "OSS_BUCKET_DOMAIN", ""),
            endpoint=_text(env, "OSS_ENDPOINT", ""),
            sign_endpoint=_text(env, "OSS_SIGN_ENDPOINT", ""),
            key_prefix=_text(env, "OSS_KEY_PREFIX", d.key_prefix).strip("/"),
            expires_in=_integer(env, "OSS_EXPIRES_IN_SECOND", d.expires_in, 0),
            input_allowed=_names(env, "OSS_INPUT_ALLOWED") if "OSS_INPUT_ALLOWED" in env else None,
            credentials={name: env[name] for name in CLOUD_CREDENTIALS if env.get(name)},
        )


@dataclass(frozen=True, slots=True)
class OutputSettings:
    """What a job hands back: the bucket `output_oss` uploads to, download links (a caller may ask
    for a shorter life, never a longer one), and where webhooks may go."""

    storage: str = "oss"  # the bucket output_oss uploads to and oss:// or s3:// inputs come from
    link_expires: int = 3600
    webhook_allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OutputSettings:
        d = cls()
        return cls(
            storage=_choice(env, "STORAGE", d.storage, STORAGES),
            link_expires=_integer(env, "FILE_LINK_EXPIRES", d.link_expires, 1),
            webhook_allowed_hosts=_allowed_hosts(env, "WEBHOOK_ALLOWED_HOSTS"),
        )


@dataclass(frozen=True, slots=True)
class StatusSettings:
    """What outlives a request: status logs (the NAS folder or Redis), hosted workflows, how long
    logs are kept, and when silence means an instance was lost."""

    backend: str = "file"  # where status logs go: the NAS folder, or Redis streams
    dir: Path = field(default_factory=lambda: Path("/mnt/auto/output/serverless_api"))
    workflows_dir: Path = field(default_factory=lambda: Path("/mnt/auto/workflows"))
    retention_days: float = 7.0
    stale_after: float = 120.0

    @classmethod
    def from_env(cls, env: Mapping[str, str], mount: str) -> StatusSettings:
        d = cls()
        return cls(
            backend=_choice(env, "STATUS_BACKEND", d.backend, STATUS_BACKENDS),
            dir=Path(_text(env, "STATUS_DIR", f"{mount}/output/serverless_api")),
            workflows_dir=Path(_text(env, "WORKFLOWS_DIR", f"{mount}/workflows")),
            retention_days=_number(env, "STATUS_RETENTION_DAYS", d.retention_days, 0),
            stale_after=_number(env, "STATUS_STALE_AFTER", d.stale_after, 1),
        )


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """How a job's events reach its callers: whether a caller's hang-up cancels its job, and
    whether previews are also written to the status log."""

    cancel_on_disconnect: bool = True
    preview_in_status: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StreamSettings:
        d = cls()
        return cls(
            cancel_on_disconnect=_flag(env, "CANCEL_ON_DISCONNECT", d.cancel_on_disconnect),
            preview_in_status=_flag(env, "PREVIEW_IN_STATUS", d.preview_in_status),
        )


@dataclass(frozen=True, slots=True)
class SchedulingSettings:
    """The fleet's scheduling (`serverless.fleet`): this worker's lane, how long a job waits for a
    worker that holds its models before any able worker takes it, and the memory watermarks a
    worker checks after each job (0: not checked)."""

    worker_lane: str = ""  # "": the default lane
    affinity_wait: float = 3.0  # seconds; 0: first free worker, no affinity
    vram_free_min: int = 0  # bytes: below this after a job, ComfyUI is asked to free memory (/free)
    comfyui_rss_max: int = 0  # bytes: above this after a job, ComfyUI is restarted (when supervised)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SchedulingSettings:
        lane = _text(env, "WORKER_LANE", "")
        if lane and not LANE_RE.fullmatch(lane):
            raise SettingsError(f"WORKER_LANE={lane!r}: 1-32 lowercase letters, digits or '-'")
        d = cls()
        return cls(
            worker_lane=lane,
            affinity_wait=_number(env, "AFFINITY_WAIT", d.affinity_wait, 0),
            vram_free_min=_integer(env, "VRAM_FREE_MIN", d.vram_free_min, 0),
            comfyui_rss_max=_integer(env, "COMFYUI_RSS_MAX", d.comfyui_rss_max, 0),
        )


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """Gateways and workers sharing one Redis: the role, the queue's bounds, and results passed back."""

    queue_backend: str = "none"  # where jobs come from: the HTTP request itself, or a Redis stream
    role: str = "all"  # with QUEUE_BACKEND=redis: take jobs from the queue (worker), serve callers, or both
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    claim_idle: float = 60.0
    max_queued_jobs: int = 1000  # a gateway's admission: jobs waiting in the Redis queue, all gateways together
    queue_ttl: float = 3600.0  # seconds a job may wait in the Redis queue for a worker (0: for ever)
    result_inline_max_bytes: int = 64 * MiB  # a fleet job's base64 outputs and linked files kept in Redis

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FleetSettings:
        d = cls()
        return cls(
            queue_backend=_choice(env, "QUEUE_BACKEND", d.queue_backend, QUEUE_BACKENDS),
            role=_choice(env, "ROLE", d.role, ROLES),
            redis_url=_redis_url(env, "REDIS_URL", d.redis_url),
            claim_idle=_number(env, "REDIS_CLAIM_IDLE", d.claim_idle, 0.5),
            max_queued_jobs=_integer(env, "MAX_QUEUED_JOBS", d.max_queued_jobs, 0),
            queue_ttl=_number(env, "QUEUE_TTL", d.queue_ttl, 0),
            result_inline_max_bytes=_integer(env, "RESULT_INLINE_MAX_BYTES", d.result_inline_max_bytes, 0),
        )


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """Who may call, and the secrets we sign with (all kept out of every `repr`): the scraper's
    token (`/metrics`), the lifecycle hooks' token (`/initialize`, `/pre-stop`: separate callers,
    separate rights), the webhooks' secret (shared with receivers), and the secret of what only we
    verify (download links, GenStudio's prompt tokens)."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_token: str = field(default="", repr=False)
    lifecycle_token: str = field(default="", repr=False)
    webhook_secret: str = field(default="", repr=False)
    file_link_secret: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SecuritySettings:
        return cls(
            api_keys=_api_keys(env),
            metrics_token=_text(env, "METRICS_TOKEN", ""),
            lifecycle_token=_text(env, "LIFECYCLE_TOKEN", ""),
            webhook_secret=_text(env, "WEBHOOK_SECRET", ""),
            file_link_secret=_text(env, "FILE_LINK_SECRET", ""),
        )


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Batches (`serverless.batches`): how long a feeder's lease on a batch lasts unrenewed, an
    eighth of STATUS_STALE_AFTER (15 s at its default): another instance takes a batch over well
    before the jobs of a lost instance read as lost."""

    lease_seconds: float = 15.0


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """Models on demand (`serverless.models`): ComfyUI's models folder, the content-addressed cache
    beside it, what a download may be and reach, and the per-host `Authorization` of private
    registries (kept out of every `repr`). `dir` unset: model references are refused."""

    dir: Path | None = None  # MODELS_DIR
    cache_dir: Path | None = None  # MODEL_CACHE_DIR (default <MODELS_DIR>/.cache: one file system, hard links)
    cache_max_bytes: int = 0  # 0: no bound (and a model file is as big as it may be)
    allowed_hosts: tuple[str, ...] = ()
    inputs: tuple[tuple[str, str, str], ...] = ()  # (class_type, input, folder)
    auth_headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # host -> Authorization
    preload_workflows: tuple[str, ...] = ()

    @property
    def cache(self) -> Path | None:
        """Where the store keeps its files (None: no models folder, no store)."""
        if self.dir is None:
            return None
        return self.cache_dir or self.dir / ".cache"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ModelSettings:
        return cls(
            dir=_folder(env, "MODELS_DIR"),
            cache_dir=_folder(env, "MODEL_CACHE_DIR"),
            cache_max_bytes=_integer(env, "MODEL_CACHE_MAX_BYTES", 0),
            allowed_hosts=_allowed_hosts(env, "MODEL_ALLOWED_HOSTS"),
            inputs=_model_inputs(env, "MODEL_INPUTS"),
            auth_headers=_auth_headers(env, "MODEL_AUTH_HEADERS"),
            preload_workflows=_names(env, "PRELOAD_WORKFLOWS"),
        )


def _model_inputs(env: Mapping[str, str], name: str) -> tuple[tuple[str, str, str], ...]:
    """`Class.input=folder` entries, comma-separated."""
    found = []
    for item in _names(env, name):
        pair, eq, folder = item.partition("=")
        class_type, dot, input_name = pair.strip().rpartition(".")
        folder = folder.strip()
        if not eq or not dot or not class_type or not input_name or not _MODEL_FOLDER.fullmatch(folder):
            raise _bad(name, env.get(name, ""), f"{item!r} is not of the form ClassType.input=folder")
        found.append((class_type, input_name, folder))
    return tuple(found)


def _auth_headers(env: Mapping[str, str], name: str) -> dict[str, str]:
    """A JSON object of host -> Authorization value (`{"hf.co": "Bearer hf_..."}`); the values
    are secrets and never echoed in an error."""
    raw = env.get(name, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise SettingsError(f"{name}: not a JSON object of host to Authorization value") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SettingsError(f"{name}: must be a JSON object of host names to strings")
    return {host.strip().lower().rstrip("."): header for host, header in value.items()}


_MODEL_FOLDER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the adapter is configured with, grouped by concern. Build it with
    `Settings.from_env()`."""

    comfyui: ComfyUISettings = field(default_factory=ComfyUISettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    inputs: InputSettings = field(default_factory=InputSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    oss: OssSettings = field(default_factory=OssSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    status: StatusSettings = field(default_factory=StatusSettings)
    stream: StreamSettings = field(default_factory=StreamSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    scheduling: SchedulingSettings = field(default_factory=SchedulingSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    batches: BatchSettings = field(default_factory=BatchSettings)
    tenants: TenantSettings = field(default_factory=TenantSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    deprecated: tuple[str, ...] = ()  # a line per old setting name in use, logged at start-up

    @property
    def reserved_output_dirs(self) -> tuple[tuple[str, ...], ...]:
        """Our folders inside ComfyUI's output folder (paths relative to it), which no workflow may
        write into: the status logs' by default."""
        reserved = []
        for folder in (self.status.dir,):
            try:
                reserved.append(folder.resolve().relative_to(self.comfyui.output_dir.resolve()).parts)
            except ValueError:
                continue
        return tuple(parts for parts in reserved if parts)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the environment (default `os.environ`); raise SettingsError naming a bad variable."""
        env, deprecated = _renamed(os.environ if env is None else env)
        mount = _text(env, "MODEL_ASSET_DIR", "/mnt/auto")
        on_fc = bool(env.get("FC_FUNCTION_NAME"))
        status = StatusSettings.from_env(env, mount)
        return cls(
            comfyui=ComfyUISettings.from_env(env, mount),
            service=ServiceSettings.from_env(env, on_fc),
            inputs=InputSettings.from_env(env),
            outputs=OutputSettings.from_env(env),
            oss=OssSettings.from_env(env),
            s3=S3Settings.from_env(env),
            status=status,
            stream=StreamSettings.from_env(env),
            fleet=FleetSettings.from_env(env),
            scheduling=SchedulingSettings.from_env(env),
            security=SecuritySettings.from_env(env),
            batches=BatchSettings(lease_seconds=status.stale_after / 8),
            tenants=TenantSettings.from_env(env),
            models=ModelSettings.from_env(env),
            deprecated=deprecated,
        )._checked()

    def _checked(self) -> Settings:
        """Combinations that cannot work fail start-up, named."""
        if self.outputs.storage == "s3" and not self.s3.bucket:
            raise SettingsError("STORAGE=s3 needs S3_BUCKET (the bucket outputs are uploaded to)")
        if self.fleet.queue_backend == "redis" and self.status.backend != "redis":
            raise SettingsError(
                "QUEUE_BACKEND=redis needs STATUS_BACKEND=redis: callers follow jobs "
                "that run on other machines through the Redis status streams"
            )
        if self.fleet.role != "all" and self.fleet.queue_backend != "redis":
            raise SettingsError(
                f"ROLE={self.fleet.role!r} needs QUEUE_BACKEND=redis: without a queue every "
                "instance runs its own callers' jobs"
            )
        return self
