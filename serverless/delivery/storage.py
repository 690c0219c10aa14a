"""The bucket seam: what uploads outputs, signs their URLs and reads `oss://` or `s3://` loader inputs.

Two kinds of bucket stand behind `Storage`, chosen by `STORAGE` (settings): Alibaba OSS
(`delivery/oss.py`, oss2 in threads, V4 signing) and any S3-compatible service (`delivery/s3.py`,
obstore). Callers hold a `Storage` and never ask which kind it is; mypy holds each kind to it.

The value types here (an uploaded object; the caller's credentials, `serverless.core.credentials`)
import no SDK, so a transport can name them without loading oss2 or obstore.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from ..core.credentials import Credentials

# What an upload reads: bytes already in memory (a converted image), or a file streamed from disk.
Source = bytes | Path


@dataclass(frozen=True, slots=True)
class UploadedObject:
    """An object that is in the bucket; `url` (signed) and `expire` (Unix time) only with an expiry."""

    region: str
    bucket: str
    object: str
    url: str | None = field(repr=False)
    expire: int | None

    def to_payload(self) -> dict[str, Any]:
        """The result's `output.oss` object (its name is FC's, whatever the kind of bucket)."""
        return {
            "region": self.region,
            "bucket": self.bucket,
            "object": self.object,
            "url": self.url,
            "expire": self.expire,
        }


@dataclass(frozen=True, slots=True)
class StoredFile:
    """An object downloaded to disk: its size and SHA-256 (hex), counted as it streamed."""

    size: int
    sha256: str


class FileSink:
    """Writes a download to `dest` through a hidden partial file, in a thread per chunk (the loop
    never waits on the disk); renamed into place on success, removed on any failure, so `dest`
    is whole or absent. `stored` tells its size and SHA-256 once the block ends."""

    def __init__(self, dest: Path) -> None:
        self._dest = dest
        self._partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self.stored = StoredFile(0, "")

    async def __aenter__(self) -> FileSink:
        self._file = await asyncio.to_thread(self._open)
        return self

    def _open(self) -> BinaryIO:
        self._dest.parent.mkdir(parents=True, exist_ok=True)
        return open(self._partial, "wb")

    async def write(self, chunk: bytes) -> None:
        assert self._file is not None
        self._hash.update(chunk)
        self._size += len(chunk)
        await asyncio.to_thread(self._file.write, chunk)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        assert self._file is not None
        await asyncio.to_thread(self._finish, exc is None)
        if exc is None:
            self.stored = StoredFile(self._size, self._hash.hexdigest())

    def _finish(self, keep: bool) -> None:
        assert self._file is not None
        self._file.close()
        if keep:
            os.replace(self._partial, self._dest)
        else:
            self._partial.unlink(missing_ok=True)


class Storage(Protocol):
    """A bucket that outputs go to and loader inputs are read from.

    Errors are the contract's: `OutputError` for an upload that failed after its retries (never an
    object that was not uploaded), `InputError` for a read, saying why in words a caller can act on.
    Nothing a storage logs or raises holds a key, a token or a signed URL."""

    @property
    def scheme(self) -> str:
        """The input URL scheme it reads: `oss` or `s3`."""
        ...

    @property
    def region(self) -> str:
        """The output bucket's region, as results report it."""
        ...

    @property
    def bucket(self) -> str:
        """The bucket outputs are uploaded to."""
        ...

    def missing_credentials(self, credentials: Credentials | None) -> str | None:
        """Why outputs cannot be uploaded with `credentials` (the request's or the instance's
        Alibaba Cloud keys), or None when they can."""
        ...

    async def upload(
        self, credentials: Credentials | None, source: Source, ext: str, content_type: str
    ) -> UploadedObject:
        """Put `source` under a new key `<prefix>/<uuid4>.<ext>`; a Path is streamed, never read
        whole. The URL is signed (when an expiry is configured) once the object is in the bucket."""
        ...

    async def sign_object(
        self, credentials: Credentials | None, key: str, expires_in: int, process: str | None = None
    ) -> str | None:
        """A new signed GET URL of `key` in the output bucket, valid `expires_in` seconds; None when
        it cannot be signed here (no credentials, or an OSS `process` on a bucket without one)."""
        ...

    async def read(self, credentials: Credentials | None, url: str, max_bytes: int) -> bytes:
        """The bytes of an `oss://` or `s3://` input, streamed and refused past `max_bytes`."""
        ...

    async def download(self, credentials: Credentials | None, url: str, dest: Path, max_bytes: int) -> StoredFile:
        """An `oss://` or `s3://` object written to `dest` as it streams (never whole in memory;
        for models and other big files), refused past `max_bytes`; `dest` is whole or absent."""
        ...

    def close(self) -> None:
        """Release connections and threads; the storage cannot be used afterwards."""
        ...
