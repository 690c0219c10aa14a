"""Tenants: API keys with scopes and limits, and usage per key (README, "API keys and tenants").

    keyfile   the lines of API_KEYS_FILE (pure)
    limits    `rate=` (GCRA, in memory or Redis) and a box's `concurrency=` gates
    usage     usage per key and hour (a folder on a box, Redis on a fleet)
    endpoints GET /api/usage

Who calls and what it may do is `serverless.auth` (`Caller`, `require_admin`); a fleet's queue
admits a key's jobs up to its concurrency in `serverless.fleet.admission`. The app's limiters and
usage store are `service.Tenants`. Importing this package loads nothing but itself (the CLI's
`keys` command reads `keyfile` without a server's libraries).
"""

from __future__ import annotations
