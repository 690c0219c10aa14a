"""What travels through the Redis queue, and back (pure): a job's spec without its credentials
(with its `owner`, the caller's key digest, so that the worker's log names it as one box's does),
the idempotency fingerprint of a request, and an error rebuilt from its stored payload."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, cast

from ..delivery.oss import Credentials
from ..errors import ServerlessError, Unclassified
from ..jobs.spec import JobSpec, Mode, OutputPolicy

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")  # the order workers read the streams in
GROUP = "workers"


def stream(priority: str) -> str:
    """The queue stream of a priority."""
    return f"jobs:{priority}"


def encode_spec(spec: JobSpec) -> bytes:
    """The spec as the queue carries it. Credentials never go through Redis: a worker uses its
    own (ALIBABA_CLOUD_* of its instance)."""
    return json.dumps(
        {
            "workflow": spec.workflow,
            "extra_data": spec.extra_data,
            "mode": spec.mode,
            "outputs": {"base64": spec.outputs.base64, "oss": spec.outputs.oss},
            "task_id": spec.task_id,
            "big": spec.big,
            "workflow_id": spec.workflow_id,
            "owner": spec.owner,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


def decode_spec(data: bytes, credentials: Credentials | None) -> JobSpec:
    """The spec a worker runs, with the worker's own credentials."""
    raw: dict[str, Any] = json.loads(data)
    outputs = raw.get("outputs") or {}
    return JobSpec(
        workflow=raw["workflow"],
        extra_data=raw.get("extra_data"),
        mode=cast(Mode, raw.get("mode", "sync")),
        outputs=OutputPolicy(base64=bool(outputs.get("base64")), oss=bool(outputs.get("oss"))),
        task_id=raw["task_id"],
        credentials=credentials,
        big=bool(raw.get("big")),
        workflow_id=raw.get("workflow_id"),
        owner=raw.get("owner"),
    )


def fingerprint(spec: JobSpec) -> str:
    """What makes two submissions "the same request" for an Idempotency-Key: the workflow, its
    extra data, the outputs asked for and the caller's key (another caller reusing a key never
    attaches to this one's task); not the mode: a caller may retry a stream as a poll."""
    same = {
        "workflow": spec.workflow,
        "extra_data": spec.extra_data,
        "workflow_id": spec.workflow_id,
        "outputs": [spec.outputs.base64, spec.outputs.oss],
        "owner": spec.owner,
    }
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:32]


def _codes() -> dict[str, type[ServerlessError]]:
    found: dict[str, type[ServerlessError]] = {}
    pending: list[type[ServerlessError]] = [ServerlessError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)  # the first (most general) class of a code
        pending.extend(cls.__subclasses__())
    return found


def error_from_payload(payload: dict[str, Any]) -> ServerlessError:
    """A stored error payload as the error it was (its code, hence its HTTP status)."""
    cls = _codes().get(str(payload.get("error_code")), Unclassified)
    error = cls.__new__(cls)
    ServerlessError.__init__(error, str(payload.get("error_message", "")), payload.get("raw"))
    return error
