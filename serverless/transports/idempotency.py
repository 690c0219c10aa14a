"""`Idempotency-Key` on `POST /api/serverless/run` (and a hosted workflow's run): the first
request with a key starts the job; a repeated one, on any instance, attaches to that task (same
task id, events and result) instead of running the workflow again.

The key is claimed in the status store, create-exclusive (`StatusStore.claim_key`: a file on the
shared folder, or SET NX in Redis), holding the task id and a digest of the body, query, workflow
id and caller: the same key with another request is refused (409). A claim whose job could not
start is given up, so that a retry can run. (The Redis tier's queue claims keys itself.)
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Mapping
from typing import Protocol

from ..auth import scoped_key
from ..core.request import TASK_ID_RE, query_flag, task_id_from_headers
from ..errors import Conflict, InvalidParams, Unavailable
from ..jobs.runner import JobRunner, RunningJob
from ..jobs.spec import Mode
from ..resources import Resources
from ..status.store import KeyClaims, TaskLogs
from .events import TaskEvents
from .start import is_async, start_job

HEADER = "idempotency-key"
ATTACH_WAIT = 10.0  # seconds a repeated request waits for the claimed task's log to appear
CLAIM_ROUNDS = 3  # claims given up by failed starts that a waiting request tries again after
WAIT_STEP = 0.05


class Claims(KeyClaims, TaskLogs, Protocol):
    """What attaching to a claimed key's task reads: the claim, and whether its task began."""


class _Released(Exception):
    """The claim attached to was given up (its job could not start): claim again."""


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The request's key (the rule of task ids), None without one."""
    key = headers.get(HEADER)
    if key is None:
        return None
    if not TASK_ID_RE.fullmatch(key) or key in (".", ".."):
        raise InvalidParams("Idempotency-Key must match [A-Za-z0-9._-]{1,128}", raw={"idempotency_key": key[:140]})
    return key


def digest(body: bytes | str, query: Mapping[str, str], workflow_id: str | None, caller: str | None = None) -> str:
    """What makes two requests the same request: body, workflow and query, except `stream` (how
    a caller follows the task does not change it: a retry may stream what was asked as JSON), and
    the caller's API key (another caller reusing a key never attaches to this one's task)."""
    data = body.encode() if isinstance(body, str) else body
    fingerprint = hashlib.sha256(data)
    flags = sorted((name, value) for name, value in query.items() if name != "stream")
    fingerprint.update(b"\0" + repr(flags).encode() + b"\0" + (workflow_id or "").encode())
    fingerprint.update(b"\0" + (caller or "").encode())
    return fingerprint.hexdigest()


def requested_mode(query: Mapping[str, str], headers: Mapping[str, str]) -> Mode:
    """How this caller follows the task (HTTP only), whoever started it."""
    if is_async(headers):
        return "async"
    return "stream" if query_flag(query, "stream") else "sync"


async def start_or_attach(
    resources: Resources,
    jobs: JobRunner,
    key: str,
    body: bytes | str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    workflow_id: str | None,
    base_url: str | None = None,
    caller: str | None = None,
) -> RunningJob | TaskEvents:
    """The job started with `key`: started now by this request, or the one an earlier request
    with the same key started (here: its job; elsewhere: its status log)."""
    fingerprint = digest(body, query, workflow_id or query.get("workflow_id"), caller)
    stored = scoped_key(key, caller)  # each API key has its own Idempotency-Keys
    for _ in range(CLAIM_ROUNDS):
        prompt_id = str(uuid.uuid4())
        task_id = task_id_from_headers(headers) or prompt_id
        owner = await _claim(resources.status, stored, task_id, fingerprint, key)
        if owner is None:
            try:
                return await start_job(
                    resources,
                    jobs,
                    body,
                    query,
                    headers,
                    "http",
                    workflow_id,
                    base_url=base_url,
                    owner=caller,
                    prompt_id=prompt_id,
                )
            except BaseException:
                await asyncio.shield(resources.status.release_key(stored, task_id))
                raise
        try:
            return await _attach(resources.status, jobs, stored, owner, key)
        except _Released:
            continue
    raise Unavailable(f"the task of Idempotency-Key {key} kept failing to start")


async def _claim(status: KeyClaims, key: str, task_id: str, fingerprint: str, shown: str) -> str | None:
    """None when this request claimed the key (`key` as stored, `shown` as sent); else the task
    an earlier request started."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ATTACH_WAIT
    while True:
        found = await status.claim_key(key, task_id, fingerprint)
        if found is None:
            return None
        owner = found.get("task_id")
        if isinstance(owner, str):
            if found.get("digest") != fingerprint:
                raise Conflict(  # which task, only its own caller may learn
                    f"Idempotency-Key {shown} was used with another request", raw={"idempotency_key": shown}
                )
            return owner
        if loop.time() > deadline:  # a claim that never got its content (its claimer died mid-write)
            raise Unavailable(f"the claim of Idempotency-Key {shown} cannot be read")
        await asyncio.sleep(WAIT_STEP)  # its claimer is writing it


async def _attach(status: Claims, jobs: JobRunner, key: str, task_id: str, shown: str) -> RunningJob | TaskEvents:
    """Follow the task once it has begun (its claimer may still be starting it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ATTACH_WAIT
    while True:
        job = jobs.get(task_id)
        if job is not None:
            return job
        if await status.known(task_id):
            return TaskEvents(task_id, status, jobs.get(task_id))
        if (await status.read_key(key)).get("task_id") != task_id:
            raise _Released
        if loop.time() > deadline:
            raise Unavailable(f"the task {task_id} of Idempotency-Key {shown} has not begun")
        await asyncio.sleep(WAIT_STEP)
