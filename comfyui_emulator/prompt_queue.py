"""The prompt queue and the history, shared by the HTTP routes and the worker thread.

Items are `[number, prompt_id, prompt, extra_data, outputs_to_execute]`; the smallest number runs
first (a heap, as in ComfyUI, so `front` prompts with negative numbers jump ahead and
`queue_pending` lists the heap's own order).
"""

from __future__ import annotations

import copy
import heapq
import threading
from collections.abc import Callable
from typing import Any

QueueItem = list[Any]
MAX_HISTORY = 10000
# extra_data keys ComfyUI keeps out of the history (API credentials).
SENSITIVE_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class PromptQueue:
    """Pending and running prompts plus finished ones' history; thread-safe."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._mutex = threading.RLock()
        self._not_empty = threading.Condition(self._mutex)
        self._heap: list[QueueItem] = []
        self._running: dict[int, QueueItem] = {}
        self._task_counter = 0
        self._history: dict[str, dict[str, Any]] = {}

    def put(self, item: QueueItem) -> None:
        with self._mutex:
            heapq.heappush(self._heap, item)
            self._on_change()
            self._not_empty.notify()

    def get(self, timeout: float) -> tuple[QueueItem, int] | None:
        """Take the next prompt, marking it running; None if none came within `timeout`."""
        with self._not_empty:
            if not self._heap:
                self._not_empty.wait(timeout)
                if not self._heap:
                    return None
            item = heapq.heappop(self._heap)
            task_id = self._task_counter
            self._task_counter += 1
            self._running[task_id] = copy.deepcopy(item)
            self._on_change()
            return item, task_id

    def wake(self) -> None:
        """Wake a waiting `get` (used at shutdown)."""
        with self._not_empty:
            self._not_empty.notify_all()

    def task_done(self, task_id: int, result: dict[str, Any], status: dict[str, Any]) -> None:
        """Move a running prompt to the history with its outputs and status."""
        with self._mutex:
            item = self._running.pop(task_id)
            for key in SENSITIVE_KEYS:
                item[3].pop(key, None)
            if len(self._history) > MAX_HISTORY:
                self._history.pop(next(iter(self._history)))
            entry: dict[str, Any] = {"prompt": item, "outputs": {}, "status": copy.deepcopy(status)}
            entry.update(result)
            self._history[item[1]] = entry
            self._on_change()

    def remaining(self) -> int:
        with self._mutex:
            return len(self._heap) + len(self._running)

    def snapshot(self) -> tuple[list[QueueItem], list[QueueItem]]:
        """(running, pending) as `GET /queue` lists them."""
        with self._mutex:
            return list(self._running.values()), list(self._heap)

    def running_ids(self) -> list[str]:
        with self._mutex:
            return [item[1] for item in self._running.values()]

    def wipe(self) -> None:
        with self._mutex:
            self._heap = []
            self._on_change()

    def delete(self, prompt_id: str) -> bool:
        """Drop one pending prompt. Deleting the last one also wipes, so two status messages go out."""
        with self._mutex:
            for index, item in enumerate(self._heap):
                if item[1] == prompt_id:
                    if len(self._heap) == 1:
                        self.wipe()
                    else:
                        self._heap.pop(index)
                        heapq.heapify(self._heap)
                    self._on_change()
                    return True
        return False

    def history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        """`GET /history` (newest `max_items` by default, or a window from `offset`) or one entry."""
        with self._mutex:
            if prompt_id is not None:
                entry = self._history.get(prompt_id)
                return {prompt_id: copy.deepcopy(entry)} if entry is not None else {}
            if offset < 0 and max_items is not None:
                offset = len(self._history) - max_items
            out: dict[str, Any] = {}
            for index, (key, entry) in enumerate(self._history.items()):
                if max_items is not None and len(out) >= max_items:
                    break
                if index >= offset:
                    out[key] = entry  # entries are never mutated once stored
            return out

    def wipe_history(self) -> None:
        with self._mutex:
            self._history = {}

    def delete_history(self, prompt_id: str) -> None:
        with self._mutex:
            self._history.pop(prompt_id, None)
