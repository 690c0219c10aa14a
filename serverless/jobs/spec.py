"""What a caller asked for, fixed before a job starts (pure): the workflow, how the result is
delivered and to whom it belongs. Built once at the edge (`serverless.transports.start`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..delivery.oss import Credentials

Mode = Literal["sync", "stream", "ws", "async"]
"""How the caller follows the job: a JSON answer, SSE, our websocket, or later (status log)."""


@dataclass(frozen=True, slots=True)
class OutputPolicy:
    """What is done with each output file besides listing it."""

    base64: bool = False
    oss: bool = False


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job as it will run. `task_id` is the caller's own (FC headers); None when the job's
    prompt id will name it. `credentials` (OSS) are resolved once, from the request or the
    instance's settings, and never shown. `workflow_id` names the hosted workflow that ran."""

    workflow: dict[str, Any]
    extra_data: dict[str, Any] | None = field(default=None, repr=False)
    mode: Mode = "sync"
    outputs: OutputPolicy = OutputPolicy()
    task_id: str | None = None
    credentials: Credentials | None = field(default=None, repr=False)
    big: bool = False  # a body big enough that copying and serialising it go to a thread
    workflow_id: str | None = None  # a hosted workflow's id, reported in the result
    priority: str = "normal"  # Redis tier: the queue stream it waits in (high, normal, low)
    idempotency_key: str | None = None  # the caller's Idempotency-Key: a repeat attaches to the first

    @property
    def named(self) -> bool:
        """True when the caller named the task, and so may poll its status log."""
        return self.task_id is not None
