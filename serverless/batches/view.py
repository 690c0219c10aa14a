"""What callers read of a batch (pure): its roll-up (counts by state, percent, ETA), an item's
outputs as names and URLs, a manifest line, and the events the feeder appends."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from .spec import Batch
from .store import ENDED_ITEM, Progress

STATES = ("pending", "queued", "running", "succeeded", "failed", "cancelled")


def counts(total: int, states: dict[int, str]) -> dict[str, int]:
    """Items by state (an item without a recorded state is pending)."""
    found = Counter(states.values())
    rolled = {state: found.get(state, 0) for state in STATES}
    rolled["pending"] += total - len(states)
    return rolled


def rollup(batch: Batch, progress: Progress, now: float | None = None) -> dict[str, Any]:
    """The batch's state, counts, percent and ETA (seconds; omitted until an item has ended)."""
    now = time.time() if now is None else now
    rolled = {state: progress.counts.get(state, 0) for state in STATES}
    ended = sum(rolled[state] for state in ENDED_ITEM)
    summary: dict[str, Any] = {
        "batch_id": batch.batch_id,
        "state": progress.state,
        "total": batch.total,
        "counts": rolled,
        "percent": round(100.0 * ended / batch.total, 2) if batch.total else 100.0,
        "created_at": batch.created,
        "ended_at": progress.ended_at,
        "workflow_id": batch.workflow_id,
    }
    if progress.live and progress.first_ended is not None and ended:
        rate = ended / max(now - progress.started, 1e-3)
        summary["eta_s"] = round((batch.total - ended) / rate, 1)
    if progress.webhook is not None:
        summary["webhook"] = progress.webhook
    if progress.manifest is not None:
        summary["manifest"] = progress.manifest
    return summary


def outputs(summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A done task's outputs: node, file name, and where to fetch it (bucket URL or link)."""
    result = (summary or {}).get("result") or {}
    found = []
    for entry in (result.get("data") or {}).get("results") or []:
        output = entry.get("output") or {}
        raw = output.get("raw") or {}
        url = (output.get("oss") or {}).get("url") or output.get("url")
        item = {"node_id": entry.get("node_id"), "filename": raw.get("filename"), "filepath": raw.get("filepath")}
        if url:
            item["url"] = url
        found.append(item)
    return found


def manifest_line(batch: Batch, index: int, state: str, summary: dict[str, Any] | None) -> bytes:
    """One JSON line of the manifest: the item, its parameters, its task and its outputs."""
    line = {
        "index": index,
        "task_id": batch.task_id(index),
        "state": state,
        "parameters": batch.item(index),
        "outputs": outputs(summary) if state == "succeeded" else [],
    }
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


def event(kind: str, data: dict[str, Any]) -> bytes:
    """One batch event as stored and sent (`batch_item`, `batch_progress`, `batch_end`)."""
    return json.dumps({"type": kind, "data": data}, ensure_ascii=False).encode()
