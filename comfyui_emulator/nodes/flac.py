"""A minimal FLAC writer: 16-bit PCM in verbatim (uncompressed) subframes, for SaveAudio.

ComfyUI encodes FLAC with FFmpeg; the emulator has none, so it writes the simplest valid stream:
a STREAMINFO block (with the MD5 of the samples, which lets a test tie an output to its input),
an optional VORBIS_COMMENT block (ComfyUI stores the prompt there), then fixed-size frames whose
subframes hold the samples as they are. Any FLAC decoder reads it.
"""

from __future__ import annotations

import array
import hashlib
import sys
from collections.abc import Mapping

BLOCK_SIZE = 4096
_BITS = 16
_STREAMINFO, _VORBIS_COMMENT = 0, 4


def encode(pcm: bytes, channels: int, sample_rate: int, tags: Mapping[str, str] | None = None) -> bytes:
    """FLAC bytes for `pcm` (16-bit signed little-endian samples, channels interleaved)."""
    if not 1 <= channels <= 8 or not 1 <= sample_rate < 1 << 20:
        raise ValueError(f"FLAC cannot hold {channels} channels at {sample_rate} Hz")
    frame_size = 2 * channels
    total = len(pcm) // frame_size
    pcm = pcm[: total * frame_size]
    blocks = [_streaminfo(channels, sample_rate, total, hashlib.md5(pcm).digest())]
    if tags:
        blocks.append((_VORBIS_COMMENT, _vorbis_comment(tags)))
    out = [b"fLaC"]
    for index, (kind, body) in enumerate(blocks):
        last = 0x80 if index == len(blocks) - 1 else 0
        out.append(bytes([last | kind]) + len(body).to_bytes(3, "big") + body)
    step = BLOCK_SIZE * frame_size
    for number, start in enumerate(range(0, len(pcm), step)):
        out.append(_frame(number, pcm[start : start + step], channels))
    return b"".join(out)


def _streaminfo(channels: int, sample_rate: int, total: int, md5: bytes) -> tuple[int, bytes]:
    sizes = BLOCK_SIZE.to_bytes(2, "big") * 2 + bytes(6)  # min/max block size; frame sizes unknown
    packed = (sample_rate << 44) | ((channels - 1) << 41) | ((_BITS - 1) << 36) | total
    return _STREAMINFO, sizes + packed.to_bytes(8, "big") + md5


def _vorbis_comment(tags: Mapping[str, str]) -> bytes:
    def field(text: str) -> bytes:
        data = text.encode("utf-8")
        return len(data).to_bytes(4, "little") + data

    comments = [field(f"{key}={value}") for key, value in tags.items()]
    return field("ComfyUI emulator") + len(comments).to_bytes(4, "little") + b"".join(comments)


def _frame(number: int, pcm: bytes, channels: int) -> bytes:
    samples = array.array("h")
    samples.frombytes(pcm)
    if sys.byteorder == "little":
        samples.byteswap()  # FLAC's bit stream is big-endian
    count = len(samples) // channels
    header = bytearray(b"\xff\xf8")  # sync code, fixed block size
    # Block size: 16-bit (size - 1) at the end of the header; sample rate: from STREAMINFO.
    header.append(0b0111_0000)
    header.append(((channels - 1) << 4) | (0b100 << 1))  # independent channels, 16 bits per sample
    header += chr(number).encode("utf-8", "surrogatepass")  # FLAC codes frame numbers as UTF-8
    header += (count - 1).to_bytes(2, "big")
    header.append(_crc8(header))
    body = bytearray(header)
    for channel in range(channels):
        body.append(0b0000_0010)  # verbatim subframe, no wasted bits
        body += samples[channel::channels].tobytes()
    return bytes(body) + _crc16(body).to_bytes(2, "big")


def _table(poly: int, width: int) -> list[int]:
    top, mask = 1 << (width - 1), (1 << width) - 1
    table = []
    for byte in range(256):
        crc = byte << (width - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
        table.append(crc)
    return table


_CRC8 = _table(0x07, 8)
_CRC16 = _table(0x8005, 16)


def _crc8(data: bytes | bytearray) -> int:
    crc = 0
    for byte in data:
        crc = _CRC8[crc ^ byte]
    return crc


def _crc16(data: bytes | bytearray) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc
