"""The status answer's body (pure): a log's stored lines joined into one JSON array.

Stored lines are already JSON, so they are joined as they are, not decoded and encoded again.
Only a line holding the non-standard tokens NaN, Infinity or -Infinity (Python's json writes them
for ComfyUI's `1e999` echoes) is re-encoded, with those values as `null` (as JavaScript's
JSON.stringify does) and every non-ASCII character escaped. A line that is not UTF-8 JSON (a
torn line left by a killed writer, or bytes no writer of ours produces) is skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..core.numbers import whole_number

TERMINAL_TYPES = ("serverless_api", "error")


def parse_after(value: str) -> int:
    """The `after` query value (or Last-Event-ID): a whole number from 0, in ASCII digits."""
    return whole_number(value, "after", 0)


def parse_attempt(value: str) -> int:
    """The `attempt` query value: a whole number from 1, in ASCII digits."""
    return whole_number(value, "attempt", 1)


def owner_named(line: bytes) -> str | None:
    """The `owner` (serverless.auth) a task's first payload names; None when it names none."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    data = event.get("data") if isinstance(event, dict) else None
    owner = data.get("owner") if isinstance(data, dict) else None
    return owner if isinstance(owner, str) else None


@dataclass(frozen=True, slots=True)
class Lines:
    """The usable lines of a log, and the last one's payload (to tell whether the log ended)."""

    lines: list[bytes]
    last: Any = None

    @property
    def ended(self) -> bool:
        return isinstance(self.last, dict) and self.last.get("type") in TERMINAL_TYPES


def usable_lines(raw: bytes) -> Lines:
    """Every line of `raw` that is UTF-8 JSON, NaN/Infinity lines re-encoded as valid JSON."""
    lines: list[bytes] = []
    last: Any = None
    for line in raw.split(b"\n"):
        parsed = _parse(line)
        if parsed is not None:
            lines.append(parsed[0])
            last = parsed[1]
    return Lines(lines, last)


def json_array(lines: Iterable[bytes]) -> bytes:
    """The JSON array of already encoded JSON values."""
    return b"[" + b",".join(lines) + b"]"


def _parse(line: bytes) -> tuple[bytes, Any] | None:
    if not line.strip():
        return None
    non_finite = False

    def constant(_: str) -> None:
        nonlocal non_finite
        non_finite = True

    try:
        # Decoded strictly first: json.loads(bytes) would also take UTF-16 or encoded surrogates.
        item = json.loads(line.decode(), parse_constant=constant)
    except ValueError:
        return None
    if non_finite:
        line = json.dumps(_finite(item), allow_nan=False).encode()
    return line, item


def _finite(value: Any) -> Any:
    """`value` with NaN/Infinity (also from overflowing literals such as 1e999) as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
