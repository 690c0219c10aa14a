"""The API keys an app accepts: `API_KEYS` (every right) and the lines of `API_KEYS_FILE`
(`keyfile`), looked at again while the app runs (`watch`). Keys are kept as SHA-256 digests and
compared in constant time (every digest is compared, whichever matches)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from ..auth import ANYONE, Caller
from ..errors import Unauthorized
from .keyfile import KeyEntry, KeyFileError, parse, plain_key

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5  # seconds between looks (a stat) at API_KEYS_FILE: how soon a key change counts


class ApiKeys:
    """The keys this instance accepts (none: the API is open): `API_KEYS` (every right) and the
    lines of `API_KEYS_FILE`, whose changes are read while the app runs (`watch`): a key added
    or revoked there counts from the next request on, one in flight goes on."""

    def __init__(self, keys: Iterable[str] = (), file: Path | None = None, entries: Iterable[KeyEntry] = ()) -> None:
        self._fixed = tuple(plain_key(key) for key in keys if key)
        self.file = file
        self._seen: tuple[int, int, int] | None = None
        self._entries: tuple[KeyEntry, ...] = ()
        self._set(tuple(entries))
        if file is not None:
            self._seen, text = _read(file)
            self._set(parse(text))

    @classmethod
    def from_settings(cls, api_keys: Iterable[str], file: str | Path | None) -> ApiKeys:
        return cls(api_keys, Path(file) if file else None)

    def _set(self, entries: tuple[KeyEntry, ...]) -> None:
        self._entries = self._fixed + entries
        self._digests = tuple(entry.digest for entry in self._entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries) or self.file is not None

    def labels(self) -> dict[str, str]:
        """Each key's owner id -> its label."""
        return {entry.owner: entry.label for entry in self._entries}

    def owner(self, authorization: str | None) -> str | None:
        """The owner id of the key in an `Authorization: Bearer <key>` header; None when keys are
        off. Unauthorized for a missing or unknown key."""
        return self.identify(authorization).owner

    def identify(self, authorization: str | None) -> Caller:
        """The caller with the key of an `Authorization: Bearer <key>` header (ANYONE when keys
        are off); Unauthorized for a missing or unknown key."""
        if not self.enabled:
            return ANYONE
        scheme, _, key = (authorization or "").partition(" ")
        presented = hashlib.sha256(key.strip().encode()).digest()
        found: KeyEntry | None = None
        for entry in self._entries:  # no early exit: the time does not tell which key matched
            if hmac.compare_digest(presented, entry.digest) and found is None:
                found = entry
        if scheme.lower() != "bearer" or not key.strip() or found is None:
            raise Unauthorized("a valid API key is required: Authorization: Bearer <key>")
        return Caller(found.owner, found.label, found.rights)

    def reload_if_changed(self) -> bool:
        """Read the file again when it changed (size, time or inode); a file that became
        unreadable or wrong keeps the keys it had (logged), never opens the API. Blocking: call
        it in a thread. True when the keys changed."""
        if self.file is None:
            return False
        try:
            stat = self.file.stat()
        except OSError as exc:
            log.error("API_KEYS_FILE %s cannot be read (%s): its keys as last read are kept", self.file, exc.strerror)
            return False
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if seen == self._seen:
            return False
        try:
            seen, text = _read(self.file)
            entries = parse(text)
        except (OSError, KeyFileError) as exc:
            log.error("API_KEYS_FILE %s: %s; its keys as last read are kept", self.file, exc)
            self._seen = seen
            return False
        self._seen = seen
        self._set(entries)
        log.info("API_KEYS_FILE %s read again: %d key(s)", self.file, len(entries))
        return True

    async def watch(self, interval: float) -> None:
        """Look at the file every `interval` seconds (a stat, in a thread) until cancelled."""
        if self.file is None:
            return
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.reload_if_changed)


def _read(file: Path) -> tuple[tuple[int, int, int], str]:
    with file.open() as handle:
        stat = os.fstat(handle.fileno())
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino), handle.read()
