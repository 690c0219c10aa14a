"""The Redis tier end to end: a real redis-server, gateways and workers as processes, each worker
with its own ComfyUI emulator; driven by the documentation's clients."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from serverless.errors import ExecutionInterrupted
from serverless.jobs.feed import Feed, Result
from serverless.status.redis import RedisStatus, connect
from tests.fleet import RedisServer, Tier
from tests.helpers import RUN, empty_image, post_run, txt2img, wait_until
from tests.test_stream import in_background, payloads, read_events, set_step_delay
from tests.test_websocket import run as ws_run

pytestmark = pytest.mark.timeout(180)

_databases = itertools.count(1)


def fresh_database(server: RedisServer) -> str:
    """The URL of a database of the session's `redis-server` no test of this process used before,
    emptied (another module's tests may have used that number)."""
    url = server.url(next(_databases))
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def tier(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Tier]]:
    made: list[Tier] = []

    def make(url: str | None = None, processes: bool = False, gateway_processes: bool = False, **env: str) -> Tier:
        made.append(Tier(tmp_path, url or fresh_database(redis_server), env, processes, gateway_processes))
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


TASK, CANCEL, EVENTS = "/api/serverless/task", "/api/serverless/cancel", "/api/serverless/events"
KEY_A, KEY_B = "sk-a-0123456789abcdef", "sk-b-fedcba9876543210"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def summary(base_url: str, task_id: str, **headers: str) -> requests.Response:
    return requests.get(base_url + TASK, params={"task_id": task_id}, headers=headers, timeout=10)


def task_events(
    base_url: str, task_id: str, last_seen: int | None = None, **headers: str
) -> list[tuple[int | None, str]]:
    """`GET /events` to the end: each event's (id, data) as received."""
    if last_seen is not None:
        headers["Last-Event-ID"] = str(last_seen)
    with requests.get(
        base_url + EVENTS, params={"task_id": task_id}, headers=headers, stream=True, timeout=60
    ) as response:
        assert response.status_code == 200, response.text
        return [(event.id, event.data) for event in read_events(response) if event.data is not None]


def assert_same_everywhere(base_urls: list[str], task_id: str) -> dict[str, Any]:
    """`status`, `task` and `events` of an ended task answer the same from every gateway; returns
    the summary."""
    answers = [(status(url, task_id), summary(url, task_id).json(), task_events(url, task_id)) for url in base_urls]
    logged, told, events = answers[0]
    assert all(answer == answers[0] for answer in answers[1:]), "every gateway answers the same"
    assert [json.loads(data) for _, data in events] == logged
    assert [seq for seq, _ in events] == list(range(1, len(logged) + 1))
    assert told["error" if logged[-1]["type"] == "error" else "result"] == logged[-1]
    return told


# -- the status store in process ----------------------------------------------------------------


def test_a_reader_never_sees_a_begun_attempt_without_its_owners_mark(redis_server: RedisServer) -> None:
    """Otherwise a follower reads "instance lost" for a job that has just started."""

    async def scenario() -> list[str]:
        store = RedisStatus(
            connect(fresh_database(redis_server)), stale_after=60, retention_days=1, max_event_bytes=1 << 20
        )
        seen_lost: list[str] = []
        done = asyncio.Event()

        async def reader(task_id: str) -> None:
            while not done.is_set():
                tip = await store._attempt_state(task_id, 1)
                if tip.newest == 1 and tip.alive is False:
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


