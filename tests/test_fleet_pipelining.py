"""A worker pipelines short jobs: it queues the next one in its ComfyUI behind the running one, so
that ComfyUI goes from prompt to prompt with no gap; never while another worker is free, never
after a long job (a job that comes later with a higher priority still goes first), and a cancel of
the job waiting in ComfyUI leaves the running one alone."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import redis
import requests

from serverless.status import keys
from tests.fleet import Tier
from tests.helpers import txt2img, wait_until
from tests.test_redis_tier import CANCEL, status, submit_async, tier, wait_ended

__all__ = ["tier"]

pytestmark = pytest.mark.timeout(120)


def short(name: str, steps: int = 2) -> dict[str, Any]:
    """A txt2img of `steps` steps (the emulator's step delay each): short, under SHORT_JOB."""
    return txt2img(seed=zlib.crc32(name.encode()), steps=steps, prefix=name)


def comfyui_queue(url: str) -> tuple[list[str], list[str]]:
    """The prompt ids ComfyUI runs and holds waiting (`GET /queue`)."""
    queue = requests.get(url + "/queue", timeout=10).json()
    return [item[1] for item in queue["queue_running"]], [item[1] for item in queue["queue_pending"]]


def heartbeats_idle(redis_url: str, names: int) -> bool:
    client = redis.Redis.from_url(redis_url)
    found = [client.get(key.decode()) for key in client.keys(keys.worker("*"))]
    views = [json.loads(raw) for raw in found if raw is not None]
    return len(views) == names and not any(view.get("busy") for view in views)


def test_a_lone_worker_queues_its_next_short_job_behind_the_running_one(tier: Callable[..., Tier]) -> None:
    fleet = tier()
    gateway = fleet.gateway()
    worker = fleet.worker(step_delay=0.1)
    emulator = fleet.emulators[0]
    assert submit_async(gateway.url, short("warm"), "warm").status_code == 202
    wait_ended(gateway.url, "warm")  # a short job ran: the worker pipelines from now on
    # A backlog (jobs queued while another runs): when none waits, a worker keeps up unpipelined.
    assert submit_async(gateway.url, short("before"), "before").status_code == 202
    wait_until(lambda: comfyui_queue(emulator.url)[0])
    ids = [f"p{n}" for n in range(6)]
    for task_id in ids:
        assert submit_async(gateway.url, short(task_id), task_id).status_code == 202
    waiting_seen = 0
    while not all(ended(gateway.url, task_id) for task_id in ids):
        running, pending = comfyui_queue(emulator.url)
        assert len(running) + len(pending) <= 2, "one running, at most one waiting behind it"
        waiting_seen += bool(running and pending)
        time.sleep(0.02)
    assert waiting_seen, "ComfyUI held the next job while one ran"
    started = [task_id for task_id in worker.started() if task_id not in ("warm", "before")]
    assert sorted(started) == ids, "each ran once"
    assert worker.most_at_once() == 2
    for task_id in ids:  # each job's own outputs
        assert status(gateway.url, task_id)[-1]["type"] == "serverless_api", task_id
        outputs = status(gateway.url, task_id)[-1]["data"]["results"]
        assert outputs and all(f"{task_id}_" in item["output"]["raw"]["filename"] for item in outputs), outputs


def test_a_free_worker_is_not_passed_over_by_a_busy_one(tier: Callable[..., Tier]) -> None:
    fleet = tier()
    gateway = fleet.gateway()
    workers = [fleet.worker(step_delay=0.1), fleet.worker(step_delay=0.1)]
    for n in range(4):  # both workers run a short job: either would pipeline
        assert submit_async(gateway.url, short(f"warm{n}"), f"warm{n}").status_code == 202
    for n in range(4):
        wait_ended(gateway.url, f"warm{n}")
    assert all(worker.started() for worker in workers), "both warmed"
    wait_until(lambda: heartbeats_idle(fleet.redis_url, 2))
    time.sleep(0.5)  # past the workers' cached view of each other (VIEW_FRESH)
    assert submit_async(gateway.url, short("first", steps=4), "first").status_code == 202
    assert submit_async(gateway.url, short("second", steps=1), "second").status_code == 202
    wait_ended(gateway.url, "first")
    wait_ended(gateway.url, "second")
    ran = {task_id: worker.name for worker in workers for task_id in worker.started()}
    assert ran["first"] != ran["second"], "the second job went to the free worker, not behind the first"


def test_after_a_long_job_a_later_higher_priority_job_goes_first(tier: Callable[..., Tier]) -> None:
    fleet = tier()
    gateway = fleet.gateway()
    worker = fleet.worker(step_delay=0.1)
    for task_id, steps in (("warm", 2), ("long", 8)):  # the last job ran 0.8 s: past SHORT_JOB
        assert submit_async(gateway.url, short(task_id, steps), task_id).status_code == 202
        wait_ended(gateway.url, task_id)
    assert submit_async(gateway.url, short("blocker", steps=8), "blocker").status_code == 202
    wait_until(lambda: "blocker" in worker.started())
    assert submit_async(gateway.url, short("later-low"), "later-low", priority="low").status_code == 202
    assert submit_async(gateway.url, short("later-high"), "later-high", priority="high").status_code == 202
    for task_id in ("blocker", "later-low", "later-high"):
        assert wait_ended(gateway.url, task_id)[-1]["type"] == "serverless_api"
    order = worker.started()
    assert order.index("later-high") < order.index("later-low"), order
    assert worker.most_at_once() == 1, "nothing was taken beside a long job"


def test_cancelling_the_job_waiting_in_comfyui_leaves_the_running_one_alone(tier: Callable[..., Tier]) -> None:
    fleet = tier()
    gateway = fleet.gateway()
    fleet.worker(step_delay=0.1)
    emulator = fleet.emulators[0]
    assert submit_async(gateway.url, short("warm"), "warm").status_code == 202
    warm = wait_ended(gateway.url, "warm")[-1]["data"]["prompt_id"]
    # Both queued while another job runs: the worker takes "running" when it ends, "waiting" beside it.
    assert submit_async(gateway.url, short("before"), "before").status_code == 202
    wait_until(lambda: comfyui_queue(emulator.url)[0])
    assert submit_async(gateway.url, short("running", steps=4), "running").status_code == 202
    assert submit_async(gateway.url, short("waiting"), "waiting").status_code == 202
    wait_ended(gateway.url, "before")
    wait_until(lambda: comfyui_queue(emulator.url)[1] or ended(gateway.url, "running"))
    assert len(comfyui_queue(emulator.url)[1]) == 1, "queued in ComfyUI behind the running job"
    answer = requests.post(gateway.url + CANCEL, params={"task_id": "waiting"}, timeout=10)
    assert answer.status_code == 202, answer.text
    cancelled = wait_ended(gateway.url, "waiting")[-1]
    assert cancelled["type"] == "error" and cancelled["error_code"] == "EXECUTION_INTERRUPTED", cancelled
    done = wait_ended(gateway.url, "running")[-1]
    assert done["type"] == "serverless_api" and done["data"]["results"], done
    history = requests.get(emulator.url + "/history", timeout=10).json()
    before = status(gateway.url, "before")[-1]["data"]["prompt_id"]
    assert set(history) == {warm, before, done["data"]["prompt_id"]}, "the waiting prompt left ComfyUI's queue unrun"
    assert comfyui_queue(emulator.url) == ([], [])


def ended(base_url: str, task_id: str) -> bool:
    logged = status(base_url, task_id)
    return bool(logged) and logged[-1]["type"] in ("serverless_api", "error")
