"""Batches (`serverless.batches`) on one box and through a gateway and two workers: a sweep's
items each run once as ordinary tasks, the roll-up is exact, the window bounds what is queued,
cancel leaves nothing running, retry re-runs only the failed items, SSE resumes on another
gateway, the manifest names every output with its parameters, the batch's webhook tells the end."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import empty_image, wait_until
from tests.topologies import Deployment

BATCHES = "/api/batches"
ENDED = ("succeeded", "failed", "cancelled")
FAST = {"BATCH_POLL_INTERVAL": "0.05", "BATCH_LEASE_SECONDS": "2"}


def create(url: str, body: dict[str, Any], **kwargs: Any) -> requests.Response:
    return requests.post(url + BATCHES, data=json.dumps(body), timeout=120, **kwargs)


def batch_of(url: str, batch_id: str, **params: Any) -> dict[str, Any]:
    answer = requests.get(f"{url}{BATCHES}/{batch_id}", params=params, timeout=30)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def ended(url: str, batch_id: str, timeout: float = 120.0) -> dict[str, Any]:
    return wait_until(lambda: (b := batch_of(url, batch_id, limit=0))["state"] in ENDED and b, timeout, 0.1)  # type: ignore[no-any-return]


def all_items(url: str, batch_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = batch_of(url, batch_id, offset=offset, limit=1000)
        items += page["items"]
        offset = page["next_offset"]
    return items


def test_small_sweep_runs_each_item_as_a_task(deployment: Callable[..., Deployment]) -> None:
    dep = deployment(step_delay=0, **FAST)
    body = {"workflow": empty_image(8, 8, prefix="sweep"), "sweep": {"1.color": [1, 2, 3], "1.width": [8, 9]}}
    answer = create(dep.url, body)
    assert answer.status_code == 202, answer.text
    created = answer.json()
    assert len(created["task_ids"]) == 6 and len(set(created["task_ids"])) == 6
    final = ended(dep.url, created["batch_id"])
    assert final["state"] == "succeeded" and final["counts"]["succeeded"] == 6 and final["percent"] == 100
    items = all_items(dep.url, created["batch_id"])
    assert [item["task_id"] for item in items] == created["task_ids"]
    assert [item["parameters"] for item in items][:2] == [{"1.color": 1, "1.width": 8}, {"1.color": 1, "1.width": 9}]
    for item in items:
        task = requests.get(dep.url + "/api/serverless/task", params={"task_id": item["task_id"]}, timeout=10).json()
        assert task["state"] == "succeeded"
        assert [o["filename"] for o in item["outputs"]] == [
            r["output"]["raw"]["filename"] for r in task["result"]["data"]["results"]
        ]
