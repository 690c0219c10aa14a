"""The job queue in Redis streams, as gateways use it: enqueue, idempotency, cancel.

    jobs:<priority>             a stream per priority (high, normal, low), consumer group `workers`
    job:<task_id>               "<stream> <entry id>" of the task's newest submission
    task:<task_id>:owner        whose it is (`serverless.status.redis`): known, queued, from now on
    idem:<key>                  "<task_id> <fingerprint>" of the first request with that Idempotency-Key
                                (under an API key: idem:<owner>-<sha256 of the key>, its own namespace)
    run:<task_id>:<entry id>    who took that submission: a worker's name, or "cancelled" (SET NX)
    cancel:<task_id>:<entry id> a cancel request its worker watches

Taking a submission and cancelling it race on one SET NX: a queued job cancelled first is removed
(XDEL) and ended here, and no worker runs it; one a worker took first is stopped by that worker,
which checks the cancel key every CANCEL_POLL seconds.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import uuid
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis

from ..auth import scoped_key
from ..core.request import validate_task_id
from ..errors import ExecutionInterrupted, InvalidParams, NotFound
from ..jobs.spec import JobSpec
from ..status.redis import RedisStatus, owner_key, translated
from .wire import GROUP, encode_spec, fingerprint, stream

log = logging.getLogger(__name__)

CANCELLED = "cancelled"


class TaskConflict(InvalidParams):
    """409: an Idempotency-Key reused with another body, or a cancel of a task that has ended."""

    status_code = 409


def cancelled_by_request() -> ExecutionInterrupted:
    return ExecutionInterrupted("cancelled by request")


@dataclass(frozen=True, slots=True)
class Submitted:
    """A submission: the task to follow, from which attempt (None: the current one), and whether
    it attached to an earlier request with the same Idempotency-Key."""

    task_id: str
    attempt: int | None
    attached: bool


class RedisQueue:
    """Gateways' side of the queue."""

    def __init__(self, client: aioredis.Redis, status: RedisStatus) -> None:
        self.client = client
        self.status = status

    async def submit(self, spec: JobSpec, priority: str, idempotency_key: str | None) -> Submitted:
        """Enqueue `spec` (XADD); with an Idempotency-Key, the first request claims it (SET NX) and
        a repeat attaches to its task. Redis down: ComfyUIUnavailable, nothing enqueued."""
        task_id = spec.task_id or str(uuid.uuid4())
        with translated():
            if idempotency_key is not None:
                validate_task_id(idempotency_key)
                mark = f"{task_id} {fingerprint(spec)}"
                claimed = await self.client.set(_idem(idempotency_key, spec), mark, nx=True, ex=self.status.ttl)
                if not claimed:
                    return await self._attach(idempotency_key, spec)
            try:
                following, entry = await self._enqueue(spec, task_id, priority)
            except BaseException:
                if idempotency_key is not None:  # a repeat must not attach to a job that never was
                    with contextlib.suppress(Exception):
                        await self.client.delete(_idem(idempotency_key, spec))
                raise
        log.info("task_id=%s queued on %s as %s", task_id, stream(priority), entry.decode())
        return Submitted(task_id, following, False)

    async def _enqueue(self, spec: JobSpec, task_id: str, priority: str) -> tuple[int, Any]:
        following = await self.status.current(task_id) + 1
        await self._claim_owner(task_id, spec.owner or "")
        fields = {"task_id": task_id, "spec": encode_spec(_named(spec, task_id))}
        entry: Any = await self.client.xadd(stream(priority), fields)  # type: ignore[arg-type]
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(f"job:{task_id}", f"{stream(priority)} {entry.decode()}", ex=self.status.ttl)
            pipe.expire(owner_key(task_id), self.status.ttl)
            await pipe.execute()
        return following, entry

    async def _claim_owner(self, task_id: str, owner: str) -> None:
        """The task is the key's that first queued it ("": anyone's): SET NX, never overwritten;
        another key naming it is refused before anything is queued."""
        if await self.client.set(owner_key(task_id), owner, nx=True, ex=self.status.ttl):
            return
        held: Any = await self.client.get(owner_key(task_id))
        if held and not hmac.compare_digest(held, owner.encode()):
            raise TaskConflict(f"task id {task_id} is taken: name another task", raw={"task_id": task_id})

    async def _attach(self, key: str, spec: JobSpec) -> Submitted:
        value: Any = await self.client.get(_idem(key, spec))
        if value is None:  # expired in between: a new request after all
            raise TaskConflict("the Idempotency-Key expired while it was used; send the request again")
        task_id, _, used = value.decode().partition(" ")
        if used != fingerprint(spec):  # which task, only its own caller may learn (it may be another key's)
            raise TaskConflict(f"Idempotency-Key {key} was used with another request", raw={"idempotency_key": key})
        log.info("Idempotency-Key %s: attached to task_id=%s", key, task_id)
        return Submitted(task_id, None, True)

    async def cancel(self, task_id: str) -> str:
        """Cancel a task's newest submission: "cancelled" when it was still queued (removed, ended
        here), "cancelling" when a worker runs it (its worker stops it). NotFound for an unknown
        task, TaskConflict for one that has ended."""
        validate_task_id(task_id)
        with translated():
            where: Any = await self.client.get(f"job:{task_id}")
            if where is None:
                raise NotFound(f"no task {task_id}", raw={"task_id": task_id, "state": "unknown"})
            name, entry = where.decode().split(" ")
            ended = await self._ended(task_id)
            if ended is not None:
                raise TaskConflict(f"task {task_id} has ended ({ended})", raw={"task_id": task_id, "state": ended})
            if await self.client.set(f"run:{task_id}:{entry}", CANCELLED, nx=True, ex=self.status.ttl):
                await self._remove_queued(task_id, name, entry)
                return "cancelled"
            await self.client.set(f"cancel:{task_id}:{entry}", "1", ex=self.status.ttl)
        log.info("task_id=%s: cancel requested from its worker", task_id)
        return "cancelling"

    async def _remove_queued(self, task_id: str, name: str, entry: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xdel(name, entry)
            pipe.xack(name, GROUP, entry)
            await pipe.execute()
        attempt = await self.status.begin(task_id)
        await self.status.append_terminal(task_id, attempt.number, cancelled_by_request())
        log.info("task_id=%s: cancelled while queued; removed from %s", task_id, name)

    async def _ended(self, task_id: str) -> str | None:
        """The final state of the task's current attempt, None while it is queued or runs."""
        number = await self.status.current(task_id)
        if not number:
            return None
        last: Any = await self.client.xrevrange(f"task:{task_id}:{number}", count=1)
        if not last or last[0][1].get(b"t") != b"1":
            return None
        data = last[0][1][b"d"]
        if b'"serverless_api"' in data[:64]:
            return "succeeded"
        return "cancelled" if b"EXECUTION_INTERRUPTED" in data else "failed"


def _idem(key: str, spec: JobSpec) -> str:
    """Where an Idempotency-Key is claimed: in the namespace of the caller's API key."""
    return f"idem:{scoped_key(key, spec.owner)}"


def _named(spec: JobSpec, task_id: str) -> JobSpec:
    """The spec with its task id: a worker records under the id the gateway answered with."""
    return spec if spec.task_id == task_id else replace(spec, task_id=task_id)
