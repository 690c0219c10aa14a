"""Big inputs staged apart from the queue entry: a request's base64 inputs (any string input of
STAGE_MIN_BYTES or more) are kept in a Redis hash of their own, with a TTL, and the entry names it;
the worker that runs the job puts them back into its workflow, and the hash is deleted as the
entry is acknowledged (a job handed back keeps it for the next worker).

    staged:<task_id>:<nonce>    a hash: `["<node id>", "<input name>"]` (JSON) -> the input's value

So a queue entry stays the size of the workflow, whatever the inputs weigh, and inputs are kept
no longer than their job needs: QUEUE_TTL plus two runs (`ttl`), not the status retention.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import redis.asyncio as aioredis

from ..errors import Unavailable
from ..status import keys

STAGE_MIN_BYTES = 16 * 1024  # a string input from this size on travels apart from the queue entry


def split(workflow: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The workflow with each big string input emptied, and those inputs by `["<node>", "<input>"]`
    (the workflow itself is not changed; {} when nothing is big)."""
    staged: dict[str, str] = {}
    light: dict[str, Any] = workflow
    for node_id, node in workflow.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        big = [name for name, value in inputs.items() if isinstance(value, str) and len(value) >= STAGE_MIN_BYTES]
        if not big:
            continue
        if light is workflow:
            light = dict(workflow)
        light[node_id] = {**node, "inputs": {**inputs, **dict.fromkeys(big, "")}}
        for name in big:
            staged[json.dumps([node_id, name])] = inputs[name]
    return light, staged


def join(workflow: dict[str, Any], staged: dict[bytes, bytes]) -> dict[str, Any]:
    """The workflow with its staged inputs back in place (`workflow` is changed: a worker's own copy)."""
    for field, value in staged.items():
        node_id, name = json.loads(field)
        workflow[node_id]["inputs"][name] = value.decode()
    return workflow


def new_name() -> str:
    """A submission's own name for its staged inputs (a task id may be queued again)."""
    return uuid.uuid4().hex[:16]


def ttl(queue_ttl: float, job_timeout: float, claim_idle: float, retention: int) -> int:
    """How long staged inputs are kept: while the job may wait (QUEUE_TTL; the status retention
    when that is 0) and run twice (each run up to JOB_TIMEOUT, a dead worker's noticed within
    REDIS_CLAIM_IDLE), and a minute more."""
    waiting = queue_ttl if queue_ttl else retention
    return int(waiting + 2 * (job_timeout + claim_idle) + 60)


async def fetch(client: aioredis.Redis, task_id: str, name: str) -> dict[bytes, bytes]:
    """A submission's staged inputs; Unavailable when they are gone (expired, or Redis lost them)."""
    staged: Any = await client.hgetall(keys.staged_inputs(task_id, name))
    if not staged:
        raise Unavailable(
            "the job's inputs are no longer kept in Redis (they outlived their TTL, or Redis lost its data): "
            "submit it again",
            raw={"task_id": task_id},
        )
    return dict(staged)
