"""What models a hosted workflow needs, and whether this instance (or a fleet's workers) holds
them: its model loader inputs' values, each a name `/object_info` lists or a reference the
store holds. `preload` fetches a workflow's references ahead of its first run (PRELOAD_WORKFLOWS)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..core.credentials import Credentials
from ..errors import ServerlessError
from ..workflows.store import WorkflowStore
from .refs import find_model_inputs, folder_of, is_reference, parse_reference
from .store import ModelStore

log = logging.getLogger(__name__)


def needed_models(
    workflow: Mapping[str, Any],
    object_info: Mapping[str, Any],
    extra: Mapping[tuple[str, str], str],
    held: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """`[{"node_id", "input", "folder", "model", "held"}]` for each model loader input; `held` is
    the store's listing (a reference is held when an entry has its source or pinned hash)."""
    found = []
    for node_id, node in workflow.items():
        if not isinstance(node, Mapping) or not isinstance(node.get("inputs"), Mapping):
            continue
        class_type = node.get("class_type")
        for name, value in node["inputs"].items():
            folder = folder_of(class_type, name, extra) if isinstance(value, str) else None
            if folder is None:
                continue
            if is_reference(value):
                try:
                    ref = parse_reference(value)
                except ServerlessError:
                    continue
                shown, have = ref.shown, any(_holds(entry, folder, ref.shown, ref.sha256) for entry in held)
            else:
                shown, have = value, value in _options(object_info, str(class_type), name)
            found.append({"node_id": str(node_id), "input": name, "folder": folder, "model": shown, "held": have})
    return found


def _holds(entry: Mapping[str, Any], folder: str, source: str, digest: str | None) -> bool:
    if entry.get("folder") != folder:
        return False
    return entry.get("sha256") == digest if digest is not None else entry.get("source") == source


def _options(object_info: Mapping[str, Any], class_type: str, name: str) -> list[Any]:
    inputs = (object_info.get(class_type) or {}).get("input") or {}
    for section in ("required", "optional"):
        spec = (inputs.get(section) or {}).get(name)
        if isinstance(spec, list) and spec:
            if isinstance(spec[0], list):
                return spec[0]
            if len(spec) > 1 and isinstance(spec[1], dict) and isinstance(spec[1].get("options"), list):
                return list(spec[1]["options"])
    return []


async def preload(
    store: ModelStore,
    workflows: WorkflowStore,
    ids: tuple[str, ...],
    extra: Mapping[tuple[str, str], str],
    credentials: Credentials | None,
) -> None:
    """Fetch the models the hosted workflows `ids` name (before the app reports ready); a failure
    is logged and left for the first run to meet again."""
    for workflow_id in ids:
        try:
            stored = await workflows.read(workflow_id)
        except ServerlessError as exc:
            log.error("PRELOAD_WORKFLOWS: workflow %s: %s", workflow_id, exc.message)
            continue
        for item in find_model_inputs(stored.workflow, extra):
            try:
                placed = await store.obtain(item.ref, item.folder, credentials)
            except ServerlessError as exc:
                log.error("PRELOAD_WORKFLOWS: workflow %s node %s: %s", workflow_id, item.node_id, exc.message)
                continue
            log.info("PRELOAD_WORKFLOWS: workflow %s has %s/%s", workflow_id, item.folder, placed.name)
