"""The OpenAPI 3.1 document of one hosted workflow (pure): its run endpoint, whose request body
is the workflow's parameters in the flat form (`"<node_id>.<input>": value`, JSON Schema types,
ranges, enums and defaults), and whose responses are the run result and the error object."""

from __future__ import annotations

from typing import Any

from .schema import Parameter

JSON_TYPES = {"INT": "integer", "FLOAT": "number", "STRING": "string", "BOOLEAN": "boolean"}
ERROR_STATUSES = {
    "400": "INVALID_PARAMS (a bad override: `raw.node_errors` names node, input and what is allowed), "
    "PROMPT_ERROR or INPUT_ERROR",
    "404": "NOT_FOUND: no such workflow",
    "500": "EXECUTION_FAILED, EXECUTION_INTERRUPTED, OUTPUT_ERROR or UNCLASSIFY",
    "503": "COMFYUI_UNAVAILABLE",
    "504": "TIMEOUT",
}


def parameter_schema(parameter: Parameter) -> dict[str, Any]:
    """The JSON Schema of one parameter."""
    spec = parameter.spec
    schema: dict[str, Any] = {"description": parameter.description, "default": parameter.default}
    if parameter.title:
        schema["title"] = parameter.title
    if parameter.loader:
        schema["type"] = "string"
    elif spec.type == "COMBO" and spec.options is not None:
        schema["enum"] = list(spec.options)
    elif spec.type in JSON_TYPES:
        schema["type"] = JSON_TYPES[spec.type]
        if spec.minimum is not None:
            schema["minimum"] = spec.minimum
        if spec.maximum is not None:
            schema["maximum"] = spec.maximum
    if parameter.seed:  # the range, or -1 for a random seed
        ranged = {k: schema.pop(k) for k in ("type", "minimum", "maximum") if k in schema}
        schema["anyOf"] = [ranged, {"const": -1}]
    return schema


def properties(parameters: list[Parameter]) -> dict[str, Any]:
    """Each parameter by `<node_id>.<input>`, and by `<title>.<input>` where its title is unique."""
    found: dict[str, Any] = {}
    for parameter in parameters:
        schema = parameter_schema(parameter)
        found[parameter.key] = schema
        if parameter.title_key is not None:
            found[parameter.title_key] = {
                **schema,
                "description": f"the same as `{parameter.key}`: {schema['description']}",
            }
    return found


def request_schema(parameters: list[Parameter]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Overrides of the stored workflow; every property is optional and defaults to the "
        "stored value. A node with a unique title is named by it too (`<title>.<input>`). "
        'The advanced form {"<node_id>": {"inputs": {...}}} and the simple '
        'form {"prompt": "text", "target_node": "<id>"} are accepted too.',
        "properties": properties(parameters),
        "additionalProperties": False,
    }


def result_schema() -> dict[str, Any]:
    output = {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "raw": {"type": "object"},
            "base64": {"type": "object", "properties": {"content": {"type": ["string", "null"]}}},
            "oss": {"type": "object"},
            "mime": {"type": ["string", "null"]},
            "bytes": {"type": ["integer", "null"]},
        },
    }
    result = {
        "type": "object",
        "properties": {
            "node_id": {"type": "string"},
            "batch_id": {"type": "integer"},
            "index": {"type": "integer"},
            "output": output,
        },
    }
    data = {
        "type": "object",
        "required": ["prompt_id", "results"],
        "properties": {
            "prompt_id": {"type": "string"},
            "task_id": {"type": "string"},
            "workflow_id": {"type": "string"},
            "execution_time": {"type": "number"},
            "seeds": {
                "type": "object",
                "additionalProperties": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
            "timings": {"type": "object", "additionalProperties": {"type": "number"}},
            "results": {"type": "array", "items": result},
            "node_errors": {"type": "object"},
        },
    }
    return {
        "type": "object",
        "required": ["type", "data"],
        "properties": {"type": {"const": "serverless_api"}, "data": data},
    }


def error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "error_code", "error_message"],
        "properties": {
            "type": {"const": "error"},
            "error_code": {"type": "string"},
            "error_message": {"type": "string"},
            "raw": {},
        },
    }


def _flag(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "boolean", "default": False},
    }


def openapi_document(workflow_id: str, parameters: list[Parameter], server_url: str) -> dict[str, Any]:
    """The whole document; `server_url` is where this API was reached."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    errors = {status: {"description": text, "content": error} for status, text in ERROR_STATUSES.items()}
    run = {
        "operationId": "run",
        "summary": f"Run the hosted workflow {workflow_id!r}",
        "parameters": [
            _flag("stream", "answer text/event-stream: every ComfyUI message, then the result"),
            _flag("output_base64", "each output's bytes in output.base64.content"),
            _flag("output_oss", "each output uploaded to OSS"),
        ],
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Overrides"}}},
        },
        "responses": {
            "200": {
                "description": "the run result (or, with stream, its events ending with it)",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Result"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            **errors,
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"Hosted workflow {workflow_id}",
            "version": "1",
            "description": f"Run the ComfyUI workflow {workflow_id!r}, changing only its parameters.",
        },
        "servers": [{"url": server_url}],
        "paths": {f"/api/workflows/{workflow_id}/run": {"post": run}},
        "components": {
            "schemas": {
                "Overrides": request_schema(parameters),
                "Result": result_schema(),
                "Error": error_schema(),
            }
        },
    }
