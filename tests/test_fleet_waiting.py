"""Callers waiting on a fleet's queue always end: a Redis restarted without its data (no AOF) ends
every one of them, sync and SSE alike, with a terminal error payload, well within QUEUE_TTL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import requests

from tests.fleet import RedisServer, Tier
from tests.helpers import RUN, empty_image, post_run, wait_until
from tests.test_redis_tier import tier
from tests.test_stream import in_background, payloads, read_events

__all__ = ["tier"]

pytestmark = pytest.mark.timeout(120)

QUEUE_TTL = 60.0


def sse_terminals(url: str, task_id: str) -> list[dict[str, object]]:
    with requests.post(
        url + RUN,
        params={"stream": "true"},
        data=json.dumps(empty_image(prefix=task_id)),
        headers={"X-Fc-Trace-Id": task_id},
        stream=True,
        timeout=QUEUE_TTL + 30,
    ) as response:
        if response.status_code != 200:  # refused before its stream began: the answer is its terminal
            return [response.json()]
        events = payloads(list(read_events(response)))
    return [p for p in events if p["type"] in ("serverless_api", "error")]


def test_every_caller_waiting_when_redis_restarts_without_its_data_gets_one_terminal_error_within_queue_ttl(
    tier: Callable[..., Tier], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "volatile", durable=False)
    try:
        fleet = tier(url=server.url(0), QUEUE_TTL=str(QUEUE_TTL))
        gateway = fleet.gateway()  # no worker: every job waits in the queue
        names = [f"sync-{n}" for n in range(3)] + [f"sse-{n}" for n in range(3)]
        waiting = {
            name: in_background(
                lambda name=name: (
                    [
                        post_run(
                            gateway.url, empty_image(prefix=name), headers={"X-Fc-Trace-Id": name}, timeout=90
                        ).json()
                    ]
                    if name.startswith("sync")
                    else sse_terminals(gateway.url, name)
                )
            )
            for name in names
        }
        client = redis.Redis.from_url(server.url(0))
        wait_until(lambda: all(client.exists(f"job:{name}") for name in names))
        server.kill()
        server.start()  # empty: no append-only file
        restarted = time.monotonic()
        for name, caller in waiting.items():
            terminals = caller.result(timeout=QUEUE_TTL + 30)
            assert len(terminals) == 1, (name, terminals)
            assert terminals[0]["type"] == "error" and terminals[0]["error_code"] == "UNAVAILABLE", terminals
            assert "no longer holds this job" in str(terminals[0]["error_message"]), terminals
        assert time.monotonic() - restarted < QUEUE_TTL, "ended by the lost queue, not by QUEUE_TTL"
    finally:
        server.stop()
