"""Image nodes: EmptyImage, ImageInvert, ImageScale, ImageAddNoise, ImageBlur.

EmptyImage and ImageInvert compute exactly as ComfyUI (float32). Scaling runs Pillow's filters on
the float channels (lanczos on 8-bit pictures, as ComfyUI's own lanczos does); noise and blur run
Pillow's 8-bit algorithms, not torch's.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image, ImageFilter

from .base import ImageBatch, Node, NodeContext, NodeOutput
from .pixels import Frame, one_minus

# Above this many pixels in one batch, EmptyImage fails the way torch does when it cannot allocate.
MAX_BATCH_PIXELS = 1 << 26
SCALE_METHODS = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class EmptyImage(Node):
    CLASS_TYPE = "EmptyImage"

    def run(
        self, ctx: NodeContext, width: int, height: int, batch_size: int = 1, color: int = 0, **_: Any
    ) -> NodeOutput:
        pixels = width * height * batch_size
        if pixels > MAX_BATCH_PIXELS:
            # Same text as the torch allocation failure ComfyUI reports (one float32 channel).
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                f"memory: you tried to allocate {pixels * 4} bytes. Error code 12 (Cannot allocate memory)"
            )
        rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
        return NodeOutput(([Frame.filled((width, height), rgb) for _ in range(batch_size)],))


class ImageInvert(Node):
    CLASS_TYPE = "ImageInvert"

    def run(self, ctx: NodeContext, image: ImageBatch, **_: Any) -> NodeOutput:
        return NodeOutput(([frame.map(one_minus) for frame in image],))


class ImageScale(Node):
    CLASS_TYPE = "ImageScale"

    def run(
        self, ctx: NodeContext, image: ImageBatch, upscale_method: str, width: int, height: int, crop: str, **_: Any
    ) -> NodeOutput:
        if width == 0 and height == 0:
            return NodeOutput((image,))
        old_w, old_h = image[0].size
        if width == 0:
            width = max(1, round(old_w * height / old_h))
        elif height == 0:
            height = max(1, round(old_h * width / old_w))
        box = _center_crop_box(old_w, old_h, width, height) if crop == "center" else None
        method = SCALE_METHODS[upscale_method]
        if upscale_method == "lanczos":  # comfy.utils.lanczos goes through 8-bit PIL images too
            return NodeOutput(
                ([Frame.of_picture(frame.picture().resize((width, height), method, box=box)) for frame in image],)
            )
        return NodeOutput(([frame.map(lambda band: band.resize((width, height), method, box=box)) for frame in image],))


class ImageAddNoise(Node):
    CLASS_TYPE = "ImageAddNoise"

    def run(self, ctx: NodeContext, image: ImageBatch, seed: int, strength: float, **_: Any) -> NodeOutput:
        rng = random.Random(seed)
        noisy = []
        for frame in image:
            picture = frame.picture()
            noise = Image.frombytes("RGB", picture.size, rng.randbytes(picture.width * picture.height * 3))
            noisy.append(Frame.of_picture(Image.blend(picture, noise, strength)))
        return NodeOutput((noisy,))


class ImageBlur(Node):
    CLASS_TYPE = "ImageBlur"

    def run(self, ctx: NodeContext, image: ImageBatch, blur_radius: int, sigma: float, **_: Any) -> NodeOutput:
        if blur_radius == 0:
            return NodeOutput((image,))
        blur = ImageFilter.GaussianBlur(radius=min(sigma, float(blur_radius)))
        return NodeOutput(([Frame.of_picture(frame.picture().filter(blur)) for frame in image],))


def _center_crop_box(old_w: int, old_h: int, new_w: int, new_h: int) -> tuple[int, int, int, int]:
    """Source box keeping the target aspect ratio, centred (ComfyUI's `crop="center"`)."""
    old_aspect, new_aspect = old_w / old_h, new_w / new_h
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return x, y, old_w - x, old_h - y
