"""The one error tree of the adapter (CONTRACT.md section 5).

    ServerlessError                  any failure a caller is told about          retried on FC
    ├── InvalidParams        400     the request itself is wrong (body, task id, query, settings it needs)
    │   ├── MethodNotAllowed 405     (a route asked with a method it does not answer)
    │   └── Conflict         409     (the task already ended; an Idempotency-Key used with another body)
    ├── NotFound             404     no such route, task or resource
    ├── Unauthorized         401     the caller is not allowed this call (lifecycle hooks outside FC's own calls)
    │   └── Forbidden        403     (a download link that is tampered with or expired; code UNAUTHORIZED)
    │       └── OutOfScope   403     (a valid API key asking what its scope does not allow; code FORBIDDEN)
    ├── PromptError          400     ComfyUI refused the prompt (`/prompt` answered 400)
    ├── InputError           400     a loader input could not be fetched, decoded or uploaded
    │   └── DownloadError    400     (a URL or base64 input; named by the resolver, raised as INPUT_ERROR)
    ├── ExecutionFailed      500     ComfyUI sent `execution_error`
    │   └── OutOfMemory      500     (its GPU ran out of memory: torch's OutOfMemoryError; retried once after /free) yes
    ├── ExecutionInterrupted 500     the job was interrupted or cancelled
    ├── ComfyUIUnavailable   503     ComfyUI unreachable, dead, or its websocket lost beyond recovery   yes
    ├── Unavailable          503     a dependency that is not ComfyUI: the status store, Redis, a drain  yes
    ├── Busy                 503     this instance holds MAX_PENDING_JOBS jobs already (`Retry-After`)   yes
    ├── RateLimited          429     the API key started more jobs than its `rate=` allows (`Retry-After`)
    ├── OutputError          500     an output could not be read or uploaded                            yes
    ├── JobTimeout           504     the job passed its deadline                                        yes
    ├── WorkerLost           500     (Redis tier) its worker died after outputs were made, or died twice
    └── Unclassified         500     anything else: a bug

Foreign errors (aiohttp, oss2, OS errors) are translated into this tree only where the foreign
library is called. An error becomes a payload in one place, `ServerlessError.to_payload`; anything
that is not a `ServerlessError` is turned into one by `as_serverless_error`, which logs it with its
traceback and never puts its text in front of a caller. `retryable` says whether running the same
request again can help (FC retries a held async invocation only when its answer is a 5xx).
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)


class ServerlessError(Exception):
    """Base class: carries the contract's error code, HTTP status and details."""

    code = "UNCLASSIFY"
    status_code = 500
    retryable = False

    def __init__(self, message: str, raw: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.raw = raw

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that go with the error's answer (none but for `Busy`)."""
        return {}

    def to_payload(self) -> dict[str, Any]:
        """The compat error object: the terminal payload of a failed job."""
        return {
            "type": "error",
            "error_code": self.code,
            "error_message": self.message,
            "raw": self.raw,
        }


class InvalidParams(ServerlessError):
    """The body is not a usable workflow, a task id or query flag is malformed, or the request asks
    for something this instance is not configured for (e.g. `output_oss` without OSS)."""

    code = "INVALID_PARAMS"
    status_code = 400


class MethodNotAllowed(InvalidParams):
    """The route exists but not with this method."""

    status_code = 405


class Conflict(InvalidParams):
    """The request cannot apply to the task as it stands: cancelling a task that already ended,
    or an `Idempotency-Key` used before with another body."""

    status_code = 409


class NotFound(ServerlessError):
    """No such route, task or resource."""

    code = "NOT_FOUND"
    status_code = 404


class Unauthorized(ServerlessError):
    """The caller may not make this call."""

    code = "UNAUTHORIZED"
    status_code = 401


class Forbidden(Unauthorized):
    """A signed download link (`/api/files/{token}`) was tampered with, has expired, or is asked
    for a conversion it was not signed for. Same code as `Unauthorized` (the contract's list of
    codes), HTTP 403: the caller is known to hold no valid grant, no credentials would help."""

    status_code = 403


class OutOfScope(Forbidden):
    """A valid API key asks for what its line in API_KEYS_FILE does not allow: a raw workflow
    without `raw=yes`, a hosted workflow not in its `workflows=`, an admin call without
    `admin=yes` (`serverless.auth.Caller`). The message names the key's label and the right."""

    code = "FORBIDDEN"


class RateLimited(ServerlessError):
    """The API key started jobs faster than its `rate=N/s`: refused before anything runs; the
    `Retry-After` header says when the next one is admitted."""

    code = "RATE_LIMITED"
    status_code = 429

    def __init__(self, message: str, retry_after: float, raw: Any = None) -> None:
        super().__init__(message, raw)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class PromptError(ServerlessError):
    """ComfyUI's `/prompt` answered 400; `raw` is ComfyUI's body (`error`, `node_errors`)."""

    code = "PROMPT_ERROR"
    status_code = 400


class InputError(ServerlessError):
    """A loader input (URL, base64, oss://) could not be fetched, decoded or uploaded."""

    code = "INPUT_ERROR"
    status_code = 400


class ExecutionFailed(ServerlessError):
    """ComfyUI reported `execution_error`; `raw` is that message's `data`."""

    code = "EXECUTION_FAILED"
    status_code = 500


class OutOfMemory(ExecutionFailed):
    """ComfyUI's `execution_error` was a CUDA out-of-memory error (`torch.OutOfMemoryError`):
    the job is run once more after ComfyUI frees its memory; a second one ends the job."""

    code = "OUT_OF_MEMORY"
    retryable = True


class ExecutionInterrupted(ServerlessError):
    """The job was interrupted in ComfyUI or cancelled by us."""

    code = "EXECUTION_INTERRUPTED"
    status_code = 500


class ComfyUIUnavailable(ServerlessError):
    """ComfyUI cannot be reached, died mid-job, or its websocket broke and recovery failed."""

    code = "COMFYUI_UNAVAILABLE"
    status_code = 503
    retryable = True


class Unavailable(ServerlessError):
    """A dependency other than ComfyUI cannot serve the call now: the status store (the shared
    folder, Redis) cannot be used, the instance is draining, an idempotency claim cannot be read,
    or the instance running a job was lost. Running the request again later can help."""

    code = "UNAVAILABLE"
    status_code = 503
    retryable = True


class Busy(ServerlessError):
    """The instance already holds as many jobs as it admits (one running, MAX_PENDING_JOBS
    waiting): refused before anything is read or uploaded, so that FC routes the retry elsewhere."""

    code = "BUSY"
    status_code = 503
    retryable = True

    def __init__(self, message: str, retry_after: int, raw: Any = None) -> None:
        super().__init__(message, raw)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class OutputError(ServerlessError):
    """An output could not be read from ComfyUI or uploaded; `raw` holds the results so far."""

    code = "OUTPUT_ERROR"
    status_code = 500
    retryable = True


class JobTimeout(ServerlessError):
    """The job passed its deadline; the ComfyUI job has been cancelled."""

    code = "TIMEOUT"
    status_code = 504
    retryable = True


class WorkerLost(ServerlessError):
    """Redis tier: the worker running the job died and the job is not run again, because its log
    already holds outputs (a rerun would charge a GPU twice for work that was done) or because it
    was already a retry. A first death before any output is retried instead, marked `retried`."""

    code = "WORKER_LOST"
    status_code = 500


class Unclassified(ServerlessError):
    """Anything unexpected. Logged with a traceback where it is caught."""

    code = "UNCLASSIFY"
    status_code = 500


class DownloadError(InputError):
    """A download or base64 decode failed; `reason` says why, for a person, without any URL.
    The input resolver re-raises it as an `InputError` naming the node and input."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _classes_by_code() -> dict[str, type[ServerlessError]]:
    """Each code's most general class (a subclass sharing its parent's code is left out)."""
    found: dict[str, type[ServerlessError]] = {}
    pending: list[type[ServerlessError]] = [ServerlessError]
    while pending:
        cls = pending.pop(0)
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def error_from_payload(payload: dict[str, Any]) -> ServerlessError:
    """The error a stored error object (a status log's terminal payload) stands for: its code,
    hence its HTTP status."""
    cls = _classes_by_code().get(str(payload.get("error_code")), Unclassified)
    error = cls.__new__(cls)
    ServerlessError.__init__(error, str(payload.get("error_message", "")), payload.get("raw"))
    return error


def as_serverless_error(exc: BaseException, where: str) -> ServerlessError:
    """`exc` itself when it is ours; anything else is a bug: logged here with its traceback (and
    `where`, e.g. the task id), and told to the caller without its text."""
    if isinstance(exc, ServerlessError):
        return exc
    log.error("unexpected error (%s)", where, exc_info=exc)
    return Unclassified(f"internal error ({type(exc).__name__}); the server log has the details ({where})")
