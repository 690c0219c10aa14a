"""Output images in the format, quality and size a caller asked for (Pillow, one pass).

`Conversion` is what was asked (`output_format`, `output_quality`, `output_max_side`), checked
once at the edge by `parse_conversion`. `convert` decodes an image once, downscales it once
(keeping its aspect) and encodes it once; it is blocking, so the async callers run it in a worker
thread (`convert_in_thread`). What is not a still image Pillow can read (video, audio, 3D files)
passes unchanged, and so does an animated WebP/GIF unless WebP is asked (then every frame is kept).
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, ImageSequence, UnidentifiedImageError

from ..errors import InvalidParams

ImageFormat = Literal["png", "jpeg", "webp"]
FORMATS: dict[str, ImageFormat] = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
MIME: dict[ImageFormat, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSION: dict[ImageFormat, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
PILLOW_FORMAT: dict[str, ImageFormat] = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
DEFAULT_QUALITY = 90
MAX_SIDE = 16384
# Refuse to decode more pixels than this (a decompression bomb); such a file passes unchanged.
MAX_PIXELS = 200_000_000


@dataclass(frozen=True, slots=True)
class Conversion:
    """What a caller asked of its image outputs; all None: nothing (outputs pass unchanged)."""

    format: ImageFormat | None = None
    quality: int | None = None
    max_side: int | None = None

    @property
    def active(self) -> bool:
        return self.format is not None or self.quality is not None or self.max_side is not None


NO_CONVERSION = Conversion()


@dataclass(frozen=True, slots=True)
class Converted:
    """An output after conversion: its bytes, MIME type and file extension (no dot)."""

    content: bytes
    mime: str
    extension: str


def parse_conversion(fmt: str | None, quality: str | None, max_side: str | None) -> Conversion:
    """The query's (or a hosted run body's) values, or InvalidParams naming the bad one."""
    chosen: ImageFormat | None = None
    if fmt is not None and fmt.strip():
        chosen = FORMATS.get(fmt.strip().lower())
        if chosen is None:
            raise InvalidParams(f"output_format must be png, jpeg (or jpg) or webp, not {fmt[:40]!r}")
    return Conversion(
        chosen, _whole(quality, "output_quality", 1, 100), _whole(max_side, "output_max_side", 1, MAX_SIDE)
    )


def _whole(raw: str | None, name: str, low: int, high: int) -> int | None:
    if raw is None or not str(raw).strip():
        return None
    text = str(raw).strip()
    if not text.isdigit() or not low <= int(text) <= high:
        raise InvalidParams(f"{name} must be a whole number from {low} to {high}, not {text[:40]!r}")
    return int(text)


def convert(content: bytes, conversion: Conversion) -> Converted | None:
    """`content` converted as asked, or None when it passes unchanged (not a still image Pillow
    reads, an animated image not asked as WebP, or nothing to do)."""
    if not conversion.active:
        return None
    try:
        image = Image.open(io.BytesIO(content))
        source = PILLOW_FORMAT.get(image.format or "")
        animated = getattr(image, "is_animated", False)
        if image.width * image.height > MAX_PIXELS:
            return None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return None
    target = conversion.format or source
    if target is None or (animated and target != "webp"):
        return None  # an image Pillow cannot write back as it was, or an animation kept as it is
    if target == source and conversion.quality is None and not _too_big(image, conversion.max_side):
        return None
    out = io.BytesIO()
    if animated:
        frames = [_resized(frame.copy(), conversion.max_side) for frame in ImageSequence.Iterator(image)]
        frames[0].save(
            out,
            "WEBP",
            save_all=True,
            append_images=frames[1:],
            quality=_quality(conversion),
            duration=image.info.get("duration", 100),
            loop=image.info.get("loop", 0),
        )
    else:
        image.load()
        _save(_resized(image, conversion.max_side), out, target, conversion)
    return Converted(out.getvalue(), MIME[target], EXTENSION[target])


async def convert_in_thread(content: bytes, conversion: Conversion) -> Converted | None:
    """`convert` in a worker thread: decoding and encoding never block the event loop."""
    if not conversion.active:
        return None
    return await asyncio.to_thread(convert, content, conversion)


def _too_big(image: Image.Image, max_side: int | None) -> bool:
    return max_side is not None and max(image.size) > max_side


def _resized(image: Image.Image, max_side: int | None) -> Image.Image:
    """Downscaled so that its longer side is at most `max_side`, keeping its aspect."""
    if not _too_big(image, max_side):
        return image
    assert max_side is not None
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.resize(size, Image.Resampling.LANCZOS)


def _quality(conversion: Conversion) -> int:
    return conversion.quality if conversion.quality is not None else DEFAULT_QUALITY


def _save(image: Image.Image, out: io.BytesIO, target: ImageFormat, conversion: Conversion) -> None:
    options: dict[str, Any] = {}
    if target == "jpeg":
        image = _flattened(image)
        options["quality"] = _quality(conversion)
    elif target == "webp":
        options["quality"] = _quality(conversion)
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    elif image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    image.save(out, target.upper(), **options)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _flattened(image: Image.Image) -> Image.Image:
    """RGB for JPEG: transparent parts laid on white (JPEG has no alpha; black would be the default)."""
    if not _has_alpha(image):
        return image if image.mode in ("RGB", "L") else image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
