"""Output images in the format, quality and size a caller asked for (Pillow, one pass).

`Conversion` is what was asked (`output_format`, `output_quality`, `output_max_side`), checked
once at the edge by `parse_conversion`. `convert` decodes an image once, downscales it once
(keeping its aspect) and encodes it once; it is blocking, so the async callers run it through the
instance's `Converter`: at most CONCURRENCY at once in worker threads, MAX_WAITING more
waiting (then BUSY), and no source of more than MAX_PIXELS pixels (refused from its header,
never decoded: a 0.3 MB PNG can hold 100 megapixels, 400 MB decoded). What is not a still image
Pillow can read (video, audio, 3D files) passes unchanged, and so does an animated WebP/GIF unless
WebP is asked (then every frame is kept).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageSequence, UnidentifiedImageError

from ..core.conversion import EXTENSION, FORMATS, MIME, Conversion, ImageFormat
from ..core.numbers import whole_number
from ..errors import Busy, InvalidParams

PILLOW_FORMAT: dict[str, ImageFormat] = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
DEFAULT_QUALITY = 90
MAX_SIDE = 16384
MAX_PIXELS = 32_000_000  # the largest image converted: about 12 bytes a pixel while converted
CONCURRENCY = 2  # conversions at once per instance: each may hold MAX_PIXELS x 12 bytes
MAX_WAITING = 64  # conversions waiting for a slot beyond which a new one is BUSY
BUSY_RETRY_AFTER = 5


class ConversionRefused(InvalidParams):
    """An image with more pixels than this instance converts (MAX_PIXELS)."""


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
    return whole_number(str(raw).strip(), name, low, high)


def convert(content: bytes, conversion: Conversion, max_pixels: int = MAX_PIXELS) -> Converted | None:
    """`content` converted as asked, or None when it passes unchanged (not a still image Pillow
    reads, an animated image not asked as WebP, or nothing to do). ConversionRefused, from its
    header alone, for an image (all its frames together) of more than `max_pixels` pixels."""
    if not conversion.active:
        return None
    try:
        image = Image.open(io.BytesIO(content))
        source = PILLOW_FORMAT.get(image.format or "")
        animated = getattr(image, "is_animated", False)
        pixels = image.width * image.height * (getattr(image, "n_frames", 1) if animated else 1)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return None
    if pixels > max_pixels:
        in_frames = f" in {pixels // (image.width * image.height or 1)} frames" if animated else ""
        raise ConversionRefused(
            f"the output is {image.width}x{image.height} pixels{in_frames}, more than this instance "
            f"converts ({max_pixels} pixels): ask for it without "
            "output_format, output_quality and output_max_side",
            raw={"width": image.width, "height": image.height, "max_pixels": max_pixels},
        )
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


class Converter:
    """The instance's conversions: `convert` in worker threads, at most `concurrency` at once
    (each holds up to about 12 bytes per pixel of `max_pixels`), `MAX_WAITING` more waiting in
    line; past that a new one is BUSY, not queued without bound."""

    def __init__(
        self, max_pixels: int = MAX_PIXELS, concurrency: int = CONCURRENCY, max_waiting: int = MAX_WAITING
    ) -> None:
        self.max_pixels = max_pixels
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(concurrency)
        self._waiting = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of the `concurrency` slots, for a conversion and whatever it reads first."""
        if self._waiting >= self.max_waiting and self._slots.locked():
            raise Busy(
                f"{self._waiting} image conversions are waiting already; retry in {BUSY_RETRY_AFTER}s",
                BUSY_RETRY_AFTER,
            )
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    async def convert(self, content: bytes, conversion: Conversion) -> Converted | None:
        """`convert` in a slot: decoding and encoding never block the event loop."""
        if not conversion.active:
            return None
        async with self.slot():
            return await self.convert_held(content, conversion)

    async def convert_held(self, content: bytes, conversion: Conversion) -> Converted | None:
        """`convert` in a worker thread, for a caller that holds a slot already."""
        if not conversion.active:
            return None
        return await asyncio.to_thread(convert, content, conversion, self.max_pixels)


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


def masked(original: bytes, mask: bytes, max_pixels: int = MAX_PIXELS) -> bytes:
    """ComfyUI's `/upload/mask`: the original image (its PNG text kept) with the mask's alpha as
    its own, as a PNG. Blocking: run it in a thread. InvalidParams for what is not an image or
    is too big to decode."""
    from PIL.PngImagePlugin import PngInfo

    try:
        with Image.open(io.BytesIO(original)) as base, Image.open(io.BytesIO(mask)) as alpha:
            if base.width * base.height > max_pixels or alpha.width * alpha.height > max_pixels:
                raise ConversionRefused(f"an image of more than {max_pixels} pixels is not masked")
            metadata = PngInfo()
            for key, value in getattr(base, "text", {}).items():
                metadata.add_text(key, value)
            composed = base.convert("RGBA")
            composed.putalpha(alpha.convert("RGBA").getchannel("A").resize(composed.size))
            out = io.BytesIO()
            composed.save(out, format="PNG", compress_level=4, pnginfo=metadata)
            return out.getvalue()
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidParams(f"the mask or its original is not an image Pillow reads ({exc})") from None
