"""What travels through the Redis queue (pure): a job's whole spec but its credentials (its
`owner`, the caller's key digest, included, so that the worker's log names it as one box's does),
and the idempotency fingerprint of a request."""

from __future__ import annotations

import hashlib
import json
from dataclasses import astuple
from typing import Any, Literal, cast

from ..core import jsontext
from ..core.conversion import Conversion
from ..core.credentials import Credentials
from ..jobs.spec import JobSpec, Mode, OutputPolicy
from ..status import keys

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")  # the order workers read the streams in
GROUP = "workers"


def stream(priority: str, lane: str = "") -> str:
    """The queue stream of a priority in a lane ("": the default lane)."""
    return keys.queue(priority, lane)


def lane_of(name: str) -> str:
    """The lane of a queue stream's name (`jobs:<priority>`: "", `jobs:<lane>:<priority>`)."""
    parts = name.split(":")
    return parts[1] if len(parts) == 3 else ""


def count_of(name: str) -> str:
    """The key counting a queue stream's entries (an entry's ordinal)."""
    return keys.queue_count(name.split(":")[-1], lane_of(name))


def encode_spec(spec: JobSpec) -> bytes:
    """The whole spec as the queue carries it, but for its credentials, which never go through
    Redis: a worker uses its own (ALIBABA_CLOUD_* of its instance). `decode_spec` gives back the
    same spec (a round trip the tests check over generated specs)."""
    outputs = spec.outputs
    convert = outputs.convert
    return jsontext.dumps(
        {
            "workflow": spec.workflow,
            "extra_data": spec.extra_data,
            "mode": spec.mode,
            "outputs": {
                "base64": outputs.base64,
                "oss": outputs.oss,
                "convert": {"format": convert.format, "quality": convert.quality, "max_side": convert.max_side},
                "url": outputs.url,
                "keep": outputs.keep,
            },
            "task_id": spec.task_id,
            "owner": spec.owner,
            "concurrency": spec.concurrency,
            "big": spec.big,
            "priority": spec.priority,
            "lane": spec.lane,
            "idempotency_key": spec.idempotency_key,
            "workflow_id": spec.workflow_id,
            "workflow_version": spec.workflow_version,
            "callback_url": spec.callback_url,
            "previews": spec.previews,
            "native": spec.native,
            "id_made": spec.id_made,
            "model_task": spec.model_task,
        }
    )


def decode_spec(data: bytes, credentials: Credentials | None) -> JobSpec:
    """The spec a worker runs, with the worker's own credentials. ValueError (or KeyError,
    TypeError) for an entry that is not one of `encode_spec`'s."""
    raw: dict[str, Any] = jsontext.loads(data)  # orjson, `json`'s values where they differ
    outputs = raw.get("outputs") or {}
    convert = outputs.get("convert") or {}
    return JobSpec(
        workflow=raw["workflow"],
        extra_data=raw.get("extra_data"),
        mode=cast(Mode, raw.get("mode", "sync")),
        outputs=OutputPolicy(
            base64=bool(outputs.get("base64")),
            oss=bool(outputs.get("oss")),
            convert=Conversion(
                format=convert.get("format"), quality=convert.get("quality"), max_side=convert.get("max_side")
            ),
            url=outputs.get("url"),
            keep=bool(outputs.get("keep")),
        ),
        task_id=raw["task_id"],
        credentials=credentials,
        owner=raw.get("owner"),
        concurrency=int(raw.get("concurrency") or 0),
        big=bool(raw.get("big")),
        priority=raw.get("priority", "normal"),
        lane=str(raw.get("lane") or ""),
        idempotency_key=raw.get("idempotency_key"),
        workflow_id=raw.get("workflow_id"),
        workflow_version=raw.get("workflow_version"),
        callback_url=raw.get("callback_url"),
        previews=bool(raw.get("previews", False)),
        native=bool(raw.get("native")),
        id_made=bool(raw.get("id_made")),
        model_task=raw.get("model_task"),
    )


def fingerprint(spec: JobSpec) -> str:
    """What makes two submissions "the same request" for an Idempotency-Key: the workflow, its
    extra data, the outputs asked for and the caller's key (another caller reusing a key never
    attaches to this one's task); not the mode: a caller may retry a stream as a poll."""
    same = {
        "workflow": spec.workflow,
        "extra_data": spec.extra_data,
        "workflow_id": spec.workflow_id,
        "workflow_version": spec.workflow_version,
        "outputs": [
            spec.outputs.base64,
            spec.outputs.oss,
            list(astuple(spec.outputs.convert)),
            spec.outputs.url is not None,
        ],
        "callback_url": spec.callback_url,
        "owner": spec.owner,
    }
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:32]
