"""The Redis tier end to end: a real redis-server, gateways and workers as processes, each worker
with its own ComfyUI emulator; driven by the documentation's clients."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from serverless.status.redis import RedisStatus, connect
from tests.fleet import RedisServer, Tier
from tests.helpers import RUN, empty_image, post_run, txt2img, wait_until
from tests.test_stream import payloads, read_events
from tests.test_websocket import run as ws_run

pytestmark = pytest.mark.timeout(180)

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the tests; each test gets a database of its own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def tier(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Tier]]:
    made: list[Tier] = []

    def make(url: str | None = None, **env: str) -> Tier:
        made.append(Tier(tmp_path, url or redis_server.url(next(_databases)), env))
        return made[-1]

    yield make
    for each in made:
        each.stop()


def submit_async(base_url: str, workflow: dict[str, Any], task_id: str, **params: str) -> requests.Response:
    headers = {"x-fc-invocation-type": "async", "x-fc-async-task-id": task_id}
    return post_run(base_url, workflow, params=params, headers=headers)


def status(base_url: str, task_id: str, **params: str) -> list[dict[str, Any]]:
    answer = requests.get(base_url + "/api/serverless/status", params={"task_id": task_id, **params}, timeout=10)
    assert answer.status_code == 200, answer.text
    return list(answer.json())


def ended(base_url: str, task_id: str) -> list[dict[str, Any]] | None:
    payloads = status(base_url, task_id)
    return payloads if payloads and payloads[-1]["type"] in ("serverless_api", "error") else None


def wait_ended(base_url: str, task_id: str, timeout: float = 60) -> list[dict[str, Any]]:
    return list(wait_until(lambda: ended(base_url, task_id), timeout=timeout, interval=0.05))


def attempts(url: str, task_id: str) -> int:
    return int(redis.Redis.from_url(url).get(f"task:{task_id}") or 0)


def slow(seed: int, steps: int = 30) -> dict[str, Any]:
    """A txt2img whose outputs come only at its end (steps x the emulator's step delay)."""
    return txt2img(seed=seed, steps=steps, prefix=f"slow{seed}")


# -- the status store in process ----------------------------------------------------------------


def test_a_reader_never_sees_a_begun_attempt_without_its_owners_mark(redis_server: RedisServer) -> None:
    """Otherwise a follower reads "instance lost" for a job that has just started."""

    async def scenario() -> list[str]:
        store = RedisStatus(
            connect(redis_server.url(next(_databases))), stale_after=60, retention_days=1, max_event_bytes=1 << 20
        )
        seen_lost: list[str] = []
        done = asyncio.Event()

        async def reader(task_id: str) -> None:
            while not done.is_set():
                newest, alive = await store._attempt_state(task_id, 1)
                if newest == 1 and alive is False:
                    seen_lost.append(task_id)
                    return

        try:
            for n in range(100):
                task_id = f"begin-{n}"
                readers = [asyncio.create_task(reader(task_id)) for _ in range(4)]
                await asyncio.sleep(0)
                await store.begin(task_id)
                await asyncio.sleep(0.001)
                done.set()
                await asyncio.gather(*readers)
                done.clear()
        finally:
            await store.aclose()
        return seen_lost

    assert asyncio.run(scenario()) == []


# -- throughput and the documentation's clients ---------------------------------------------------


def test_200_async_jobs_each_complete_once_spread_over_three_workers_one_at_a_time(tier: Callable[..., Tier]) -> None:
    fleet = tier()
    gateway = fleet.gateway()
    workers = [fleet.worker() for _ in range(3)]
    ids = [f"bulk-{n}" for n in range(200)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: submit_async(gateway.url, empty_image(prefix=t), t), ids))
    assert {answer.status_code for answer in answers} == {202}
    for task_id in ids:
        assert wait_ended(gateway.url, task_id)[-1]["type"] == "serverless_api", task_id
    started = Counter(task for worker in workers for task in worker.started())
    assert set(started) == set(ids) and set(started.values()) == {1}, "every job ran exactly once"
    assert all(worker.started() for worker in workers), [len(w.started()) for w in workers]
    for worker in workers:
        worker.assert_one_job_at_a_time()
    assert {attempts(fleet.redis_url, task_id) for task_id in ids} == {1}


