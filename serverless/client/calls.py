"""The HTTP calls of the API as plain values (pure), shared by the sync and the async client:
what to send for each method, and the local form of overrides for a workflow sent whole."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import quote

ASYNC_HEADER = "X-Fc-Invocation-Type"
TASK_HEADER = "X-Fc-Async-Task-Id"


def _orjson_dumps() -> Callable[[Any], bytes] | None:
    try:
        import orjson
    except ImportError:  # the client alone (requirements-client.txt) need not have it
        return None
    # What `json` refuses, refused too (then `json` says why): dates, dataclasses, subclasses.
    strict = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
    return partial(orjson.dumps, option=strict)


_FAST_DUMPS = _orjson_dumps()


def body_json(value: Any) -> bytes:
    """A request body's JSON: orjson's when it is installed (the server's requirements have it; a
    megabyte image's base64 in a workflow in ~0.05 ms, where `json.dumps` takes ~4 ms), else
    `json`'s. `json` writes what orjson would write otherwise (a NaN or an infinity: `json` as
    Python spells it, orjson as null) or refuses (an integer past 64 bits, a key not a str)."""
    if _FAST_DUMPS is not None and _finite(value):
        try:
            return _FAST_DUMPS(value)
        except TypeError:  # orjson.JSONEncodeError
            pass
    return json.dumps(value).encode()


def _finite(value: Any) -> bool:
    """No float in `value` is a NaN or an infinity (its strings are not read: one step each)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            return False
    return True


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How a run answers: outputs as base64 and/or in OSS (and, where the server has result
    delivery, converted, linked or posted to a webhook); its task id and idempotency key."""

    output_base64: bool = False
    output_oss: bool = False
    output_format: str | None = None
    output_quality: int | None = None
    output_max_side: int | None = None
    output_url: bool = False
    callback_url: str | None = None
    task_id: str | None = None
    idempotency_key: str | None = None
    previews: bool = False  # sampler previews as `serverless_preview` events (`Event.preview`)

    def params(self) -> dict[str, str]:
        flags = ("output_base64", "output_oss", "output_url", "previews")
        params = {name: "true" for name in flags if getattr(self, name)}
        for name in ("output_format", "output_quality", "output_max_side", "callback_url"):
            value = getattr(self, name)
            if value is not None:
                params[name] = str(value)
        return params

    def headers(self) -> dict[str, str]:
        headers = {TASK_HEADER: self.task_id} if self.task_id else {}
        if self.idempotency_key:
            headers["Idempotency-Key"] = self.idempotency_key
        return headers


def split_key(key: str) -> tuple[str, str]:
    """`"<node_id>.<input>"` -> (node id, input); a ValueError names a key of another shape."""
    node_id, dot, name = key.rpartition(".")
    if not dot or not node_id or not name:
        raise ValueError(f"{key!r} is not <node_id>.<input> (e.g. 6.text)")
    return node_id, name


def apply_overrides(workflow: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an API-format workflow with `{"<node_id>.<input>": value}` set; a ValueError names
    a key whose node is not in the workflow."""
    result = copy.deepcopy(dict(workflow))
    wrapped = result.get("prompt")
    # A wrapper's prompt holds nodes; a node whose id is "prompt" has a class_type.
    prompt: dict[str, Any] = wrapped if isinstance(wrapped, dict) and "class_type" not in wrapped else result
    for key, value in overrides.items():
        node_id, name = split_key(key)
        node = prompt.get(node_id)
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            raise ValueError(f"{key!r}: the workflow has no node {node_id!r}")
        node["inputs"][name] = value
    return result


def run_call(
    workflow: Mapping[str, Any] | None,
    workflow_id: str | None,
    overrides: Mapping[str, Any] | None,
    options: RunOptions,
    stream: bool = False,
    asynchronous: bool = False,
) -> Call:
    """POST /api/serverless/run with a workflow, or /api/workflows/{id}/run with overrides."""
    if (workflow is None) == (workflow_id is None):
        raise ValueError("give a workflow or a workflow_id, not both")
    params, headers = options.params(), {"Content-Type": "application/json", **options.headers()}
    if stream:
        params["stream"] = "true"
    if asynchronous:
        headers[ASYNC_HEADER] = "Async"
    if workflow is not None:
        body = apply_overrides(workflow, overrides or {})
        return Call("POST", "/api/serverless/run", params, headers, body_json(body))
    path = f"/api/workflows/{quote(str(workflow_id), safe='@')}/run"  # `<id>@<n>`, `<id>@<alias>`
    return Call("POST", path, params, headers, body_json(dict(overrides or {})))


def task_call(name: str, task_id: str, **params: str) -> Call:
    method = "POST" if name == "cancel" else "GET"
    return Call(method, f"/api/serverless/{name}", {"task_id": task_id, **params})


def events_call(task_id: str, resume: str | int | None) -> Call:
    headers = {"Accept": "text/event-stream"}
    if resume is not None:
        headers["Last-Event-ID"] = str(resume)
    return Call("GET", "/api/serverless/events", {"task_id": task_id}, headers)


def workflow_call(method: str, workflow_id: str | None = None, body: Any = None, suffix: str = "") -> Call:
    path = "/api/workflows" + (f"/{quote(workflow_id, safe='@')}" if workflow_id is not None else "") + suffix
    if body is None:
        return Call(method, path)
    return Call(method, path, headers={"Content-Type": "application/json"}, body=body_json(body))


def alias_call(workflow_id: str, alias: str, version: int) -> Call:
    """PUT /api/workflows/{id}/aliases/{alias} `{"version": n}`."""
    return workflow_call("PUT", workflow_id, {"version": version}, f"/aliases/{quote(alias, safe='')}")


def batch_call(
    workflow: Mapping[str, Any] | None,
    workflow_id: str | None,
    items: list[Mapping[str, Any]] | None,
    sweep: Mapping[str, list[Any]] | None,
    mode: str,
    options: RunOptions,
    priority: str | None = None,
    item_webhooks: bool = False,
) -> Call:
    """POST /api/batches: a workflow (or a hosted one's id) and its items, or a sweep."""
    if (workflow is None) == (workflow_id is None):
        raise ValueError("give a workflow or a workflow_id, not both")
    if (items is None) == (sweep is None):
        raise ValueError("give items or a sweep, not both")
    body: dict[str, Any] = {"workflow": dict(workflow)} if workflow is not None else {"workflow_id": workflow_id}
    if items is not None:
        body["items"] = [dict(item) for item in items]
    else:
        body.update(sweep=dict(sweep or {}), mode=mode)
    body.update(options.params())
    if priority is not None:
        body["priority"] = priority
    if item_webhooks:
        body["item_webhooks"] = True
    return Call("POST", "/api/batches", headers={"Content-Type": "application/json"}, body=body_json(body))


def batch_path(batch_id: str, suffix: str = "", method: str = "GET", **params: str) -> Call:
    """One of a batch's calls: its roll-up (""), `/events`, `/cancel`, `/retry`, `/manifest`."""
    headers = {"Accept": "text/event-stream"} if suffix == "/events" else {}
    return Call(method, f"/api/batches/{quote(batch_id, safe='')}{suffix}", dict(params), headers)
