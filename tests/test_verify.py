"""`verify_media`: whole files pass, truncated or inconsistent ones and decompression bombs are
refused. Pure (bytes in, an exception or not out); the files are made here with Pillow and wave."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import wave

import pytest
from PIL import Image

from serverless.core.media import sniff
from serverless.inputs.verify import MediaError, verify_media

LIMIT = 100_000_000


def image(fmt: str, size: int = 64, frames: int = 1, mode: str = "RGB") -> bytes:
    pictures = [Image.new(mode, (size, size), (40 * i % 256, 0, 0)) for i in range(frames)]
    buffer = io.BytesIO()
    extra = {"save_all": True, "append_images": pictures[1:]} if frames > 1 else {}
    pictures[0].save(buffer, format=fmt, **extra)
    return buffer.getvalue()


def noisy_jpeg(size: int = 256) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 64).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def wav(frames: int = 800) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(bytes(2 * frames))
    return buffer.getvalue()


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def mp4() -> bytes:
    return box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2") + box(b"moov", bytes(100)) + box(b"mdat", bytes(4000))


def webm(segment: int = 200) -> bytes:
    """An EBML header (DocType webm), then a Segment of `segment` bytes (a 2-byte size)."""
    return (
        b"\x1a\x45\xdf\xa3\x87\x42\x82\x84webm"
        + b"\x18\x53\x80\x67"
        + (0x4000 | segment).to_bytes(2, "big")
        + bytes(segment)
    )


def flac() -> bytes:
    streaminfo = bytes(34)
    return b"fLaC" + bytes([0x80]) + len(streaminfo).to_bytes(3, "big") + streaminfo + b"\xff\xf8" + bytes(100)


def ogg_page(payload: bytes) -> bytes:
    return b"OggS\x00\x02" + bytes(20) + bytes([1, len(payload)]) + payload


def check(data: bytes, limit: int = LIMIT) -> None:
    found = sniff(data)
    assert found is not None, "the test file must be sniffable"
    verify_media(data, found[1], limit)


@pytest.mark.parametrize(
    "data",
    [
        image("PNG"),
        image("JPEG"),
        image("GIF", frames=3),
        image("WEBP"),
        image("BMP"),
        image("TIFF"),
        image("PNG") + bytes(1000),  # trailing bytes after IEND still load
        wav(),
        mp4(),
        webm(200),
        flac(),
        ogg_page(b"x" * 50) + ogg_page(b"y" * 30),
    ],
    ids=["png", "jpeg", "gif", "webp", "bmp", "tiff", "png+trailer", "wav", "mp4", "webm", "flac", "ogg"],
)
def test_whole_files_pass(data: bytes) -> None:
    check(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (image("PNG")[:-12], "broken PNG image"),
        (image("PNG")[:-5], "broken PNG image"),
        (image("PNG")[:60], "broken PNG image"),
        (noisy_jpeg()[:2000], "broken JPEG image"),
        (image("GIF", frames=3)[:-40], "broken GIF image"),
        (image("WEBP", 128)[:-30], "image"),
        (image("BMP")[:-100], "broken BMP image"),
        (wav()[:-100], "truncated: RIFF declares"),
        (wav()[:40], "truncated"),
        (mp4()[:-10], "truncated: box 'mdat'"),
        (box(b"ftyp", b"isom") + b"\x00\x00\x00\x04free", "impossible size 4"),
        (webm(200)[:-10], "truncated: Segment"),
        (flac()[:30], "FLAC metadata cut off"),
        (flac()[:42], "no FLAC audio frame"),
        ((ogg_page(b"x" * 50) + ogg_page(b"y" * 30))[:-5], "last Ogg page cut off"),
    ],
    ids=[
        "png-12",
        "png-5",
        "png-60",
        "jpeg",
        "gif",
        "webp",
        "bmp",
        "wav",
        "wav-header",
        "mp4",
        "mp4-box",
        "webm",
        "flac-meta",
        "flac-frame",
        "ogg",
    ],
)
def test_truncated_or_inconsistent_files_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(MediaError, match=reason):
        check(data)


def test_an_mp4_without_ftyp_first_is_refused() -> None:
    data = box(b"ftyp", b"isom\x00\x00\x02\x00") + box(b"mdat", bytes(10))
    with pytest.raises(MediaError, match="does not start with an 'ftyp' box"):
        verify_media(data[4:], "video/mp4", LIMIT)


def bomb_png(side: int = 12000) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own alarm, then ours
def test_a_decompression_bomb_is_refused_from_its_header_without_decoding() -> None:
    data = bomb_png()
    assert len(data) < 32 * 1024, "a few KB that claim 144 megapixels"
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(MediaError, match="12000x12000 pixels is over the limit of 100000000 pixels"):
            check(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{peak} bytes allocated: the pixels were not decoded"
    assert time.perf_counter() - started < 1


def test_the_pixel_limit_is_a_setting() -> None:
    with pytest.raises(MediaError, match="64x64 pixels is over the limit of 4095 pixels"):
        check(image("PNG", 64), limit=4095)
    check(image("PNG", 64), limit=4096)


def test_an_image_announcing_another_format_is_refused() -> None:
    with pytest.raises(MediaError, match="not a readable image"):
        verify_media(b"\x89PNG\r\n\x1a\n" + bytes(100), "image/png", LIMIT)


def test_the_pixel_limit_counts_every_frame_of_an_animation() -> None:
    data = image("GIF", 32, frames=4)
    with pytest.raises(MediaError, match=r"32x32 pixels x 4 frames is over the limit of 4095 pixels"):
        check(data, limit=4095)
    check(data, limit=4096)
