"""JSON text for our payloads (pure), with big ASCII values spliced in rather than copied.

A result with `output_base64` can carry tens of megabytes of base64. Rendered the ordinary way
it would exist as bytes, as a str inside the payload, as the JSON str, and as the JSON bytes. A
`Spliced` value stays the bytes it is: the payload is serialised with a short placeholder in its
place, and the bytes are joined into the final UTF-8 text once.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Spliced:
    """A JSON string value given as ASCII bytes that need no escaping (e.g. base64)."""

    data: bytes


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
