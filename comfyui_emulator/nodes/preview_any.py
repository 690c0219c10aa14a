"""PreviewAny (comfy_extras/nodes_preview_any.py): an output node showing any value as text."""

from __future__ import annotations

import json
from typing import Any

from .base import Node, NodeContext, NodeOutput


class PreviewAny(Node):
    """`{"ui": {"text": [<the value as text>]}}`; the input `source` is of any type ("*")."""

    CLASS_TYPE = "PreviewAny"

    def run(self, ctx: NodeContext, source: Any = None, **_: Any) -> NodeOutput:
        return NodeOutput(ui={"text": [as_text(source)]})


def as_text(source: Any) -> str:
    """ComfyUI's rendering: strings as they are, numbers with str(), else JSON, else str().

    A tensor is not JSON, so ComfyUI shows torch's repr of it; the emulator shows its own
    (`<IMAGE float32 [h, w, 3]>` per image).
    """
    if isinstance(source, str):
        return source
    if isinstance(source, (int, float, bool)):
        return str(source)
    if source is None:
        return "None"
    try:
        return json.dumps(source)
    except Exception:
        try:
            return str(source)
        except Exception:
            return "source exists, but could not be serialized."
