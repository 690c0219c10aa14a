"""The app's limiters and usage store, held by its resources."""

from __future__ import annotations

from dataclasses import dataclass, field

from .limits import KeyGates, MemoryRate, RateLimiter
from .usage import BufferedUsage, NoUsage


def _no_usage() -> BufferedUsage:
    return BufferedUsage(NoUsage())


@dataclass(frozen=True, slots=True)
class Tenants:
    """The app's limiters and usage store (buffered: the lifespan runs `usage.flush_forever`),
    opened with its resources."""

    rate: RateLimiter = field(default_factory=MemoryRate)
    usage: BufferedUsage = field(default_factory=_no_usage)
    gates: KeyGates = field(default_factory=KeyGates)
