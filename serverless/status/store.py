"""What the job code needs of a status store, whichever keeps the logs: the NAS folder
(`serverless.status.log.StatusLog`) or Redis streams (`serverless.status.redis.RedisStatus`).

A store keeps, per task, attempts (one per delivery of the task) and in each the task's payloads
in order, numbered from 1; `read` answers the status API from any instance.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from ..jobs.feed import Feed

A = TypeVar("A")


class StatusStore(Protocol[A]):
    """A status store whose attempts are of type `A` (opaque to the job code: `record` takes back
    what `begin` gave)."""

    async def begin(self, task_id: str) -> A:
        """Claim the task's next attempt; the task is known everywhere from then on."""
        ...

    async def record(self, attempt: A, feed: Feed) -> None:
        """Store every event of `feed` until its terminal payload (which is always tried)."""
        ...

    async def read(self, task_id: str, after: int = 0, attempt: int | None = None) -> bytes:
        """The status API's body: a JSON array of the payloads after the first `after`."""
        ...

    async def attempts(self, task_id: str) -> list[int]:
        """The numbers of the task's attempts, oldest first."""
        ...

    async def writable(self) -> bool:
        """Whether logs can be written now (why not is in `health()`)."""
        ...

    def health(self) -> dict[str, Any]:
        """What the store is doing; holds `not_writable_because`."""
        ...

    async def prune_forever(self, retention_days: float, every: float = 3600.0) -> None:
        """Forget tasks older than the retention (now and then)."""
        ...

    async def aclose(self) -> None:
        """Release what the store holds."""
        ...
