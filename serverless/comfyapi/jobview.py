"""Comfy API v2's shapes made from ours (pure): a task's status log as a `Job`, its results as
`Output`s (each an asset whose id names the task and the result), an uploaded file as an `Asset`,
our errors in its error envelope, a log's events as its SSE events."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from .index import PromptEntry

API = "/api/v2"
OUTPUT_PREFIX = "out~"  # "~" is in no task id: "out~<task id>~<node id>~<output key>~<batch id>"
URL_VALID = 3600  # seconds an output's or asset's `url` is said to be valid
STATUS = {
    "queued": "queued",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "canceled",
}
TERMINAL = ("succeeded", "failed", "canceled")


def iso(at: float | None) -> str | None:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z") if at is not None else None


def output_id(task_id: str, result: dict[str, Any]) -> str:
    """An output's asset id: the same while the job runs (its `serverless_output` event) and
    after (its result), whatever order the outputs were read in."""
    kind = (result.get("output") or {}).get("type")
    return f"{OUTPUT_PREFIX}{task_id}~{result.get('node_id')}~{kind}~{result.get('batch_id')}"


def parse_output_id(asset_id: str) -> str | None:
    """The task id of an output's asset id; None for an uploaded asset's."""
    if not asset_id.startswith(OUTPUT_PREFIX):
        return None
    parts = asset_id[len(OUTPUT_PREFIX) :].rsplit("~", 3)
    return parts[0] if len(parts) == 4 and parts[0] else None


def results(payloads: list[Any]) -> list[dict[str, Any]]:
    """A job's results: its terminal payload's, else those its `serverless_output` events told
    so far (each as it was read: an output lands before the job ends)."""
    terminal = payloads[-1] if payloads and isinstance(payloads[-1], dict) else None
    if terminal is not None and terminal.get("type") == "serverless_api":
        return list(terminal["data"].get("results") or [])
    return [p["data"] for p in payloads if isinstance(p, dict) and p.get("type") == "serverless_output"]


def kind(output: dict[str, Any]) -> str:
    """API v2's `OutputType` of one of our outputs."""
    mime = str(output.get("mime") or "")
    for prefix in ("image", "video", "audio"):
        if mime.startswith(prefix + "/"):
            return prefix
    return "text" if mime.startswith("text/") else "file"


def outputs(task_id: str, payloads: list[Any], now: float, base: str = "") -> list[dict[str, Any]]:
    """A job's results so far as `Output`s (their `url` under `base`, where the caller reached us)."""
    found = []
    for result in results(payloads):
        output = result.get("output") or {}
        raw = output.get("raw") or {}
        asset_id = output_id(task_id, result)
        found.append(
            {
                "node_id": str(result.get("node_id")),
                "name": raw.get("filename"),
                "type": kind(output),
                "content_type": output.get("mime") or "application/octet-stream",
                "size_bytes": output.get("bytes") or 0,
                "id": asset_id,
                "hash": None,
                "url": f"{base}{API}/assets/{asset_id}/content",
                "url_expires_at": iso(now + URL_VALID),
                "job_id": task_id,
            }
        )
    return found


def error(terminal: dict[str, Any] | None) -> dict[str, Any] | None:
    """A failed job's `JobError`."""
    if terminal is None or terminal.get("type") != "error":
        return None
    raw: dict[str, Any] = terminal["raw"] if isinstance(terminal.get("raw"), dict) else {}
    code = str(terminal.get("error_code", "UNCLASSIFY"))
    traceback = raw.get("traceback")
    return {
        "code": "node_execution_error" if code == "EXECUTION_FAILED" else code.lower(),
        "message": str(terminal.get("error_message", "")),
        "node_id": str(raw["node_id"]) if raw.get("node_id") is not None else None,
        "class_type": raw.get("node_type"),
        "traceback": "".join(traceback) if isinstance(traceback, list) else None,
    }