def test_documentation_clients_work_unchanged_against_a_gateway(tier: Callable[..., Tier]) -> None:
    fleet = tier()
    gateway = fleet.gateway()
    fleet.worker()
    workflow = txt2img(seed=7, steps=3)

    answer = post_run(gateway.url, workflow)  # sync JSON
    assert answer.status_code == 200 and answer.json()["type"] == "serverless_api"
    assert answer.json()["data"]["results"][0]["output"]["type"] == "images"

    with requests.post(
        gateway.url + RUN, params={"stream": "true"}, data=json.dumps(workflow), stream=True, timeout=60
    ) as response:  # SSE
        events = list(read_events(response))
    assert [event.id for event in events] == list(range(1, len(events) + 1))
    assert payloads(events)[-1]["type"] == "serverless_api"
    assert "executed" in [payload["type"] for payload in payloads(events)]

    texts, code = ws_run(gateway.url, workflow)  # websocket
    assert code == 1000 and json.loads(texts[-1])["type"] == "serverless_api"
    assert "execution_success" in [json.loads(text)["type"] for text in texts]

    assert submit_async(gateway.url, workflow, "doc-async").status_code == 202  # async + status poll
    logged = wait_ended(gateway.url, "doc-async")
    assert logged[-1]["type"] == "serverless_api" and logged[-1]["data"]["task_id"] == "doc-async"


def test_sse_ids_through_one_gateway_are_the_status_numbering_of_another(tier: Callable[..., Tier]) -> None:
    fleet = tier()
    first, second = fleet.gateway(), fleet.gateway()
    fleet.worker()
    headers = {"x-fc-async-task-id": "numbered"}  # named: its status is kept
    with requests.post(
        first.url + RUN,
        params={"stream": "true"},
        data=json.dumps(txt2img(seed=9, steps=3)),
        headers=headers,
        stream=True,
        timeout=60,
    ) as response:
        events = list(read_events(response))
    for after in (0, 3, len(events) - 1):
        resumed = status(second.url, "numbered", after=str(after))
        assert resumed == payloads(events[after:]), after


def test_base64_outputs_are_left_out_of_redis_with_a_note(tier: Callable[..., Tier]) -> None:
    fleet = tier()
    gateway = fleet.gateway()
    fleet.worker()
    answer = post_run(gateway.url, empty_image(), params={"output_base64": "true"})
    encoded = answer.json()["data"]["results"][0]["output"]["base64"]
    assert encoded["content"] is None and "output_oss" in encoded["note"]
    stored = [
        value
        for key in redis.Redis.from_url(fleet.redis_url).scan_iter("task:*:1")
        for value in [redis.Redis.from_url(fleet.redis_url).xrange(key)]
    ]
    assert stored and all(b"iVBOR" not in fields[b"d"] for entries in stored for _, fields in entries)


def test_a_gateway_answers_503_naming_redis_when_it_cannot_reach_it(tier: Callable[..., Tier]) -> None:
    from tests.servers import free_port

    fleet = tier(url=f"redis://127.0.0.1:{free_port()}/0")
    gateway = fleet.gateway(ready_path="/no-such-route")  # its health is 503, as it should be
    answer = post_run(gateway.url, empty_image())
    assert answer.status_code == 503
    assert answer.json()["error_code"] == "COMFYUI_UNAVAILABLE" and "Redis" in answer.json()["error_message"]
    health = requests.get(gateway.url + "/api/serverless/health", timeout=10)
    assert health.status_code == 503 and "Redis" in health.json()["reason"]


# -- faults ----------------------------------------------------------------------------------------


