"""Parsing of a run request (pure): body, query flags and headers into a `RunRequest`.

Nothing here does I/O; every refusal is an `InvalidParams` whose message tells a person what to fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParams
from . import jsontext
from .uiformat import UIFormatWorkflow, is_ui_format

TASK_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
PARAMETER_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
RUN_QUERY_FLAGS = (
    "output_base64",
    "output_oss",
    "stream",
    "workflow_id",
    "priority",
    "lane",
    "output_format",
    "output_quality",
    "output_max_side",
    "output_url",
    "callback_url",
    "previews",
)
TASK_ID_HEADERS = ("x-fc-async-task-id", "x-fc-trace-id", "x-fc-request-id")
FALSE_VALUES = ("", "0", "false")
MAX_INPUT_DEPTH = 64  # far beyond any real workflow; bounds the recursion of copying and encoding
# Array elements and object members in one body, counted by their separators before parsing: far
# beyond any real workflow (big bodies are big strings: base64 inputs). It bounds how long parsing
# and serialising a body, which hold the GIL whichever thread does them, keep other callers waiting.
MAX_BODY_ITEMS = 1_000_000
BIG_BODY = 256 * 1024  # bytes of a body from which parsing, copying and serialising run off the event loop

Workflow = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One job as the caller asked for it, before any preparation."""

    workflow: Workflow
    extra_data: dict[str, Any] | None
    output_base64: bool
    output_oss: bool
    stream: bool
    task_id: str | None


def query_flag(query: Mapping[str, str], name: str) -> bool:
    """Compat flag rule: true unless absent, empty, `0` or `false` (any case)."""
    value = query.get(name)
    return value is not None and value.strip().lower() not in FALSE_VALUES


def validate_task_id(task_id: str) -> str:
    """A task id names a file on the shared disk: refuse anything that could escape its folder."""
    if not TASK_ID_RE.fullmatch(task_id) or task_id in (".", ".."):
        raise InvalidParams(
            "task id must be 1-128 characters of letters, digits, '.', '_' or '-' (and not '.' or '..')",
            raw={"task_id": task_id[:200]},
        )
    return task_id


def task_id_from_headers(headers: Mapping[str, str]) -> str | None:
    """The FC task id: async task id, else trace id, else request id; None when none is sent."""
    for name in TASK_ID_HEADERS:
        value = headers.get(name)
        if value:
            return validate_task_id(value)
    return None


def decode_body(body: bytes | str) -> Any:
    """JSON-decode a run's request body, refusing what is not JSON (`decode_json`)."""
    if not body or not body.strip():
        raise InvalidParams("the request body is empty: send a ComfyUI API-format workflow as JSON")
    return decode_json(body)


