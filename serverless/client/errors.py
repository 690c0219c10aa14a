"""The client's errors: the server's error tree (serverless/errors.py, CONTRACT.md section 5)
mirrored, each carrying the `error_code`, the message, `raw` and the HTTP status, plus the
client's own failures (the server could not be reached, or answered something that is not ours).

    ClientError                       anything this client raises
    ├── TransportError                the server could not be reached, or the connection broke
    ├── ProtocolError                 the answer is not what the API sends (not JSON, no terminal payload)
    │   └── NotServerless             the URL answers, but it is not a ComfyUI Serverless API (a 404 not ours)
    └── APIError                      the server's error object; `.error_code`, `.raw`, `.status`
        ├── InvalidParams             INVALID_PARAMS
        ├── NotFound                  NOT_FOUND
        ├── Unauthorized              UNAUTHORIZED
        │   └── Forbidden             FORBIDDEN (an API key out of its scope: raw=, workflows=, admin=)
        ├── Conflict                  409 (a finished task's cancel, a reused Idempotency-Key)
        ├── PromptError               PROMPT_ERROR
        ├── InputError                INPUT_ERROR
        ├── ExecutionFailed           EXECUTION_FAILED
        │   └── OutOfMemory           OUT_OF_MEMORY (its GPU ran out of memory twice: run once more already)
        ├── ExecutionInterrupted      EXECUTION_INTERRUPTED (cancelled, too)
        ├── ComfyUIUnavailable        COMFYUI_UNAVAILABLE
        ├── Unavailable               UNAVAILABLE (the status store, Redis, a draining instance)
        ├── Busy                      BUSY
        ├── RateLimited               RATE_LIMITED (the key's rate=; `.retry_after` seconds)
        ├── OutputError               OUTPUT_ERROR
        ├── JobTimeout                TIMEOUT
        ├── WorkerLost                WORKER_LOST (the Redis tier: its worker died, twice or after outputs)
        └── Unclassified              UNCLASSIFY, and any code this client does not know
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base class of everything the client raises."""


class TransportError(ClientError):
    """The server could not be reached, or the connection broke before the answer ended."""


class ProtocolError(ClientError):
    """The server's answer is not one this API sends."""


class NotServerless(ProtocolError):
    """The server at the URL answered an error that is not the API's error object where the API
    would have the route (404, 405): the URL names another server (ComfyUI itself, a web page)."""


class APIError(ClientError):
    """The server's error object (`{"type": "error", "error_code", "error_message", "raw"}`)."""

    error_code = "UNCLASSIFY"

    def __init__(
        self,
        message: str,
        error_code: str | None = None,
        raw: Any = None,
        status: int | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = error_code or type(self).error_code
        self.raw = raw
        self.status = status
        self.payload = payload

    def __str__(self) -> str:
        return f"{self.error_code}: {self.message}"


class InvalidParams(APIError):
    error_code = "INVALID_PARAMS"


class NotFound(APIError):
    error_code = "NOT_FOUND"


class Unauthorized(APIError):
    error_code = "UNAUTHORIZED"


class Forbidden(Unauthorized):
    error_code = "FORBIDDEN"


class Conflict(APIError):
    error_code = "CONFLICT"


class PromptError(APIError):
    error_code = "PROMPT_ERROR"


class InputError(APIError):
    error_code = "INPUT_ERROR"


class ExecutionFailed(APIError):
    error_code = "EXECUTION_FAILED"


class OutOfMemory(ExecutionFailed):
    error_code = "OUT_OF_MEMORY"


class ExecutionInterrupted(APIError):
    error_code = "EXECUTION_INTERRUPTED"


class ComfyUIUnavailable(APIError):
    error_code = "COMFYUI_UNAVAILABLE"


class Unavailable(APIError):
    error_code = "UNAVAILABLE"


class Busy(APIError):
    error_code = "BUSY"


class RateLimited(APIError):
    error_code = "RATE_LIMITED"

    @property
    def retry_after(self) -> float | None:
        """Seconds until the key may start a job again (from the error's `raw`)."""
        raw = self.raw if isinstance(self.raw, dict) else {}
        value = raw.get("retry_after_s")
        return float(value) if isinstance(value, int | float) else None


class OutputError(APIError):
    error_code = "OUTPUT_ERROR"


class JobTimeout(APIError):
    error_code = "TIMEOUT"


class WorkerLost(APIError):
    error_code = "WORKER_LOST"


class Unclassified(APIError):
    error_code = "UNCLASSIFY"


BY_CODE: dict[str, type[APIError]] = {
    cls.error_code: cls
    for cls in (
        InvalidParams,
        NotFound,
        Unauthorized,
        Forbidden,
        PromptError,
        InputError,
        ExecutionFailed,
        OutOfMemory,
        WorkerLost,
        ExecutionInterrupted,
        ComfyUIUnavailable,
        Unavailable,
        Busy,
        RateLimited,
        OutputError,
        JobTimeout,
        Unclassified,
    )
}


def from_payload(payload: dict[str, Any], status: int | None = None) -> APIError:
    """The exception for an error object; any 409 is a `Conflict` (the server says
    `INVALID_PARAMS` with status 409: a finished task's cancel, a reused Idempotency-Key)."""
    code = str(payload.get("error_code") or "")
    message = str(payload.get("error_message") or payload.get("message") or f"HTTP {status}")
    cls = Conflict if status == 409 else (BY_CODE.get(code) or Unclassified)
    return cls(message, code or cls.error_code, payload.get("raw"), status, payload)
