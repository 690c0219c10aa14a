"""The ASGI entry point: `uvicorn handler:app`."""

from __future__ import annotations

import logging
import os

from serverless.app import create_app

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO").upper(),
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)

app = create_app()