def test_a_log_resumed_after_its_end_says_so_at_once_and_the_lost_error_comes_once(redis_server: RedisServer) -> None:
    """As the file store: the "instance lost" error is the event after the last stored one, and a
    follower resumed after the terminal payload (or that error) gets nothing more, at once."""

    async def scenario() -> None:
        client = connect(fresh_database(redis_server))
        store = RedisStatus(client, stale_after=60, retention_days=1, max_event_bytes=1 << 20)

        async def follow(task_id: str, after: int) -> list[tuple[int, bool]]:
            async with asyncio.timeout(0.5 if after else 2.0):  # from the start: one XREAD BLOCK first
                return [(e.seq, e.terminal) async for e in store.follow(task_id, after) if e is not None]

        try:
            await store.begin("ended")
            await store.append_terminal("ended", 1, ExecutionInterrupted("cancelled by request"))
            assert await follow("ended", 0) == [(1, True)] and await follow("ended", 1) == []
            await store.begin("lost")
            await client.delete("task:lost:1:alive")  # its owner died before writing anything
            assert await follow("lost", 0) == [(1, True)] and await follow("lost", 1) == []
            assert json.loads(await store.read("lost"))[0]["error_code"] == "UNAVAILABLE"
            assert await store.read("lost", after=1) == b"[]" and await store.read("lost", attempt=2) == b"[]"
            assert (await store.summary("lost") or {})["state"] == "failed"
            assert await store.summary("nobody") is None and not await store.known("nobody")
            assert await store.owner("nobody") == ""
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_a_retry_note_on_an_attempt_killed_before_writing_expires_with_the_log(redis_server: RedisServer) -> None:
    """A worker killed before its attempt stored anything: the next worker's "retrying" note makes
    that attempt's stream, and the stream still expires (it was left in Redis for good once)."""

    async def scenario() -> None:
        client = connect(fresh_database(redis_server))
        store = RedisStatus(client, stale_after=60, retention_days=1, max_event_bytes=1 << 20)
        try:
            await store.begin("killed")
            assert not await client.exists("task:killed:1")
            await store.append_event("killed", 1, {"type": "serverless_progress", "data": {"state": "retrying"}})
            assert 0 < await client.ttl("task:killed:1") <= 86400
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_events_refused_past_maxmemory_are_kept_and_stored_once_redis_has_room(redis_server: RedisServer) -> None:
    """A Redis full (`maxmemory`, `noeviction`) refuses a job's events: the worker keeps them
    and stores them, its terminal payload last, once Redis has room (they were dropped once: the
    refusal went unrecognised)."""

    async def scenario() -> list[bytes]:
        client = connect(redis_server.url(next(_databases)))
        store = RedisStatus(client, stale_after=60, retention_days=1, max_event_bytes=1 << 20)
        feed = Feed()
        try:
            attempt = await store.begin("full")
            recording = asyncio.create_task(store.record(attempt, feed))
            feed.publish_payload({"type": "serverless_progress", "data": {"task_id": "full", "at": time.time()}})
            for _ in range(1000):  # the first event stored (at once: nothing came before it)
                if await client.xlen(attempt.key):
                    break
                await asyncio.sleep(0.01)
            used = (await client.info("memory"))["used_memory"]
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", str(max(used - 100_000, 1)))
            try:
                feed.publish('{"type": "executing", "data": {"node": "1"}}')
                feed.finish(Result({"type": "serverless_api", "data": {"task_id": "full"}}))
                await asyncio.sleep(0.5)  # refused meanwhile, kept, tried again
                assert await client.xlen(attempt.key) == 1, "nothing stored past maxmemory"
            finally:
                await client.config_set("maxmemory", "0")
            async with asyncio.timeout(10):
                await recording
            entries: Any = await client.xrange(attempt.key)
            return [fields[b"d"] for _, fields in entries]
        finally:
            await store.aclose()

    stored = asyncio.run(scenario())
    assert [json.loads(data)["type"] for data in stored] == ["serverless_progress", "executing", "serverless_api"]


# -- throughput and the documentation's clients ---------------------------------------------------


def test_200_async_jobs_each_complete_once_spread_over_three_workers_two_at_most_each(
    tier: Callable[..., Tier],
) -> None:
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
    assert all(worker.most_at_once() <= 2 for worker in workers), "one running, at most one waiting behind it"
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


