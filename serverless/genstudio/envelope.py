"""GenStudio's answer envelope (pure): `{"code": 0, "msg": "Success", "data": ...}`, and every
error in it, rendered in one place.

GenStudio's documents show only successes (`code` 0, HTTP 200) and say nothing of its errors, so:
a request error (the caller's to fix: a bad body, an unknown workflow, bad overrides) is HTTP 200
with a non-zero `code`, as its clients check `code`; a failure on our side keeps its HTTP status
(5xx), so that retries and load balancers see it; a missing or wrong key is 401 (the middleware).
The `code` is the error's HTTP-like number, the `msg` our message, `data` our error object.
"""

from __future__ import annotations

from typing import Any

from ..errors import ServerlessError

SUCCESS = "Success"


def success(data: Any) -> dict[str, Any]:
    """The envelope of an answer."""
    return {"code": 0, "msg": SUCCESS, "data": data}


def failure(error: ServerlessError) -> tuple[dict[str, Any], int]:
    """The envelope of an error and the HTTP status it is sent with."""
    body = {"code": error.status_code, "msg": error.message, "data": error.to_payload()}
    return body, (error.status_code if error.status_code >= 500 else 200)