def test_a_job_whose_worker_is_killed_is_retried_once_then_ends_worker_lost(tier: Callable[..., Tier]) -> None:
    fleet = tier(REDIS_CLAIM_IDLE="1", STATUS_STALE_AFTER="3")
    gateways = [fleet.gateway(), fleet.gateway()]
    workers = [fleet.worker(step_delay=0.2) for _ in range(3)]
    assert submit_async(gateways[0].url, slow(1), "doomed").status_code == 202

    def runner() -> Any:
        return next((w for w in workers if w.proc.poll() is None and "doomed" in w.started()), None)

    first = wait_until(runner, timeout=20)
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(gateways[0].url, "doomed")))
    first.kill()
    second = wait_until(lambda: runner() if runner() is not first else None, timeout=20)
    assert attempts(fleet.redis_url, "doomed") == 2
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(gateways[0].url, "doomed")))
    second.kill()
    logged = wait_ended(gateways[0].url, "doomed", timeout=30)
    assert logged[-1]["error_code"] == "WORKER_LOST" and "attempt 2" in logged[-1]["error_message"]
    assert status(gateways[1].url, "doomed") == logged, "any gateway answers the same"
    assert attempts(fleet.redis_url, "doomed") == 2, "never run a third time"
    assert sum(w.started().count("doomed") for w in workers) == 2
    first_attempt = status(gateways[1].url, "doomed", attempt="1")
    assert first_attempt[-1]["error_code"] == "COMFYUI_UNAVAILABLE" and "lost" in first_attempt[-1]["error_message"]


def test_a_job_whose_worker_is_killed_finishes_on_another_marked_retried(tier: Callable[..., Tier]) -> None:
    fleet = tier(REDIS_CLAIM_IDLE="1", STATUS_STALE_AFTER="3")
    gateways = [fleet.gateway(), fleet.gateway()]
    workers = [fleet.worker(step_delay=0.1) for _ in range(2)]
    for n in range(4):  # a queue behind it: none of them may be lost either
        assert submit_async(gateways[0].url, slow(10 + n, steps=3), f"behind-{n}").status_code == 202
    assert submit_async(gateways[0].url, slow(2, steps=15), "victim").status_code == 202
    victim = wait_until(lambda: next((w for w in workers if "victim" in w.started()), None), timeout=20)
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(gateways[0].url, "victim")))
    victim.kill()
    logged = wait_ended(gateways[1].url, "victim", timeout=40)
    assert logged[-1]["type"] == "serverless_api" and logged[-1]["retried"] is True
    assert status(gateways[0].url, "victim") == logged
    survivor = next(w for w in workers if w is not victim)
    assert "victim" in survivor.started()
    for n in range(4):
        assert wait_ended(gateways[0].url, f"behind-{n}")[-1]["type"] == "serverless_api"
    assert attempts(fleet.redis_url, "victim") == 2


def test_a_job_whose_worker_dies_after_making_outputs_ends_worker_lost_and_is_not_rerun(
    tier: Callable[..., Tier],
) -> None:
    fleet = tier(REDIS_CLAIM_IDLE="1", STATUS_STALE_AFTER="3")
    gateway = fleet.gateway()
    workers = [fleet.worker(step_delay=0.2) for _ in range(2)]
    workflow = slow(8, steps=40)  # an early output (a2), then a long sampler and the late output
    workflow.update(
        {
            "a1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 5}},
            "a2": {"class_type": "SaveImage", "inputs": {"images": ["a1", 0], "filename_prefix": "early"}},
        }
    )
    assert submit_async(gateway.url, workflow, "charged").status_code == 202
    wait_until(lambda: any(p["type"] == "executed" for p in status(gateway.url, "charged")))
    owner = next(w for w in workers if "charged" in w.started())
    owner.kill()
    logged = wait_ended(gateway.url, "charged", timeout=30)
    assert logged[-1]["error_code"] == "WORKER_LOST" and "outputs" in logged[-1]["error_message"]
    assert attempts(fleet.redis_url, "charged") == 1
    assert sum(w.started().count("charged") for w in workers) == 1, "not run a second time"


# -- cancel, priority, idempotency -----------------------------------------------------------------