def test_base64_outputs_reach_the_caller_and_are_kept_apart_from_the_log_for_their_ttl(
    tier: Callable[..., Tier],
) -> None:
    fleet = tier()
    gateway = fleet.gateway()
    fleet.worker()
    answer = post_run(gateway.url, empty_image(), params={"output_base64": "true"}, headers={"X-Fc-Trace-Id": "b64"})
    encoded = answer.json()["data"]["results"][0]["output"]["base64"]
    assert base64.b64decode(encoded["content"]).startswith(b"\x89PNG")
    assert status(gateway.url, "b64")[-1] == answer.json(), "the status log answers the same, base64 included"
    client = redis.Redis.from_url(fleet.redis_url)
    stream = client.xrange("task:b64:1")
    assert stream and all(b"iVBOR" not in fields[b"d"] for _, fields in stream), "the log itself stays small"
    assert 0 < client.ttl("task:b64:1:result") <= 3600  # FILE_LINK_EXPIRES
    client.delete("task:b64:1:result")  # what its expiry does
    expired = status(gateway.url, "b64")[-1]["data"]["results"][0]["output"]["base64"]
    assert expired["content"] is None and "output_oss" in expired["note"]


def test_a_gateway_answers_503_naming_redis_when_it_cannot_reach_it(tier: Callable[..., Tier]) -> None:
    from tests.servers import free_port

    fleet = tier(url=f"redis://127.0.0.1:{free_port()}/0")
    gateway = fleet.gateway(ready_path="/no-such-route")  # its health is 503, as it should be
    answer = post_run(gateway.url, empty_image())
    assert answer.status_code == 503
    assert answer.json()["error_code"] == "UNAVAILABLE" and "Redis" in answer.json()["error_message"]
    # Its operator is told too, with the caller's reason (a gateway's 503 once left no line at all).
    wait_until(lambda: "POST /api/serverless/run answered 503 UNAVAILABLE: Redis" in gateway.log_text())
    health = requests.get(gateway.url + "/api/serverless/health", timeout=10)
    assert health.status_code == 503 and "Redis" in health.json()["reason"]


# -- faults ----------------------------------------------------------------------------------------


def test_a_job_whose_worker_is_killed_is_retried_once_then_ends_worker_lost(tier: Callable[..., Tier]) -> None:
    fleet = tier(REDIS_CLAIM_IDLE="1", STATUS_STALE_AFTER="3")
    gateways = [fleet.gateway(), fleet.gateway()]
    # The two workers killed are processes, each started before the job can come to it; the
    # third, which finds the job lost twice, runs in-process.
    first = fleet.worker(step_delay=0.2, process=True)
    assert submit_async(gateways[0].url, slow(1), "doomed").status_code == 202
    wait_until(lambda: "doomed" in first.started(), timeout=20)
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(gateways[0].url, "doomed")))
    second = fleet.worker(step_delay=0.2, process=True)
    first.kill()
    wait_until(lambda: "doomed" in second.started(), timeout=20)
    assert attempts(fleet.redis_url, "doomed") == 2
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(gateways[0].url, "doomed")))
    workers = [first, second, fleet.worker(step_delay=0.2)]
    second.kill()
    logged = wait_ended(gateways[0].url, "doomed", timeout=30)
    assert logged[-1]["error_code"] == "WORKER_LOST" and "attempt 2" in logged[-1]["error_message"]
    assert status(gateways[1].url, "doomed") == logged, "any gateway answers the same"
    assert attempts(fleet.redis_url, "doomed") == 2, "never run a third time"
    assert sum(w.started().count("doomed") for w in workers) == 2
    first_attempt = status(gateways[1].url, "doomed", attempt="1")
    assert first_attempt[-1]["error_code"] == "UNAVAILABLE" and "lost" in first_attempt[-1]["error_message"]
    told = assert_same_everywhere([g.url for g in gateways], "doomed")
    assert told["state"] == "failed" and told["error"]["error_code"] == "WORKER_LOST"


