"""Nodes reading the input folder: LoadImage (image + mask) and LoadImageMask."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from PIL import Image, ImageOps, ImageSequence

from ..folders import Folders
from .base import ImageBatch, MaskBatch, Node, NodeContext, NodeOutput
from .pixels import Frame, one_minus, to_float


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
        masks: MaskBatch = []
        with Image.open(_path(self.folders, image)) as source:
            for frame in ImageSequence.Iterator(source):
                frame = ImageOps.exif_transpose(frame)
                if images and frame.size != images[0].size:
                    continue  # ComfyUI skips frames whose size differs from the first one
                images.append(Frame.of_picture(frame))
                masks.append(_mask_of(frame))
        return NodeOutput((images, masks))


class LoadImageMask(_InputFileNode):
    CLASS_TYPE = "LoadImageMask"

    def run(self, ctx: NodeContext, image: str, channel: str, **_: Any) -> NodeOutput:
        with Image.open(_path(self.folders, image)) as source:
            rgba = ImageOps.exif_transpose(source).convert("RGBA")
        band = channel[0].upper()
        mask = to_float(rgba.getchannel(band))
        if band == "A":
            mask = one_minus(mask)  # ComfyUI masks are 1 - alpha
        return NodeOutput(([mask],))


def _path(folders: Folders, name: str) -> str:
    return folders.annotated_path(name)


def _mask_of(frame: Image.Image) -> Image.Image:
    """1 - alpha (float32) when the frame has transparency, else ComfyUI's empty 64x64 mask."""
    if "A" in frame.getbands():
        return one_minus(to_float(frame.getchannel("A")))
    if frame.mode == "P" and "transparency" in frame.info:
        return one_minus(to_float(frame.convert("RGBA").getchannel("A")))
    return Image.new("F", (64, 64), 0.0)
