"""Per-prompt node progress and the cumulative `progress_state` message.

Every change re-sends the state of all non-pending nodes of the prompt. Starting a node sets
value/max to 0.0/1.0 (floats), step updates carry the sampler's ints, finishing copies max into
value; a node finished without being started (a cached output) shows the int defaults 1/1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Send = Callable[[str, Any, "str | None"], None]


class ProgressRegistry:
    """Progress of one prompt's nodes; `send` delivers messages to the prompt's client (None: all)."""

    def __init__(self, prompt_id: str, client_id: str | None, send: Send) -> None:
        self.prompt_id = prompt_id
        self.client_id = client_id
        self._send = send
        self._nodes: dict[str, dict[str, Any]] = {}

    def start(self, node_id: str) -> None:
        self._entry(node_id).update(state="running", value=0.0, max=1.0)
        self._publish()

    def update(self, node_id: str, value: float, max_value: float) -> None:
        self._entry(node_id).update(state="running", value=value, max=max_value)
        self._publish()

    def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state="finished", value=entry["max"])
        self._publish()

    def _entry(self, node_id: str) -> dict[str, Any]:
        return self._nodes.setdefault(node_id, {"state": "pending", "value": 0, "max": 1})

    def _publish(self) -> None:
        nodes = {
            node_id: {
                "value": entry["value"],
                "max": entry["max"],
                "state": entry["state"],
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, entry in self._nodes.items()
            if entry["state"] != "pending"
        }
        self._send("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, self.client_id)
