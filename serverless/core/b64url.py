"""Unpadded URL-safe base64 and HMAC-SHA256 (pure): the pieces of our signed tokens (download
links, GenStudio's prompt tokens)."""

from __future__ import annotations

import base64
import hashlib
import hmac


def encode(data: bytes) -> str:
    """URL-safe base64 without padding (as JWTs write it)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def decode(text: str) -> bytes:
    """The bytes of `encode`'s text; ValueError (binascii.Error included) for anything else."""
    if not text.isascii():
        raise ValueError("not ASCII")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mac(secret: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of `data`."""
    return hmac.new(secret, data, hashlib.sha256).digest()
