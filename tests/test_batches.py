"""Batches (`serverless.batches`) on one box and through a gateway and two workers: a sweep's
items each run once as ordinary tasks, the roll-up is exact, the window bounds what is queued,
cancel leaves nothing running, retry re-runs only the failed items, SSE resumes on another
gateway, the manifest names every output with its parameters, the batch's webhook tells the end."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import requests
from PIL import Image

from serverless.status import keys
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


def picture() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def put_input(dep: Deployment, name: str) -> None:
    """An input file every ComfyUI of the deployment holds."""
    for emulator in dep.emulators:
        (emulator.root / "input").mkdir(parents=True, exist_ok=True)
        (emulator.root / "input" / name).write_bytes(picture())


def load_and_save(image: str = "good.png", prefix: str = "item") -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def queue_depth(dep: Deployment) -> int:
    """What the fleet's queue holds for workers: entries not yet read plus read and not yet acknowledged."""
    if dep.redis_url is None:
        return 0
    client = redis.Redis.from_url(dep.redis_url)
    depth = 0
    for priority in ("high", "normal", "low"):
        try:
            groups = client.xinfo_groups(keys.queue(priority))
        except redis.ResponseError:  # no such stream yet
            continue
        depth += sum(int(group.get("lag") or 0) + int(group["pending"]) for group in groups)
    return depth


def follow(dep: Deployment, batch_id: str, window: int, timeout: float = 300.0) -> tuple[dict[str, Any], int, int]:
    """Until the batch ends: its last roll-up, the most items it had in flight, the deepest queue."""
    in_flight = depth = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rolled = batch_of(dep.url, batch_id, limit=0)
        in_flight = max(in_flight, rolled["counts"]["queued"] + rolled["counts"]["running"])
        depth = max(depth, queue_depth(dep))
        if rolled["state"] in ENDED:
            return rolled, in_flight, depth
        time.sleep(0.1)
    raise AssertionError("the batch did not end")


def outputs_named(dep: Deployment, prefix: str) -> list[Path]:
    return [path for emulator in dep.emulators for path in (emulator.root / "output").glob(f"{prefix}*.png")]


def test_thousand_item_sweep_runs_each_item_once_retries_only_the_failed_and_lists_every_output(
    deployment: Callable[..., Deployment],
) -> None:
    """1,000 items, 100 of which name an input no ComfyUI holds yet: the window bounds what is
    queued, every item runs once, the roll-up is exact; once the input exists, retry runs only
    the 100 again; the manifest lists each output with its item's parameters."""
    window = 16
    dep = deployment(step_delay=0, BATCH_WINDOW=str(window), **FAST)
    images = [f"good{number}.png" for number in range(9)] + ["late.png"]  # every item a different prompt
    for name in images[:-1]:
        put_input(dep, name)
    prefixes = [f"p{number:03d}" for number in range(100)]
    body = {"workflow": load_and_save(), "sweep": {"2.filename_prefix": prefixes, "1.image": images}}
    created = create(dep.url, body).json()
    batch_id, task_ids = created["batch_id"], created["task_ids"]
    assert len(set(task_ids)) == 1000

    rolled, in_flight, depth = follow(dep, batch_id, window)
    assert rolled["state"] == "failed"
    assert rolled["counts"] == {
        "pending": 0,
        "queued": 0,
        "running": 0,
        "succeeded": 900,
        "failed": 100,
        "cancelled": 0,
    }
    assert 0 < in_flight <= window and depth <= window  # never more than the window queued
    assert len(outputs_named(dep, "p")) == 900  # each item ran once
    items = all_items(dep.url, batch_id)
    failed = [item["task_id"] for item in items if item["state"] == "failed"]
    assert len(failed) == 100 and all(
        item["parameters"]["1.image"] == "late.png" for item in items if item["state"] == "failed"
    )

    put_input(dep, "late.png")
    retried = requests.post(f"{dep.url}{BATCHES}/{batch_id}/retry", timeout=30)
    assert retried.status_code == 202 and retried.json()["task_ids"] == failed
    rolled, _, _ = follow(dep, batch_id, window)
    assert rolled["state"] == "succeeded" and rolled["counts"]["succeeded"] == 1000, rolled
    assert len(outputs_named(dep, "p")) == 1000  # the 900 did not run again

    lines = requests.get(f"{dep.url}{BATCHES}/{batch_id}/manifest", timeout=60).text.splitlines()
    manifest = [json.loads(line) for line in lines]
    assert [line["task_id"] for line in manifest] == task_ids
    on_disk = {path.name for path in outputs_named(dep, "p")}
    for line in manifest:
        (output,) = line["outputs"]
        assert output["filename"] in on_disk and output["filename"].startswith(
            line["parameters"]["2.filename_prefix"] + "_"
        )
    assert len({line["outputs"][0]["filename"] for line in manifest}) == 1000
