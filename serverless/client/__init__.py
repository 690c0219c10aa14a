"""A Python client of the API (sync and async, on httpx).

from serverless.client import Client
with Client("http://127.0.0.1:9000") as client:
    result = client.run(workflow_id="txt2img", overrides={"6.text": "a cat"}, output_base64=True)
    result.outputs[0].save("cat.png"); print(result.seeds)
"""

from __future__ import annotations

from . import errors
from .aio import AsyncClient
from .calls import RunOptions, apply_overrides
from .errors import APIError, ClientError, NotServerless, ProtocolError, TransportError
from .results import Event, Output, Preview, Progress, Result
from .sync import Client

__all__ = [
    "APIError",
    "AsyncClient",
    "Client",
    "ClientError",
    "Event",
    "NotServerless",
    "Output",
    "Preview",
    "Progress",
    "ProtocolError",
    "Result",
    "RunOptions",
    "TransportError",
    "apply_overrides",
    "errors",
]
