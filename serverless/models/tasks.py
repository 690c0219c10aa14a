"""The models API's changes as tasks (`JobSpec.model_task`), run where the models live: on one box
by its own jobs, on a fleet by a worker that took them from the queue, so that a gateway (which
holds no models) answers as a box does. An import reports its bytes as `serverless_progress`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..core.credentials import Credentials
from ..errors import InvalidParams
from .refs import check_folder, check_name, parse_reference
from .store import ModelStore

PROGRESS_INTERVAL = 0.25
Publish = Callable[[dict[str, Any]], object]


def import_task(body: Any) -> dict[str, Any]:
    """`POST /api/models`'s body checked: `{"source", "folder", "name"?, "sha256"?, "pin"?}`."""
    if not isinstance(body, dict):
        raise InvalidParams('the body must be a JSON object: {"source": ..., "folder": ...}')
    source, folder = body.get("source"), body.get("folder")
    if not isinstance(source, str) or not isinstance(folder, str):
        raise InvalidParams("source and folder are required strings")
    ref = parse_reference(source)
    task: dict[str, Any] = {"op": "import", "source": source, "folder": check_folder(folder)}
    name, digest, pin = body.get("name"), body.get("sha256"), body.get("pin", False)
    if name is not None:
        task["name"] = check_name(name) if isinstance(name, str) else check_name("")
    if digest is not None:
        if not isinstance(digest, str) or (ref.sha256 is not None and ref.sha256 != digest.lower()):
            raise InvalidParams("sha256 must be the 64 hex digits the source's content hashes to")
        parse_reference(f"sha256:{digest}")
        task["sha256"] = digest.lower()
    if not isinstance(pin, bool):
        raise InvalidParams("pin must be true or false")
    task["pin"] = pin
    return task


async def run_task(
    store: ModelStore, task: dict[str, Any], credentials: Credentials | None, publish: Publish
) -> dict[str, Any]:
    """One model task; its result data (`model`, or `deleted`)."""
    op, task_id = task.get("op"), task.get("task_id")
    folder = check_folder(str(task.get("folder", "")))
    if op == "delete":
        await store.delete(folder, str(task.get("name", "")))
        return {"deleted": {"folder": folder, "name": task["name"]}}
    if op == "pin":
        return {"model": await store.set_pinned(folder, str(task.get("name", "")), bool(task.get("pinned")))}
    if op != "import":
        raise InvalidParams(f"unknown model task {op!r}")
    source = str(task["source"])
    if task.get("sha256") and "#sha256=" not in source and not source.startswith("sha256:"):
        source = f"{source}#sha256={task['sha256']}"
    ref = parse_reference(source)
    last = [0.0]

    def progress(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] < PROGRESS_INTERVAL and done != total:
            return
        last[0] = now
        data: dict[str, Any] = {"task_id": task_id, "state": "running", "bytes_done": done, "bytes_total": total}
        if total:
            data["percent"] = round(min(99.9, 100.0 * done / total), 1)
        publish({"type": "serverless_progress", "data": data})

    placed = await store.obtain(ref, folder, credentials, task.get("name"), True if task.get("pin") else None, progress)
    entries = await store.listing(folder)
    entry = next((e for e in entries if e["name"] == placed.name), None)
    return {
        "model": entry or {"folder": folder, "name": placed.name, "sha256": placed.sha256, "bytes": placed.bytes},
        "cached": placed.cached,
        "download_s": placed.download_s,
    }
