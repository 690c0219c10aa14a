"""ComfyUI's shapes made from ours (pure): a task's status log as a `/history` entry, a prompt as a
`/queue` item, which logged messages a `/ws` client gets, and the end ComfyUI would have sent for
a job that ended before ComfyUI could say so (refused by a worker's ComfyUI, lost, timed out).

A task's log holds ComfyUI's own messages byte for byte (`jobs.job`), between ours
(`serverless_*`) and the terminal payload (`serverless_api` or `error`)."""

from __future__ import annotations

import base64
import binascii
import json
import struct
import time
from typing import Any

from .index import PromptEntry

STATUS_MESSAGES = (
    "execution_start",
    "execution_cached",
    "execution_success",
    "execution_error",
    "execution_interrupted",
)
ENDS = ("execution_success", "execution_error", "execution_interrupted")


def relayed(text: str) -> dict[str, Any] | None:
    """The message a `/ws` client gets of a logged event (parsed once, to route it), None for
    ours and for the greeting the worker's own connection got (its `sid` is not the client's)."""
    if '"serverless_' in text[:40]:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return None
    if message["type"] in ("serverless_api", "error") or str(message["type"]).startswith("serverless_"):
        return None
    data = message.get("data")
    if message["type"] == "status" and isinstance(data, dict) and "sid" in data:
        return None
    return message


# ComfyUI's messages as its `json.dumps` writes them start `{"type": "<type>", `: those of a type
# that is never held back nor left out are passed on unparsed.
PREFIX = '{"type": "'
PASSED_AS_THEY_ARE = frozenset(
    {"execution_start", "execution_cached", "executed", "execution_success", "progress", "progress_state"}
)


# The messages a `/history` entry is built from (`history_entry`): ComfyUI's status messages and
# its `executed` outputs; the rest (`progress_state`, `executing`, our `serverless_*`, ...) not.
IN_HISTORY = frozenset({*STATUS_MESSAGES, "executed"})


def message_type(text: str) -> str | None:
    """The type of a message as ComfyUI's `json.dumps` writes it (`{"type": "<type>", ...`),
    told without parsing it; None for a text not written so."""
    if not text.startswith(PREFIX):
        return None
    end = text.find('"', len(PREFIX))
    return text[len(PREFIX) : end] if end > 0 else None


def in_history(text: str) -> bool:
    """Whether a logged event may count in a `/history` entry (False: it certainly does not)."""
    kind = message_type(text)
    return kind is None or kind in IN_HISTORY


def relayed_as_is(text: str) -> bool:
    """Whether a logged event is one of ComfyUI's messages a `/ws` client gets as it is, and
    not a prompt's last one, told without parsing it (False: `relayed` decides): an `executing`
    message that names a node (`names_node`), a `status` message without `"sid"` (not the
    greeting)."""
    kind = message_type(text)
    if kind == "executing":
        return names_node(text)
    if kind == "status":  # ComfyUI's queue count, relayed; the greeting its own socket got is not
        return '"sid"' not in text
    return kind in PASSED_AS_THEY_ARE


PREVIEW_IMAGE = 1  # ComfyUI's binary event types (server.BinaryEventTypes)
IMAGE_TYPES = {"image/jpeg": 1, "image/png": 2}


def preview_frame(text: str) -> bytes | None:
    """ComfyUI's binary preview frame (event type, image type, image bytes, each type a big-endian
    uint32) of one of our `serverless_preview` events; None for any other event."""
    if '"serverless_preview"' not in text[:40]:
        return None
    data = json.loads(text).get("data")
    if not isinstance(data, dict) or data.get("mime") not in IMAGE_TYPES:
        return None
    try:
        image = base64.b64decode(str(data.get("base64", "")), validate=True)
    except (binascii.Error, ValueError):
        return None
    return struct.pack(">II", PREVIEW_IMAGE, IMAGE_TYPES[data["mime"]]) + image


def is_end(message: dict[str, Any], prompt_id: str) -> bool:
    """ComfyUI's last message of a prompt: `executing` with no node."""
    data = message.get("data")
    return (
        message.get("type") == "executing"
        and isinstance(data, dict)
        and data.get("node") is None
        and data.get("prompt_id") == prompt_id
    )


def names_node(text: str) -> bool:
    """Whether an `executing` message's text certainly names a node (it has a `node` and no
    `null` anywhere), told without parsing it."""
    return "null" not in text and '"node"' in text


def ends_prompt(text: str, prompt_id: str) -> bool:
    """Whether a logged text is ComfyUI's last message of the prompt (`is_end`); only
    `executing` messages that may have no node are parsed."""
    if '"executing"' not in text[:40] or names_node(text):
        return False
    try:
        message = json.loads(text)
    except ValueError:
        return False
    return isinstance(message, dict) and is_end(message, prompt_id)


def ended(payloads: list[Any]) -> bool:
    """Whether a task's payloads end with its terminal one."""
    last = payloads[-1] if payloads else None
    return isinstance(last, dict) and last.get("type") in ("serverless_api", "error")


def comfyui_ended(payloads: list[Any], prompt_id: str) -> bool:
    """Whether ComfyUI has sent the prompt's last message among `payloads`."""
    return any(isinstance(payload, dict) and is_end(payload, prompt_id) for payload in reversed(payloads))


def is_feature_flags(text: str | None) -> bool:
    """Whether a client's message is the `feature_flags` the editor sends first."""
    if not text or '"feature_flags"' not in text:
        return False
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):  # a client's text: anything may be there
        return False
    return isinstance(message, dict) and message.get("type") == "feature_flags"


