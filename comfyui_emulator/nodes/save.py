"""Output nodes writing PNGs: SaveImage (output folder) and PreviewImage (temp folder)."""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from PIL.PngImagePlugin import PngInfo

from ..folders import Folders
from .base import ImageBatch, Node, NodeContext, NodeOutput


class SaveImage(Node):
    CLASS_TYPE = "SaveImage"
    FOLDER_TYPE = "output"
    COMPRESS_LEVEL = 4

    def __init__(self, folders: Folders) -> None:
        super().__init__(folders)
        self.prefix_append = ""

    def run(
        self,
        ctx: NodeContext,
        images: ImageBatch,
        filename_prefix: str = "ComfyUI",
        prompt: Any = None,
        extra_pnginfo: Any = None,
        **_: Any,
    ) -> NodeOutput:
        base_dir = str(self.folders.by_type(self.FOLDER_TYPE))
        width, height = images[0].size
        folder, name, counter, subfolder = save_path(filename_prefix + self.prefix_append, base_dir, width, height)
        metadata = _png_metadata(prompt, extra_pnginfo)
        results = []
        for batch_number, image in enumerate(images):
            file = f"{name.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            image.picture().save(os.path.join(folder, file), pnginfo=metadata, compress_level=self.COMPRESS_LEVEL)
            results.append({"filename": file, "subfolder": subfolder, "type": self.FOLDER_TYPE})
            counter += 1
        return NodeOutput(ui={"images": results})


class PreviewImage(SaveImage):
    CLASS_TYPE = "PreviewImage"
    FOLDER_TYPE = "temp"
    COMPRESS_LEVEL = 1

    def __init__(self, folders: Folders) -> None:
        super().__init__(folders)
        # One random suffix per node object, which ComfyUI keeps while the node id stays in use.
        self.prefix_append = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))

    def run(
        self,
        ctx: NodeContext,
        images: ImageBatch,
        filename_prefix: str = "ComfyUI",
        prompt: Any = None,
        extra_pnginfo: Any = None,
        **_: Any,
    ) -> NodeOutput:
        return super().run(ctx, images, "ComfyUI", prompt, extra_pnginfo)


def save_path(prefix: str, base_dir: str, width: int, height: int) -> tuple[str, str, int, str]:
    """(folder, file name stem, first free counter, subfolder) for a filename prefix.

    A prefix may hold a subfolder (`trace_c/batch`) and %width%/%height%/%year%.. variables; one
    leading outside `base_dir` raises the same exception text as ComfyUI.
    """
    if "%" in prefix:
        prefix = _expand_vars(prefix, width, height)
    subfolder = os.path.dirname(os.path.normpath(prefix))
    name = os.path.basename(os.path.normpath(prefix))
    folder = os.path.join(base_dir, subfolder)
    common = os.path.commonpath((base_dir, os.path.abspath(folder)))
    if common != base_dir:
        raise Exception(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(folder)}"
            f"\n         output_dir: {base_dir}"
            f"\n         commonpath: {common}"
        )
    os.makedirs(folder, exist_ok=True)
    return folder, name, _next_counter(folder, name), subfolder


def _next_counter(folder: str, name: str) -> int:
    """One past the highest `<name>_<digits>_...` counter already in `folder` (1 when none)."""
    best = 0
    size = len(name)
    for existing in os.listdir(folder):
        if os.path.normcase(existing[:size]) != os.path.normcase(name) or existing[size : size + 1] != "_":
            continue
        digits = existing[size + 1 :].split("_")[0]
        best = max(best, int(digits) if digits.isdigit() else 0)
    return best + 1


def _expand_vars(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    values = {
        "width": width,
        "height": height,
        "year": now.tm_year,
        "month": f"{now.tm_mon:02}",
        "day": f"{now.tm_mday:02}",
        "hour": f"{now.tm_hour:02}",
        "minute": f"{now.tm_min:02}",
        "second": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", str(value))
    return prefix


def _png_metadata(prompt: Any, extra_pnginfo: Any) -> PngInfo:
    """The `prompt` and workflow text chunks ComfyUI embeds in every saved PNG."""
    metadata = PngInfo()
    if prompt is not None:
        metadata.add_text("prompt", json.dumps(prompt))
    if isinstance(extra_pnginfo, dict):
        for key, value in extra_pnginfo.items():
            metadata.add_text(key, json.dumps(value))
    return metadata
