"""The app's limiters and usage store, held by its resources."""

from __future__ import annotations

from dataclasses import dataclass, field

from .limits import KeyGates, MemoryRate, RateLimiter
from .usage import NoUsage, UsageStore


@dataclass(frozen=True, slots=True)
class Tenants:
    """The app's limiters and usage store, opened with its resources."""

    rate: RateLimiter = field(default_factory=MemoryRate)
    usage: UsageStore = field(default_factory=NoUsage)
    gates: KeyGates = field(default_factory=KeyGates)

    @classmethod
    def in_memory(cls, usage: UsageStore) -> Tenants:
        return cls(MemoryRate(), usage)
