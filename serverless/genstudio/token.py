"""`prompt_token` (pure): the signed token that authorises GenStudio's progress websocket for one
task, shaped as GenStudio's own (a JWT, HS256): `{"task_id", "owner", "iss", "exp"}`, valid 24 h.

Signed with a key derived from FILE_LINK_SECRET; without it each process makes a random secret, so
a token works only on the instance that issued it (multi-instance deployments must set the secret).
"""

from __future__ import annotations

import binascii
import hmac
import json
from dataclasses import dataclass
from typing import Any

from ..core import b64url
from ..errors import Forbidden

ISSUER = "comfyui-serverless"
LIFETIME_S = 24 * 3600
MAX_TOKEN = 2048
_HEADER = {"alg": "HS256", "typ": "JWT"}


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token allows: following task `task_id` of `owner` (None: keys off)."""

    task_id: str
    owner: str | None
    expires: int


def issue(secret: bytes, task_id: str, owner: str | None, now: float) -> str:
    """A token for following `task_id`, valid LIFETIME_S from `now`."""
    claims = {"task_id": task_id, "owner": owner, "iss": ISSUER, "exp": int(now) + LIFETIME_S}
    signing_input = f"{_encode(_HEADER)}.{_encode(claims)}"
    return f"{signing_input}.{b64url.encode(b64url.mac(secret, signing_input.encode()))}"


def verify(secret: bytes, token: str | None, now: float) -> Grant:
    """The grant of a token; Forbidden when it is missing, malformed, forged or expired."""
    if not token or len(token) > MAX_TOKEN or token.count(".") != 2:
        raise Forbidden("a valid prompt_token is required (?authorization=<prompt_token>)")
    signing_input, _, mac_text = token.rpartition(".")
    try:
        mac = b64url.decode(mac_text)
    except (binascii.Error, ValueError):
        raise Forbidden("this prompt_token is not valid") from None
    if not hmac.compare_digest(mac, b64url.mac(secret, signing_input.encode())):
        raise Forbidden("this prompt_token is not valid")
    claims = _decode(signing_input.partition(".")[2])
    task_id, owner, expires = claims.get("task_id"), claims.get("owner"), claims.get("exp")
    if not isinstance(task_id, str) or not isinstance(expires, int) or not isinstance(owner, str | None):
        raise Forbidden("this prompt_token is not valid")
    if now >= expires:
        raise Forbidden("this prompt_token has expired")
    return Grant(task_id, owner, expires)


def _decode(text: str) -> dict[str, Any]:
    try:
        claims = json.loads(b64url.decode(text))
    except (binascii.Error, ValueError):
        raise Forbidden("this prompt_token is not valid") from None
    if not isinstance(claims, dict):
        raise Forbidden("this prompt_token is not valid")
    return claims


def _encode(value: dict[str, Any]) -> str:
    return b64url.encode(json.dumps(value, separators=(",", ":")).encode())
