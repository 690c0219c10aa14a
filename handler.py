"""The ASGI entry point: `uvicorn handler:app` (`bootstrap` runs `python -m serverless.server`).

A bad setting prints one line, `settings error: NAME='value': reason`, and exits 2."""

from __future__ import annotations

from serverless.app import create_app
from serverless.server import configure_logging, load_settings

settings = load_settings()
configure_logging(settings)

app = create_app(settings)
