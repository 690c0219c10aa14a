"""Is a fetched loader input whole? A check of its content before anything reaches ComfyUI.

The sniffed type (`serverless.core.media.sniff`) only says what the first bytes announce: a
truncated PNG, a WAV cut mid-download or a 17 KB PNG that decodes to 12000 x 12000 pixels all pass
it. `verify_media` looks further, cheaply, for the types the loaders read:

- images (Pillow): the header's size first, against `max_pixels`, before any pixel is decoded
  (decompression bombs); then PNG's own `verify()` (every chunk and its CRC up to IEND), a JPEG
  decoded at 1/8 scale (every entropy-coded byte read, 1/64 of the pixels held), other formats
  decoded frame by frame (their `verify()` checks little or nothing);
- RIFF (WAV, AVI) and AIFF: the container size and each chunk fit in the bytes;
- ISO media (MP4, MOV, M4A, 3GP): an `ftyp` box first, every top-level box of a sane size that
  fits; HEIF/AVIF stills are ISO media too and are checked the same way;
- Matroska/WebM: the EBML header and the Segment's declared size fit;
- FLAC: the metadata blocks fit, STREAMINFO first, and an audio frame follows;
- Ogg: every page header is whole and its page fits.

Blocking (Pillow decodes): call it in a worker thread. Pillow is spoken only here.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Callable
from typing import Literal

from PIL import Image, ImageFile

from ..errors import InputError

# The largest input image (width x height, all frames), read from its header before any pixel is
# decoded: ComfyUI decodes what we pass it, and 100 megapixels is past any model's use.
MAX_PIXELS = 100_000_000

# Pillow's format name for each image MIME type `sniff` reports.
_PILLOW_FORMATS: dict[str, str] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
}
_ISO_MEDIA = frozenset(
    {"video/mp4", "video/quicktime", "video/x-m4v", "video/3gpp", "audio/mp4", "image/avif", "image/heic"}
)
_RIFF_SENTINELS = frozenset({0, 0xFFFFFFFF})  # sizes a streaming writer leaves unset
_JPEG_DRAFT_SCALE = 8
_PNG_CHUNK_TYPE = re.compile(rb"\w\w\w\w")  # what Pillow's PNG reader takes for a chunk type


class MediaError(InputError):
    """The content is not a whole file of the type it announces; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def verify_media(data: bytes, mime: str, max_pixels: int) -> None:
    """Raise `MediaError` when `data` (sniffed as `mime`) is broken, truncated, or an image of
    more than `max_pixels` pixels. Types without a check here pass. Blocking: run in a thread."""
    if mime in _ISO_MEDIA:
        _verify_iso_media(data, mime)
        return
    check = _CHECKS.get(mime)
    if check is not None:
        check(data, max_pixels)


def decodes_pixels(sniffed: tuple[str, str] | None) -> bool:
    """Whether `verify_media` decodes pixels for content sniffed as this (ext, mime): its cost
    then follows the image's size, not its bytes. PNG is checked chunk by chunk (CRCs, no
    inflate), the containers by their headers."""
    return sniffed is not None and sniffed[1] in _PILLOW_FORMATS and sniffed[1] != "image/png"


# --- images -----------------------------------------------------------------------------------------


def _verify_image(data: bytes, max_pixels: int, expected: str) -> None:
    # Pillow raises an assortment of types on malformed input (OSError, SyntaxError, ValueError,
    # EOFError, struct.error, zlib.error...): for untrusted bytes, any of them means "broken".
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image too large to decode safely ({exc})") from exc
    except Exception as exc:
        raise MediaError(f"not a readable image ({_pillow_reason(exc)})") from exc
    with image:
        if image.format != expected:
            raise MediaError(f"announced as {expected} but Pillow reads it as {image.format}")
        width, height = image.size
        if width <= 0 or height <= 0:
            raise MediaError(f"image has an empty size {width}x{height}")
        if width * height > max_pixels:
            raise MediaError(f"image of {width}x{height} pixels is over the limit of {max_pixels} pixels")
        try:
            frames = _frame_count(image)
            # Every frame is decoded (here, and by ComfyUI into one batch): the limit is on the sum.
            if frames * width * height > max_pixels:
                raise MediaError(
                    f"image of {width}x{height} pixels x {frames} frames is over the limit of {max_pixels} pixels"
                )
            _decode_check(image, frames, data)
        except MediaError:
            raise
        except Exception as exc:
            raise MediaError(f"broken {expected} image ({_pillow_reason(exc)})") from exc