def decode_json(body: bytes | str) -> Any:
    """The JSON value of a request body; InvalidParams for what is not JSON, holds more than
    MAX_BODY_ITEMS items or nests deeper than the parser goes. Every endpoint that takes JSON
    decodes it here: none answers such a body with a 500."""
    # Every item but the last takes a byte and its separator: a body of at most twice the limit in
    # bytes cannot hold more, and is not counted (two passes over a 1 MB image's base64 cost 0.8 ms).
    if len(body) > 2 * MAX_BODY_ITEMS and _separators(body) > MAX_BODY_ITEMS:
        raise InvalidParams(f"the request body holds more than {MAX_BODY_ITEMS} JSON items (elements and members)")
    try:
        return jsontext.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidParams(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidParams("the request body is nested too deeply") from None


def _separators(body: bytes | str) -> int:
    if isinstance(body, bytes):
        return body.count(b",") + body.count(b":")
    return body.count(",") + body.count(":")


def is_wrapper(document: Mapping[str, Any]) -> bool:
    """Whether `document` is the `{"prompt": {...}, "extra_data": ...}` wrapper rather than a
    workflow with a node whose id is "prompt": the wrapper's `prompt` holds nodes, not `class_type`."""
    prompt = document.get("prompt")
    return isinstance(prompt, dict) and "class_type" not in prompt


def split_workflow(document: Any) -> tuple[Workflow, dict[str, Any] | None]:
    """Accept a bare API-format workflow or the `{"prompt": ..., "extra_data": ...}` wrapper; a
    UI-format one raises `UIFormatWorkflow` (an InvalidParams) for the caller to convert."""
    if not isinstance(document, dict):
        raise InvalidParams("the request body must be a JSON object: a ComfyUI API-format workflow")
    extra_data = None
    if is_wrapper(document):
        extra_data = document.get("extra_data")
        if extra_data is not None and not isinstance(extra_data, dict):
            raise InvalidParams("extra_data must be a JSON object")
        # ComfyUI deep-copies extra_data in its prompt worker: too deep, and the worker dies.
        if extra_data is not None and _depth(extra_data) > MAX_INPUT_DEPTH:
            raise InvalidParams(f"extra_data is nested more than {MAX_INPUT_DEPTH} levels deep")
        document = document["prompt"]
    if is_ui_format(document):  # converted by the caller, which has ComfyUI's /object_info
        raise UIFormatWorkflow(document, extra_data)
    check_nodes(document)
    return document, extra_data


def check_nodes(workflow: Workflow) -> None:
    """Refuse shapes ComfyUI would crash on instead of answering with a validation error."""
    if not workflow:
        raise InvalidParams("the workflow has no nodes")
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            raise InvalidParams(f"node {node_id!r} must be an object with class_type and inputs")
        if "class_type" in node and not isinstance(node["class_type"], str):
            raise InvalidParams(f"node {node_id!r}: class_type must be a string")
        if not isinstance(node.get("inputs", {}), dict):
            raise InvalidParams(f"node {node_id!r}: inputs must be an object")
        if _depth(node) > MAX_INPUT_DEPTH:
            raise InvalidParams(f"node {node_id!r} is nested more than {MAX_INPUT_DEPTH} levels deep")


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in `value` (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_INPUT_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def parse_run_request(body: bytes | str, query: Mapping[str, str], headers: Mapping[str, str]) -> RunRequest:
    """Turn what the caller sent into a RunRequest, or raise InvalidParams."""
    task_id = task_id_from_headers(headers)
    workflow, extra_data = split_workflow(decode_body(body))
    return run_request(workflow, extra_data, query, task_id)


def parse_run_document(document: Any, query: Mapping[str, str], headers: Mapping[str, str]) -> RunRequest:
    """`parse_run_request` of a body whose JSON is decoded already."""
    task_id = task_id_from_headers(headers)
    workflow, extra_data = split_workflow(document)
    return run_request(workflow, extra_data, query, task_id)


def run_request(
    workflow: Workflow, extra_data: dict[str, Any] | None, query: Mapping[str, str], task_id: str | None
) -> RunRequest:
    """A workflow (given, or a hosted one with its overrides merged) with the run's query flags."""
    return RunRequest(
        workflow=workflow,
        extra_data=extra_data,
        output_base64=query_flag(query, "output_base64"),
        output_oss=query_flag(query, "output_oss"),
        stream=query_flag(query, "stream"),
        task_id=task_id,
    )


def check_parameter_names(query: Mapping[str, str]) -> None:
    """Refuse, before anything runs, a query parameter whose name is not `[A-Za-z0-9._-]{1,64}`:
    such a name (CR/LF, non-Latin-1 characters) is no flag of ours misspelt, and it must never
    reach a log line or a header as it came."""
    for name in query:
        if not PARAMETER_NAME_RE.fullmatch(name):
            shown = name[:64].encode("unicode_escape").decode("ascii")
            raise InvalidParams(f"query parameter names are [A-Za-z0-9._-]{{1,64}}, not {shown!r}")


def unknown_parameters(query: Mapping[str, str], known: tuple[str, ...] = RUN_QUERY_FLAGS) -> list[str]:
    """Query parameters we do not know (a misspelt flag is ignored, as FC does, but told)."""
    return sorted(name for name in query if name not in known)
