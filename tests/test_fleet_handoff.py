"""A fleet job given back to the queue instead of failed: a worker whose drain runs out of time,
or whose ComfyUI dies under the job, hands it to another worker (at most the usual two runs)."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.fleet import Tier
from tests.helpers import RUN, empty_image, post_run, wait_until
from tests.test_redis_tier import attempts, slow, status, tier, wait_ended
from tests.test_stream import in_background, payloads, read_events

__all__ = ["tier"]  # the fixture, shared with the tier's other tests

pytestmark = pytest.mark.timeout(180)


def sse_payloads(url: str, workflow: dict[str, Any], task_id: str) -> list[dict[str, Any]]:
    with requests.post(
        url + RUN,
        params={"stream": "true"},
        data=json.dumps(workflow),
        headers={"X-Fc-Trace-Id": task_id},
        stream=True,
        timeout=90,
    ) as response:
        return payloads(list(read_events(response)))


def test_a_worker_stopping_past_drain_timeout_hands_its_job_to_another_which_answers_the_caller(
    tier: Callable[..., Tier],
) -> None:
    # REDIS_CLAIM_IDLE as deployed (60 s): the job is taken by the other worker at once, not
    # when a dead worker's job would be.
    fleet = tier(DRAIN_TIMEOUT="1", REDIS_CLAIM_IDLE="60")
    gateway = fleet.gateway()
    first = fleet.worker(step_delay=0.1)  # the one signalled, alone until it runs the job
    waiting = in_background(lambda: post_run(gateway.url, slow(31, steps=30), headers={"X-Fc-Trace-Id": "handed"}))
    wait_until(lambda: "handed" in first.started(), timeout=20)
    workers = [first, fleet.worker(step_delay=0.02)]  # the other takes the job handed back (0.6 s to run it)
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(gateway.url, "handed")))
    first.signal(signal.SIGTERM)  # in-process: the server's own SIGTERM handler
    answer = waiting.result(timeout=45)
    assert answer.status_code == 200 and answer.json()["type"] == "serverless_api", answer.text
    assert answer.json()["retried"] is True
    assert first.wait(30) == 0, "the stopping worker exits cleanly"
    second = next(w for w in workers if w is not first)
    assert "handed" in second.started()
    assert sum(w.started().count("handed") for w in workers) == 2 and attempts(fleet.redis_url, "handed") == 2
    progress = [p["data"] for p in status(gateway.url, "handed", attempt="1") if p["type"] == "serverless_progress"]
    assert progress[-1]["state"] == "retrying" and "stopped" in progress[-1]["reason"]
    assert "cancelled" not in {p["state"] for p in progress}, "no end from the stopped worker"
    logged = wait_ended(gateway.url, "handed")
    assert logged[-1] == answer.json()


def test_a_job_whose_comfyui_dies_runs_once_more_on_another_worker_and_that_worker_waits_for_its_comfyui(
    tier: Callable[..., Tier],
) -> None:
    fleet = tier(REDIS_CLAIM_IDLE="60", COMFYUI_STARTUP_TIMEOUT="1")  # no signal: the workers in-process
    gateway = fleet.gateway()
    first = fleet.worker(step_delay=0.1)  # the one whose ComfyUI dies, alone until it runs the job
    waiting = in_background(lambda: sse_payloads(gateway.url, slow(32, steps=30), "crashed"))
    wait_until(lambda: "crashed" in first.started(), timeout=20)
    workers = [first, fleet.worker(step_delay=0.02)]  # the other runs it again (0.6 s)
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(gateway.url, "crashed")))
    fleet.emulators[workers.index(first)].kill()  # its ComfyUI crashes under the job
    streamed = waiting.result(timeout=60)
    states = [p["data"]["state"] for p in streamed if p["type"] == "serverless_progress"]
    assert "retrying" in states and states.index("retrying") < len(states) - 1, "retrying, then the second run"
    assert [p["type"] for p in streamed].count("serverless_api") == 1 and streamed[-1]["type"] == "serverless_api"
    assert not [p for p in streamed if p["type"] == "error"], "no terminal from the first run"
    assert streamed[-1]["retried"] is True
    second = next(w for w in workers if w is not first)
    assert "crashed" in second.started() and attempts(fleet.redis_url, "crashed") == 2
    progress = [p["data"] for p in status(gateway.url, "crashed", attempt="1") if p["type"] == "serverless_progress"]
    assert progress[-1]["state"] == "retrying" and "ComfyUI" in progress[-1]["reason"]
    for n in range(3):  # the worker without a ComfyUI takes nothing meanwhile
        assert post_run(gateway.url, empty_image(prefix=f"after{n}")).status_code == 200
    assert first.started() == ["crashed"] and first.running()