def _frame_count(image: Image.Image) -> int:
    """How many frames: found by walking the frame headers, without decoding (GIF, WebP, TIFF)."""
    return int(getattr(image, "n_frames", 1))


def _decode_check(image: ImageFile.ImageFile, frames: int, data: bytes) -> None:
    """Read the whole image, holding as few decoded pixels as the format allows."""
    if image.format == "PNG":
        _verify_png_chunks(data, image.tile[0][2] - 8)  # every chunk and its CRC, to IEND; no pixels
        return
    if image.format == "JPEG":
        width, height = image.size
        image.draft(image.mode, (max(1, width // _JPEG_DRAFT_SCALE), max(1, height // _JPEG_DRAFT_SCALE)))
        image.load()
        return
    for frame in range(frames):
        image.seek(frame)
        image.load()


def _verify_png_chunks(data: bytes, offset: int) -> None:
    """What Pillow's `verify()` checks of a PNG (from its first image data chunk at `offset`, every
    chunk whole and its CRC right, up to IEND), with its words, read in place: Pillow copies each
    chunk out of the file first, a fresh megabyte (~0.65 ms of page faults here) for a megabyte's
    image data."""
    view = memoryview(data)
    while True:
        if offset + 4 > len(data):
            raise OSError("truncated PNG file")
        kind = data[offset + 4 : offset + 8]
        if not _PNG_CHUNK_TYPE.match(kind):
            raise SyntaxError(f"broken PNG file (chunk {kind!r})")
        if kind == b"IEND":
            return
        start = offset + 8
        end = start + int.from_bytes(data[offset : offset + 4], "big")
        if end > len(data):
            raise OSError("Truncated File Read")
        if end + 4 > len(data):
            raise SyntaxError(f"broken PNG file (incomplete checksum in {kind!r})")
        if zlib.crc32(view[start:end], zlib.crc32(kind)) != int.from_bytes(data[end : end + 4], "big"):
            raise SyntaxError(f"broken PNG file (bad header checksum in {kind!r})")
        offset = end + 4


def _pillow_reason(exc: Exception) -> str:
    text = str(exc)
    # "cannot identify image file <_io.BytesIO object at 0x...>": the object is noise.
    if "<_io." in text:
        text = text.split("<_io.", 1)[0].rstrip()
    return text or type(exc).__name__


def _image_check(fmt: str) -> Callable[[bytes, int], None]:
    return lambda data, max_pixels: _verify_image(data, max_pixels, fmt)


# --- RIFF (WAV, AVI, WebP's container is left to Pillow) and AIFF ---------------------------------


def _verify_riff(data: bytes, max_pixels: int) -> None:
    del max_pixels
    if len(data) < 12:
        raise MediaError("RIFF file shorter than its header")
    if data[:4] == b"RF64":
        return  # sizes live in the ds64 chunk; beyond a cheap probe
    declared = int.from_bytes(data[4:8], "little")
    if declared not in _RIFF_SENTINELS and declared + 8 > len(data):
        raise MediaError(f"truncated: RIFF declares {declared + 8} bytes, {len(data)} received")
    end = len(data) if declared in _RIFF_SENTINELS else declared + 8
    chunks = _walk_chunks(data, 12, "little", end)
    if data[8:12] == b"WAVE":
        if b"fmt " not in chunks:
            raise MediaError("WAV file has no 'fmt ' chunk")
        if b"data" not in chunks:
            raise MediaError("WAV file has no 'data' chunk")


def _verify_aiff(data: bytes, max_pixels: int) -> None:
    del max_pixels
    if len(data) < 12:
        raise MediaError("AIFF file shorter than its header")
    declared = int.from_bytes(data[4:8], "big")
    if declared + 8 > len(data):
        raise MediaError(f"truncated: FORM declares {declared + 8} bytes, {len(data)} received")
    chunks = _walk_chunks(data, 12, "big", declared + 8)
    if b"COMM" not in chunks:
        raise MediaError("AIFF file has no 'COMM' chunk")


def _walk_chunks(data: bytes, offset: int, order: Literal["little", "big"], stop: int) -> set[bytes]:
    """The ids of the chunks from `offset` to `stop` (what the container declares; bytes after it
    are ignored); a chunk running past the data is truncation, except a sound `data` chunk left
    unsized by a streaming writer."""
    seen: set[bytes] = set()
    while offset + 8 <= stop:
        chunk_id = data[offset : offset + 4]
        size = int.from_bytes(data[offset + 4 : offset + 8], order)
        seen.add(chunk_id)
        if chunk_id == b"data" and size in _RIFF_SENTINELS:
            break  # the sound runs to the end of the file
        end = offset + 8 + size
        if end > stop:
            raise MediaError(f"truncated: chunk {_printable(chunk_id)} needs {end - stop} more bytes")
        offset = end + (size & 1)  # chunks are padded to an even length
    return seen


# --- ISO base media (MP4, MOV, M4A, 3GP, HEIF, AVIF) ----------------------------------------------


def _verify_iso_media(data: bytes, mime: str) -> None:
    if data[4:8] != b"ftyp":
        raise MediaError(f"{mime} file does not start with an 'ftyp' box")
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise MediaError(f"truncated: {len(data) - offset} stray bytes after the last box")
        size = int.from_bytes(data[offset : offset + 4], "big")
        box_type = data[offset + 4 : offset + 8]
        header = 8
        if size == 1:  # 64-bit size follows the type
            if offset + 16 > len(data):
                raise MediaError("truncated: box header cut off")
            size, header = int.from_bytes(data[offset + 8 : offset + 16], "big"), 16
        elif size == 0:  # the last box runs to the end of the file
            size = len(data) - offset
        if size < header:
            raise MediaError(f"box {_printable(box_type)} has an impossible size {size}")
        if offset + size > len(data):
            raise MediaError(f"truncated: box {_printable(box_type)} needs {offset + size - len(data)} more bytes")
        offset += size


# --- Matroska / WebM --------------------------------------------------------------------------------


def _verify_ebml(data: bytes, max_pixels: int) -> None:
    del max_pixels
    header_size, at = _ebml_size(data, 4)
    segment = at + header_size
    if segment > len(data):
        raise MediaError("truncated: EBML header cut off")
    if data[segment : segment + 4] != b"\x18\x53\x80\x67":
        raise MediaError("no Segment after the EBML header")
    size, body = _ebml_size(data, segment + 4)
    if body + size > len(data):
        raise MediaError(f"truncated: Segment needs {body + size - len(data)} more bytes")


def _ebml_size(data: bytes, offset: int) -> tuple[int, int]:
    """An EBML variable-length size at `offset`: (value, offset after it); an unknown size (all
    value bits set, as a live stream writes) is taken as "to the end"."""
    if offset >= len(data) or data[offset] == 0:
        raise MediaError("invalid EBML element size")
    length = 9 - data[offset].bit_length()
    if offset + length > len(data):
        raise MediaError("truncated: EBML element size cut off")
    value = int.from_bytes(data[offset : offset + length], "big") & ((1 << (7 * length)) - 1)
    if value == (1 << (7 * length)) - 1:
        return len(data) - offset - length, offset + length
    return value, offset + length


# --- FLAC and Ogg -------------------------------------------------------------------------------------


def _verify_flac(data: bytes, max_pixels: int) -> None:
    del max_pixels
    offset, first = 4, True
    while True:
        if offset + 4 > len(data):
            raise MediaError("truncated: FLAC metadata cut off")
        flags = data[offset]
        if first and flags & 0x7F != 0:
            raise MediaError("FLAC file does not start with STREAMINFO")
        offset += 4 + int.from_bytes(data[offset + 1 : offset + 4], "big")
        first = False
        if flags & 0x80:
            break
    if offset > len(data):
        raise MediaError("truncated: FLAC metadata cut off")
    if data[offset : offset + 2] not in (b"\xff\xf8", b"\xff\xf9"):
        raise MediaError("no FLAC audio frame after the metadata")


def _verify_ogg(data: bytes, max_pixels: int) -> None:
    del max_pixels
    offset = 0
    while offset < len(data):
        if data[offset : offset + 4] != b"OggS" or offset + 27 > len(data):
            raise MediaError(f"broken Ogg page at byte {offset}")
        segments = data[offset + 26]
        table_end = offset + 27 + segments
        if table_end > len(data):
            raise MediaError("truncated: Ogg page header cut off")
        offset = table_end + sum(data[offset + 27 : table_end])
        if offset > len(data):
            raise MediaError("truncated: last Ogg page cut off")


def _printable(tag: bytes) -> str:
    return repr(tag.decode("latin-1"))


_CHECKS: dict[str, Callable[[bytes, int], None]] = {
    **{mime: _image_check(fmt) for mime, fmt in _PILLOW_FORMATS.items()},
    "audio/wav": _verify_riff,
    "video/x-msvideo": _verify_riff,
    "audio/aiff": _verify_aiff,
    "video/webm": _verify_ebml,
    "video/x-matroska": _verify_ebml,
    "audio/flac": _verify_flac,
    "audio/ogg": _verify_ogg,
    "video/ogg": _verify_ogg,
}
