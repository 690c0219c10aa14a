"""Alibaba OSS: where outputs are uploaded and `oss://` loader inputs are read (CONTRACT.md section 6).

oss2 is blocking, so every call that touches the network runs in a worker thread. oss2 errors are
translated here and only here: into `OutputError` for uploads, `InputError` for reads. Nothing this
module logs or raises contains an access key, secret, security token or signed URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import oss2  # type: ignore[import-untyped]
import urllib3
from oss2.credentials import StaticCredentialsProvider  # type: ignore[import-untyped]
from oss2.exceptions import InconsistentError, OssError, RequestError  # type: ignore[import-untyped]

from serverless.errors import InputError, OutputError

from ..core.credentials import Credentials
from .oss_config import ALIYUN_HOST, MAX_EXPIRES_S, OssConfig, ReadRule, parse_oss_url, read_rules
from .storage import Source, StoredFile, UploadedObject

__all__ = ["Credentials", "OssConfig", "OssStore", "ReadRule", "UploadedObject", "parse_oss_url", "read_rules"]

log = logging.getLogger(__name__)
# oss2 logs request headers (Authorization, x-oss-security-token) at DEBUG, and at INFO every OSS
# error body, which for a bad signature echoes the canonical request, security token included.
logging.getLogger("oss2").setLevel(logging.WARNING)

_READ_CHUNK = 256 * 1024
_EXT = re.compile(r"[A-Za-z0-9_-]{1,32}")
_SAFE_DETAILS = ("Code", "Message", "RequestId", "HostId", "EC")
_T = TypeVar("_T")


class _TooLarge(Exception):
    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size


def _is_transient(exc: OssError) -> bool:
    return isinstance(exc, (RequestError, InconsistentError)) or exc.status >= 500


def _describe(exc: OssError) -> str:
    """What went wrong, for a person: the OSS code, status and request id; never the error body."""
    if isinstance(exc, RequestError):
        return f"connection failed ({type(exc.exception).__name__})"
    if isinstance(exc, InconsistentError):
        return "checksum mismatch"
    if exc.status < 0:
        return type(exc).__name__
    request_id = f", request id {exc.request_id}" if exc.request_id else ""
    return f"{exc.code or 'error'} (HTTP {exc.status}{request_id})"


def _scrubbed(exc: OssError) -> OssError:
    """The same error without its body: OSS echoes the signed canonical request, token included,
    and a traceback prints it."""
    exc.details = {k: v for k, v in exc.details.items() if k in _SAFE_DETAILS}
    exc.body = b""
    exc.args = ()
    return exc


def _stream_capped(bucket: Any, key: str, max_bytes: int, write: Callable[[bytes], object]) -> int:
    """GET the object into `write`, refusing it by its length first and by counting while it
    streams; its size. Network failures are RequestError (retried), a failing `write` itself."""
    with bucket.get_object(key) as result:
        if result.content_length is not None and result.content_length > max_bytes:
            raise _TooLarge(result.content_length)
        total, crc = 0, oss2.utils.Crc64()
        # One pass over the raw body. oss2's own reader restarts requests' iterator on every read,
        # which loses data of a chunked response; and the raw bytes are what OSS's CRC covers.
        chunks = iter(result.resp.response.raw.stream(_READ_CHUNK, decode_content=False))
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise RequestError(exc) from exc
            total += len(chunk)
            if total > max_bytes:
                raise _TooLarge(None)
            crc.update(chunk)
            write(chunk)
        oss2.utils.check_crc("get object", crc.crc, result.server_crc, result.request_id)
    return total


def _read_capped(bucket: Any, key: str, max_bytes: int) -> bytes:
    # One buffer, handed over without a copy: an accepted object is held in memory once.
    body = io.BytesIO()
    _stream_capped(bucket, key, max_bytes, body.write)
    return body.getvalue()


def _download_capped(bucket: Any, key: str, max_bytes: int, dest: Path) -> StoredFile:
    """The object into `dest` through a hidden partial file (each attempt anew), hashed on the way."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as f:

            def write(chunk: bytes) -> None:
                digest.update(chunk)
                f.write(chunk)

            size = _stream_capped(bucket, key, max_bytes, write)
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return StoredFile(size, digest.hexdigest())


class OssStore:
    """Uploads outputs to the configured bucket and reads `oss://` inputs, retrying transient
    failures (5xx, connection errors, checksum mismatches) with exponential backoff.

    One oss2 session (connection pool) for all calls; oss2 `Bucket` objects are kept per
    (credentials, endpoint, bucket, region), the least recently used dropped beyond `cache_size`.
    Calls run in the store's own `max_calls` threads: asyncio's default executor has only
    cpu_count + 4 (6 on a 2-core instance), shared with the rest of the app, which would queue a
    job's 8 concurrent uploads behind each other.
    """

    def __init__(
        self,
        config: OssConfig,
        *,
        attempts: int = 3,
        backoff_s: float = 0.5,
        timeout_s: float = 60.0,
        cache_size: int = 32,
        max_calls: int = 32,
        read_allowed: tuple[ReadRule, ...] | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.read_allowed = read_allowed if read_allowed is not None else read_rules(None, config)
        self._on_retry = on_retry  # counts retries (metrics)
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._cache_size = cache_size
        self._session = oss2.Session(pool_size=max_calls)
        self._threads = ThreadPoolExecutor(max_calls, thread_name_prefix="oss")
        self._buckets: OrderedDict[tuple[Credentials | None, str, str, str], Any] = OrderedDict()
        self._closed = False

    scheme = "oss"

    @property
    def region(self) -> str:
        return self.config.region

    @property
    def bucket(self) -> str:
        return self.config.bucket

    def missing_credentials(self, credentials: Credentials | None) -> str | None:
        """OSS signs with the request's or the instance's Alibaba Cloud keys: there must be some."""
        if credentials is None:
            return (
                "output_oss was asked but there are no OSS credentials (x-fc-access-key-* headers "
                "or ALIBABA_CLOUD_ACCESS_KEY_ID/SECRET)"
            )
        return None

    def object_key(self, ext: str) -> str:
        """`<prefix>/<uuid4>.<ext>` (no dot when `ext` is empty or not a plain extension)."""
        ext = ext.lstrip(".")
        name = f"{uuid.uuid4()}.{ext}" if _EXT.fullmatch(ext) else str(uuid.uuid4())
        return f"{self.config.key_prefix}/{name}" if self.config.key_prefix else name

    async def upload(self, creds: Credentials | None, source: Source, ext: str, content_type: str) -> UploadedObject:
        """Put `source` (bytes, or a file streamed from disk) under a new key; OutputError if it
        still fails after retries. The URL is signed only once the object is in the bucket."""
        cfg = self.config
        if creds is None:
            raise OutputError(f"OSS upload to bucket {cfg.bucket} failed: no OSS credentials")
        key = self.object_key(ext)
        bucket = self._bucket(creds, cfg.endpoint, cfg.bucket, cfg.signing_region)
        headers = {"Content-Type": content_type}
        if isinstance(source, Path):
            put = partial(bucket.put_object_from_file, key, str(source), headers=headers)
        else:
            put = partial(bucket.put_object, key, source, headers=headers)
        try:
            await self._retrying(put, f"upload to {cfg.bucket}/{key}")
        except OssError as exc:
            message = f"OSS upload to bucket {cfg.bucket} failed: {_describe(exc)}"
            raise OutputError(message) from _scrubbed(exc)
        except OSError as exc:
            raise OutputError(f"output file could not be read for upload: {exc.strerror}") from exc
        if cfg.expires_in <= 0:
            return UploadedObject(cfg.region, cfg.bucket, key, None, None)
        signer = self._bucket(creds, cfg.sign_endpoint, cfg.bucket, cfg.signing_region)
        expire = int(time.time()) + cfg.expires_in
        url = signer.sign_url("GET", key, cfg.expires_in, slash_safe=True)
        return UploadedObject(cfg.region, cfg.bucket, key, url, expire)

    async def sign_object(
        self, creds: Credentials | None, key: str, expires_in: int, process: str | None = None
    ) -> str | None:
        """A new signed GET URL of the existing object `key` of the configured bucket, valid
        `expires_in` seconds; `process` (e.g. `image/format,jpg/quality,q_80`) is signed in as its
        `x-oss-process` (OSS converts the image as it serves it)."""
        cfg = self.config
        if creds is None:
            return None
        signer = self._bucket(creds, cfg.sign_endpoint, cfg.bucket, cfg.signing_region)
        params = {"x-oss-process": process} if process else None
        sign = partial(signer.sign_url, "GET", key, min(expires_in, MAX_EXPIRES_S), slash_safe=True, params=params)
        url: str = await asyncio.get_running_loop().run_in_executor(self._threads, sign)
        return url

    async def read(self, creds: Credentials | None, url: str, max_bytes: int) -> bytes:
        """The bytes of `oss://...` (anonymously when `creds` is None); InputError saying why not.
        The instance's own credentials read only what `read_allowed` lists (no confused deputy)."""
        return await self._get(creds, url, max_bytes, partial(_read_capped, max_bytes=max_bytes))

    async def download(self, creds: Credentials | None, url: str, dest: Path, max_bytes: int) -> StoredFile:
        """`oss://...` written to `dest` as it streams (whole or not at all), as `read` reads it."""
        return await self._get(creds, url, max_bytes, partial(_download_capped, max_bytes=max_bytes, dest=dest))

    async def _get(self, creds: Credentials | None, url: str, max_bytes: int, fetch: Callable[..., _T]) -> _T:
        """`fetch(bucket, key)` of the object `url` names, in a thread with retries, once the URL,
        its endpoint and the credentials' right to read it are checked; InputError saying why not."""
        try:
            bucket_name, endpoint, key = parse_oss_url(url, self.config.endpoint)
        except ValueError as exc:
            raise InputError(f"invalid OSS URL: {exc}") from exc
        where = f"oss://{bucket_name}/{key}"
        endpoint_url, region = self._route(endpoint, where)
        if (
            creds is not None
            and not creds.from_caller
            and not any(rule.allows(bucket_name, key) for rule in self.read_allowed)
        ):
            allowed = ", ".join(map(str, self.read_allowed)) or "nothing"
            raise InputError(
                f"{where} is not readable with the instance's credentials (OSS_INPUT_ALLOWED: {allowed}); "
                "send your own OSS credentials (x-fc-access-key-* headers) to read it"
            )
        try:
            bucket = self._bucket(creds, endpoint_url, bucket_name, region)
            return await self._retrying(partial(fetch, bucket, key), f"read of {where}")
        except _TooLarge as exc:
            size = f" ({exc.size} bytes)" if exc.size is not None else ""
            raise InputError(f"{where} is too large{size}: the limit is {max_bytes} bytes") from exc
        except OssError as exc:
            if exc.status == 404:
                reason = "not found"
            elif exc.status == 403:
                reason = f"access denied: {_describe(exc)}"
            else:
                reason = f"could not be read: {_describe(exc)}"
            raise InputError(f"{where} {reason}") from _scrubbed(exc)
        except OSError as exc:  # the download's own file
            raise InputError(f"{where} could not be written to disk: {exc.strerror}") from exc

    def close(self) -> None:
        """Release pooled connections; the store cannot be used afterwards."""
        self._closed = True
        self._buckets.clear()
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._session.session.close()

    def _route(self, endpoint: str, where: str) -> tuple[str, str]:
        """URL and signing region for an endpoint an input names. Only the configured endpoint and
        Alibaba OSS endpoints: credentials are never signed for a host a caller chose."""
        cfg = self.config
        if endpoint in (cfg.endpoint, urlsplit(cfg.endpoint).netloc):
            return cfg.endpoint, cfg.signing_region
        match = ALIYUN_HOST.fullmatch(endpoint)
        if match is None:
            raise InputError(f"{where}: endpoint {endpoint!r} is not an Alibaba Cloud OSS endpoint")
        if match["region"] == cfg.signing_region:
            return cfg.endpoint, cfg.signing_region
        return f"https://{endpoint}", match["region"]

    def _bucket(self, creds: Credentials | None, endpoint: str, name: str, region: str) -> Any:
        if self._closed:
            raise RuntimeError("OssStore is closed")
        cache_key = (creds, endpoint, name, region)
        bucket = self._buckets.get(cache_key)
        if bucket is not None:
            self._buckets.move_to_end(cache_key)
            return bucket
        if creds is None:
            auth = oss2.AnonymousAuth()
        else:
            auth = oss2.ProviderAuthV4(
                StaticCredentialsProvider(creds.access_key_id, creds.access_key_secret, creds.security_token or "")
            )
        bucket = oss2.Bucket(
            auth, endpoint, name, session=self._session, connect_timeout=self._timeout_s, region=region
        )
        self._buckets[cache_key] = bucket
        if len(self._buckets) > self._cache_size:
            self._buckets.popitem(last=False)
        return bucket

    async def _retrying(self, call: Callable[[], _T], what: str) -> _T:
        """Run `call` in a thread; on a transient OSS error wait (0.5 s, 1 s, ...) and run it again."""
        loop = asyncio.get_running_loop()
        for attempt in range(1, self._attempts + 1):
            try:
                return await loop.run_in_executor(self._threads, call)
            except OssError as exc:
                if attempt == self._attempts or not _is_transient(exc):
                    raise
                delay = self._backoff_s * 2 ** (attempt - 1)
                if self._on_retry is not None:
                    self._on_retry()
                log.warning(
                    "OSS %s failed (%s), attempt %d of %d; retrying in %.2fs",
                    what,
                    _describe(exc),
                    attempt,
                    self._attempts,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")
