"""The one error tree of the adapter (CONTRACT.md section 5).

    ServerlessError                  any failure a caller is told about
    ├── InvalidParams        400     the request itself is wrong (body, task id, query, settings it needs)
    ├── PromptError          400     ComfyUI refused the prompt (`/prompt` answered 400)
    ├── InputError           400     a loader input could not be fetched, decoded or uploaded
    ├── ExecutionFailed      500     ComfyUI sent `execution_error`
    ├── ExecutionInterrupted 500     the job was interrupted or cancelled
    ├── ComfyUIUnavailable   503     ComfyUI unreachable, dead, or its websocket lost beyond recovery
    ├── OutputError          500     an output could not be read or uploaded
    ├── JobTimeout           504     the job passed its deadline
    └── Unclassified         500     anything else: a bug

Foreign errors (aiohttp, oss2, OS errors) are translated into this tree only where the foreign
library is called; errors become responses in exactly one place (`serverless.app`).
"""

from __future__ import annotations

from typing import Any


class ServerlessError(Exception):
    """Base class: carries the contract's error code, HTTP status and details."""

    code = "UNCLASSIFY"
    status_code = 500

    def __init__(self, message: str, raw: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.raw = raw

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


class ExecutionInterrupted(ServerlessError):
    """The job was interrupted in ComfyUI or cancelled by us."""

    code = "EXECUTION_INTERRUPTED"
    status_code = 500


class ComfyUIUnavailable(ServerlessError):
    """ComfyUI cannot be reached, died mid-job, or its websocket broke and recovery failed."""

    code = "COMFYUI_UNAVAILABLE"
    status_code = 503


class OutputError(ServerlessError):
    """An output could not be read from ComfyUI or uploaded; `raw` holds the results so far."""

    code = "OUTPUT_ERROR"
    status_code = 500


class JobTimeout(ServerlessError):
    """The job passed its deadline; the ComfyUI job has been cancelled."""

    code = "TIMEOUT"
    status_code = 504


class Unclassified(ServerlessError):
    """Anything unexpected. Logged with a traceback where it is caught."""

    code = "UNCLASSIFY"
    status_code = 500


def status_for_code(code: str) -> int:
    """The HTTP status of an error code, for terminal payloads rendered as a plain response."""
    for cls in ServerlessError.__subclasses__():
        if cls.code == code:
            return cls.status_code
    return Unclassified.status_code
