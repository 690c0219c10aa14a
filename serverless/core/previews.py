"""ComfyUI's binary websocket frames (pure): which are sampler previews, and whose.

ComfyUI 0.3.64 frames a preview in one of two ways (`server.py`), chosen per client:

    event 1 (PREVIEW_IMAGE)                 >I event, >I image type (1 JPEG, 2 PNG), the image
    event 4 (PREVIEW_IMAGE_WITH_METADATA)   >I event, >I length, that many bytes of JSON
                                            (node_id, prompt_id, display_node_id, parent_node_id,
                                            real_node_id, image_type), the image

The second is sent to a client whose first message declared `supports_preview_metadata`
(`FEATURE_FLAGS`); it names the prompt and node, so a frame on a socket shared by many jobs
finds its job. Event 3 (progress text) and anything else is not a preview.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import jsontext

PREVIEW_IMAGE = 1
UNENCODED_PREVIEW_IMAGE = 2  # ComfyUI encodes it before sending: never on the wire
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
IMAGE_TYPES = {1: "image/jpeg", 2: "image/png"}
FEATURE_FLAGS = '{"type": "feature_flags", "data": {"supports_preview_metadata": true}}'
MAX_METADATA = 64 * 1024


@dataclass(frozen=True, slots=True)
class PreviewFrame:
    """One preview image; `prompt_id` and `node` are None in the legacy form (event 1)."""

    image: bytes
    mime: str
    prompt_id: str | None = None
    node: str | None = None


def parse_frame(frame: bytes) -> PreviewFrame | None:
    """A binary frame as a preview, or None (progress text, unknown events, malformed frames)."""
    if len(frame) < 8:
        return None
    event, second = struct.unpack_from(">II", frame)
    if event == PREVIEW_IMAGE:
        mime = IMAGE_TYPES.get(second)
        return PreviewFrame(frame[8:], mime) if mime is not None and len(frame) > 8 else None
    if event != PREVIEW_IMAGE_WITH_METADATA or second > MAX_METADATA or len(frame) <= 8 + second:
        return None
    try:
        metadata = jsontext.loads(frame[8 : 8 + second])
    except ValueError:
        return None
    if not isinstance(metadata, dict):
        return None
    mime = metadata.get("image_type")
    prompt_id, node = metadata.get("prompt_id"), metadata.get("display_node_id") or metadata.get("node_id")
    return PreviewFrame(
        frame[8 + second :],
        mime if isinstance(mime, str) and mime.startswith("image/") else "image/jpeg",
        prompt_id if isinstance(prompt_id, str) else None,
        None if node is None else str(node),
    )
