"""Job control end to end: progress events, the task summary, cancel, resumable streams and
idempotent submission, through real app instances that share one status folder (the NAS) and
the ComfyUI emulator."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.helpers import RUN, post_run, txt2img, wait_until
from tests.servers import App, Emulator
from tests.test_stream import (
    SseEvent,
    history_messages,
    in_background,
    payloads,
    prompt_ids,
    queued,
    read_events,
    set_step_delay,
    status_log,
)

pytestmark = pytest.mark.timeout(90)

TASK, CANCEL, EVENTS = "/api/serverless/task", "/api/serverless/cancel", "/api/serverless/events"
ENDED = ("succeeded", "failed", "cancelled")


def new_task(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def named(task_id: str) -> dict[str, str]:
    return {"x-fc-trace-id": task_id}


def summary(server: App, task_id: str) -> requests.Response:
    return requests.get(server.url + TASK, params={"task_id": task_id}, timeout=10)


def cancel(server: App, task_id: str) -> requests.Response:
    return requests.post(server.url + CANCEL, params={"task_id": task_id}, timeout=10)


def stream_all(server: App, workflow: dict[str, Any], headers: dict[str, str] | None = None) -> list[SseEvent]:
    response = requests.post(
        server.url + RUN,
        params={"stream": "true"},
        data=json.dumps(workflow),
        headers=headers or {},
        stream=True,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return list(read_events(response))


def progress_of(events: list[SseEvent]) -> list[dict[str, Any]]:
    return [p["data"] for p in payloads(events) if p.get("type") == "serverless_progress"]


def changes(values: list[Any]) -> list[Any]:
    """`values` without repeats of the one before."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def places(progress: list[dict[str, Any]]) -> list[int]:
    """The queue positions a job went through, once known and until it ended."""
    return changes([p["queue_position"] for p in progress if p["queue_position"] is not None])


@pytest.fixture
def pair(own_emulator: Emulator, start_app: Any, tmp_path: Any) -> tuple[App, App]:
    """Two instances sharing one status folder (the NAS), against one ComfyUI."""
    shared = tmp_path / "nas"
    return (
        start_app(own_emulator.url, status_dir=shared, CANCEL_ON_DISCONNECT="false", FC_INSTANCE_ID="one"),
        start_app(own_emulator.url, status_dir=shared, FC_INSTANCE_ID="two"),
    )


# -- progress ---------------------------------------------------------------------------------------


def test_progress_rises_to_100_and_the_jobs_queued_behind_count_down_to_running(own_emulator, start_app):
    set_step_delay(own_emulator, 0.2)  # 4 s of steps: time to queue two more, and ~16 progress events
    server = start_app(own_emulator.url)
    first = in_background(lambda: stream_all(server, txt2img(seed=1, steps=20, prefix="first")))
    wait_until(lambda: prompt_ids(own_emulator.url, "first", "running"))
    second = in_background(lambda: stream_all(server, txt2img(seed=2, steps=2, prefix="second")))
    wait_until(lambda: prompt_ids(own_emulator.url, "second", "pending"))
    third = in_background(lambda: stream_all(server, txt2img(seed=3, steps=2, prefix="third")))
    wait_until(lambda: prompt_ids(own_emulator.url, "third", "pending"))
    assert prompt_ids(own_emulator.url, "first", "running")  # both wait behind it

    progress = [progress_of(job.result(timeout=60)) for job in (first, second, third)]

    percents = [p["percent"] for p in progress[0]]
    assert percents == sorted(percents) and percents[-1] == 100 and max(percents[:-1]) < 100
    assert len(set(percents)) > 4  # it rose step by step, not in one jump
    assert progress[0][-1]["state"] == "succeeded"
    assert places(progress[1]) == [1, 0] and places(progress[2]) == [2, 1, 0]
    for events in progress:
        assert changes([p["state"] for p in events]) == ["queued", "running", "succeeded"]
        assert all(isinstance(p["at"], float) for p in events)


# -- the task summary ---------------------------------------------------------------------------------


