"""S3-compatible buckets (AWS S3, MinIO, R2, B2, GCS interoperability): where outputs go and
`s3://` loader inputs are read from when `STORAGE=s3`.

obstore (Rust's `object_store`) is natively async: requests run on its own runtime, so nothing here
blocks the event loop and no thread pool is needed. An output file is uploaded in parts
(`PART_BYTES` each, `PART_CONCURRENCY` at a time) straight from disk; an input is streamed and
refused by its announced size, then by counting. obstore errors are translated here and only here,
keeping the S3 error code and HTTP status only: an S3 error body can echo the canonical request
(session token included) and is never logged or raised.

Credentials are the instance's: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`,
else a profile's static keys (`AWS_PROFILE` in the shared credentials and config files), else
what obstore finds itself (web identity token, container credentials, instance metadata). The
buckets they may read for a caller are only those the settings name (no confused deputy).
"""

from __future__ import annotations

import io
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import BaseError, NotFoundError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store as _ObjectStore

from ..core.credentials import Credentials
from ..errors import InputError, OutputError
from .s3_config import MAX_EXPIRES_S, S3Config, parse_s3_url
from .storage import FileSink, Source, StoredFile, UploadedObject

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig
    from obstore.store import S3Config as _StoreConfig


MiB = 1024 * 1024
PART_BYTES = 8 * MiB  # S3 wants parts of 5 MiB at least (but the last); 10,000 parts: 80 GB
PART_CONCURRENCY = 4  # parts in flight per upload: what an upload holds in memory is about their sum
READ_CHUNK = 256 * 1024
_EXT = re.compile(r"[A-Za-z0-9_-]{1,32}")
_ERROR_CODE = re.compile(r"<Code>([A-Za-z0-9.]{1,64})</Code>")
_HTTP_STATUS = re.compile(r"status code: (\d{3})")
_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
_RETRIES = re.compile(r"after (\d+) retries")
_HTTP_KINDS = {"Connect": "cannot connect", "Timeout": "timed out", "Interrupted": "connection broken off"}


