"""JSON text in and out (pure).

Parsing goes through orjson, several times faster than `json`: it is what keeps a 25 MB body from
holding the GIL (and so the event loop) for long, and every ComfyUI message is parsed once. What
orjson refuses or would round and `json` accepts (NaN, integers past 64 bits) is parsed by `json`, and a document
neither accepts gets `json`'s error message, which names line and column. A prompt for ComfyUI is
written by orjson too (`compact`; a NaN becomes null there, as a browser's JSON.stringify makes
it); our own payloads keep `json`'s `{"key": value}` text, which clients have read since the first
release.

Our payloads' big ASCII values are spliced in rather than copied. A result with `output_base64` can
carry tens of megabytes of base64. Rendered the ordinary way it would exist as bytes, as a str
inside the payload, as the JSON str, and as the JSON bytes. A `Spliced` value stays the bytes it is:
the payload is serialised with a short placeholder in its place, and the bytes are joined into the
final UTF-8 text once.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Spliced:
    """A JSON string value given as ASCII bytes that need no escaping (e.g. base64)."""

    data: bytes


_BEYOND_64_BITS = 2.0**63  # orjson reads an integer past 64 bits as a float of at least this size
# Such an integer is written with at least 19 digits. Looking for a run of them is cheaper than
# walking the value, up to a size: past it the walk (a big body is mostly one long string) is. The
# run is looked for in C: every digit made "0", then nineteen of them searched (a regex step per
# character cost 12 times as much, more than orjson's parse of a ComfyUI message itself).
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_DIGITS = b"0" * 19
_SCAN_UP_TO = 64 * 1024


def loads(text: bytes | str) -> Any:
    """The JSON value of `text`; ValueError (with `json`'s message) when it is not JSON."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # NaN, a lone surrogate: valid to Python's json (and to ComfyUI)
    if _may_hold_long_integer(text) and _has_huge_float(value):
        return json.loads(text)  # perhaps an integer past 64 bits, which json keeps exact
    return value


def _may_hold_long_integer(text: bytes | str) -> bool:
    if len(text) > _SCAN_UP_TO:
        return True
    data = text.encode(errors="surrogatepass") if isinstance(text, str) else text  # UTF-8: digits stay ASCII bytes
    return _NINETEEN_DIGITS in data.translate(_DIGITS_AS_ZERO)


def _has_huge_float(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is float and not -_BEYOND_64_BITS < item < _BEYOND_64_BITS:
            return True
    return False


def compact(value: Any) -> bytes:
    """Compact UTF-8 JSON of `value`, for a machine (ComfyUI) rather than a person."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # an integer past 64 bits, a lone surrogate, a non-string key
        return json.dumps(value).encode()


def dumps(payload: Any) -> bytes:
    """UTF-8 JSON of `payload`, `Spliced` values joined in. Non-ASCII stays readable unless the
    payload holds a lone surrogate (echoed from a client), which only escaping can encode."""
    spliced: list[bytes] = []
    token = ""  # chosen at the first Spliced value: most payloads have none

    def place(value: Any) -> str:
        nonlocal token
        if not isinstance(value, Spliced):
            raise TypeError(f"{type(value).__name__} is not JSON serialisable")
        token = token or f"spliced-{uuid.uuid4().hex}-"
        spliced.append(value.data)
        return f"{token}{len(spliced) - 1}"

    text = json.dumps(payload, ensure_ascii=False, default=place)
    if not text.isascii() and _SURROGATE.search(text):
        spliced.clear()
        text = json.dumps(payload, default=place)
    encoded = text.encode()
    if not spliced:
        return encoded
    # Each placeholder is `"<token><index>"`: every piece after the first starts `<index>"`.
    first, *rest = encoded.split(b'"' + token.encode())
    out = [first]
    for piece in rest:
        index, _, after = piece.partition(b'"')
        out += (b'"', spliced[int(index)], b'"', after)
    return b"".join(out)