def test_the_task_summary_is_the_same_from_a_second_instance_during_and_after_a_job(own_emulator, pair):
    one, two = pair
    set_step_delay(own_emulator, 0.05)
    task_id = new_task("summary")
    job = in_background(lambda: post_run(one.url, txt2img(seed=4, steps=30), headers=named(task_id)))

    during = wait_until(lambda: (s := summary(two, task_id).json()).get("state") == "running" and s)
    assert during["percent"] < 100 and during["queue_position"] == 0 and during["ended_at"] is None
    assert summary(one, task_id).json()["state"] == "running"
    assert job.result(timeout=60).status_code == 200

    after = wait_until(lambda: (s := summary(two, task_id).json()).get("state") in ENDED and s)
    assert after == summary(one, task_id).json()
    assert after["state"] == "succeeded" and after["percent"] == 100 and after["queue_position"] is None
    assert after["created_at"] <= after["started_at"] <= after["ended_at"] <= time.time()
    assert after["result"] == status_log(one, task_id)[-1] and "error" not in after


def test_the_summary_of_an_unknown_task_is_404_unknown_and_of_a_malformed_id_400(app):
    unknown = summary(app, new_task("never"))
    assert unknown.status_code == 404
    assert unknown.json()["error_code"] == "NOT_FOUND" and unknown.json()["raw"]["state"] == "unknown"
    assert summary(app, "bad/id").status_code == 400
    assert requests.get(app.url + TASK, timeout=10).status_code == 400


# -- cancel -------------------------------------------------------------------------------------------


def test_a_job_cancelled_through_a_second_instance_ends_interrupted_and_the_job_beside_it_completes(own_emulator, pair):
    one, two = pair
    set_step_delay(own_emulator, 0.05)
    victim_id, neighbour_id = new_task("victim"), new_task("neighbour")
    victim = in_background(
        lambda: post_run(one.url, txt2img(seed=5, steps=400, prefix="victim"), headers=named(victim_id))
    )
    (victim_prompt,) = wait_until(lambda: prompt_ids(own_emulator.url, "victim", "running"))
    neighbour = in_background(
        lambda: post_run(one.url, txt2img(seed=6, steps=5, prefix="neighbour"), headers=named(neighbour_id))
    )
    wait_until(lambda: prompt_ids(own_emulator.url, "neighbour", "pending"))
    wait_until(lambda: summary(two, victim_id).json().get("percent", 0) > 0)

    asked = time.monotonic()
    answer = cancel(two, victim_id)
    assert answer.status_code == 202 and answer.json() == {"task_id": victim_id, "state": "cancelling"}
    wait_until(lambda: summary(two, victim_id).json()["state"] == "cancelled", timeout=10, interval=0.02)
    assert time.monotonic() - asked < 2.0

    ended = victim.result(timeout=30)
    assert ended.status_code == 500
    assert ended.json()["error_code"] == "EXECUTION_INTERRUPTED"
    assert ended.json()["error_message"] == "cancelled by request"
    assert status_log(two, victim_id)[-1] == ended.json() == summary(two, victim_id).json()["error"]
    done = neighbour.result(timeout=30)
    assert done.status_code == 200, done.text
    assert history_messages(own_emulator.url, done.json()["data"]["prompt_id"])[-1] == "execution_success"
    assert "execution_interrupted" in history_messages(own_emulator.url, victim_prompt)
    assert not queued(own_emulator.url, victim_prompt)
    history = requests.get(own_emulator.url + "/history", timeout=5).json()
    interrupted = [
        p
        for p, entry in history.items()
        if "execution_interrupted" in [name for name, _ in entry["status"]["messages"]]
    ]
    assert interrupted == [victim_prompt]

    again = cancel(one, victim_id)
    assert again.status_code == 409 and again.json()["raw"] == {"task_id": victim_id, "state": "cancelled"}
    assert cancel(two, neighbour_id).json()["raw"]["state"] == "succeeded"


