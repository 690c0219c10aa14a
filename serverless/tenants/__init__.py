"""Tenants: API keys with scopes and limits, and usage per key (README, "API keys and tenants").

    keyfile   the lines of API_KEYS_FILE (pure)
    limits    `rate=` (GCRA, in memory or Redis) and a box's `concurrency=` gates
    usage     usage per key and hour (a folder on a box, Redis on a fleet)
    endpoints GET /api/usage

Who calls and what it may do is `serverless.auth` (`Caller`, `require_admin`); a fleet's queue
admits a key's jobs up to its concurrency in `serverless.fleet.admission`.
"""

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
