"""What a fleet's gateways list at `GET /api/models`: each worker's store listing, published in
Redis (`keys.MODELS`, one field per worker) whenever its store changes and when it starts. A
gateway holds no models; it merges what the workers say (the newest entry of a name wins)."""

from __future__ import annotations

import json
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..errors import Unavailable
from ..status import keys


async def publish(client: Redis, instance: str, store_id: str, listing: list[dict[str, Any]]) -> None:
    """This worker's listing, for the gateways; `store_id` names its cache (workers sharing one,
    as on FC's NAS, publish the same store: the newest word on it is the truth)."""
    published = {"at": time.time(), "store": store_id, "models": listing}
    try:
        await client.hset(keys.MODELS, instance, json.dumps(published))
    except RedisError as exc:
        raise Unavailable(f"Redis: the model listing could not be published ({type(exc).__name__})") from exc


async def merged(client: Redis, folder: str | None) -> list[dict[str, Any]]:
    """Every store's models (each as its newest publication says), one entry per folder and name."""
    try:
        fields: dict[Any, Any] = await client.hgetall(keys.MODELS)
    except RedisError as exc:
        raise Unavailable(f"Redis: the model listing could not be read ({type(exc).__name__})") from exc
    newest: dict[str, dict[str, Any]] = {}
    for raw in fields.values():
        try:
            published = json.loads(raw)
        except ValueError:
            continue
        store = str(published.get("store"))
        if store not in newest or newest[store].get("at", 0) < published.get("at", 0):
            newest[store] = published
    found: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
    for published in newest.values():
        for entry in published.get("models", []):
            key = (entry.get("folder"), entry.get("name"))
            if folder is not None and key[0] != folder:
                continue
            if key not in found or found[key][0] < published.get("at", 0):
                found[key] = (published.get("at", 0), entry)
    return [entry for _, (_, entry) in sorted(found.items())]