def test_cancel_here_stops_the_job_at_once_and_unknown_or_malformed_ids_are_refused(own_emulator, start_app):
    set_step_delay(own_emulator, 0.05)
    server = start_app(own_emulator.url)
    task_id = new_task("local")
    job = in_background(
        lambda: post_run(server.url, txt2img(seed=7, steps=400, prefix="local"), headers=named(task_id))
    )
    wait_until(lambda: prompt_ids(own_emulator.url, "local", "running"))
    assert cancel(server, task_id).status_code == 202
    assert job.result(timeout=10).json()["error_message"] == "cancelled by request"
    unknown = cancel(server, new_task("never"))
    assert unknown.status_code == 404 and unknown.json()["raw"]["state"] == "unknown"
    assert cancel(server, "no spaces").status_code == 400


# -- resumable streams --------------------------------------------------------------------------------


def test_a_dropped_stream_resumes_on_the_other_instance_with_every_missed_event_once(own_emulator, pair):
    one, two = pair
    set_step_delay(own_emulator, 0.05)
    task_id = new_task("resume")
    response = requests.post(
        one.url + RUN,
        params={"stream": "true"},
        data=json.dumps(txt2img(seed=8, steps=40)),
        headers=named(task_id),
        stream=True,
        timeout=60,
    )
    seen: list[SseEvent] = []
    for event in read_events(response):
        seen.append(event)
        if event.data is not None and json.loads(event.data).get("type") == "progress":
            break  # the connection breaks mid-job
    response.close()
    last = seen[-1].id
    assert last is not None

    resumed = requests.get(
        two.url + EVENTS, params={"task_id": task_id}, headers={"Last-Event-ID": str(last)}, stream=True, timeout=60
    )
    assert resumed.status_code == 200
    rest = [event for event in read_events(resumed) if event.data is not None]

    assert [event.id for event in rest] == list(range(last + 1, last + 1 + len(rest)))
    assert json.loads(rest[-1].data)["type"] == "serverless_api"
    log = status_log(one, task_id)
    assert [json.loads(e.data) for e in seen if e.data] + [json.loads(e.data) for e in rest] == log
    # `after=N` resumes the same way, and past the terminal payload there is nothing more.
    tail = requests.get(one.url + EVENTS, params={"task_id": task_id, "after": str(len(log) - 1)}, timeout=10)
    assert [e.id for e in read_events_of(tail)] == [len(log)]
    assert (
        list(
            read_events_of(
                requests.get(two.url + EVENTS, params={"task_id": task_id, "after": str(len(log))}, timeout=10)
            )
        )
        == []
    )


def read_events_of(response: requests.Response) -> list[SseEvent]:
    assert response.status_code == 200, response.text
    return [event for event in read_events(response) if event.data is not None]


def test_events_of_an_unknown_task_are_404_and_a_bad_last_event_id_400(app):
    assert requests.get(app.url + EVENTS, params={"task_id": new_task("never")}, timeout=10).status_code == 404
    bad = requests.get(app.url + EVENTS, params={"task_id": "x"}, headers={"Last-Event-ID": "x"}, timeout=10)
    assert bad.status_code == 400


# -- idempotent submission ----------------------------------------------------------------------------


def test_the_same_idempotency_key_posted_to_two_instances_at_once_runs_comfyui_once(own_emulator, pair):
    one, two = pair
    set_step_delay(own_emulator, 0.02)
    body, key = txt2img(seed=9, steps=10, prefix="once"), {"Idempotency-Key": new_task("key")}
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda server: post_run(server.url, body, headers=key), (one, two)))

    assert [answer.status_code for answer in answers] == [200, 200], [a.text for a in answers]
    assert answers[0].json() == answers[1].json()
    assert len(requests.get(own_emulator.url + "/history", timeout=5).json()) == 1
    later = post_run(two.url, body, headers=key, params={"stream": "true"})
    assert payloads(list(read_events(later)))[-1] == answers[0].json()
    assert len(requests.get(own_emulator.url + "/history", timeout=5).json()) == 1

    other = post_run(one.url, txt2img(seed=10, steps=10, prefix="once"), headers=key)
    assert other.status_code == 409 and other.json()["error_code"] == "INVALID_PARAMS"
    assert post_run(one.url, body, headers={"Idempotency-Key": "no spaces"}).status_code == 400