def test_a_job_whose_worker_is_killed_finishes_on_another_marked_retried(tier: Callable[..., Tier]) -> None:
    fleet = tier(REDIS_CLAIM_IDLE="1", STATUS_STALE_AFTER="3")
    gateways = [fleet.gateway(), fleet.gateway()]
    victim = fleet.worker(step_delay=0.1, process=True)  # the one killed; the survivor joins once it runs the job
    assert submit_async(gateways[0].url, slow(2, steps=15), "victim").status_code == 202
    wait_until(lambda: "victim" in victim.started(), timeout=20)
    for n in range(4):  # a queue behind it: none of them may be lost either
        assert submit_async(gateways[0].url, slow(10 + n, steps=3), f"behind-{n}").status_code == 202
    workers = [victim, fleet.worker(step_delay=0.1)]
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(gateways[0].url, "victim")))
    victim.kill()
    logged = wait_ended(gateways[1].url, "victim", timeout=40)
    assert logged[-1]["type"] == "serverless_api" and logged[-1]["retried"] is True
    assert status(gateways[0].url, "victim") == logged
    told = assert_same_everywhere([g.url for g in gateways], "victim")
    assert told["state"] == "succeeded" and told["percent"] == 100 and told["result"]["retried"] is True
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
    owner = fleet.worker(step_delay=0.2, process=True)  # the one killed; the other joins once it runs the job
    workflow = slow(8, steps=40)  # an early output (a2), then a long sampler and the late output
    workflow.update(
        {
            "a1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 5}},
            "a2": {"class_type": "SaveImage", "inputs": {"images": ["a1", 0], "filename_prefix": "early"}},
        }
    )
    assert submit_async(gateway.url, workflow, "charged").status_code == 202
    wait_until(lambda: "charged" in owner.started(), timeout=20)
    workers = [owner, fleet.worker(step_delay=0.2)]
    wait_until(lambda: any(p["type"] == "executed" for p in status(gateway.url, "charged")))
    owner.kill()
    logged = wait_ended(gateway.url, "charged", timeout=30)
    assert logged[-1]["error_code"] == "WORKER_LOST" and "outputs" in logged[-1]["error_message"]
    assert attempts(fleet.redis_url, "charged") == 1
    assert sum(w.started().count("charged") for w in workers) == 1, "not run a second time"


# -- job control from any gateway ------------------------------------------------------------------


def test_events_resume_after_last_event_id_on_another_gateway_while_running_and_once_ended(
    tier: Callable[..., Tier],
) -> None:
    fleet = tier()
    first, second = fleet.gateway(), fleet.gateway()
    fleet.worker(step_delay=0.1)
    with requests.post(
        first.url + RUN,
        params={"stream": "true"},
        data=json.dumps(slow(21, steps=25)),
        headers={"x-fc-async-task-id": "resumed"},
        stream=True,
        timeout=60,
    ) as response:
        received = (event for event in read_events(response) if event.data is not None)
        seen = [(event.id, event.data) for event in itertools.islice(received, 3)]
        assert summary(second.url, "resumed").json()["state"] in ("queued", "running"), "it still runs"
        live = in_background(lambda: task_events(second.url, "resumed", last_seen=3))
        seen += [(event.id, event.data) for event in received]
    everything = seen
    assert [seq for seq, _ in everything] == list(range(1, len(everything) + 1))
    assert json.loads(everything[-1][1])["type"] == "serverless_api"
    assert live.result(timeout=30) == everything[3:], "resumed live, exactly after event 3"

    for last_seen in (0, 1, len(everything) // 2, len(everything) - 1):
        assert task_events(second.url, "resumed", last_seen) == everything[last_seen:], last_seen
    by_query = requests.get(second.url + EVENTS, params={"task_id": "resumed", "after": "5"}, stream=True, timeout=10)
    assert [(e.id, e.data) for e in read_events(by_query) if e.data is not None] == everything[5:]
    started = time.monotonic()
    assert task_events(second.url, "resumed", len(everything)) == [], "nothing after the terminal payload"
    assert time.monotonic() - started < 5, "an ended log says so at once, not after STATUS_STALE_AFTER (120 s)"


def test_the_task_summary_from_any_gateway_queued_running_ended_unknown_and_malformed(
    tier: Callable[..., Tier],
) -> None:
    fleet = tier()
    first, second = fleet.gateway(), fleet.gateway()
    fleet.worker(step_delay=0.1)
    assert submit_async(first.url, slow(22, steps=30), "summarised").status_code == 202
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(first.url, "summarised")))
    assert submit_async(first.url, empty_image(prefix="waiting"), "waiting").status_code == 202
    waiting = summary(second.url, "waiting")  # queued in Redis: no worker has begun it
    assert waiting.status_code == 200 and waiting.json()["state"] == "queued", waiting.text

    running = wait_until(lambda: (r := summary(second.url, "summarised").json())["percent"] > 0 and r)
    assert running["state"] == "running" and running["percent"] < 100
    assert running["started_at"] and running["ended_at"] is None
    assert "result" not in running and "error" not in running

    logged = wait_ended(first.url, "summarised")
    ended = summary(second.url, "summarised").json()
    assert ended["state"] == "succeeded" and ended["percent"] == 100 and ended["result"] == logged[-1]
    assert ended == summary(first.url, "summarised").json()

    for path in (TASK, EVENTS):
        unknown = requests.get(second.url + path, params={"task_id": "nobody"}, timeout=10)
        assert unknown.status_code == 404 and unknown.json()["raw"]["state"] == "unknown", (path, unknown.text)
        malformed = requests.get(second.url + path, params={"task_id": "../etc"}, timeout=10)
        assert malformed.status_code == 400 and malformed.json()["error_code"] == "INVALID_PARAMS", path


