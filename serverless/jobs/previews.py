"""A job's sampler previews, at most `fps` a second (`PreviewThrottle`), the newest winning.

ComfyUI sends one frame per sampler step (tens a second on a fast GPU). A frame that comes
within 1/fps of the last one shown waits until that interval is over, replacing any frame
already waiting: callers see the newest picture at a steady rate, never a backlog, and a frame
left over is dropped when the job ends. The `serverless_preview` payload (the image as base64)
is built only for frames that are shown.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.previews import PreviewFrame


@dataclass(frozen=True, slots=True)
class Preview:
    """A frame and where the job was when it came."""

    frame: PreviewFrame
    node: str | None
    step: int | None


def preview_payload(task_id: str, preview: Preview) -> dict[str, Any]:
    """The `serverless_preview` event."""
    return {
        "type": "serverless_preview",
        "data": {
            "task_id": task_id,
            "node": preview.node,
            "mime": preview.frame.mime,
            "base64": base64.b64encode(preview.frame.image).decode("ascii"),
            "step": preview.step,
        },
    }


MAX_FPS = 4.0  # previews shown a second per job; a newer frame replaces one waiting


class PreviewThrottle:
    """Shows previews through `show`, at most `fps` a second (see the module docstring)."""

    def __init__(
        self, fps: float, show: Callable[[Preview], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = 1.0 / fps
        self._show = show
        self._clock = clock
        self._last: float | None = None
        self._waiting: Preview | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.offered = 0
        self.shown = 0

    def offer(self, preview: Preview) -> None:
        self.offered += 1
        now = self._clock()
        if self._timer is None and (self._last is None or now - self._last >= self.interval):
            self._emit(preview, now)
            return
        self._waiting = preview  # the newest wins: an older one waiting is dropped
        if self._timer is None:
            assert self._last is not None
            delay = max(0.0, self._last + self.interval - now)
            self._timer = asyncio.get_running_loop().call_later(delay, self._flush)

    def close(self) -> None:
        """The job ended: a frame still waiting is dropped."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting = None

    def _flush(self) -> None:
        self._timer = None
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self._emit(waiting, self._clock())

    def _emit(self, preview: Preview, now: float) -> None:
        self._last = now
        self.shown += 1
        self._show(preview)
