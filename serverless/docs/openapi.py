"""The OpenAPI 3.1 document of the whole API (pure): built from `catalog.OPERATIONS`, with the
shapes it shares with the per-workflow documents (result, error) taken from their builder, and a
link to the document of every hosted workflow."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..workflows.openapi import error_schema, result_schema
from .catalog import ERROR_TEXT, OPERATIONS, TAGS, Operation, Param, Reply

JSON_TYPES = ("object", "string", "integer", "number", "boolean", "array")


def _progress_schema() -> dict[str, Any]:
    node = {
        "type": ["object", "null"],
        "properties": {
            "id": {"type": "string"},
            "class_type": {"type": ["string", "null"]},
            "title": {"type": ["string", "null"]},
        },
    }
    return {
        "type": "object",
        "properties": {
            "type": {"const": "serverless_progress"},
            "data": {
                "type": "object",
                "properties": {
                    "task_id": {"type": "string"},
                    "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                    "percent": {"type": "number", "minimum": 0, "maximum": 100},
                    "queue_position": {"type": ["integer", "null"], "description": "1 = next; 0 = running"},
                    "queue_size": {"type": ["integer", "null"]},
                    "node": node,
                    "eta_s": {
                        "type": "number",
                        "description": "seconds left; absent until a sampling step is timed (or learned)",
                    },
                    "elapsed_s": {"type": "number"},
                },
            },
        },
    }


def _preview_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "with `previews=true`: a sampler preview (not numbered, not in the status log)",
        "properties": {
            "type": {"const": "serverless_preview"},
            "data": {
                "type": "object",
                "properties": {
                    "task_id": {"type": "string"},
                    "node": {"type": ["string", "null"]},
                    "mime": {"type": "string"},
                    "base64": {"type": "string"},
                    "step": {"type": ["integer", "null"]},
                },
            },
        },
    }


def _task_schema() -> dict[str, Any]:
    times = {name: {"type": ["number", "string", "null"]} for name in ("created_at", "started_at", "ended_at")}
    return {
        "type": "object",
        "required": ["task_id", "state"],
        "properties": {
            "task_id": {"type": "string"},
            "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled", "unknown"]},
            "percent": {"type": "number"},
            "queue_position": {"type": ["integer", "null"]},
            "queue_size": {"type": ["integer", "null"]},
            **times,
            "result": {"$ref": "#/components/schemas/Result"},
            "error": {"$ref": "#/components/schemas/Error"},
        },
    }


def _parameter_schema() -> dict[str, Any]:
    spec = {
        "type": "object",
        "properties": {
            "default": {},
            "min": {"type": "number"},
            "max": {"type": "number"},
            "step": {"type": "number"},
            "options": {"type": "array"},
            "multiline": {"type": "boolean"},
        },
    }
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "`<node_id>.<input>`, the key of the flat override form"},
            "title_name": {
                "type": ["string", "null"],
                "description": "`<title>.<input>`, the same parameter by its node's title (null unless unique)",
            },
            "node_id": {"type": "string"},
            "input": {"type": "string"},
            "class_type": {"type": "string"},
            "title": {"type": ["string", "null"]},
            "type": {"type": "string"},
            "spec": spec,
            "loader": {"type": "boolean", "description": "a file input: a name, URL, oss://, s3:// or base64/data URI"},
            "note": {"type": "string"},
        },
    }


def schemas() -> dict[str, Any]:
    """The shapes the operations name."""
    summary_properties: dict[str, Any] = {
        "workflow_id": {"type": "string"},
        "title": {"type": "string"},
        "parameters": {"type": "integer"},
        "modified": {},
    }
    summary = {"type": "object", "properties": summary_properties}
    return {
        "Workflow": {
            "type": "object",
            "description": 'A ComfyUI API-format workflow ("Export (API)"): '
            '`{"<node_id>": {"class_type", "inputs"}}`, or `{"prompt": ..., "extra_data": ...}`; or the '
            "editor's own save (UI format: `nodes`, `links`, `definitions.subgraphs`), converted with "
            "ComfyUI's object_info",
            "additionalProperties": {"type": "object"},
        },
        "Overrides": {
            "type": "object",
            "description": '`{"<node_id>.<input>": value}`; the advanced form '
            '`{"<node_id>": {"inputs": {...}}}` and the simple form `{"prompt", "target_node"}` too. '
            'Ours (result delivery): `"output": {"format", "quality", "max_side"}`.',
        },
        "Result": result_schema(),
        "Error": error_schema(),
        "Accepted": {"type": "object", "required": ["task_id"], "properties": {"task_id": {"type": "string"}}},
        "StatusLog": {
            "type": "array",
            "items": {
                "type": "object",
                "description": "a ComfyUI message, one of our "
                "events (`serverless_progress`, `serverless_output`), or the terminal payload",
            },
        },
        "Progress": _progress_schema(),
        "Preview": _preview_schema(),
        "OutputEvent": {
            "type": "object",
            "properties": {
                "type": {"const": "serverless_output"},
                "data": {"type": "object", "description": "one item of `data.results`"},
            },
        },
        "Task": _task_schema(),
        "TaskList": {
            "type": "object",
            "properties": {
                "tasks": {"type": "array", "items": {"type": "object", "description": "a task's summary, no outputs"}},
                "next_cursor": {"type": ["string", "null"]},
            },
        },
        "Cancelling": {
            "type": "object",
            "properties": {
                "task_id": {"type": "string"},
                # "cancelled": on the Redis tier, a job still queued is removed at once
                "state": {"enum": ["cancelling", "cancelled"]},
            },
        },
        "Health": {
            "type": "object",
            "properties": {
                "status": {"type": "string"},
                "comfyui": {"type": "object"},
                "queue": {"type": "object"},
                "jobs": {"type": "integer"},
            },
        },
        "WorkflowList": {"type": "object", "properties": {"workflows": {"type": "array", "items": summary}}},
        "Parameter": _parameter_schema(),
        "WorkflowDescription": {
            **summary,
            "properties": {
                **summary_properties,
                "workflow": {"$ref": "#/components/schemas/Workflow"},
                "parameters": {"type": "array", "items": {"$ref": "#/components/schemas/Parameter"}},
            },
        },
        "Converted": {
            "type": "object",
            "required": ["prompt", "notes"],
            "properties": {
                "prompt": {"$ref": "#/components/schemas/Workflow"},
                "notes": {"type": "array", "items": {"type": "string"}, "description": "what could not be kept"},
            },
        },
        "Deleted": {"type": "object", "properties": {"workflow_id": {"type": "string"}, "deleted": {"const": True}}},
    }


def _schema(name: str) -> dict[str, Any]:
    return {"type": name} if name in JSON_TYPES else {"$ref": f"#/components/schemas/{name}"}


def _parameter(param: Param) -> dict[str, Any]:
    return {
        "name": param.name,
        "in": param.where,
        "required": param.required or param.where == "path",
        "description": param.description,
        "schema": {"type": param.type},
    }


def _reply(reply: Reply) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": reply.description}
    if reply.schema is not None:
        answer["content"] = {reply.media: {"schema": _schema(reply.schema)}}
    return answer


def _responses(operation: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for reply in operation.replies:  # two replies under one status: one entry, several media types
        entry = responses.setdefault(reply.status, _reply(reply))
        if entry["description"] != reply.description:
            entry["description"] += "; " + reply.description
            entry.setdefault("content", {}).update(_reply(reply).get("content", {}))
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for status in operation.errors:
        responses.setdefault(status, {"description": ERROR_TEXT[status], "content": error})
    return responses


def operation_object(operation: Operation) -> dict[str, Any]:
    result: dict[str, Any] = {
        "tags": [operation.tag],
        "summary": operation.summary,
        "operationId": operation.operation_id or f"{operation.method}{operation.path}",
    }
    if operation.description:
        result["description"] = operation.description
    if operation.params:
        result["parameters"] = [_parameter(p) for p in operation.params]
    if operation.body is not None:
        result["requestBody"] = {
            "required": operation.body_required,
            "content": {"application/json": {"schema": _schema(operation.body)}},
        }
    result["responses"] = _responses(operation)
    return result


def _description(workflow_ids: Iterable[str]) -> str:
    lines = [
        "Serve ComfyUI workflows as an HTTP API, compatible with Alibaba Function Compute's ComfyUI Serverless "
        'API. Errors are `{"type": "error", "error_code", "error_message", "raw"}`. With `API_KEYS` '
        "set, send `Authorization: Bearer <key>`. Try workflows in the [playground](/).",
    ]
    ids = list(workflow_ids)
    if ids:
        lines.append("\nEach hosted workflow has its own document, its parameters as the request body:\n")
        lines += [f"- [{w}](/api/workflows/{w}/openapi.json)" for w in ids]
    return "\n".join(lines)


def build_document(
    server_url: str, workflow_ids: Iterable[str] = (), operations: Iterable[Operation] = OPERATIONS
) -> dict[str, Any]:
    """The document; `server_url` is where the API was reached, `workflow_ids` the hosted
    workflows whose own documents it links."""
    paths: dict[str, dict[str, Any]] = {}
    for operation in operations:
        paths.setdefault(operation.path, {})[operation.method] = operation_object(operation)
    return {
        "openapi": "3.1.0",
        "info": {"title": "ComfyUI Serverless API", "version": "1", "description": _description(workflow_ids)},
        "servers": [{"url": server_url}],
        "tags": [{"name": name, "description": text} for name, text in TAGS.items()],
        "paths": paths,
        # With API_KEYS every operation but health, readiness and this document needs the key;
        # declared here, Swagger UI shows its Authorize control and sends the key it is given.
        "security": [{"apiKey": []}, {}],
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "one of API_KEYS, when that setting is set",
                }
            },
        },
    }
