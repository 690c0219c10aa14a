"""The content-addressed model store: files by sha256 under MODEL_CACHE_DIR, placed under stable
names in ComfyUI's models folder (MODELS_DIR/<folder>/<name>: a hard link, else a symbolic link,
else a copy), shared by every instance that mounts the same folders (FC's NAS).

    <cache>/blobs/<sha256>         the content, verified, renamed into place whole
    <cache>/meta/<sha256>.json     its source, size, pinned flag and the names it is placed under
    <cache>/urls/<key>             the sha256 a reference (URL, oss://, s3://) gave, by its hash
    <cache>/partial/<key>.part     a download under way (resumed with Range after a failure)
    <cache>/locks/<key>.lock       held (flock) by the one instance downloading the reference

A reference is downloaded once: callers in this process wait for the one download under way
(single-flight), other instances wait on its lock file and then find it in the index. A file's
last use is its blob's modification time. Every disk step runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..core.credentials import Credentials
from ..errors import Conflict, InputError, NotFound
from .fetch import Rejected
from .metrics import ModelMetrics
from .refs import ModelRef, check_name
from .safetensors import check_safetensors, looks_like_safetensors

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]
# (reference, partial file, progress) -> (size, sha256): an HTTP download, or a bucket read.
Downloader = Callable[[ModelRef, Path, Credentials | None, Progress | None], Awaitable[tuple[int, str]]]
LOCK_POLL = 0.1


@dataclass(frozen=True, slots=True)
class Placed:
    """A model in ComfyUI's folder, as `data.models` and the import report it."""

    folder: str
    name: str
    sha256: str
    bytes: int
    source: str
    cached: bool
    download_s: float


@dataclass
class _Flight:
    """One download under way, that every caller naming the reference waits for."""

    task: asyncio.Task[tuple[str, int, float]]
    listeners: list[Progress] = field(default_factory=list)

    def progress(self, done: int, total: int | None) -> None:
        for listener in list(self.listeners):
            listener(done, total)