def progress(entry: PromptEntry, payloads: list[Any], percent: float) -> dict[str, Any]:
    """The `Progress` snapshot: nodes begun, the current node and its sampler steps."""
    begun: list[str] = []
    step = steps = None
    for payload in payloads:
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, dict) or data.get("prompt_id") != entry.task_id:
            continue
        if payload.get("type") == "executing" and data.get("node") is not None:
            begun.append(str(data["node"]))
            step = steps = None
        elif payload.get("type") == "progress":
            step, steps = data.get("value"), data.get("max")
    current = begun[-1] if begun else None
    node = entry.workflow.get(current) if current is not None else None
    class_type = node.get("class_type") if isinstance(node, dict) else None
    message = f"{class_type} {step}/{steps}" if class_type and steps else class_type
    return {
        "value": round(min(max(percent / 100.0, 0.0), 1.0), 4),
        "nodes_done": max(len(set(begun)) - 1, 0) if current is not None else 0,
        "nodes_total": len(entry.workflow),
        "current_node": current,
        "current_node_class": class_type,
        "step": step,
        "steps": steps,
        "message": message,
    }


def job(
    entry: PromptEntry, payloads: list[Any], now: float, retention: float, canceling: bool = False, base: str = ""
) -> dict[str, Any]:
    """The `Job` of a prompt whose status log holds `payloads`."""
    ours = [p["data"] for p in payloads if isinstance(p, dict) and p.get("type") == "serverless_progress"]
    last = ours[-1] if ours else {}
    terminal = (
        payloads[-1]
        if payloads and isinstance(payloads[-1], dict) and payloads[-1].get("type") in ("serverless_api", "error")
        else None
    )
    state = str(last.get("state", "queued"))
    if terminal is not None:
        interrupted = terminal.get("error_code") == "EXECUTION_INTERRUPTED"
        state = "succeeded" if terminal["type"] == "serverless_api" else "cancelled" if interrupted else "failed"
    status = STATUS.get(state, "queued")
    if canceling and status not in TERMINAL:
        status = "canceling"
    started = next((p.get("at") for p in ours if p.get("state") == "running"), None)
    completed = next((p.get("at") for p in ours if p.get("state") in STATUS and STATUS[p["state"]] in TERMINAL), None)
    timings = (
        terminal["data"].get("timings", {}) if terminal is not None and terminal["type"] == "serverless_api" else {}
    )
    return {
        "id": entry.task_id,
        "status": status,
        "created_at": iso(entry.created),
        "started_at": iso(started),
        "completed_at": iso(completed if completed is not None else now if terminal is not None else None),
        "expires_at": iso(entry.created + retention),
        "queue_position": last.get("queue_position") if status == "queued" else None,
        "progress": progress(entry, payloads, 100.0 if status == "succeeded" else float(last.get("percent") or 0.0)),
        "outputs": outputs(entry.task_id, payloads if terminal is None or status == "succeeded" else [], now, base),
        "error": error(terminal),
        "metrics": {
            "queue_ms": _ms(timings.get("queued_s")),
            "execution_ms": _ms(timings.get("execution_s")),
        },
        "urls": {
            "self": f"{API}/jobs/{entry.task_id}",
            "events": f"{API}/jobs/{entry.task_id}/events",
            "cancel": f"{API}/jobs/{entry.task_id}/cancel",
        },
    }


def _ms(seconds: Any) -> int | None:
    return round(seconds * 1000) if isinstance(seconds, int | float) else None


def asset(record: dict[str, Any], now: float, base: str = "", created_new: bool | None = None) -> dict[str, Any]:
    """An uploaded file's `Asset`."""
    shown = {key: record.get(key) for key in ("id", "hash", "size_bytes", "content_type", "file_path", "created_at")}
    shown.update(url=f"{base}{API}/assets/{record['id']}/content", url_expires_at=iso(now + URL_VALID), expires_at=None)
    if created_new is not None:
        shown["created_new"] = created_new
    return shown


def output_asset(output: dict[str, Any], created_at: str | None) -> dict[str, Any]:
    """A job's output as an `Asset`."""
    shown = {
        key: output[key] for key in ("id", "hash", "size_bytes", "content_type", "url", "url_expires_at", "job_id")
    }
    return {**shown, "file_path": output["name"], "created_at": created_at, "expires_at": None}


def preview(payload: dict[str, Any]) -> dict[str, Any]:
    """API v2's `preview` event of our `serverless_preview` event."""
    data = payload.get("data") or {}
    return {"node_id": data.get("node"), "content_type": data.get("mime"), "data_base64": data.get("base64")}


def envelope(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def sse(event: str, data: Any, seq: int | None) -> str:
    """One SSE frame; `id:` (ours) lets a client resume with `Last-Event-ID`."""
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