def current_node(prompt_id: str, payloads: list[Any]) -> str | None:
    """The node a prompt runs, by its latest `executing` message in `payloads`."""
    for payload in reversed(payloads):
        data = payload.get("data") if isinstance(payload, dict) else None
        if payload.get("type") == "executing" and isinstance(data, dict) and data.get("prompt_id") == prompt_id:
            node = data.get("node")
            return str(node) if node is not None else None
    return None


def greeting(client_id: str, queue_remaining: int) -> str:
    """What ComfyUI sends a websocket client as it connects."""
    return json.dumps(
        {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": queue_remaining}}, "sid": client_id}}
    )


def closing(prompt_id: str, terminal: dict[str, Any]) -> list[str]:
    """The messages ComfyUI ends a prompt with, for a job that ended without ComfyUI's: an
    `execution_error` (or `execution_interrupted`) naming our error, then `executing` null."""
    now = int(time.time() * 1000)
    messages = []
    if terminal.get("type") == "error":
        if terminal.get("error_code") == "EXECUTION_INTERRUPTED":
            data: dict[str, Any] = {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": []}
            messages.append({"type": "execution_interrupted", "data": {**data, "timestamp": now}})
        else:
            data = {
                "prompt_id": prompt_id,
                "node_id": None,
                "node_type": None,
                "executed": [],
                "exception_message": str(terminal.get("error_message", "")),
                "exception_type": str(terminal.get("error_code", "")),
                "traceback": [],
                "current_inputs": {},
                "current_outputs": {},
                "timestamp": now,
            }
            messages.append({"type": "execution_error", "data": data})
    messages.append({"type": "executing", "data": {"node": None, "prompt_id": prompt_id}})
    return [json.dumps(message) for message in messages]


def queue_item(entry: PromptEntry) -> list[Any]:
    """A prompt as `/queue` lists it: `[number, prompt_id, prompt, extra_data, outputs]`."""
    return [entry.number, entry.task_id, entry.workflow, _extra(entry), list(entry.outputs)]


def _extra(entry: PromptEntry) -> dict[str, Any]:
    return {"client_id": entry.client_id} if entry.client_id else {}


def history_entry(entry: PromptEntry, payloads: list[Any], by_comfyui: bool = False) -> dict[str, Any] | None:
    """The `/history` entry of an ended prompt whose log holds `payloads`; None while it runs.
    `by_comfyui`: the job has not published its end, but its ComfyUI has ended the prompt
    (`payloads` hold its `execution_success`, `_error` or `_interrupted`): the entry as ComfyUI's
    own history then holds it."""
    if not ended(payloads) and not by_comfyui:
        return None
    terminal = payloads[-1] if ended(payloads) else None
    outputs: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    messages: list[list[Any]] = []
    for message in payloads if terminal is None else payloads[:-1]:
        if not isinstance(message, dict):
            continue
        kind, data = message.get("type"), message.get("data")
        if not isinstance(data, dict) or data.get("prompt_id") != entry.task_id:
            continue
        if kind in STATUS_MESSAGES:
            messages.append([kind, data])
        elif kind == "executed" and isinstance(data.get("output"), dict):
            node = str(data.get("node"))
            outputs[node] = _merged(outputs.get(node), data["output"])
            meta[node] = {
                "node_id": node,
                "display_node": data.get("display_node", node),
                "parent_node": None,
                "real_node_id": node,
            }
    if terminal is None:
        succeeded = any(kind == "execution_success" for kind, _ in messages)
    else:
        succeeded = terminal["type"] == "serverless_api"
    if terminal is not None and not any(kind in ENDS for kind, _ in messages) and not succeeded:
        messages.extend([kind, data] for kind, data in _ended_early(entry.task_id, terminal))
    return {
        "prompt": queue_item(entry),
        "outputs": outputs,
        "status": {"status_str": "success" if succeeded else "error", "completed": succeeded, "messages": messages},
        "meta": meta,
    }


def _ended_early(prompt_id: str, terminal: dict[str, Any]) -> list[tuple[str, Any]]:
    ends = [json.loads(text) for text in closing(prompt_id, terminal)[:-1]]
    return [(message["type"], message["data"]) for message in ends]


def _merged(before: dict[str, Any] | None, output: dict[str, Any]) -> dict[str, Any]:
    """A node's outputs over its `executed` messages (a node may send several)."""
    if before is None:
        return dict(output)
    merged = dict(before)
    for key, value in output.items():
        if isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


def upstream(workflow: dict[str, Any], node_id: str) -> set[str]:
    """`node_id` and every node it takes an input from, directly or not."""
    seen: set[str] = set()
    todo = [node_id]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        node = workflow.get(current)
        inputs = node.get("inputs") if isinstance(node, dict) else None
        for value in inputs.values() if isinstance(inputs, dict) else ():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                todo.append(str(value[0]))
    return seen


def runnable_outputs(workflow: dict[str, Any], outputs: tuple[str, ...], failed: set[str]) -> tuple[str, ...]:
    """The outputs none of whose nodes failed validation (those ComfyUI runs)."""
    return tuple(output for output in outputs if not upstream(workflow, output) & failed)


def output_nodes(workflow: dict[str, Any], object_info: dict[str, Any]) -> tuple[str, ...]:
    """The workflow's output nodes (what ComfyUI executes), by `/object_info`'s `output_node`."""
    found = []
    for node_id, node in workflow.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        info = object_info.get(class_type) if isinstance(class_type, str) else None
        if isinstance(info, dict) and info.get("output_node"):
            found.append(str(node_id))
    return tuple(found)
