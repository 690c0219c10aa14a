"""The ASGI entry point: `uvicorn handler:app` (`bootstrap` runs `python -m serverless.server`)."""

from __future__ import annotations

from serverless.app import create_app
from serverless.server import configure_logging

configure_logging()

app = create_app()
