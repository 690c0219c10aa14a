"""`python -m serverless.cli`: the same as the `comfy-serverless` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