def test_with_api_keys_a_task_of_key_a_is_unknown_to_key_b_through_another_gateway(tier: Callable[..., Tier]) -> None:
    fleet = tier(API_KEYS=f"{KEY_A},{KEY_B}")
    first, second = fleet.gateway(), fleet.gateway()
    headers = {**bearer(KEY_A), "x-fc-invocation-type": "async", "x-fc-async-task-id": "owned"}
    assert post_run(first.url, slow(23, steps=60), headers=headers).status_code == 202
    query = {"task_id": "owned"}

    def theirs_are_unknown() -> None:
        for method, path in (("GET", TASK), ("GET", EVENTS), ("POST", CANCEL)):
            theirs = requests.request(method, second.url + path, params=query, headers=bearer(KEY_B), timeout=10)
            assert theirs.status_code == 404 and theirs.json()["raw"]["state"] == "unknown", (path, theirs.text)
        polled = requests.get(second.url + "/api/serverless/status", params=query, headers=bearer(KEY_B), timeout=10)
        assert polled.status_code == 404 and "serverless_progress" not in polled.text

    assert summary(second.url, "owned", **bearer(KEY_A)).json()["state"] == "queued"  # no worker yet
    theirs_are_unknown()
    fleet.worker(step_delay=0.1)
    mine = wait_until(lambda: (r := summary(second.url, "owned", **bearer(KEY_A)).json())["state"] == "running" and r)
    assert mine["task_id"] == "owned"
    theirs_are_unknown()
    cancelled = requests.post(second.url + CANCEL, params=query, headers=bearer(KEY_A), timeout=10)
    assert cancelled.status_code == 202, cancelled.text
    polled = requests.get(second.url + "/api/serverless/status", params=query, headers=bearer(KEY_A), timeout=10)
    assert polled.status_code == 200 and polled.json()[0]["type"] == "serverless_progress"
    assert polled.json()[0]["data"]["owner"], "the worker's log names the owner, as one box's does"
    logged = wait_until(
        lambda: (r := summary(second.url, "owned", **bearer(KEY_A)).json())["state"] == "cancelled" and r, timeout=5
    )
    assert logged["error"]["error_message"] == "cancelled by request"
    theirs_are_unknown()
    assert requests.get(second.url + TASK, params=query, timeout=10).status_code == 401


