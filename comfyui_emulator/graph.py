"""Execution order: which node of a prompt runs next.

Nodes needed by the requested outputs are added depth-first, skipping any whose output is cached;
a node is ready when every node it waits for has finished. Among ready nodes ComfyUI prefers an
output node, then one feeding an output, then one two steps before an output, else the first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def is_link(value: Any) -> bool:
    """A `[node_id, output_index]` reference to another node's output."""
    return (
        isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], (int, float))
    )


class ExecutionList:
    """The pending part of a prompt, dissolved one node at a time."""

    def __init__(
        self, prompt: dict[str, Any], is_output: Callable[[str], bool], is_cached: Callable[[str], bool]
    ) -> None:
        self._prompt = prompt
        self._is_output = is_output
        self._is_cached = is_cached
        self._pending: dict[str, int] = {}  # node id -> how many pending nodes it waits for
        self._blocking: dict[str, set[str]] = {}  # node id -> pending nodes waiting for it

    def add_node(self, node_id: str) -> None:
        """Add `node_id` and its uncached upstream nodes."""
        stack, links = [node_id], []
        while stack:
            current = stack.pop()
            if current in self._pending:
                continue
            self._pending[current] = 0
            self._blocking[current] = set()
            for value in self._prompt[current]["inputs"].values():
                if is_link(value) and not self._is_cached(value[0]):
                    stack.append(value[0])
                    links.append((value[0], current))
        for source, target in links:
            if target not in self._blocking[source]:
                self._blocking[source].add(target)
                self._pending[target] += 1

    def is_empty(self) -> bool:
        return not self._pending

    def next_node(self) -> str | None:
        """The node to run next; None when the remaining nodes wait on each other (a cycle)."""
        ready = [node for node, waits in self._pending.items() if waits == 0]
        if not ready:
            return None
        for node in ready:
            if self._class_is_output(node):
                return node
        for node in ready:
            if any(self._class_is_output(b) for b in self._blocking[node]):
                return node
        for node in ready:
            if any(self._class_is_output(c) for b in self._blocking[node] for c in self._blocking[b]):
                return node
        return ready[0]

    def complete(self, node_id: str) -> None:
        """Mark `node_id` done, releasing the nodes waiting for it."""
        del self._pending[node_id]
        for blocked in self._blocking.pop(node_id):
            self._pending[blocked] -= 1

    def cycle(self) -> list[str]:
        """Pending nodes (all of them are part of, or wait on, a cycle once nothing is ready)."""
        return list(self._pending)

    def _class_is_output(self, node_id: str) -> bool:
        return self._is_output(self._prompt[node_id]["class_type"])
