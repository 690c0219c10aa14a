"""What a node implementation is and what it may call while it runs.

IMAGE values are lists of `Frame`s (a batch of float32 RGB images); MASK values are lists of
float32 ("F") Pillow images: ComfyUI's tensors, see pixels.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image

from ..folders import Folders
from .pixels import Frame

ImageBatch = list[Frame]
MaskBatch = list[Image.Image]


class Interrupted(Exception):
    """Processing was interrupted (`POST /interrupt`); ComfyUI's InterruptProcessingException."""


@dataclass
class NodeOutput:
    """A node's result: its output sockets' values and, for output nodes, the UI payload."""

    values: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None


@dataclass
class NodeContext:
    """Handed to `Node.run`: folders, prompt data, delays and the progress/interrupt hooks."""

    node_id: str
    prompt_id: str
    folders: Folders
    step_delay: Callable[[], float]
    interrupt: threading.Event
    on_progress: Callable[[int, int, Image.Image | None], None]
    load_model: Callable[[str], None] = lambda name: None  # a checkpoint read from disk (`memory.Memory`)

    def check_interrupt(self) -> None:
        """Raise `Interrupted` if an interrupt is pending (and consume it, as ComfyUI does)."""
        if self.interrupt.is_set():
            self.interrupt.clear()
            raise Interrupted("Processing interrupted")

    def progress(self, value: int, total: int, preview: Image.Image | None = None) -> None:
        """Report step progress (`progress_state` + `progress` messages, and a binary preview
        frame of `preview` when previews are on); interrupts land here."""
        self.check_interrupt()
        self.on_progress(value, total, preview)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class Node:
    """One ComfyUI class_type. Instances live as long as ComfyUI's object cache keeps them."""

    CLASS_TYPE: ClassVar[str] = ""
    # Inputs checked by `validate` instead of the generic min/max/list checks (VALIDATE_INPUTS args).
    VALIDATE_ARGS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, folders: Folders) -> None:
        self.folders = folders

    @classmethod
    def is_changed(cls, folders: Folders, inputs: dict[str, Any]) -> Any:
        """Fingerprint mixed into the cache key (IS_CHANGED); False when the node has none."""
        return False

    @classmethod
    def validate(cls, folders: Folders, **values: Any) -> bool | str:
        """Custom validation of VALIDATE_ARGS: True, or a message for `custom_validation_failed`."""
        return True

    # Each node defines `run(self, ctx, <its inputs as keywords>, **_) -> NodeOutput`; the `**_`
    # swallows inputs a node ignores (ComfyUI passes every declared and hidden input).
    run: Callable[..., NodeOutput]
