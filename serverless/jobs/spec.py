"""What a caller asked for, fixed before a job starts (pure): the workflow, how the result is
delivered and to whom it belongs. Built once at the edge (`serverless.transports.start`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..core.conversion import NO_CONVERSION, Conversion
from ..core.credentials import Credentials

Mode = Literal["sync", "stream", "ws", "async"]
"""How the caller follows the job: a JSON answer, SSE, our websocket, or later (status log)."""


@dataclass(frozen=True, slots=True)
class OutputPolicy:
    """What is done with each output file besides listing it: its base64, an OSS upload, a
    conversion of images (`output_format`, ...), and a signed download link made under `url`
    (the base URL the caller reached us at; None: no links)."""

    base64: bool = False
    oss: bool = False
    convert: Conversion = NO_CONVERSION
    url: str | None = None
    keep: bool = False  # on a fleet, kept in Redis where every gateway serves ComfyUI's /view of it


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job as it will run. `task_id` is the caller's own (FC headers); None when the job's
    prompt id will name it. `credentials` (OSS) are resolved once, from the request or the
    instance's settings, and never shown. `workflow_id` and `workflow_version` name the hosted
    workflow that ran."""

    workflow: dict[str, Any]
    extra_data: dict[str, Any] | None = field(default=None, repr=False)
    mode: Mode = "sync"
    outputs: OutputPolicy = OutputPolicy()
    task_id: str | None = None
    credentials: Credentials | None = field(default=None, repr=False)
    owner: str | None = None  # who may see the task: a digest of the caller's API key (serverless.auth)
    concurrency: int = 0  # its key's `concurrency=` (0: none): more of its jobs wait behind its own
    # A body big enough, its loader inputs' base64 aside (decoded before it is sent on), that
    # copying and serialising it go to a thread.
    big: bool = False
    priority: str = "normal"  # Redis tier: the queue stream it waits in (high, normal, low)
    lane: str = ""  # Redis tier: the lane whose workers run it ("" the default lane; `?lane=`)
    idempotency_key: str | None = None  # Redis tier: a repeat attaches to the first (SET NX on the key)
    workflow_id: str | None = None  # a hosted workflow's id, reported in the result
    workflow_version: int | None = None  # which version of it (None: a file never registered)
    callback_url: str | None = field(default=None, repr=False)  # the webhook; its query may hold secrets
    previews: bool = False  # `?previews=true`: ComfyUI's sampler previews become `serverless_preview` events
    # Queued through ComfyUI's own API (`serverless.comfyapi`): its ComfyUI prompt id is its task
    # id, and its filename prefixes are kept as written, as ComfyUI keeps them.
    native: bool = False
    # The task id was made for its caller, who learns it from the answer (a prompt of ComfyUI's
    # API sent without its own `prompt_id`): nobody may ask about the task before then.
    id_made: bool = False
    # The models API's import, delete or pin (`serverless.models.tasks`): run where the models
    # live (a worker), no workflow; its result data is the task's answer.
    model_task: dict[str, Any] | None = None

    @property
    def named(self) -> bool:
        """True when the caller named the task, and so may poll its status log."""
        return self.task_id is not None and not self.id_made

    @property
    def observed(self) -> bool:
        """True when someone may read the job's events before its answer: a stream's or a
        websocket's caller, an async caller polling its log, a caller that named the task. A
        sync job nobody named is seen only in its answer (its log is kept, written after)."""
        return self.named or self.mode != "sync"
