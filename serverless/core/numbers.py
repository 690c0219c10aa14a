"""The one parser of whole numbers in query values (pure).

`str.isdigit` takes `²` and `٣`, which `int` then refuses (a 500), and `int` refuses more than
4300 digits: a query value is a number here only when it is 1-12 ASCII digits within its bounds.
"""

from __future__ import annotations

import re

from ..errors import InvalidParams

MAX_DIGITS = 12
_DIGITS = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")


def whole_number(raw: str | None, name: str, low: int, high: int | None = None) -> int:
    """`raw` as a whole number from `low` (to `high`), else InvalidParams naming `name` and
    echoing at most 40 characters of what was sent."""
    text = raw or ""
    value = int(text) if _DIGITS.fullmatch(text) else None
    if value is None or value < low or (high is not None and value > high):
        upto = f" to {high}" if high is not None else ""
        raise InvalidParams(f"{name} must be a whole number from {low}{upto}", raw={name: text[:40]})
    return value
