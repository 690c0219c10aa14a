"""Sniffing file types from real bytes (Pillow, `wave`) and from hand-made container headers."""

from __future__ import annotations

import io
import struct
import wave

import pytest
from PIL import Image, features

from serverless.core.media import ext_for_mime, mime_for_name, sniff


def pillow_bytes(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8), "red").save(buf, format=fmt)
    return buf.getvalue()


def wav_bytes() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 80)
    return buf.getvalue()


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x02\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + b"\x00\x00\x00\x08free"


def ebml(doctype: bytes) -> bytes:
    element = b"\x42\x82" + bytes([0x80 | len(doctype)]) + doctype
    return b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(element)]) + element + b"\x18\x53\x80\x67"


@pytest.mark.parametrize(
    ("fmt", "mode", "expected"),
    [
        ("PNG", "RGB", ("png", "image/png")),
        ("JPEG", "RGB", ("jpg", "image/jpeg")),
        ("WEBP", "RGB", ("webp", "image/webp")),
        ("GIF", "P", ("gif", "image/gif")),
        ("BMP", "RGB", ("bmp", "image/bmp")),
        ("TIFF", "RGB", ("tiff", "image/tiff")),
    ],
)
def test_sniff_recognises_images_made_by_pillow(fmt: str, mode: str, expected: tuple[str, str]) -> None:
    assert sniff(pillow_bytes(fmt, mode)) == expected


@pytest.mark.skipif(not features.check("avif"), reason="Pillow without AVIF")
def test_sniff_recognises_avif_made_by_pillow() -> None:
    assert sniff(pillow_bytes("AVIF")) == ("avif", "image/avif")


def test_sniff_recognises_wav_written_by_the_wave_module() -> None:
    assert sniff(wav_bytes()) == ("wav", "audio/wav")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (ftyp(b"isom", b"isom", b"iso2", b"avc1", b"mp41"), ("mp4", "video/mp4")),
        (ftyp(b"mp42", b"mp42", b"isom"), ("mp4", "video/mp4")),
        (ftyp(b"qt  ", b"qt  "), ("mov", "video/quicktime")),
        (ftyp(b"M4V ", b"M4V ", b"mp42"), ("m4v", "video/x-m4v")),
        (ftyp(b"M4A ", b"M4A ", b"mp42"), ("m4a", "audio/mp4")),
        (ftyp(b"mif1", b"mif1", b"avif"), ("avif", "image/avif")),
        (ftyp(b"heic", b"mif1", b"heic"), ("heic", "image/heic")),
        (ebml(b"webm"), ("webm", "video/webm")),
        (ebml(b"matroska"), ("mkv", "video/x-matroska")),
        (
            b"RIFF\x24\x00\x00\x00AVI LIST\x00\x00\x00\x00hdrl",
            ("avi", "video/x-msvideo"),
        ),
        (
            b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64",
            ("mp3", "audio/mpeg"),
        ),
        (b"\xff\xfb\x90\x64" + bytes(60), ("mp3", "audio/mpeg")),
        (b"\xff\xf3\x84\x64" + bytes(60), ("mp3", "audio/mpeg")),
        (b"\xff\xf1\x50\x80\x02\x1f\xfc" + bytes(20), ("aac", "audio/aac")),
        (b"fLaC\x00\x00\x00\x22" + bytes(34), ("flac", "audio/flac")),
        (b"OggS\x00\x02" + bytes(22) + b"\x01vorbis", ("ogg", "audio/ogg")),
        (b"OggS\x00\x02" + bytes(22) + b"OpusHead", ("ogg", "audio/ogg")),
        (b"OggS\x00\x02" + bytes(22) + b"\x80theora", ("ogv", "video/ogg")),
        (b"FORM\x00\x00\x00\x2eAIFFCOMM", ("aiff", "audio/aiff")),
        (b"glTF\x02\x00\x00\x00\x00\x01\x00\x00", ("glb", "model/gltf-binary")),
    ],
)
def test_sniff_recognises_container_headers(data: bytes, expected: tuple[str, str]) -> None:
    assert sniff(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!DOCTYPE html><html><body>Not Found</body></html>",
        b'{"error": "denied"}',
        b"BM is how this text starts, but it is no bitmap",
        b"RIFF\x00\x00\x00\x00XXXX",
        b"\xff\xff\xff\xff",  # sync bits, but an invalid MPEG frame header
        b"\xff\xe8\x00\x00",  # MPEG version "reserved"
        b"GIF88a",
        bytes(64),
    ],
)
def test_sniff_returns_none_for_content_that_is_not_media(data: bytes) -> None:
    assert sniff(data) is None


def test_sniff_reads_only_the_head_of_large_data() -> None:
    assert sniff(pillow_bytes("PNG") + bytes(10_000_000)) == ("png", "image/png")


def test_sniff_does_not_take_jpeg_for_mp3() -> None:
    assert sniff(pillow_bytes("JPEG"))[0] == "jpg"  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "mime"),
    [
        ("ComfyUI_00001_.png", "image/png"),
        ("sub/dir/clip.MP4", "video/mp4"),
        ("a.jpeg", "image/jpeg"),
        ("a.jpg", "image/jpeg"),
        ("voice.flac", "audio/flac"),
        ("mesh.glb", "model/gltf-binary"),
        ("out.webm", "video/webm"),
        ("no_extension", "application/octet-stream"),
        ("dir.with.dots/no_extension", "application/octet-stream"),
        ("weird.latent", "application/octet-stream"),
        ("", "application/octet-stream"),
    ],
)
def test_mime_for_name_uses_the_extension_and_falls_back_to_octet_stream(name: str, mime: str) -> None:
    assert mime_for_name(name) == mime


def test_ext_for_mime_gives_the_usual_extension() -> None:
    assert ext_for_mime("image/jpeg") == "jpg"
    assert ext_for_mime("Audio/MPEG; charset=binary") == "mp3"
    assert ext_for_mime("application/x-unknown") is None
