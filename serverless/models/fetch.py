"""One model download over HTTP(S): streamed to a partial file, resumed with `Range` where the
file already holds a prefix, hashed as it is written, through the input downloads' SSRF guard
(`serverless.inputs.download`: every hop's URL checked, the guarded session's resolver and
connector check every address). Disk writes and hashing run in a thread, one batch at a time
while the next is read. `Authorization` goes only to the host it is configured for, never
across a redirect to another host, and is never logged."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from ..errors import DownloadError
from ..inputs.download import DownloadPolicy, GuardedConnector, check_url, describe_client_error, redact_url

log = logging.getLogger(__name__)

BATCH = 4 * 1024 * 1024  # bytes handed to the writer thread at once
MAX_BYTES = 64 * 1024**3  # one model file, when MODEL_CACHE_MAX_BYTES does not bound it lower
DOWNLOAD_TIMEOUT = 3600.0  # seconds one model download may take, all redirects included
# Linux starts writing a range's dirty pages back on this advice (they stay cached until written):
# a download's closing fsync then waits for its last batch only, not for the whole file.
_WRITE_BACK = getattr(os, "posix_fadvise", None)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
Progress = Callable[[int, int | None], None]  # (bytes so far, total if known)


class Rejected(DownloadError):
    """Content that must not be resumed nor kept (too large, a wrong hash, a broken header)."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A whole download on disk: its size and SHA-256 (hex)."""

    size: int
    sha256: str
    resumed_from: int = 0


class _Writer:
    """Appends to the partial file and hashes what it holds, in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hash = hashlib.sha256()
        self.size = 0
        self._file: Any = None

    def open(self, keep: bool) -> None:
        """Keep (and hash) what the file holds, or start it empty."""
        self.hash, self.size = hashlib.sha256(), 0
        if self._file is not None:
            self._file.close()
        if keep and self.path.exists():
            with open(self.path, "rb") as f:
                while block := f.read(BATCH):
                    self.hash.update(block)
                    self.size += len(block)
            self._file = open(self.path, "ab")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")

    def write(self, chunks: list[bytes]) -> None:
        """Append and hash `chunks` (each as received: not joined into one copy first)."""
        start = self.size
        for data in chunks:
            self._file.write(data)
            self.hash.update(data)
            self.size += len(data)
        if _WRITE_BACK is not None:  # the disk writes it while more arrives: the closing fsync is short
            self._file.flush()
            _WRITE_BACK(self._file.fileno(), start, self.size - start, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


async def fetch_to(
    session: aiohttp.ClientSession,
    url: str,
    partial: Path,
    policy: DownloadPolicy,
    auth: Mapping[str, str],
    on_progress: Progress | None = None,
) -> Fetched:
    """Download `url` into `partial` (resuming what it holds); at most `policy.max_bytes`, within
    `policy.total_timeout`. DownloadError for every failure; `partial` is left for a later resume."""
    if not isinstance(session.connector, GuardedConnector):
        raise TypeError("fetch_to() needs a session from create_download_session()")
    writer = _Writer(partial)
    try:
        await asyncio.to_thread(writer.open, True)
        resumed = writer.size
        async with asyncio.timeout(policy.total_timeout):
            target = URL(url)
            for _hop in range(policy.max_redirects + 1):
                check_url(target, policy)
                following = await _get(session, target, writer, policy, auth, on_progress)
                if following is None:
                    return Fetched(writer.size, writer.hash.hexdigest(), resumed)
                target = following
            raise DownloadError(f"too many redirects (more than {policy.max_redirects})")
    except TimeoutError as exc:
        raise DownloadError(f"timed out after {policy.total_timeout:g}s") from exc
    except (ValueError, TypeError) as exc:
        raise DownloadError("invalid URL") from exc
    finally:
        await asyncio.to_thread(writer.close)


async def _get(
    session: aiohttp.ClientSession,
    url: URL,
    writer: _Writer,
    policy: DownloadPolicy,
    auth: Mapping[str, str],
    on_progress: Progress | None,
) -> URL | None:
    """One request: None once the body is written, or the URL a redirect points to."""
    headers = {}
    if writer.size:
        headers["Range"] = f"bytes={writer.size}-"
    header = auth.get((url.host or "").lower().rstrip("."))
    if header is not None:
        headers["Authorization"] = header
    log.debug("model download: %s from byte %d", redact_url(url), writer.size)
    try:
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            if resp.status in _REDIRECTS and "Location" in resp.headers:
                return url.join(URL(resp.headers["Location"])).with_fragment(None)
            if resp.status == 416 and writer.size:  # what we hold is not a prefix it knows: start over
                await asyncio.to_thread(writer.open, False)
                return url
            if resp.status == 200 and writer.size:  # no Range support: the whole body again
                await asyncio.to_thread(writer.open, False)
            elif resp.status == 206 and not _continues(resp, writer.size):
                raise DownloadError("the server resumed at another byte than asked")
            elif not 200 <= resp.status < 300:
                raise DownloadError(f"HTTP {resp.status}")
            await _stream(resp, writer, policy.max_bytes, on_progress)
            return None
    except aiohttp.ClientError as exc:
        raise DownloadError(describe_client_error(exc)) from exc


def _continues(resp: aiohttp.ClientResponse, start: int) -> bool:
    spec = resp.headers.get("Content-Range", "")
    return spec.startswith(f"bytes {start}-")


async def _stream(resp: aiohttp.ClientResponse, writer: _Writer, max_bytes: int, on_progress: Progress | None) -> None:
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise DownloadError(f"unsupported Content-Encoding {encoding!r}")
    total = writer.size + resp.content_length if resp.content_length is not None else None
    if total is not None and total > max_bytes:
        resp.close()
        raise Rejected(f"larger than {max_bytes} bytes (MODEL_CACHE_MAX_BYTES; Content-Length says {total})")
    done = writer.size
    batch: list[bytes] = []
    batched = 0
    pending: asyncio.Future[None] | None = None
    try:
        async for chunk in resp.content.iter_any():  # each as received: no joining copy
            done += len(chunk)
            if done > max_bytes:
                resp.close()
                raise Rejected(f"larger than {max_bytes} bytes (MODEL_CACHE_MAX_BYTES)")
            batch.append(chunk)
            batched += len(chunk)
            if batched >= BATCH:
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(asyncio.to_thread(writer.write, batch))
                batch, batched = [], 0
            if on_progress is not None:  # received, not yet all on disk: the listener rate-limits
                on_progress(done, total)
    finally:
        if pending is not None:  # the write under way ends before the file is closed or reopened
            await asyncio.gather(pending, return_exceptions=True)
        if batch:  # what arrived is kept, also when the body broke off: a later try resumes after it
            await asyncio.to_thread(writer.write, batch)
    if pending is not None:
        pending.result()
    if total is not None and done != total:
        raise DownloadError("response body broken off")
    if on_progress is not None:
        on_progress(done, total)
