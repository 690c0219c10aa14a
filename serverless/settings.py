"""Settings, read once from the environment at start-up into a frozen dataclass.

Every setting is an environment variable (see README, "Settings"). A bad value fails start-up with
a message naming the variable. Secrets never live here: OSS credentials are read per request.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MiB = 1024 * 1024


class SettingsError(ValueError):
    """A setting has a value the adapter cannot use; the message names the variable."""


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
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    value = _number(env, name, default, minimum)
    if value != int(value):
        raise SettingsError(f"{name}={env.get(name)!r} must be a whole number")
    return int(value)


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} must be true or false")


def _names(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in env.get(name, "").split(",") if part.strip())


def _loader_pairs(env: Mapping[str, str], name: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _names(env, name):
        class_type, dot, input_name = item.rpartition(".")
        if not dot or not class_type or not input_name:
            raise SettingsError(f"{name}: {item!r} is not of the form ClassType.input")
        pairs.append((class_type, input_name))
    return tuple(pairs)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the adapter is configured with. Build it with `Settings.from_env()`."""

    comfyui_url: str = "http://127.0.0.1:8188"
    comfyui_cmd: str = ""
    comfyui_dir: str = ""
    instance_id: str = "local"
    job_timeout: float = 1800.0
    connect_timeout: float = 5.0
    request_timeout: float = 60.0
    reconnect_timeout: float = 30.0
    startup_timeout: float = 60.0
    output_concurrency: int = 8
    max_body_bytes: int = 100 * MiB
    input_max_bytes: int = 50 * MiB
    input_timeout: float = 60.0
    input_max_base64_bytes: int = 50 * MiB
    input_allow_private: bool = False
    input_allowed_hosts: tuple[str, ...] = ()
    input_loaders: tuple[tuple[str, str], ...] = ()
    input_max_pixels: int = 100_000_000
    max_input_bytes_per_job: int = 200 * MiB
    input_max_inflight_bytes: int = 512 * MiB
    oss_input_allowed: tuple[str, ...] | None = None  # None: the OSS_BUCKET_DOMAIN bucket only
    oss_bucket_domain: str = ""
    oss_endpoint: str = ""
    oss_sign_endpoint: str = ""
    oss_key_prefix: str = "serverless-api-output"
    oss_expires_in: int = 0
    status_dir: Path = field(default_factory=lambda: Path("/mnt/auto/output/serverless_api"))
    status_retention_days: float = 7.0
    status_stale_after: float = 120.0
    cancel_on_disconnect: bool = True
    stream_ping_interval: float = 15.0
    stream_buffer_events: int = 10000
    drain_timeout: float = 600.0
    prewarm_prompt: str = ""
    on_fc: bool = False

    @property
    def comfyui_port(self) -> int:
        port = urlsplit(self.comfyui_url).port
        return port or 8188

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the environment (default `os.environ`); raise SettingsError naming a bad variable."""
        env = os.environ if env is None else env
        d = cls()  # the defaults
        mount = _text(env, "MODEL_ASSET_DIR", "/mnt/auto")
        return cls(
            comfyui_url=_text(env, "COMFYUI_URL", d.comfyui_url).rstrip("/"),
            comfyui_cmd=_text(env, "COMFYUI_CMD", ""),
            comfyui_dir=_text(env, "COMFYUI_DIR", ""),
            instance_id=_text(env, "FC_INSTANCE_ID", socket.gethostname() or "local"),
            job_timeout=_number(env, "JOB_TIMEOUT", d.job_timeout, 1),
            connect_timeout=_number(env, "COMFYUI_CONNECT_TIMEOUT", d.connect_timeout, 0.1),
            request_timeout=_number(env, "COMFYUI_REQUEST_TIMEOUT", d.request_timeout, 0.1),
            reconnect_timeout=_number(env, "COMFYUI_RECONNECT_TIMEOUT", d.reconnect_timeout, 0),
            startup_timeout=_number(env, "COMFYUI_STARTUP_TIMEOUT", d.startup_timeout, 0),
            output_concurrency=_integer(env, "OUTPUT_CONCURRENCY", d.output_concurrency, 1),
            max_body_bytes=_integer(env, "MAX_BODY_BYTES", d.max_body_bytes, 1024),
            input_max_bytes=_integer(env, "INPUT_MAX_BYTES", d.input_max_bytes, 1),
            input_timeout=_number(env, "INPUT_TIMEOUT", d.input_timeout, 0.1),
            input_max_base64_bytes=_integer(env, "INPUT_MAX_BASE64_BYTES", d.input_max_base64_bytes, 1),
            input_allow_private=_flag(env, "INPUT_ALLOW_PRIVATE", d.input_allow_private),
            input_allowed_hosts=_names(env, "INPUT_ALLOWED_HOSTS"),
            input_loaders=_loader_pairs(env, "INPUT_LOADERS"),
            input_max_pixels=_integer(env, "INPUT_MAX_PIXELS", d.input_max_pixels, 1),
            max_input_bytes_per_job=_integer(env, "MAX_INPUT_BYTES_PER_JOB", d.max_input_bytes_per_job, 1),
            input_max_inflight_bytes=_integer(env, "INPUT_MAX_INFLIGHT_BYTES", d.input_max_inflight_bytes, 1),
            oss_input_allowed=_names(env, "OSS_INPUT_ALLOWED") if "OSS_INPUT_ALLOWED" in env else None,
            oss_bucket_domain=_text(env, "OSS_BUCKET_DOMAIN", ""),
            oss_endpoint=_text(env, "OSS_ENDPOINT", ""),
            oss_sign_endpoint=_text(env, "OSS_SIGN_ENDPOINT", ""),
            oss_key_prefix=_text(env, "OSS_KEY_PREFIX", d.oss_key_prefix).strip("/"),
            oss_expires_in=_integer(env, "OSS_EXPIRES_IN_SECOND", d.oss_expires_in, 0),
            status_dir=Path(_text(env, "STATUS_DIR", f"{mount}/output/serverless_api")),
            status_retention_days=_number(env, "STATUS_RETENTION_DAYS", d.status_retention_days, 0),
            status_stale_after=_number(env, "STATUS_STALE_AFTER", d.status_stale_after, 1),
            cancel_on_disconnect=_flag(env, "CANCEL_ON_DISCONNECT", d.cancel_on_disconnect),
            stream_ping_interval=_number(env, "STREAM_PING_INTERVAL", d.stream_ping_interval, 0.01),
            stream_buffer_events=_integer(env, "STREAM_BUFFER_EVENTS", d.stream_buffer_events, 10),
            drain_timeout=_number(env, "DRAIN_TIMEOUT", d.drain_timeout, 0),
            prewarm_prompt=_text(env, "PREWARM_PROMPT", ""),
            on_fc=bool(env.get("FC_FUNCTION_NAME")),
        )
