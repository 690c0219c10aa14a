"""Signed download links to outputs (pure): `/api/files/{token}`.

A token is `<claims>.<mac>`, both base64url without padding: the claims are a small JSON object
naming the output's place in ComfyUI (`type`, `subfolder`, `filename`), when the link expires
(`exp`, Unix seconds) and the conversion asked (`fmt`, `q`, `side`); the MAC is HMAC-SHA256 of the
claims' text with FILE_LINK_SECRET. Any instance with the same secret serves any link; nothing a
caller sends reaches a file system: the place comes only out of a token this service signed.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core import b64url
from ..core.conversion import FORMATS, Conversion
from ..errors import Forbidden

MAX_TOKEN = 2048


@dataclass(frozen=True, slots=True)
class FileLink:
    """What a valid token grants: one output file, converted as signed."""

    item: dict[str, str]  # ComfyUI's `type`, `subfolder`, `filename`, as `/view` takes them
    expires: int
    conversion: Conversion


def sign(secret: bytes, item: Mapping[str, Any], expires: int, conversion: Conversion) -> str:
    """A token for the output `item` (a history entry), valid until `expires`."""
    claims: dict[str, Any] = {
        "type": str(item.get("type", "output") or "output"),
        "subfolder": str(item.get("subfolder", "") or ""),
        "filename": str(item.get("filename", "")),
        "exp": int(expires),
    }
    if conversion.format is not None:
        claims["fmt"] = conversion.format
    if conversion.quality is not None:
        claims["q"] = conversion.quality
    if conversion.max_side is not None:
        claims["side"] = conversion.max_side
    body = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    return f"{b64url.encode(body)}.{b64url.encode(b64url.mac(secret, body))}"


def stored_name(item: Mapping[str, Any], conversion: Conversion) -> str:
    """The name under which a fleet keeps a linked output's bytes (as served: converted): the
    same for the worker that made it and the gateway that serves its link."""
    place = {
        "type": str(item.get("type", "output") or "output"),
        "subfolder": str(item.get("subfolder", "") or ""),
        "filename": str(item.get("filename", "")),
        "fmt": conversion.format,
        "q": conversion.quality,
        "side": conversion.max_side,
    }
    return hashlib.sha256(json.dumps(place, sort_keys=True).encode()).hexdigest()


def verify(secret: bytes, token: str, now: float, query: Mapping[str, str] | None = None) -> FileLink:
    """The link a token grants; Forbidden when it was not signed with `secret`, has expired, or
    `query` asks a conversion (`format`, `q`, `max_side`) other than the signed one."""
    claims = _claims(secret, token)
    try:
        link = FileLink(
            {"type": str(claims["type"]), "subfolder": str(claims["subfolder"]), "filename": str(claims["filename"])},
            int(claims["exp"]),
            Conversion(claims.get("fmt"), claims.get("q"), claims.get("side")),
        )
    except (KeyError, TypeError, ValueError):
        raise Forbidden("this download link is not valid") from None
    if now >= link.expires:
        raise Forbidden("this download link has expired")
    if query is not None and not _query_matches(query, link.conversion):
        raise Forbidden("the format or quality asked is not the one this link was signed for")
    return link


def _claims(secret: bytes, token: str) -> dict[str, Any]:
    body_text, dot, mac_text = token.partition(".")
    if not dot or len(token) > MAX_TOKEN:
        raise Forbidden("this download link is not valid")
    try:
        body, mac = b64url.decode(body_text), b64url.decode(mac_text)
    except (binascii.Error, ValueError):
        raise Forbidden("this download link is not valid") from None
    # Compare the canonical encodings too: a token must have exactly one spelling.
    if (
        not hmac.compare_digest(mac, b64url.mac(secret, body))
        or b64url.encode(body) != body_text
        or b64url.encode(mac) != mac_text
    ):
        raise Forbidden("this download link is not valid")
    claims = json.loads(body)
    if not isinstance(claims, dict):
        raise Forbidden("this download link is not valid")
    return claims


def _query_matches(query: Mapping[str, str], conversion: Conversion) -> bool:
    """A `?format=jpeg&q=80` on a link must be what the link was signed for."""
    asked_format = query.get("format")
    if asked_format is not None and FORMATS.get(asked_format.strip().lower()) != conversion.format:
        return False
    for name, signed in (("q", conversion.quality), ("max_side", conversion.max_side)):
        asked = query.get(name)
        if asked is not None and asked.strip() != str(signed):
            return False
    return True
