"""What a file is: its type sniffed from its first bytes, or guessed from its name.

Pure: no I/O. `sniff` names uploaded loader inputs (`<hash>.<ext>`) and lets the input resolver
refuse, say, an HTML error page handed to `LoadImage`; `mime_for_name` labels outputs by file name.
"""

from __future__ import annotations

OCTET_STREAM = "application/octet-stream"

# Extension (lower case, no dot) -> MIME type, for names of outputs and sniffed inputs alike.
_MIME_BY_EXT: dict[str, str] = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "jpe": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "avif": "image/avif",
    "heic": "image/heic",
    "svg": "image/svg+xml",
    "ico": "image/vnd.microsoft.icon",
    "mp4": "video/mp4",
    "m4v": "video/x-m4v",
    "mov": "video/quicktime",
    "3gp": "video/3gpp",
    "webm": "video/webm",
    "mkv": "video/x-matroska",
    "avi": "video/x-msvideo",
    "ogv": "video/ogg",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "opus": "audio/ogg",
    "m4a": "audio/mp4",
    "aac": "audio/aac",
    "aiff": "audio/aiff",
    "aif": "audio/aiff",
    "glb": "model/gltf-binary",
    "gltf": "model/gltf+json",
    "obj": "model/obj",
    "txt": "text/plain",
    "json": "application/json",
}

# MIME type -> its usual extension: the first extension listed for it above.
_EXT_BY_MIME: dict[str, str] = {}
for _ext, _mime in _MIME_BY_EXT.items():
    _EXT_BY_MIME.setdefault(_mime, _ext)
del _ext, _mime

# ISO base media file format (`....ftyp<brand>`): brands that are not plain MP4 video.
_FTYP_BRANDS: dict[bytes, tuple[str, str]] = {
    b"qt  ": ("mov", "video/quicktime"),
    b"M4A ": ("m4a", "audio/mp4"),
    b"M4B ": ("m4a", "audio/mp4"),
    b"M4V ": ("m4v", "video/x-m4v"),
    b"M4VH": ("m4v", "video/x-m4v"),
    b"M4VP": ("m4v", "video/x-m4v"),
    b"3gp4": ("3gp", "video/3gpp"),
    b"3gp5": ("3gp", "video/3gpp"),
    b"3gp6": ("3gp", "video/3gpp"),
    b"3g2a": ("3gp", "video/3gpp"),
    b"avif": ("avif", "image/avif"),
    b"avis": ("avif", "image/avif"),
    b"heic": ("heic", "image/heic"),
    b"heix": ("heic", "image/heic"),
    b"heim": ("heic", "image/heic"),
    b"heis": ("heic", "image/heic"),
}

# Sizes of the BMP info headers that exist (core, v3, v4, v5 and the odd ones between).
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def sniff(data: bytes) -> tuple[str, str] | None:
    """The (extension without dot, MIME type) that the first bytes of `data` announce, or None."""
    head = bytes(data[:64])
    for check in (_sniff_image, _sniff_riff, _sniff_iso_bmff, _sniff_other):
        found = check(head)
        if found is not None:
            return found
    return None


def mime_for_name(filename: str) -> str:
    """The MIME type for a file name's extension, `application/octet-stream` when unknown."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if "." not in base:
        return OCTET_STREAM
    return _MIME_BY_EXT.get(base.rsplit(".", 1)[1].lower(), OCTET_STREAM)


def ext_for_mime(mime: str) -> str | None:
    """The usual extension (no dot) for a MIME type, or None when unknown."""
    mime = mime.split(";", 1)[0].strip().lower()
    return _EXT_BY_MIME.get(mime)


def _sniff_image(head: bytes) -> tuple[str, str] | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ("png", "image/png")
    if head.startswith(b"\xff\xd8\xff"):
        return ("jpg", "image/jpeg")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return ("gif", "image/gif")
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return ("tiff", "image/tiff")
    if _is_bmp(head):
        return ("bmp", "image/bmp")
    return None


def _is_bmp(head: bytes) -> bool:
    # "BM" alone is too weak (text starts with it), so the reserved words must be zero and the
    # info header size one that exists.
    if len(head) < 18 or not head.startswith(b"BM"):
        return False
    reserved = head[6:10]
    dib_size = int.from_bytes(head[14:18], "little")
    return reserved == b"\x00\x00\x00\x00" and dib_size in _BMP_DIB_SIZES


def _sniff_riff(head: bytes) -> tuple[str, str] | None:
    if head[:4] not in (b"RIFF", b"RF64") or len(head) < 12:
        return None
    form = head[8:12]
    if form == b"WEBP":
        return ("webp", "image/webp")
    if form == b"WAVE":
        return ("wav", "audio/wav")
    if form == b"AVI ":
        return ("avi", "video/x-msvideo")
    return None


def _sniff_iso_bmff(head: bytes) -> tuple[str, str] | None:
    if len(head) < 12 or head[4:8] != b"ftyp":
        return None
    major = head[8:12]
    if major in _FTYP_BRANDS:
        return _FTYP_BRANDS[major]
    # Generic still-image brands (`mif1`, `msf1`) say what they hold in the compatible brands.
    box_end = min(int.from_bytes(head[0:4], "big"), len(head))
    compatible = {head[i : i + 4] for i in range(16, box_end - 3, 4)}
    for brand in (b"avif", b"heic", b"heix"):
        if brand in compatible:
            return _FTYP_BRANDS[brand]
    if major in (b"mif1", b"msf1"):
        return ("heic", "image/heic")
    return ("mp4", "video/mp4")


def _sniff_other(head: bytes) -> tuple[str, str] | None:
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        # EBML: the DocType element near the start says WebM or Matroska.
        return ("webm", "video/webm") if b"webm" in head else ("mkv", "video/x-matroska")
    if head.startswith(b"fLaC"):
        return ("flac", "audio/flac")
    if head.startswith(b"OggS"):
        return ("ogv", "video/ogg") if b"\x80theora" in head else ("ogg", "audio/ogg")
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return ("aiff", "audio/aiff")
    if head.startswith(b"glTF"):
        return ("glb", "model/gltf-binary")
    if head.startswith(b"ID3"):
        return ("mp3", "audio/mpeg")
    return _sniff_mpeg_audio(head)


def _sniff_mpeg_audio(head: bytes) -> tuple[str, str] | None:
    """An MP3 frame header or an AAC ADTS header at offset 0 (11 sync bits, then valid fields)."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return None
    version = (head[1] >> 3) & 0b11
    layer = (head[1] >> 1) & 0b11
    if layer == 0:
        # ADTS: MPEG-4/2 AAC, whose "layer" bits are always 0; sampling index 13-15 are invalid.
        sampling = (head[2] >> 2) & 0b1111
        return ("aac", "audio/aac") if head[1] & 0xF6 == 0xF0 and sampling < 13 else None
    bitrate = head[2] >> 4
    sample_rate = (head[2] >> 2) & 0b11
    if version == 0b01 or bitrate in (0, 0b1111) or sample_rate == 0b11:
        return None
    return ("mp3", "audio/mpeg")
