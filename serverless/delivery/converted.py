"""Converted download links (`/api/files/{token}` signed with a conversion), made once each.

Every GET of such a link used to read the source and convert it again, so four GETs at once of
one link to a big image held four decoded copies. Here the first GET of a (file, conversion)
starts the one conversion (its source read in the converter's slot, so that the slots bound the
sources held too); GETs meanwhile wait for that same result (single flight), and later ones get it
from memory until the newest link naming it expires. Kept results are bounded by
CACHE_BYTES, least recently served dropped first (a dropped one is made again).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..core.conversion import Conversion
from .convert import Converter
from .links import FileLink

CACHE_BYTES = 256 * 1024 * 1024  # converted link files kept in memory, an instance's
Key = tuple[str, str, str, Conversion]
# Reads a link's source whole: its bytes and content type.
Reader = Callable[[FileLink], Awaitable[tuple[bytes, str]]]


@dataclass(frozen=True, slots=True)
class Made:
    """A converted link's answer: the bytes, their type, and until when they may be served."""

    body: bytes
    content_type: str
    expires: float


class ConvertedFiles:
    """Single-flight conversions of linked outputs, kept until their links expire."""

    def __init__(self, converter: Converter, max_bytes: int) -> None:
        self.converter = converter
        self.max_bytes = max_bytes
        self._kept: OrderedDict[Key, Made] = OrderedDict()
        self._kept_bytes = 0
        self._flights: dict[Key, asyncio.Task[Made]] = {}

    async def get(self, link: FileLink, read: Reader) -> tuple[bytes, str]:
        """The link's converted file: kept, being made (waited for), or made now."""
        key = (link.item["type"], link.item["subfolder"], link.item["filename"], link.conversion)
        kept = self._kept.get(key)
        if kept is not None and kept.expires > time.time():
            self._kept.move_to_end(key)
            if link.expires > kept.expires:  # a newer link to the same file keeps it longer
                self._kept[key] = Made(kept.body, kept.content_type, link.expires)
            return kept.body, kept.content_type
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.create_task(self._make(key, link, read), name=f"convert {link.item['filename']}")
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        # A caller that goes away does not cancel the flight others wait for.
        made = await asyncio.shield(flight)
        return made.body, made.content_type

    async def _make(self, key: Key, link: FileLink, read: Reader) -> Made:
        async with self.converter.slot():
            content, content_type = await read(link)
            converted = await self.converter.convert_held(content, link.conversion)
        if converted is not None:
            content, content_type = converted.content, converted.mime
        return Made(content, content_type, link.expires)

    def _landed(self, key: Key, flight: asyncio.Task[Made]) -> None:
        self._flights.pop(key, None)
        if flight.cancelled() or flight.exception() is not None:
            return  # its waiters were told; the next GET tries again
        made = flight.result()
        if len(made.body) > self.max_bytes:
            return
        old = self._kept.pop(key, None)
        self._kept_bytes -= len(old.body) if old is not None else 0
        self._kept[key] = made
        self._kept_bytes += len(made.body)
        now = time.time()
        for stale in [k for k, kept in self._kept.items() if kept.expires <= now]:
            self._kept_bytes -= len(self._kept.pop(stale).body)
        while self._kept_bytes > self.max_bytes:
            _, dropped = self._kept.popitem(last=False)
            self._kept_bytes -= len(dropped.body)