def test_without_a_queue_instances_sharing_redis_answer_and_cancel_for_each_other(
    redis_server: RedisServer, own_emulator: Any, start_app: Callable[..., Any]
) -> None:
    """STATUS_BACKEND=redis, QUEUE_BACKEND=none: each instance runs its callers' jobs, any answers."""
    env = {"STATUS_BACKEND": "redis", "REDIS_URL": fresh_database(redis_server), "API_KEYS": f"{KEY_A},{KEY_B}"}
    one, two = start_app(own_emulator.url, FC_INSTANCE_ID="one", **env), start_app(own_emulator.url, **env)
    set_step_delay(own_emulator, 0.1)
    headers = {**bearer(KEY_A), "x-fc-invocation-type": "async", "x-fc-trace-id": "local"}
    assert post_run(one.url, slow(24, steps=60), headers=headers).status_code == 202
    wait_until(lambda: (r := summary(two.url, "local", **bearer(KEY_A))).status_code == 200 and r.json()["percent"])
    for method, path in (("GET", TASK), ("GET", EVENTS), ("POST", CANCEL)):
        theirs = requests.request(method, two.url + path, params={"task_id": "local"}, headers=bearer(KEY_B), timeout=9)
        assert theirs.status_code == 404 and theirs.json()["raw"]["state"] == "unknown", (path, theirs.text)
    followed = in_background(lambda: task_events(two.url, "local", **bearer(KEY_A)))

    asked = time.monotonic()
    stopping = requests.post(two.url + CANCEL, params={"task_id": "local"}, headers=bearer(KEY_A), timeout=10)
    assert stopping.status_code == 202 and stopping.json() == {"task_id": "local", "state": "cancelling"}
    told = wait_until(lambda: (r := summary(two.url, "local", **bearer(KEY_A)).json())["state"] == "cancelled" and r)
    assert time.monotonic() - asked < 2.0
    events = followed.result(timeout=10)
    logged = requests.get(
        one.url + "/api/serverless/status", params={"task_id": "local"}, headers=bearer(KEY_A), timeout=10
    ).json()
    assert [json.loads(data) for _, data in events] == logged and told["error"] == logged[-1]
    assert logged[-1]["error_message"] == "cancelled by request"

    key = {**bearer(KEY_A), "Idempotency-Key": "local-once"}
    answers = [post_run(app.url, empty_image(prefix="once"), headers=key) for app in (one, two)]
    assert [a.status_code for a in answers] == [200, 200] and answers[0].json() == answers[1].json()
    assert post_run(two.url, empty_image(prefix="other"), headers=key).status_code == 409
    other_caller = {**bearer(KEY_B), "Idempotency-Key": "local-once"}  # another key's own namespace (#28.9)
    theirs = post_run(two.url, empty_image(prefix="once"), headers=other_caller)
    assert theirs.status_code == 200 and theirs.json()["data"]["task_id"] != answers[0].json()["data"]["task_id"]


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
        fleet = tier(url=server.url(0))  # the workers in-process: Redis is what dies here
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
        assert polled.status_code == 503 and polled.json()["error_code"] == "UNAVAILABLE"
        server.start()
        for task_id in ids:
            assert wait_ended(gateway.url, task_id, timeout=90)[-1]["type"] == "serverless_api", task_id
        answer = post_run(gateway.url, empty_image(prefix="after-restart"))
        assert answer.status_code == 200 and answer.json()["type"] == "serverless_api"
        for worker in workers:  # no restart needed: the same workers serve on
            assert requests.get(worker.url + "/api/serverless/health", timeout=10).status_code == 200
    finally:
        server.stop()


