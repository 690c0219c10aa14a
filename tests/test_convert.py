"""Output conversion (pure): format, quality and size asked of image outputs, and what passes unchanged."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from serverless.core.conversion import Conversion
from serverless.delivery.convert import convert, parse_conversion
from serverless.errors import InvalidParams


def png(size: tuple[int, int], mode: str = "RGB", color: object = (10, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, "PNG")  # type: ignore[arg-type]
    return out.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 20), (i * 80, 0, 0)) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return out.getvalue()


def test_jpeg_at_a_quality_downscaled_keeping_aspect():
    converted = convert(png((100, 50)), parse_conversion("jpg", "70", "32"))
    assert converted is not None and (converted.mime, converted.extension) == ("image/jpeg", "jpg")
    image = Image.open(io.BytesIO(converted.content))
    assert (image.format, image.size) == ("JPEG", (32, 16))


def test_jpeg_lays_transparency_on_white():
    converted = convert(png((8, 8), "RGBA", (0, 0, 0, 0)), Conversion("jpeg"))
    assert converted is not None
    assert Image.open(io.BytesIO(converted.content)).convert("RGB").getpixel((4, 4)) >= (250, 250, 250)


def test_max_side_alone_keeps_the_format():
    converted = convert(png((64, 64)), Conversion(max_side=16))
    assert converted is not None and converted.mime == "image/png"
    assert Image.open(io.BytesIO(converted.content)).size == (16, 16)


def test_what_needs_nothing_done_or_is_no_still_image_passes_unchanged():
    assert convert(png((16, 16)), Conversion("png")) is None  # already a PNG, nothing else asked
    assert convert(png((16, 16)), Conversion(max_side=64)) is None  # already small enough
    assert convert(b"\x00\x00\x00\x18ftypmp42 not really a video", Conversion("jpeg")) is None
    assert convert(animated_gif(), Conversion("jpeg", 50, 10)) is None  # an animation stays one


def test_an_animation_asked_as_webp_keeps_its_frames():
    converted = convert(animated_gif(), Conversion("webp", max_side=20))
    assert converted is not None and converted.mime == "image/webp"
    image = Image.open(io.BytesIO(converted.content))
    assert image.n_frames == 3 and image.size == (20, 10)


@pytest.mark.parametrize(
    "fmt, quality, side",
    [
        ("bmp", None, None),
        ("", "0", None),
        (None, "101", None),
        (None, "7.5", None),
        (None, None, "0"),
        (None, None, "-3"),
        (None, None, "big"),
    ],
)
def test_bad_values_are_invalid_params(fmt, quality, side):
    with pytest.raises(InvalidParams):
        parse_conversion(fmt, quality, side)