def test_cancel_through_a_second_gateway_stops_the_running_job_and_removes_a_queued_one(
    tier: Callable[..., Tier],
) -> None:
    fleet = tier()
    first, second = fleet.gateway(), fleet.gateway()
    worker = fleet.worker(step_delay=0.2)
    assert submit_async(first.url, slow(3, steps=100), "running").status_code == 202
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(first.url, "running")))
    assert submit_async(first.url, empty_image(prefix="queued"), "queued").status_code == 202

    queued = requests.post(second.url + "/api/serverless/cancel", params={"task_id": "queued"}, timeout=10)
    assert queued.status_code == 202 and queued.json() == {"task_id": "queued", "state": "cancelled"}
    asked = time.monotonic()
    running = requests.post(second.url + "/api/serverless/cancel", params={"task_id": "running"}, timeout=10)
    assert running.status_code == 202 and running.json()["state"] == "cancelling"
    logged = wait_ended(first.url, "running", timeout=5)
    assert time.monotonic() - asked < 2.0
    assert logged[-1]["error_code"] == "EXECUTION_INTERRUPTED" and "cancelled by request" in logged[-1]["error_message"]
    assert status(second.url, "queued")[-1]["error_message"] == "cancelled by request"

    assert submit_async(first.url, empty_image(prefix="after"), "after").status_code == 202
    after = wait_ended(first.url, "after")
    assert after[-1]["type"] == "serverless_api", after[-3:]
    assert "queued" not in worker.started(), "a job cancelled while queued never runs"
    again = requests.post(second.url + "/api/serverless/cancel", params={"task_id": "running"}, timeout=10)
    assert again.status_code == 409 and again.json()["raw"]["state"] == "cancelled"
    unknown = requests.post(second.url + "/api/serverless/cancel", params={"task_id": "nobody"}, timeout=10)
    assert unknown.status_code == 404


def test_high_priority_jobs_are_taken_before_normal_and_low_ones(tier: Callable[..., Tier]) -> None:
    fleet = tier()
    gateway = fleet.gateway()
    worker = fleet.worker(step_delay=0.1)
    assert submit_async(gateway.url, slow(4, steps=30), "blocker").status_code == 202  # 3 s: time to queue
    wait_until(lambda: "blocker" in worker.started())
    for name, priority in [("low-1", "low"), ("normal-1", "normal"), ("high-1", "high"), ("normal-2", "normal")]:
        assert submit_async(gateway.url, empty_image(prefix=name), name, priority=priority).status_code == 202
    for name in ("low-1", "normal-1", "high-1", "normal-2"):
        wait_ended(gateway.url, name)
    assert worker.started() == ["blocker", "high-1", "normal-1", "normal-2", "low-1"]
    bad = submit_async(gateway.url, empty_image(), "bad", priority="urgent")
    assert bad.status_code == 400


def test_an_idempotency_key_posted_twice_at_once_to_two_gateways_runs_once(tier: Callable[..., Tier]) -> None:
    fleet = tier()
    gateways = [fleet.gateway(), fleet.gateway()]
    worker = fleet.worker(step_delay=0.05)
    workflow = slow(5, steps=5)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda g: post_run(g.url, workflow, headers={"Idempotency-Key": "once"}), gateways))
    assert [answer.status_code for answer in answers] == [200, 200]
    assert answers[0].json() == answers[1].json()
    assert len(worker.started()) == 1
    other = post_run(gateways[0].url, slow(6, steps=5), headers={"Idempotency-Key": "once"})
    assert other.status_code == 409


# -- Redis down ------------------------------------------------------------------------------------


def test_redis_restarted_mid_run_loses_nothing_acknowledged_and_the_fleet_recovers(
    tier: Callable[..., Tier], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "durable", durable=True)
    try:
        fleet = tier(url=server.url(0))
        gateway = fleet.gateway()
        workers = [fleet.worker(step_delay=0.05) for _ in range(2)]
        ids = [f"durable-{n}" for n in range(12)]
        for task_id in ids:
            assert submit_async(gateway.url, slow(hash(task_id) % 1000, steps=6), task_id).status_code == 202
        wait_until(lambda: any(w.started() for w in workers))
        server.kill()
        down = post_run(gateway.url, empty_image())
        assert down.status_code == 503 and "Redis" in down.json()["error_message"]
        polled = requests.get(gateway.url + "/api/serverless/status", params={"task_id": ids[0]}, timeout=10)
        assert polled.status_code == 503 and polled.json()["error_code"] == "COMFYUI_UNAVAILABLE"
        server.start()
        for task_id in ids:
            assert wait_ended(gateway.url, task_id, timeout=90)[-1]["type"] == "serverless_api", task_id
        answer = post_run(gateway.url, empty_image(prefix="after-restart"))
        assert answer.status_code == 200 and answer.json()["type"] == "serverless_api"
        assert all(w.proc.poll() is None for w in workers), "no restart needed"
    finally:
        server.stop()