async def test_five_hundred_sync_callers_on_one_gateway_are_all_answered_on_a_few_connections(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Waiting callers hold no Redis connection each: one blocking read per gateway wakes them."""
    import httpx

    from tests.topologies import deploy

    deployed = await asyncio.to_thread(deploy, "fleet", tmp_path, redis_server, 0.0, MAX_QUEUED_JOBS="0")
    client = redis.Redis.from_url(deployed.redis_url or "")
    most_clients = 0
    try:
        async with httpx.AsyncClient(
            base_url=deployed.url, timeout=120, limits=httpx.Limits(max_connections=600)
        ) as http:

            async def call(number: int) -> int:
                answer = await http.post(RUN, json=empty_image(prefix=f"many{number}"))
                return answer.status_code

            calls = asyncio.gather(*(call(number) for number in range(500)))
            while not calls.done():
                most_clients = max(most_clients, int(client.info("clients")["connected_clients"]))
                await asyncio.sleep(0.2)
            statuses = await calls
    finally:
        await asyncio.to_thread(deployed.stop)
    assert Counter(statuses) == {200: 500}
    # Two workers and a gateway, each pool at most 64 connections, most of them idle: far below
    # one per waiting caller.
    assert most_clients < 3 * 64, most_clients


def test_a_job_no_worker_takes_within_queue_ttl_ends_with_timeout_for_every_caller(tier: Callable[..., Tier]) -> None:
    fleet = tier(QUEUE_TTL="1")
    gateway = fleet.gateway()  # and no worker at all
    assert submit_async(gateway.url, empty_image(), "nobody-takes-it").status_code == 202
    answer = post_run(gateway.url, empty_image(), headers={"X-Fc-Trace-Id": "nobody-either"})
    assert answer.status_code == 504 and answer.json()["error_code"] == "TIMEOUT"
    assert "QUEUE_TTL" in answer.json()["error_message"]
    polled = wait_ended(gateway.url, "nobody-takes-it")
    assert polled[-1]["error_code"] == "TIMEOUT"
    worker = fleet.worker()  # a worker that comes later does not run what was given up
    assert post_run(gateway.url, empty_image(prefix="later")).status_code == 200
    assert "nobody-takes-it" not in worker.started() and "nobody-either" not in worker.started()


def test_a_gateway_stopping_answers_its_waiting_callers_with_a_terminal_payload_and_the_job_goes_on(
    tier: Callable[..., Tier],
) -> None:
    fleet = tier(DRAIN_TIMEOUT="1")
    gateway = fleet.gateway()  # the one signalled (in-process: the server's own SIGTERM handler)
    fleet.worker(step_delay=0.1)
    waiting = in_background(lambda: post_run(gateway.url, slow(5, steps=40), headers={"X-Fc-Trace-Id": "outlives"}))
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(gateway.url, "outlives")))
    gateway.signal(signal.SIGTERM)
    answer = waiting.result(timeout=30)
    assert answer.status_code == 503 and answer.headers["content-type"] == "application/json"
    assert answer.json()["error_code"] == "UNAVAILABLE" and "goes on" in answer.json()["error_message"]
    assert gateway.wait(30) == 0
    other = fleet.gateway()
    assert wait_ended(other.url, "outlives")[-1]["type"] == "serverless_api", "the job itself ran to its end"


def test_the_queue_keeps_no_done_jobs_and_its_lag_reads_as_keda_reads_it_after_cancels(
    tier: Callable[..., Tier],
) -> None:
    """KEDA's redis-streams scaler reads each stream's consumer-group lag (XINFO GROUPS): it must
    stay a number (not nil) after cancels, count the jobs waiting from zero workers, and the
    stream must not keep the bodies of jobs done."""
    fleet = tier()
    gateway = fleet.gateway()  # no worker yet: KEDA would scale from zero
    client = redis.Redis.from_url(fleet.redis_url)
    big = {"prompt": empty_image(prefix="bodied"), "extra_data": {"pad": "x" * 100_000}}  # a 100 KB request
    for n in range(6):
        assert submit_async(gateway.url, big, f"lagged-{n}").status_code == 202
    for n in (1, 4):  # queued jobs cancelled: ended at once, their entries left for a worker to skip
        cancelled = requests.post(gateway.url + CANCEL, params={"task_id": f"lagged-{n}"}, timeout=10)
        assert cancelled.json()["state"] == "cancelled"

    def lag() -> Any:
        (group,) = client.xinfo_groups("jobs:normal")
        return group["lag"]

    assert lag() == 6, "a number, counting every entry no worker has read"
    fleet.worker()
    for n in range(6):
        assert wait_ended(gateway.url, f"lagged-{n}")[-1]["type"] == ("error" if n in (1, 4) else "serverless_api")
    wait_until(lambda: client.xlen("jobs:normal") <= 1, timeout=30)  # at most the last one handed out
    assert lag() == 0
    assert client.memory_usage("jobs:normal") < 2 * 100_000, "of the six bodies, the last one handed out at most"


def test_a_worker_lost_longer_than_stale_after_is_retried_and_its_caller_gets_the_result_not_instance_lost(
    tier: Callable[..., Tier],
) -> None:
    fleet = tier(REDIS_CLAIM_IDLE="3", STATUS_STALE_AFTER="1")  # claimed later than "stale"
    gateway = fleet.gateway()
    victim = fleet.worker(step_delay=0.1, process=True)  # the one killed; the other joins once it runs the job
    waiting = in_background(lambda: post_run(gateway.url, slow(3, steps=20), headers={"X-Fc-Trace-Id": "patient"}))
    wait_until(lambda: "patient" in victim.started(), timeout=20)
    fleet.worker(step_delay=0.1)
    wait_until(lambda: any(p["type"] == "execution_start" for p in status(gateway.url, "patient")))
    victim.kill()
    seen: list[list[dict[str, Any]]] = []
    while not waiting.done():  # what a poller reads meanwhile: never an end before the real one
        seen.append(status(gateway.url, "patient"))
        time.sleep(0.2)
    answer = waiting.result()
    assert answer.status_code == 200 and answer.json()["retried"] is True, answer.text
    assert all(not log or log[-1]["type"] not in ("error", "serverless_api") for log in seen[:-3])
    first_attempt = status(gateway.url, "patient", attempt="1")
    assert [p["data"]["state"] for p in first_attempt if p["type"] == "serverless_progress"][-1] == "retrying"


def test_consumers_of_workers_gone_for_good_are_forgotten(
    tier: Callable[..., Tier], monkeypatch: pytest.MonkeyPatch
) -> None:
    from serverless.fleet import worker as worker_module

    monkeypatch.setattr(worker_module, "FORGET_AFTER", 0.5)  # an hour, as deployed
    monkeypatch.setattr(worker_module, "FORGET_EVERY", 0.1)
    fleet = tier()
    gateway = fleet.gateway()
    client = redis.Redis.from_url(fleet.redis_url)
    client.xgroup_create("jobs:normal", "workers", id="0", mkstream=True)
    client.xgroup_createconsumer("jobs:normal", "workers", "ghost:9000")  # a worker that died long ago
    fleet.worker()

    def names() -> set[str]:
        return {
            c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            for c in client.xinfo_consumers("jobs:normal", "workers")
        }

    wait_until(lambda: "ghost:9000" not in names(), timeout=20)
    assert post_run(gateway.url, empty_image(prefix="after")).status_code == 200
    assert names(), "the live worker's consumer stays (or comes back with its next read)"


def test_a_low_priority_job_waiting_past_the_aging_time_goes_before_newer_high_ones(
    tier: Callable[..., Tier], monkeypatch: pytest.MonkeyPatch
) -> None:
    from serverless.fleet import worker as worker_module

    monkeypatch.setattr(worker_module, "PRIORITY_AGING", 0.5)  # 30 s, as deployed
    monkeypatch.setattr(worker_module, "AGING_LOOK", 0.05)
    fleet = tier()
    gateway = fleet.gateway()
    worker = fleet.worker(step_delay=0.05)
    assert submit_async(gateway.url, slow(1, steps=10), "first", priority="high").status_code == 202
    wait_until(lambda: "first" in worker.started())
    assert submit_async(gateway.url, slow(2, steps=2), "patient", priority="low").status_code == 202
    for n in range(10):  # a steady flood of high priority work: without aging, low waits for all of it
        assert submit_async(gateway.url, slow(10 + n, steps=4), f"urgent-{n}", priority="high").status_code == 202
    for task_id in ("patient", *(f"urgent-{n}" for n in range(10))):
        wait_ended(gateway.url, task_id, timeout=60)
    order = worker.started()
    assert order.index("patient") < order.index("urgent-9"), order
    assert order.index("patient") > 0, "aged, not first: the job already running went on"