class ModelStore:
    """The store's operations; what is wrong with a reference is an `InputError`."""

    def __init__(
        self,
        models_dir: Path,
        cache: Path,
        download: Downloader,
        metrics: ModelMetrics,
        max_cache_bytes: int = 0,
        on_changed: Callable[[ModelStore], Awaitable[None]] | None = None,
        instance: str = "local",
    ) -> None:
        self.instance = instance  # who publishes this store's listing on a fleet
        self.models_dir = models_dir
        self.cache = cache
        self._download = download
        self.metrics = metrics
        self.max_cache_bytes = max_cache_bytes
        self._on_changed = on_changed
        self._flights: dict[str, _Flight] = {}
        for sub in ("blobs", "meta", "urls", "partial", "locks"):
            (cache / sub).mkdir(parents=True, exist_ok=True)
        models_dir.mkdir(parents=True, exist_ok=True)
        self.store_id = _store_id(cache / "id")  # the same for every instance sharing the cache

    # --- references -------------------------------------------------------------------------

    async def obtain(
        self,
        ref: ModelRef,
        folder: str,
        credentials: Credentials | None,
        name: str | None = None,
        pinned: bool | None = None,
        progress: Progress | None = None,
    ) -> Placed:
        """The model `ref` names, placed in `folder` (under `name`, else a stable name of its
        own): from the store when it holds it, else downloaded once."""
        hit = await asyncio.to_thread(self._cached, ref, folder, name, pinned)
        if hit is not None:
            self.metrics.hits.inc()
            return hit
        if ref.kind == "hash":
            raise InputError(f"the model store holds no {ref.location} (import it first: POST /api/models)")
        flight = self._flights.get(ref.key)
        if flight is None:
            flight = _Flight(asyncio.create_task(self._fetch(ref, credentials), name=f"model download {ref.key[:12]}"))
            self._flights[ref.key] = flight
            flight.task.add_done_callback(lambda task: self._landed(ref.key, task))
        if progress is not None:
            flight.listeners.append(progress)
        try:
            digest, size, seconds = await asyncio.shield(flight.task)
        finally:
            if progress is not None:
                with contextlib.suppress(ValueError):
                    flight.listeners.remove(progress)
        if ref.sha256 is not None and digest != ref.sha256:  # an index entry made before the pin was known
            raise InputError(f"the content's sha256 is {digest}, not the pinned {ref.sha256}")
        placed = await asyncio.to_thread(self._place, digest, folder, name or ref.file_name(), pinned)
        await self._changed()
        return Placed(folder, placed, digest, size, ref.shown, seconds == 0.0, round(seconds, 4))

    def _landed(self, key: str, task: asyncio.Task[tuple[str, int, float]]) -> None:
        """A download ended: the next caller starts afresh (its failure was told to its waiters)."""
        self._flights.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone (cancelled) before it failed

    async def aclose(self) -> None:
        """Stop the downloads under way (their partial files stay, to be resumed)."""
        tasks = [flight.task for flight in self._flights.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _changed(self) -> None:
        """Tell ComfyUI's readers (the /object_info cache, a fleet's gateways) of a change."""
        if self._on_changed is not None:
            await self._on_changed(self)

    def _cached(self, ref: ModelRef, folder: str, name: str | None, pinned: bool | None) -> Placed | None:
        """The model when the store holds it, placed (blocking)."""
        digest = ref.sha256 if ref.kind == "hash" else self._indexed(ref.key)
        if digest is None or (ref.sha256 is not None and digest != ref.sha256):
            return None
        meta = self._meta(digest)
        if meta is None or (ref.kind == "hash" and not (self.cache / "blobs" / digest).exists()):
            return None  # (an indexed URL's blob was found there by `_indexed`)
        wanted = name or (ref.file_name() if ref.kind != "hash" else _hash_name(meta, folder, digest))
        placed = self._place(digest, folder, wanted, pinned)
        return Placed(folder, placed, digest, int(meta["bytes"]), str(meta.get("source", "")), True, 0.0)

    async def _fetch(self, ref: ModelRef, credentials: Credentials | None) -> tuple[str, int, float]:
        """Download `ref` into the store once across instances (its lock file held meanwhile)."""
        lock = await self._lock(self.cache / "locks" / f"{ref.key}.lock")
        try:
            digest = await asyncio.to_thread(self._indexed, ref.key)
            if digest is not None:  # another instance got it while we waited
                meta = await asyncio.to_thread(self._meta, digest)
                if meta is not None:
                    self.metrics.hits.inc()
                    return digest, int(meta["bytes"]), 0.0
            self.metrics.misses.inc()
            partial = self.cache / "partial" / f"{ref.key}.part"
            flight = self._flights.get(ref.key)
            started = time.monotonic()
            try:
                size, digest = await self._download(ref, partial, credentials, flight.progress if flight else None)
                await asyncio.to_thread(self._verify, ref, partial, digest)
            except Rejected:
                await asyncio.to_thread(partial.unlink, True)
                raise
            seconds = max(time.monotonic() - started, 1e-6)
            self.metrics.download_bytes.inc(size)
            self.metrics.download_seconds.inc(seconds)
            await asyncio.to_thread(self._commit, partial, digest, size, ref)
            log.info("model %s stored: %d bytes in %.2fs (%s)", digest[:12], size, seconds, ref.shown)
        finally:
            await asyncio.to_thread(_unlock, lock)
        await self.evict(keep={digest})
        return digest, size, seconds

    def _verify(self, ref: ModelRef, partial: Path, digest: str) -> None:
        if ref.sha256 is not None and digest != ref.sha256:
            raise Rejected(f"the content's sha256 is {digest}, not the pinned {ref.sha256}")
        if looks_like_safetensors(ref.file_name()):
            reason = check_safetensors(partial)
            if reason is not None:
                raise Rejected(f"not a usable safetensors file: {reason}")

    async def _lock(self, path: Path) -> int:
        """The lock file, held by this process (waiting while another instance holds it)."""
        while True:
            fd = await asyncio.to_thread(_try_lock, path)
            if fd is not None:
                return fd
            await asyncio.sleep(LOCK_POLL)

    # --- in use -----------------------------------------------------------------------------

    def use(self, digests: list[str]) -> Callable[[], None]:
        """The models a running job uses (blocking: call in a thread): a shared lock on each
        one's use file, which eviction and delete (an exclusive try) respect on every instance
        sharing the cache, until the returned call. InputError when one was evicted meanwhile."""
        held: list[int] = []
        try:
            for digest in digests:
                held.append(_lock_file(self._use_lock(digest), fcntl.LOCK_SH))
                if not (self.cache / "blobs" / digest).exists():
                    raise InputError(f"model sha256:{digest} was evicted while it was placed: run again")
        except BaseException:
            _close_all(held)
            raise
        return lambda: _close_all(held)

    def hold_cached(self, wanted: list[tuple[ModelRef, str]]) -> tuple[list[Placed], Callable[[], None]] | None:
        """Every (reference, folder) of `wanted` placed from the store and held in use (as
        `use`), in one blocking call: a job whose models are all cached pays one thread hop.
        None when the store lacks one of them (nothing is held then: `obtain` each)."""
        placed = []
        for ref, folder in wanted:
            hit = self._cached(ref, folder, None, None)
            if hit is None:
                return None
            placed.append(hit)
        return placed, self.use(sorted({hit.sha256 for hit in placed}))

    def _use_lock(self, digest: str) -> Path:
        return self.cache / "locks" / f"use-{digest}.lock"

    def _unused(self, digest: str) -> int | None:
        """An exclusive hold on a model no job uses (on any instance), or None."""
        fd = os.open(self._use_lock(digest), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    async def evict(self, keep: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        """Least recently used models removed until the store is under MODEL_CACHE_MAX_BYTES;
        never a pinned one, one in use, or one in `keep`."""
        if not self.max_cache_bytes:
            return []
        evicted = await asyncio.to_thread(self._evict, set(keep))
        for digest in evicted:
            self.metrics.evictions.inc()
            log.info("model %s evicted (MODEL_CACHE_MAX_BYTES=%d)", digest[:12], self.max_cache_bytes)
        return evicted

    def _evict(self, spared: set[str]) -> list[str]:
        entries = []
        for meta in self._metas():
            blob = self.cache / "blobs" / meta["sha256"]
            with contextlib.suppress(FileNotFoundError):
                entries.append((blob.stat().st_mtime, meta))
        total = sum(int(meta["bytes"]) for _, meta in entries)
        evicted = []
        for _, meta in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.max_cache_bytes:
                break
            if meta.get("pinned") or meta["sha256"] in spared:
                continue
            hold = self._unused(meta["sha256"])
            if hold is None:  # a running job uses it
                continue
            try:
                self._remove(meta)
            finally:
                _unlock(hold)
            total -= int(meta["bytes"])
            evicted.append(meta["sha256"])
        return evicted

    # --- the models API -----------------------------------------------------------------------

    async def listing(self, folder: str | None = None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._listing, folder)

    def _listing(self, folder: str | None) -> list[dict[str, Any]]:
        found = []
        for meta in self._metas():
            blob = self.cache / "blobs" / meta["sha256"]
            try:
                used = datetime.fromtimestamp(blob.stat().st_mtime, UTC).isoformat(timespec="seconds")
            except FileNotFoundError:
                continue
            for each_folder, name in meta.get("names", []):
                if folder is None or each_folder == folder:
                    found.append(_entry(meta, each_folder, name, used))
        return sorted(found, key=lambda e: (e["folder"], e["name"]))

    async def delete(self, folder: str, name: str) -> None:
        """Remove a placed model; its file goes too when no other name holds it. Conflict while a
        running job uses it."""
        await asyncio.to_thread(self._delete, folder, check_name(name))
        await self._changed()

    def _delete(self, folder: str, name: str) -> None:
        meta = self._owner_of(folder, name)
        hold = self._unused(meta["sha256"])
        if hold is None:
            raise Conflict(f"model {folder}/{name} is in use by a running job")
        try:
            names = [n for n in meta["names"] if n != [folder, name]]
            _unlink_ours(self.models_dir / folder / name, self.cache / "blobs" / meta["sha256"])
            if names:
                self._update(meta["sha256"], lambda m: m.update(names=names))
            else:
                self._remove(meta)
        finally:
            _unlock(hold)

    async def set_pinned(self, folder: str, name: str, pinned: bool) -> dict[str, Any]:
        entry = await asyncio.to_thread(self._set_pinned, folder, check_name(name), pinned)
        await self._changed()
        return entry

    def _set_pinned(self, folder: str, name: str, pinned: bool) -> dict[str, Any]:
        meta = self._update(self._owner_of(folder, name)["sha256"], lambda m: m.update(pinned=pinned))
        return _entry(meta, folder, name, None)

    def _owner_of(self, folder: str, name: str) -> dict[str, Any]:
        for meta in self._metas():
            if [folder, name] in meta.get("names", []):
                return meta
        raise NotFound(f"the model store has no {folder}/{name}")

    # --- files (blocking) -----------------------------------------------------------------------

    def _indexed(self, key: str) -> str | None:
        try:
            digest = (self.cache / "urls" / key).read_text().strip()
        except FileNotFoundError:
            return None
        return digest if (self.cache / "blobs" / digest).exists() else None

    def _meta(self, digest: str) -> dict[str, Any] | None:
        try:
            meta: dict[str, Any] = json.loads((self.cache / "meta" / f"{digest}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return meta

    def _metas(self) -> list[dict[str, Any]]:
        found = []
        for path in (self.cache / "meta").glob("*.json"):
            meta = self._meta(path.stem)
            if meta is not None:
                found.append(meta)
        return found

    def _update(self, digest: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Change a blob's meta under its lock (instances sharing the cache take turns)."""
        lock = _try_lock(self.cache / "locks" / f"meta-{digest}.lock", block=True)
        try:
            meta = self._meta(digest)
            if meta is None:
                raise NotFound(f"the model store has no sha256:{digest}")
            change(meta)
            _write_json(self.cache / "meta" / f"{digest}.json", meta)
            return meta
        finally:
            _unlock(lock)

    def _commit(self, partial: Path, digest: str, size: int, ref: ModelRef) -> None:
        blob = self.cache / "blobs" / digest
        if blob.exists():
            partial.unlink(missing_ok=True)
        else:
            os.replace(partial, blob)
        if self._meta(digest) is None:
            meta = {"sha256": digest, "bytes": size, "source": ref.shown, "pinned": False, "names": []}
            _write_json(self.cache / "meta" / f"{digest}.json", meta)
        _write_text(self.cache / "urls" / ref.key, digest)

    def _place(self, digest: str, folder: str, name: str, pinned: bool | None) -> str:
        """`digest` under `folder`/`name` (a name another file holds gets the hash beside it);
        its last use is now. Returns the name ComfyUI lists."""
        blob = self.cache / "blobs" / digest
        check_name(name)
        target = self.models_dir / folder / name
        if target.exists() and not _same_file(target, blob):
            stem, dot, ext = name.rpartition(".")
            name = f"{stem}-{digest[:12]}.{ext}" if dot else f"{name}-{digest[:12]}"
            target = self.models_dir / folder / name
        fresh = not (target.exists() and _same_file(target, blob))
        if fresh:
            _link(blob, target)
        os.utime(blob)
        meta = self._meta(digest)
        if fresh or meta is None or [folder, name] not in meta.get("names", []) or pinned is not None:

            def change(m: dict[str, Any]) -> None:
                if [folder, name] not in m.setdefault("names", []):
                    m["names"].append([folder, name])
                if pinned is not None:
                    m["pinned"] = pinned

            self._update(digest, change)
        return name

    def _remove(self, meta: dict[str, Any]) -> None:
        digest = meta["sha256"]
        blob = self.cache / "blobs" / digest
        for folder, name in meta.get("names", []):
            _unlink_ours(self.models_dir / folder / name, blob)
        (self.cache / "meta" / f"{digest}.json").unlink(missing_ok=True)
        blob.unlink(missing_ok=True)


def _entry(meta: dict[str, Any], folder: str, name: str, last_used: str | None) -> dict[str, Any]:
    return {
        "folder": folder,
        "name": name,
        "sha256": meta["sha256"],
        "bytes": meta["bytes"],
        "source": meta.get("source"),
        "pinned": bool(meta.get("pinned")),
        "last_used": last_used,
    }


def _hash_name(meta: dict[str, Any], folder: str, digest: str) -> str:
    """The name a `sha256:` reference gets in `folder`: one it has there, else the hash."""
    names = meta.get("names", [])
    for each_folder, name in names:
        if each_folder == folder:
            return str(name)
    ext = names[0][1].rpartition(".")[2] if names and "." in names[0][1] else "safetensors"
    return f"{digest[:12]}.{ext}"


def _same_file(path: Path, blob: Path) -> bool:
    try:
        return os.path.samefile(path, blob)
    except OSError:
        return False


def _link(blob: Path, target: Path) -> None:
    """`target` becomes `blob`: a hard link, else a symbolic link, else a copy; through a temporary
    name renamed over it, so ComfyUI never lists a half-made file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(blob, temporary)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            try:
                os.symlink(os.path.abspath(blob), temporary)
            except OSError:
                shutil.copyfile(blob, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _unlink_ours(target: Path, blob: Path) -> None:
    """Remove a placed name, unless someone put another file there since."""
    if target.is_symlink() or _same_file(target, blob):
        target.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _write_json(path: Path, value: Any) -> None:
    _write_text(path, json.dumps(value))


def _try_lock(path: Path, block: bool = False) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_file(path: Path, how: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, how)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close_all(fds: list[int]) -> None:
    """Closing a file descriptor lets go of its flock."""
    while fds:
        os.close(fds.pop())


def _unlock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _store_id(path: Path) -> str:
    """The cache's id, made by the first instance to open it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        for _ in range(50):  # its maker may not have written it yet
            if text := path.read_text().strip():
                return text
            time.sleep(0.01)
        return str(path)
    made = uuid.uuid4().hex
    with os.fdopen(fd, "w") as f:
        f.write(made)
    return made