class S3Store:
    """Uploads outputs to the configured bucket and reads `s3://` inputs from the buckets the
    settings name. One obstore client per bucket, made at start-up; obstore retries transient
    failures (5xx, connection errors) itself, `attempts` times in all with exponential backoff."""

    scheme = "s3"

    def __init__(
        self,
        config: S3Config,
        *,
        attempts: int = 3,
        backoff_s: float = 0.5,
        timeout_s: float = 60.0,
        proxy_url: str | None = None,
    ) -> None:
        self.config = config
        retry: RetryConfig = {
            "max_retries": max(0, attempts - 1),
            "backoff": {"init_backoff": timedelta(seconds=backoff_s), "max_backoff": timedelta(seconds=10), "base": 2},
            "retry_timeout": timedelta(seconds=timeout_s * attempts),
        }
        client: ClientConfig = {
            "connect_timeout": timedelta(seconds=min(10.0, timeout_s)),
            "timeout": timedelta(seconds=timeout_s),  # one request: a part, a small PUT, a GET's headers
            "allow_http": (config.endpoint or "").startswith("http://"),
        }
        if proxy_url is not None:  # an HTTP proxy for every request
            client["proxy_url"] = proxy_url
        self._stores = {name: self._open(name, retry, client) for name in config.readable}
        self._closed = False

    def _open(self, bucket: str, retry: RetryConfig, client: ClientConfig) -> _ObjectStore:
        cfg = self.config
        settings: _StoreConfig = {
            "region": cfg.region,
            "virtual_hosted_style_request": cfg.addressing == "virtual",
        }
        endpoint = cfg.bucket_endpoint(bucket)
        if endpoint is not None:
            settings["endpoint"] = endpoint
        if cfg.keys is not None:
            settings["access_key_id"] = cfg.keys.access_key_id
            settings["secret_access_key"] = cfg.keys.secret_access_key
            if cfg.keys.session_token:
                settings["session_token"] = cfg.keys.session_token
        return _ObjectStore(bucket, config=settings, client_options=client, retry_config=retry)

    @property
    def region(self) -> str:
        return self.config.region

    @property
    def bucket(self) -> str:
        return self.config.bucket

    def missing_credentials(self, credentials: Credentials | None) -> str | None:
        """The instance's AWS credentials sign every request: a caller's Alibaba keys are not needed."""
        return None

    def object_key(self, ext: str) -> str:
        """`<prefix>/<uuid4>.<ext>` (no dot when `ext` is empty or not a plain extension)."""
        ext = ext.lstrip(".")
        name = f"{uuid.uuid4()}.{ext}" if _EXT.fullmatch(ext) else str(uuid.uuid4())
        return f"{self.config.key_prefix}/{name}" if self.config.key_prefix else name

    async def upload(
        self, credentials: Credentials | None, source: Source, ext: str, content_type: str
    ) -> UploadedObject:
        """Put `source` under a new key: a file in parts, streamed from disk, overlapping each
        other; bytes in one request when smaller than a part. OutputError after the retries."""
        cfg = self.config
        key = self.object_key(ext)
        store = self._store(cfg.bucket)
        try:
            await obstore.put_async(
                store,
                key,
                source,
                attributes={"Content-Type": content_type},
                chunk_size=PART_BYTES,
                max_concurrency=PART_CONCURRENCY,
            )
        except (BaseError, OSError) as exc:
            # obstore's NotFound is Python's FileNotFoundError: a missing file has no HTTP status.
            if isinstance(exc, OSError) and _HTTP_STATUS.search(str(exc)) is None:
                reason = exc.strerror or type(exc).__name__
                raise OutputError(f"output file could not be read for upload: {reason}") from None
            raise OutputError(f"S3 upload to bucket {cfg.bucket} failed: {_describe(exc)}") from None
        if cfg.expires_in <= 0:
            return UploadedObject(cfg.region, cfg.bucket, key, None, None)
        expire = int(time.time()) + cfg.expires_in
        url = await self._sign(key, cfg.expires_in)
        return UploadedObject(cfg.region, cfg.bucket, key, url, expire)

    async def sign_object(
        self, credentials: Credentials | None, key: str, expires_in: int, process: str | None = None
    ) -> str | None:
        """A presigned GET of `key` in the output bucket; None for an OSS image `process`, which
        S3 cannot apply (the caller falls back to a link that converts)."""
        if process:
            return None
        return await self._sign(key, min(expires_in, MAX_EXPIRES_S))

    async def read(self, credentials: Credentials | None, url: str, max_bytes: int) -> bytes:
        """The bytes of `s3://bucket/key`, for the buckets the settings name only; InputError
        saying why not. Refused by its size before its body is read, then by counting."""
        body = io.BytesIO()  # handed over without a copy: an accepted object is held in memory once
        async for chunk in self._chunks(url, max_bytes):
            body.write(chunk)
        return body.getvalue()

    async def download(self, credentials: Credentials | None, url: str, dest: Path, max_bytes: int) -> StoredFile:
        """`s3://bucket/key` written to `dest` as it streams (whole or not at all), hashed on the way."""
        try:
            async with FileSink(dest) as sink:
                async for chunk in self._chunks(url, max_bytes):
                    await sink.write(chunk)
        except OSError as exc:  # the download's own file (obstore's are translated in _chunks)
            raise InputError(f"{url} could not be written to disk: {exc.strerror}") from exc
        return sink.stored

    async def _chunks(self, url: str, max_bytes: int) -> AsyncIterator[bytes]:
        try:
            bucket, key = parse_s3_url(url)
        except ValueError as exc:
            raise InputError(f"invalid S3 URL: {exc}") from exc
        where = f"s3://{bucket}/{key}"
        if bucket not in self._stores:
            allowed = ", ".join(self.config.readable)
            raise InputError(f"{where} is not readable by this instance (S3_BUCKET, S3_INPUT_BUCKETS: {allowed})")
        try:
            result = await obstore.get_async(self._store(bucket), key)
            size = result.meta["size"]
            if size > max_bytes:
                raise InputError(f"{where} is too large ({size} bytes): the limit is {max_bytes} bytes")
            total = 0
            async for chunk in result.stream(min_chunk_size=READ_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise InputError(f"{where} is too large: the limit is {max_bytes} bytes")
                yield chunk
        except (FileNotFoundError, NotFoundError):  # obstore raises the first for a missing object
            raise InputError(f"{where} not found") from None
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise InputError(f"{where} access denied: {_describe(exc)}") from None
        except BaseError as exc:
            raise InputError(f"{where} could not be read: {_describe(exc)}") from None

    def close(self) -> None:
        """obstore holds only pooled connections, dropped with the clients."""
        self._closed = True
        self._stores.clear()

    async def _sign(self, key: str, expires_in: int) -> str:
        try:
            return await obstore.sign_async(self._store(self.config.bucket), "GET", key, timedelta(seconds=expires_in))
        except BaseError as exc:
            raise OutputError(f"S3 URL of {self.config.bucket}/{key} could not be signed: {_describe(exc)}") from None

    def _store(self, bucket: str) -> _ObjectStore:
        if self._closed:
            raise RuntimeError("S3Store is closed")
        return self._stores[bucket]


def _describe(exc: BaseException) -> str:
    """What went wrong, for a person: the S3 error code and HTTP status, else what the connection
    did; never obstore's message (it carries S3's error body)."""
    text = str(exc)
    code, status = _ERROR_CODE.search(text), _HTTP_STATUS.search(text)
    if code and status:
        return f"{code[1]} (HTTP {status[1]})"
    if status:
        return f"HTTP {status[1]}"
    kind = _HTTP_KIND.search(text)
    retries = _RETRIES.search(text)
    what = _HTTP_KINDS.get(kind[1], "request failed") if kind else "error"
    return f"{what} (after {retries[1]} retries)" if retries else what
