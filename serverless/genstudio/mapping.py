"""GenStudio's requests and answers read into ours and back (pure).

    POST .../prompt          {"workflow_id", "prompt": {"<node_id>": {"inputs": {...}}}}  -> overrides
    POST .../get_task_info   {"comfy_task_ids", "url_expire_period", "image_post_process_cmd"}
    POST .../cancel          {"comfy_task_id"} or {"comfy_task_ids": [...]}
    a task's summary (`serverless.status.summary`)  -> one `comfy_task_info` object

Status: 1 queued, 2 running, 3 succeeded, 4 failed or cancelled (and, ours, an unknown id, with
its `errMsg`), 5 not permitted (another key's task: nothing else of it is shown).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from typing import Any

from ..core.conversion import Conversion
from ..delivery.convert import parse_conversion
from ..errors import InvalidParams

QUEUED, RUNNING, SUCCEEDED, FAILED, NOT_PERMITTED = 1, 2, 3, 4, 5
STATUS = {"queued": QUEUED, "running": RUNNING, "succeeded": SUCCEEDED, "failed": FAILED, "cancelled": FAILED}
DEFAULT_URL_EXPIRE = 600  # seconds, as GenStudio's documents state
MAX_URL_EXPIRE = 7 * 24 * 3600  # the longest an OSS V4 signed URL may live
MAX_TASK_IDS = 100
NODE_KEYS = ("inputs", "class_type", "_meta")
WHOLE_WORKFLOW = (
    'prompt must hold only the inputs to change, {"<node_id>": {"inputs": {...}}}: a whole workflow '
    "(ComfyUI's API-format export) is not accepted here; it is registered once as a hosted workflow"
)
PARAMETER_RANGE = (
    'prompt must hold input values, not the parameter ranges ({"type", "current", "spec"}): '
    'take each input\'s "current"'
)


@dataclass(frozen=True, slots=True)
class PromptRequest:
    workflow_id: str
    overrides: dict[str, dict[str, Any]]  # the advanced form of a hosted run's overrides


@dataclass(frozen=True, slots=True)
class PostProcess:
    """`image_post_process_cmd`: our conversion, and the same as OSS's `x-oss-process`."""

    conversion: Conversion
    oss_process: str | None


@dataclass(frozen=True, slots=True)
class TaskInfoRequest:
    task_ids: tuple[str, ...]
    url_expire_period: int
    post_process: PostProcess


def as_object(document: Any) -> dict[str, Any]:
    """A body's JSON value as the object GenStudio's endpoints take, or InvalidParams."""
    if not isinstance(document, dict):
        raise InvalidParams("the body must be a JSON object")
    return document


def parse_prompt(document: Mapping[str, Any]) -> PromptRequest:
    """`workflow_id` and the overrides of `prompt` (absent or null: none)."""
    workflow_id = document.get("workflow_id")
    if not isinstance(workflow_id, str) or not workflow_id:
        raise InvalidParams("workflow_id is required")
    prompt = document.get("prompt")
    if prompt is None:
        return PromptRequest(workflow_id, {})
    if not isinstance(prompt, dict):
        raise InvalidParams('prompt must be an object: {"<node_id>": {"inputs": {...}}}')
    return PromptRequest(workflow_id, {str(node_id): _node(node) for node_id, node in prompt.items()})


