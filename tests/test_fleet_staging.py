"""Big inputs travel apart from the queue entry (`serverless.fleet.staging`): kept in a key of their
own with a TTL while the job waits and runs, deleted as it ends."""

from __future__ import annotations

import base64
import io
import random
from collections.abc import Callable
from typing import Any

import pytest
import redis
from PIL import Image

from serverless.fleet import staging
from tests.fleet import Tier
from tests.helpers import post_run, wait_until
from tests.test_inputs_e2e import load_image
from tests.test_redis_tier import submit_async, tier, wait_ended

__all__ = ["tier"]

pytestmark = pytest.mark.timeout(120)


def noise_png(side: int, seed: int) -> bytes:
    """A PNG that does not compress: about 3 x side^2 bytes."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(3 * side * side)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_split_and_join_give_back_the_workflow_and_leave_small_inputs_in_place() -> None:
    big = "x" * staging.STAGE_MIN_BYTES
    workflow: dict[str, Any] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": big, "upload": "image"}},
        "node 2": {"class_type": "Note", "inputs": {"text": big + "y", "other": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "small"}},
    }
    light, staged = staging.split(workflow)
    assert workflow["1"]["inputs"]["image"] == big, "the caller's workflow is not changed"
    assert light["1"]["inputs"] == {"image": "", "upload": "image"} and light["3"] is workflow["3"]
    assert len(staged) == 2 and staging.split(light) == (light, {})
    wire = {field.encode(): value.encode() for field, value in staged.items()}
    assert staging.join(light, wire) == workflow


def test_a_queued_jobs_big_inputs_are_kept_apart_with_a_ttl_and_deleted_when_it_ends(tier: Callable[..., Tier]) -> None:
    fleet = tier(QUEUE_TTL="600", JOB_TIMEOUT="100")
    gateway = fleet.gateway()  # no worker yet: the job waits
    client = redis.Redis.from_url(fleet.redis_url)
    picture = noise_png(600, 1)
    assert len(picture) > 1_000_000
    assert submit_async(gateway.url, load_image(data_uri(picture)), "heavy").status_code == 202
    (entry,) = client.xrange("jobs:normal")
    assert len(entry[1][b"spec"]) < 4096, "the entry holds the workflow, not its inputs"
    (key,) = client.keys("staged:heavy:*")
    assert client.memory_usage(key) > len(picture)
    assert 600 < client.ttl(key) <= 600 + 2 * (100 + 60) + 60, "QUEUE_TTL and two runs, not the status retention"

    fleet.worker()
    logged = wait_ended(gateway.url, "heavy")
    assert logged[-1]["type"] == "serverless_api", logged[-1]
    wait_until(lambda: not client.exists(key), timeout=10)

    answer = post_run(gateway.url, load_image(data_uri(noise_png(300, 2))))  # a sync caller, the same way
    assert answer.status_code == 200 and answer.json()["type"] == "serverless_api", answer.text
    wait_until(lambda: not client.keys("staged:*"), timeout=10)


def test_a_job_whose_staged_inputs_are_gone_ends_with_an_error_saying_so(tier: Callable[..., Tier]) -> None:
    fleet = tier()
    gateway = fleet.gateway()
    client = redis.Redis.from_url(fleet.redis_url)
    assert submit_async(gateway.url, load_image(data_uri(noise_png(200, 3))), "evicted").status_code == 202
    for key in client.keys("staged:evicted:*"):
        client.delete(key)  # what their TTL (or a Redis that lost its data) does
    fleet.worker()
    logged = wait_ended(gateway.url, "evicted")
    assert logged[-1]["error_code"] == "UNAVAILABLE" and "inputs" in logged[-1]["error_message"]
