"""What the job code and job control need of a status store, whichever keeps the logs: the NAS
folder (`serverless.status.log.StatusLog`) or Redis streams (`serverless.status.redis.RedisStatus`).

A store keeps, per task, attempts (one per delivery of the task) and in each the task's payloads
in order, numbered from 1; any instance reads them (`read`, `summary`, `follow`), learns whose
the task is (`owner`) and asks the instance running it to stop it (`request_cancel`). Its parts,
by who calls them:

    TaskLogs        job control on any instance: read, follow, summary, owner
    TaskIndex       the task list: list_tasks
    AttemptLog      a runner recording its jobs: begin, record, record_new, attempts
    CancelBox       cancels between instances without a queue
    KeyClaims       Idempotency-Key claims
    WebhookRecords  how each task's webhook went
    StoreHealth     health and the lifespan: writable, health, prune, close
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..jobs.feed import Feed
from .tasklist import TaskPage, TaskQuery

A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored payload of a task, as a follower gets it: its number in the attempt's log (the
    `id:` of the original stream) and whether it is the last."""

    seq: int
    data: bytes
    terminal: bool
    preview: bool = False  # a sampler preview kept apart (short-lived, never in the log)
    more: bool = False  # more entries of the same read follow at once (a stream writes them together)


class TaskLogs(Protocol):
    """The reading side: what job control (`task`, `events`, ownership) asks of any instance."""

    def validate(self, task_id: str) -> None:
        """InvalidParams (400) for an id the store cannot keep a log under."""
        ...

    async def read(self, task_id: str, after: int = 0, attempt: int | None = None) -> bytes:
        """The status API's body: a JSON array of the payloads after the first `after`."""
        ...

    async def known(self, task_id: str) -> bool:
        """Whether any instance has taken the task in (its log may still be empty)."""
        ...

    async def owner(self, task_id: str) -> str | None:
        """Whose the task is: None when made without API keys (anyone's); "" while not known yet."""
        ...

    async def summary(self, task_id: str) -> dict[str, Any] | None:
        """The task's summary (`summary.summarise`) from its current attempt; None when unknown."""
        ...

    def follow(
        self,
        task_id: str,
        after: int = 0,
        attempt: int | None = None,
        idle: float | None = None,
        previews: bool = False,
    ) -> AsyncIterator[Entry | None]:
        """The current attempt's payloads after `after` as they are stored, until the terminal one
        (an "instance lost" error when the owner went silent counts as one); None after `idle`
        seconds of silence. Nothing when resumed after the terminal payload. With `previews`,
        the newest of the previews a store keeps apart (Redis; a folder keeps none)."""
        ...


class TaskIndex(Protocol):
    """The task list (`GET /api/tasks`)."""

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        """A page of the tasks `query` asks for, newest first, only those its caller may see."""
        ...


class AttemptLog(Protocol[A]):
    """The writing side: what a runner (`Jobs`) asks to record a job's attempts. Attempts are of
    type `A`, opaque to the runner: `record` takes back what `begin` gave."""

    async def begin(self, task_id: str) -> A:
        """Claim the task's next attempt; the task is known everywhere from then on."""
        ...

    async def record(self, attempt: A, feed: Feed) -> None:
        """Store every event of `feed` until its terminal payload (which is always tried)."""
        ...

    async def record_new(self, task_id: str, feed: Feed, claimed: Callable[[A], None] | None = None) -> None:
        """`record` for a task nobody can ask about before its first event is stored (a sync job
        whose caller did not name it, a prompt of ComfyUI's API whose id was made for it): its
        attempt may be claimed with that first store, and is then told to `claimed`."""
        ...

    async def attempts(self, task_id: str) -> list[int]:
        """The numbers of the task's attempts, oldest first."""
        ...


class CancelBox(Protocol[A]):
    """Cancel requests between instances that share the store but no queue."""

    async def request_cancel(self, task_id: str) -> int | None:
        """Ask the instance running the task's newest attempt to stop it; returns that attempt,
        None for an unknown task."""
        ...

    async def cancels_asked(self, attempts: list[A]) -> list[A]:
        """Those of `attempts` (running here) another instance asked to cancel."""
        ...


class KeyClaims(Protocol):
    """`Idempotency-Key` claims (`serverless.transports.idempotency`)."""

    async def claim_key(self, key: str, task_id: str, digest: str) -> dict[str, Any] | None:
        """Claim an `Idempotency-Key` for the task (of two claimers one wins): None when claimed
        here, else the claim found ({} while its claimer is still writing it)."""
        ...

    async def read_key(self, key: str) -> dict[str, Any]:
        """What a claimed key holds; {} when it is not (or not yet) there."""
        ...

    async def release_key(self, key: str, task_id: str) -> None:
        """Give a claim up (its job could not start), unless it now holds another task."""
        ...


class WebhookRecords(Protocol):
    """How each task's webhook went, kept beside its log."""

    async def record_webhook(self, task_id: str, record: bytes) -> None:
        """Keep how the task's webhook went (its delivery's JSON), replacing an earlier record."""
        ...

    async def webhook_record(self, task_id: str) -> bytes | None:
        """How the task's webhook went (JSON: `delivery.webhooks.Delivery`), None when none was sent."""
        ...


class StoreHealth(Protocol):
    """What health checks and the lifespan ask of the store itself."""

    async def writable(self) -> bool:
        """Whether logs can be written now (why not is in `health()`)."""
        ...

    def writable_now(self) -> bool | None:
        """Whether logs can be written, known without waiting; None when only `writable` can tell."""
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


class StatusStore(
    TaskLogs, TaskIndex, AttemptLog[A], CancelBox[A], KeyClaims, WebhookRecords, StoreHealth, Protocol[A]
):
    """A whole status store (the file store, the Redis store): every role above. Callers take
    the narrowest role they use."""
