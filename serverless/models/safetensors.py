"""A safetensors file checked from its header before ComfyUI is told of it (blocking: call in a
thread): an 8-byte little-endian header length, a JSON object of tensors whose data offsets fall
inside the file. A truncated download or an HTML error page saved as `.safetensors` fails here."""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER = 100 * 1024 * 1024  # what the safetensors library itself accepts


def looks_like_safetensors(name: str) -> bool:
    return name.lower().endswith((".safetensors", ".sft"))


def check_safetensors(path: Path) -> str | None:
    """Why `path` is not a usable safetensors file, or None when its header holds."""
    size = path.stat().st_size
    if size < 8:
        return "shorter than a safetensors header"
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER or 8 + length > size:
            return "its safetensors header length is impossible (not a safetensors file, or truncated)"
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # the header is the downloaded file's: anything may be there
        return "its safetensors header is not JSON"
    if not isinstance(header, dict):
        return "its safetensors header is not a JSON object"
    data = size - 8 - length
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"tensor {name[:64]!r} has no data offsets"
        if not 0 <= offsets[0] <= offsets[1] <= data:
            return f"tensor {name[:64]!r} lies past the end of the file (truncated)"
    return None