def _node(node: Any) -> dict[str, Any]:
    """One node's overrides. Keys beside `inputs` are taken as inputs: GenStudio's own tutorial
    client sets `prompt[node]["image"]` so, and it is plain what it means."""
    if not isinstance(node, dict):
        raise InvalidParams('each node of prompt must be {"inputs": {...}}')
    if "class_type" in node:
        raise InvalidParams(WHOLE_WORKFLOW)
    inputs = node.get("inputs", {})
    if not isinstance(inputs, dict):
        raise InvalidParams('each node of prompt must be {"inputs": {...}}')
    merged = {**inputs, **{key: value for key, value in node.items() if key not in NODE_KEYS}}
    for value in merged.values():
        if _is_link(value):
            raise InvalidParams(WHOLE_WORKFLOW)
        if isinstance(value, dict) and "current" in value and ("spec" in value or "type" in value):
            raise InvalidParams(PARAMETER_RANGE)
    return {"inputs": merged}


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def parse_task_info(document: Mapping[str, Any]) -> TaskInfoRequest:
    """The ids asked (at least one, at most MAX_TASK_IDS), the URLs' lifetime and conversion."""
    ids = document.get("comfy_task_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(task_id, str) for task_id in ids):
        raise InvalidParams("comfy_task_ids must be a non-empty array of task ids (prompt_id)")
    if len(ids) > MAX_TASK_IDS:
        raise InvalidParams(f"comfy_task_ids holds more than {MAX_TASK_IDS} ids")
    expire = document.get("url_expire_period", DEFAULT_URL_EXPIRE)
    if expire is None:
        expire = DEFAULT_URL_EXPIRE
    if isinstance(expire, bool) or not isinstance(expire, int) or not 1 <= expire <= MAX_URL_EXPIRE:
        raise InvalidParams(f"url_expire_period must be a whole number of seconds from 1 to {MAX_URL_EXPIRE}")
    post_process = parse_post_process(document.get("image_post_process_cmd"))
    return TaskInfoRequest(tuple(dict.fromkeys(ids)), expire, post_process)


def parse_post_process(command: Any) -> PostProcess:
    """`{"format": "jpg", "quality": {"q": 80}}` (or `{"Q": 90}`, absolute quality)."""
    if command is None:
        return PostProcess(Conversion(), None)
    if not isinstance(command, dict) or set(command) - {"format", "quality"}:
        raise InvalidParams('image_post_process_cmd must be {"format": "jpg", "quality": {"q": 80}}')
    fmt, quality = command.get("format"), command.get("quality")
    steps: list[str] = []
    if fmt is not None:
        if not isinstance(fmt, str):
            raise InvalidParams("image_post_process_cmd.format must be jpg, jpeg, png or webp")
        steps.append(f"format,{fmt.strip().lower()}")
    value: Any = None
    if quality is not None:
        if not isinstance(quality, dict) or len(quality) != 1 or next(iter(quality)) not in ("q", "Q"):
            raise InvalidParams('image_post_process_cmd.quality must be {"q": 1-100} or {"Q": 1-100}')
        ((letter, value),) = quality.items()
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
            raise InvalidParams("image_post_process_cmd.quality must be a whole number from 1 to 100")
        steps.append(f"quality,{letter}_{value}")
    try:
        conversion = parse_conversion(fmt, None if value is None else str(value), None)
    except InvalidParams:
        raise InvalidParams("image_post_process_cmd.format must be jpg, jpeg, png or webp") from None
    return PostProcess(conversion, "image/" + "/".join(steps) if steps else None)


def cancel_ids(document: Mapping[str, Any]) -> tuple[str, ...]:
    """`comfy_task_id` (GenStudio's) and/or `comfy_task_ids`; `prompt_id` too."""
    found: list[Any] = [document[key] for key in ("comfy_task_id", "prompt_id") if key in document]
    many = document.get("comfy_task_ids")
    if many is not None:
        if not isinstance(many, list):
            raise InvalidParams("comfy_task_ids must be an array of task ids")
        found.extend(many)
    if not found or not all(isinstance(task_id, str) and task_id for task_id in found):
        raise InvalidParams("comfy_task_id (or comfy_task_ids) is required")
    if len(found) > MAX_TASK_IDS:
        raise InvalidParams(f"at most {MAX_TASK_IDS} ids at once")
    return tuple(dict.fromkeys(found))


def outputs(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The results of a succeeded task (items of `data.results`), in order."""
    result = summary.get("result")
    data = result.get("data") if isinstance(result, dict) else None
    results = data.get("results") if isinstance(data, dict) else None
    return [item for item in results or [] if isinstance(item, dict) and isinstance(item.get("output"), dict)]


def task_info(task_id: str, summary: Mapping[str, Any], urls: list[str | None]) -> dict[str, Any]:
    """The `comfy_task_info` of a task from its summary; `urls[i]` is the URL of `outputs(summary)[i]`.
    A task whose last progress says succeeded but whose result is not logged yet is still running:
    GenStudio's clients take status 3 as final and read its files then."""
    status = STATUS.get(str(summary.get("state")), QUEUED)
    if status == SUCCEEDED and not isinstance(summary.get("result"), dict):
        status = RUNNING
    files: dict[str, list[str]] = {}
    final: list[str] = []
    for item, url in zip(outputs(summary), urls, strict=True):
        if url is None:
            continue
        files.setdefault(str(item.get("node_id")), []).append(url)
        if item["output"].get("raw", {}).get("type", "output") == "output":
            final.append(url)
    return {
        "comfy_task_id": task_id,
        "status": status,
        "queue_size": summary.get("queue_size") or 0,
        "current_position": summary.get("queue_position") or 0,
        "errMsg": _error_message(summary),
        "files": files,
        "final_files": final,
        "progress_num": 100 if status == SUCCEEDED else int(float(summary.get("percent") or 0)),
    }


def preview(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The `preview` member of a `comfy_task_info`, from a `serverless_preview` event."""
    data = payload.get("data") or {}
    return {key: data.get(key) for key in ("node", "mime", "base64", "step")}


def _error_message(summary: Mapping[str, Any]) -> str:
    error = summary.get("error")
    if not isinstance(error, dict):
        return ""
    return f"{error.get('error_code', 'UNCLASSIFY')}: {error.get('error_message', '')}"


def unknown(task_id: str) -> dict[str, Any]:
    """The entry of an id no instance knows."""
    return {**_empty(task_id, FAILED), "errMsg": f"no task {task_id}"}


def not_permitted(task_id: str) -> dict[str, Any]:
    """The entry of another key's task: nothing of it."""
    return {**_empty(task_id, NOT_PERMITTED), "errMsg": "permission denied"}


def _empty(task_id: str, status: int) -> dict[str, Any]:
    return {
        "comfy_task_id": task_id,
        "status": status,
        "queue_size": 0,
        "current_position": 0,
        "errMsg": "",
        "files": {},
        "final_files": [],
        "progress_num": 0,
    }


def source_file(body: bytes, content_type: str) -> bytes:
    """The bytes of the multipart field `source_file` (GenStudio's upload). Blocking for big
    bodies (the stdlib's MIME parser): run it in a thread."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidParams("upload/image takes multipart/form-data with the image in the field source_file")
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise InvalidParams("the multipart body could not be read")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "source_file":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes) and payload:
                return payload
            raise InvalidParams("source_file is empty")
    raise InvalidParams("the image goes in the multipart field source_file")
