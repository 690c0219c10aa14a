"""ComfyUI's classic node cache.

Outputs and UI results are keyed by an input signature: the node's class, its IS_CHANGED value,
its constant inputs and, recursively, those of everything upstream (ancestors by position, so
node ids do not matter). Node objects are keyed by (node id, class). Before each prompt, entries
the new prompt does not use are dropped, so only what the previous prompt left can be reused.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from typing import Any

from .graph import is_link


class KeyedCache:
    """Values stored under per-node keys computed for the current prompt."""

    def __init__(self) -> None:
        self._keys: dict[str, str] = {}
        self._values: dict[str, Any] = {}

    def set_prompt(self, keys: dict[str, str]) -> None:
        """Switch to a new prompt's keys and drop every entry it does not use."""
        self._keys = keys
        used = set(keys.values())
        self._values = {k: v for k, v in self._values.items() if k in used}

    def get(self, node_id: str) -> Any:
        key = self._keys.get(node_id)
        return None if key is None else self._values.get(key)

    def set(self, node_id: str, value: Any) -> None:
        self._values[self._keys[node_id]] = value

    def node_ids(self) -> list[str]:
        return list(self._keys)


class CacheSet:
    """The three caches a prompt executor keeps between prompts."""

    def __init__(self) -> None:
        self.outputs = KeyedCache()
        self.ui = KeyedCache()
        self.objects = KeyedCache()

    def set_prompt(self, prompt: dict[str, Any], is_changed: Callable[[str], Any]) -> None:
        signatures = {node_id: signature(prompt, node_id, is_changed) for node_id in prompt}
        self.outputs.set_prompt(signatures)
        self.ui.set_prompt(signatures)
        self.objects.set_prompt({n: json.dumps([n, prompt[n]["class_type"]]) for n in prompt})


def signature(prompt: dict[str, Any], node_id: str, is_changed: Callable[[str], Any]) -> str:
    """The cache key of `node_id`: its own and its ordered ancestors' immediate signatures."""
    ancestors: list[str] = []
    _collect_ancestors(prompt, node_id, ancestors)
    order = {ancestor: index for index, ancestor in enumerate(ancestors)}
    parts = [_immediate(prompt, n, order, is_changed) for n in [node_id, *ancestors]]
    return json.dumps(parts, sort_keys=True, default=repr)


def _collect_ancestors(prompt: dict[str, Any], node_id: str, ancestors: list[str]) -> None:
    inputs = prompt[node_id]["inputs"]
    for key in sorted(inputs):
        if is_link(inputs[key]) and inputs[key][0] not in ancestors and inputs[key][0] in prompt:
            ancestors.append(inputs[key][0])
            _collect_ancestors(prompt, inputs[key][0], ancestors)


def _immediate(
    prompt: dict[str, Any], node_id: str, order: dict[str, int], is_changed: Callable[[str], Any]
) -> list[Any]:
    node = prompt[node_id]
    fingerprint = is_changed(node_id)
    if isinstance(fingerprint, float) and math.isnan(fingerprint):  # failed: never match anything
        fingerprint = uuid.uuid4().hex
    parts: list[Any] = [node["class_type"], fingerprint]
    for key in sorted(node["inputs"]):
        value = node["inputs"][key]
        if is_link(value) and value[0] in order:
            parts.append([key, ["ANCESTOR", order[value[0]], value[1]]])
        else:
            parts.append([key, value])
    return parts
