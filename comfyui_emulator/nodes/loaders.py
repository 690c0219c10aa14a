"""Nodes reading the input folder: LoadImage (image + mask) and LoadImageMask."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from PIL import Image, ImageOps, ImageSequence

from ..folders import Folders
from .base import ImageBatch, Node, NodeContext, NodeOutput


class _InputFileNode(Node):
    """Shared by the loaders: the `image` input names a file under the input folder."""

    VALIDATE_ARGS = ("image",)

    @classmethod
    def is_changed(cls, folders: Folders, inputs: dict[str, Any]) -> Any:
        # The file's hash, so replacing an input file with the same name re-runs the node.
        with open(_path(folders, inputs["image"]), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @classmethod
    def validate(cls, folders: Folders, **values: Any) -> bool | str:
        image = values.get("image")
        path = _path(folders, str(image))
        if not folders.inside(folders.root.as_posix(), path) or not os.path.exists(path):
            return f"Invalid image file: {image}"
        return True


class LoadImage(_InputFileNode):
    CLASS_TYPE = "LoadImage"

    def run(self, ctx: NodeContext, image: str, **_: Any) -> NodeOutput:
        images: ImageBatch = []
        masks: ImageBatch = []
        with Image.open(_path(self.folders, image)) as source:
            for frame in ImageSequence.Iterator(source):
                frame = ImageOps.exif_transpose(frame)
                rgb = frame.convert("RGB")
                if images and rgb.size != images[0].size:
                    continue  # ComfyUI skips frames whose size differs from the first one
                images.append(rgb)
                masks.append(_mask_of(frame))
        return NodeOutput((images, masks))


class LoadImageMask(_InputFileNode):
    CLASS_TYPE = "LoadImageMask"

    def run(self, ctx: NodeContext, image: str, channel: str, **_: Any) -> NodeOutput:
        with Image.open(_path(self.folders, image)) as source:
            rgba = ImageOps.exif_transpose(source).convert("RGBA")
        band = channel[0].upper()
        mask = rgba.getchannel(band)
        if band == "A":
            mask = ImageOps.invert(mask)  # ComfyUI masks are 1 - alpha
        return NodeOutput(([mask],))


def _path(folders: Folders, name: str) -> str:
    return folders.annotated_path(name)


def _mask_of(frame: Image.Image) -> Image.Image:
    """1 - alpha when the frame has transparency, else ComfyUI's empty 64x64 mask."""
    if "A" in frame.getbands():
        return ImageOps.invert(frame.getchannel("A"))
    if frame.mode == "P" and "transparency" in frame.info:
        return ImageOps.invert(frame.convert("RGBA").getchannel("A"))
    return Image.new("L", (64, 64), 0)
