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

import pytest
import redis
import requests
from PIL import Image

from serverless.batches import feeder
from serverless.status import keys
from tests.helpers import empty_image, wait_until
from tests.servers import InProcessApp
from tests.test_webhooks import SECRET, Receiver, verify
from tests.topologies import Deployment, deploy

BATCHES = "/api/batches"
ENDED = ("succeeded", "failed", "cancelled")
FAST = {"STATUS_STALE_AFTER": "16"}  # a feeder's lease: an eighth of it, 2 s


@pytest.fixture(autouse=True)
def quick_feeders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Feeders in this process look at their batches every 0.05 s instead of 0.2 s."""
    monkeypatch.setattr("serverless.batches.feeder.POLL_INTERVAL", 0.05)


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


def comfyui_depth(dep: Deployment) -> int:
    """Prompts every ComfyUI of the deployment holds, running or pending."""
    queues = [requests.get(emulator.url + "/queue", timeout=5).json() for emulator in dep.emulators]
    return sum(len(queue["queue_running"]) + len(queue["queue_pending"]) for queue in queues)


def follow(dep: Deployment, batch_id: str, window: int, timeout: float = 300.0) -> tuple[dict[str, Any], int, int]:
    """Until the batch ends: its last roll-up, the most items it had in flight, the deepest queue
    (the fleet's Redis queue, and every ComfyUI's own)."""
    in_flight = depth = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rolled = batch_of(dep.url, batch_id, limit=0)
        in_flight = max(in_flight, rolled["counts"]["queued"] + rolled["counts"]["running"])
        depth = max(depth, queue_depth(dep), comfyui_depth(dep))  # a job a worker took is in both
        if rolled["state"] in ENDED:
            return rolled, in_flight, depth
        time.sleep(0.1)
    raise AssertionError("the batch did not end")


def outputs_named(dep: Deployment, prefix: str) -> list[Path]:
    return [path for emulator in dep.emulators for path in (emulator.root / "output").glob(f"{prefix}*.png")]


def test_thousand_item_sweep_runs_each_item_once_retries_only_the_failed_and_lists_every_output(
    deployment: Callable[..., Deployment], monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 items, 100 of which name an input no ComfyUI holds yet: the window bounds what is
    queued, every item runs once, the roll-up is exact; once the input exists, retry runs only
    the 100 again; the manifest lists each output with its item's parameters."""
    window = 48
    monkeypatch.setattr("serverless.batches.feeder.WINDOW", window)
    monkeypatch.setattr("serverless.batches.feeder.POLL_INTERVAL", 0.01)
    dep = deployment(step_delay=0, **FAST)
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


def slow_down(dep: Deployment, seconds: float) -> None:
    for emulator in dep.emulators:
        requests.post(emulator.url + "/emulator/config", json={"node_delay": seconds}, timeout=5)


def colours(count: int) -> dict[str, Any]:
    """A sweep of `count` different prompts (one colour each: ComfyUI caches none of them)."""
    return {"workflow": empty_image(8, 8, prefix="c"), "sweep": {"1.color": list(range(1, count + 1))}}


def test_cancel_midway_leaves_nothing_queued_or_running(
    deployment: Callable[..., Deployment], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serverless.batches.feeder.WINDOW", 8)
    dep = deployment(step_delay=0, **FAST)
    slow_down(dep, 0.02)
    created = create(dep.url, colours(1000)).json()
    batch_id = created["batch_id"]
    wait_until(lambda: batch_of(dep.url, batch_id, limit=0)["counts"]["succeeded"] >= 20, 120, 0.05)
    cancelled = requests.post(f"{dep.url}{BATCHES}/{batch_id}/cancel", timeout=30)
    assert cancelled.status_code == 202 and cancelled.json()["state"] in ("cancelling", "cancelled")
    rolled = ended(dep.url, batch_id)
    counts = rolled["counts"]
    assert rolled["state"] == "cancelled"
    assert counts["pending"] == counts["queued"] == counts["running"] == 0
    assert counts["succeeded"] + counts["failed"] + counts["cancelled"] == 1000 and counts["cancelled"] > 900
    for emulator in dep.emulators:  # no ComfyUI holds any of it
        queue = requests.get(emulator.url + "/queue", timeout=5).json()
        assert queue == {"queue_running": [], "queue_pending": []}
    made = len(outputs_named(dep, "c"))
    # An item stopped as it saved may leave its file; none beyond the window's ever began.
    assert counts["succeeded"] <= made <= counts["succeeded"] + 8
    items = all_items(dep.url, batch_id)
    for item in items:  # every task the batch started has ended; the rest never started
        if item["state"] == "succeeded":
            continue
        task = requests.get(dep.url + "/api/serverless/task", params={"task_id": item["task_id"]}, timeout=10)
        assert task.status_code == 404 or task.json()["state"] in ENDED, task.text
    time.sleep(0.5)
    assert len(outputs_named(dep, "c")) == made  # and nothing runs after
    again = requests.post(f"{dep.url}{BATCHES}/{batch_id}/cancel", timeout=30)
    assert again.status_code == 409


def sse_events(response: requests.Response, until: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """Events (`id`, `type`, `data`) read from an SSE response until `until` holds or it ends."""
    events: list[dict[str, Any]] = []
    event_id = None
    for line in response.iter_lines():
        if line.startswith(b"id: "):
            event_id = int(line[4:])
        elif line.startswith(b"data: "):
            events.append({"id": event_id, **json.loads(line[6:])})
            if until(events):
                break
    return events


def test_a_batch_followed_over_sse_goes_on_from_another_instance_when_the_first_stops(
    topology: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance feeding a batch stops midway: another gateway (on a box, the instance started
    again) takes the batch over and its SSE resumes after the last event seen, to the end."""
    server = request.getfixturevalue("redis_server") if topology == "fleet" else None
    monkeypatch.setattr("serverless.batches.feeder.WINDOW", 4)
    dep = deploy(topology, tmp_path / "d", server, 0, **FAST)  # type: ignore[arg-type]
    second: InProcessApp | None = None
    try:
        slow_down(dep, 0.02)
        batch_id = create(dep.url, colours(60)).json()["batch_id"]
        with requests.get(f"{dep.url}{BATCHES}/{batch_id}/events", stream=True, timeout=60) as first:
            seen = sse_events(first, lambda events: len(events) >= 10)
        first_app = dep.apps[-1]  # the gateway, or the box
        env = dict(first_app.env)
        first_app.stop()
        env["FC_INSTANCE_ID"] = "second"
        second = InProcessApp(tmp_path / "d", env)
        last = seen[-1]["id"]
        headers = {"Last-Event-ID": str(last)}
        with requests.get(
            f"{second.url}{BATCHES}/{batch_id}/events", headers=headers, stream=True, timeout=120
        ) as rest:
            after = sse_events(rest, lambda events: events[-1]["type"] == "batch_end")
        assert [event["id"] for event in after] == list(range(last + 1, last + 1 + len(after)))
        end = after[-1]
        assert end["type"] == "batch_end" and end["data"]["counts"]["succeeded"] == 60, end
        assert batch_of(second.url, batch_id, limit=0)["state"] == "succeeded"
        assert len(outputs_named(dep, "c")) == 60  # each item once, whoever fed it
    finally:
        if second is not None:
            second.stop()
        dep.stop()


def test_batch_webhook_tells_the_end_with_counts_signed_and_items_their_own(
    deployment: Callable[..., Deployment],
) -> None:
    hooks = Receiver()
    try:
        dep = deployment(step_delay=0, WEBHOOK_ALLOWED_HOSTS="127.0.0.1", WEBHOOK_SECRET=SECRET, **FAST)
        body = {**colours(4), "callback_url": hooks.url, "item_webhooks": True}
        created = create(dep.url, body).json()
        rolled = ended(dep.url, created["batch_id"])
        assert rolled["state"] == "succeeded"
        wait_until(lambda: len(hooks.received) >= 5 and batch_of(dep.url, created["batch_id"], limit=0).get("webhook"))
        by_task = {headers["x-serverless-task-id"]: (headers, body) for headers, body in hooks.received}
        assert set(by_task) == {created["batch_id"], *created["task_ids"]}
        headers, sent = by_task[created["batch_id"]]
        assert verify(headers, sent)
        payload = json.loads(sent)
        assert payload["type"] == "serverless_batch" and payload["data"]["counts"]["succeeded"] == 4
        assert batch_of(dep.url, created["batch_id"], limit=0)["webhook"]["delivered"] is True
    finally:
        hooks.close()


def test_cli_sweeps_a_workflow_file_with_a_bar_and_saves_every_output_and_the_manifest(
    deployment: Callable[..., Deployment], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from serverless.cli import main

    dep = deployment(step_delay=0, **FAST)
    workflow = tmp_path / "image.json"
    workflow.write_text(json.dumps(empty_image(8, 8, prefix="cli")))
    prompts = tmp_path / "prefixes.txt"
    prompts.write_text("red\n\nblue\n")
    out = tmp_path / "out"
    argv = [
        "--url",
        dep.url,
        "batch",
        str(workflow),
        "--sweep",
        "1.color=1,2,3",
        "--sweep",
        f"2.filename_prefix=@{prompts}",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "succeeded" in printed and "succeeded 6" in printed
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [line["parameters"] for line in manifest][:2] == [
        {"1.color": 1, "2.filename_prefix": "red"},
        {"1.color": 1, "2.filename_prefix": "blue"},
    ]
    for line in manifest:
        (name,) = line["files"]
        assert (out / name).stat().st_size > 0 and line["parameters"]["2.filename_prefix"] in name


def test_client_batch_sync_and_async_follow_a_batch_to_its_end(deployment: Callable[..., Deployment]) -> None:
    import asyncio

    from serverless.client import AsyncClient, Client

    dep = deployment(step_delay=0, **FAST)
    with Client(dep.url) as client:
        created = client.batch(empty_image(8, 8, prefix="sync"), items=[{"1.color": 5}, {"1.color": 6}])
        events = list(client.batch_events(created["batch_id"]))
        assert events[-1].type == "batch_end" and events[-1].data["counts"]["succeeded"] == 2
        assert [line["task_id"] for line in client.batch_manifest(created["batch_id"])] == created["task_ids"]
        assert client.retry_batch(created["batch_id"])["retried"] == 0

    async def run_async() -> dict[str, Any]:
        async with AsyncClient(dep.url) as client:
            created = await client.batch(empty_image(8, 8, prefix="aio"), sweep={"1.color": [7, 8]}, mode="zip")
            async for event in client.batch_events(created["batch_id"]):
                if event.type == "batch_end":
                    break
            return await client.batch_status(created["batch_id"])

    rolled = asyncio.run(run_async())
    assert rolled["state"] == "succeeded" and [item["parameters"] for item in rolled["items"]] == [
        {"1.color": 7},
        {"1.color": 8},
    ]


def test_a_bad_item_is_refused_before_anything_runs_naming_it(
    deployment: Callable[..., Deployment], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serverless.batches.spec.MAX_ITEMS", 50)
    dep = deployment(step_delay=0, **FAST)
    items = [{"1.color": 1}, {"1.color": 2}, {"1.width": "wide"}]
    refused = create(dep.url, {"workflow": empty_image(8, 8, prefix="bad"), "items": items})
    assert refused.status_code == 400, refused.text
    error = refused.json()
    assert error["error_code"] == "INVALID_PARAMS" and error["raw"]["item"] == 2
    assert error["raw"]["parameters"] == {"1.width": "wide"}
    too_many = create(dep.url, {"workflow": empty_image(), "sweep": {"1.color": list(range(51))}})
    assert too_many.status_code == 400 and too_many.json()["raw"]["max_items"] == 50
    assert not outputs_named(dep, "bad")  # nothing ran
    assert requests.get(f"{dep.url}{BATCHES}/batch-0123abcd", timeout=10).status_code == 404


def test_with_api_keys_a_batch_is_its_keys_own(deployment: Callable[..., Deployment]) -> None:
    dep = deployment(step_delay=0, API_KEYS="key-one-0123456789,key-two-0123456789", **FAST)
    one, two = ({"Authorization": f"Bearer key-{name}-0123456789"} for name in ("one", "two"))
    created = create(dep.url, colours(2), headers=one).json()
    path = f"{dep.url}{BATCHES}/{created['batch_id']}"
    assert requests.get(path, headers=one, timeout=10).status_code == 200
    for suffix, method in (
        ("", "GET"),
        ("/events", "GET"),
        ("/manifest", "GET"),
        ("/cancel", "POST"),
        ("/retry", "POST"),
    ):
        assert requests.request(method, path + suffix, headers=two, timeout=10).status_code == 404
    assert requests.get(path, timeout=10).status_code == 401


def test_with_output_oss_the_manifest_is_uploaded_beside_the_outputs(deployment: Callable[..., Deployment]) -> None:
    from tests.test_oss_e2e import local_oss_server, oss_env

    with local_oss_server("outs") as oss:
        dep = deployment(step_delay=0, **oss_env(oss, "outs"), **FAST)
        created = create(dep.url, {**colours(3), "output_oss": True}).json()
        rolled = ended(dep.url, created["batch_id"])
        assert rolled["state"] == "succeeded"
        uploaded = rolled["manifest"]
        body, mime = oss.get_object("outs", uploaded["object"])
        assert mime == "application/x-ndjson"
        lines = [json.loads(line) for line in body.decode().splitlines()]
        assert [line["parameters"] for line in lines] == [{"1.color": 1}, {"1.color": 2}, {"1.color": 3}]
        for line in lines:  # each output in the same bucket, under the same prefix
            (output,) = line["outputs"]
            key = output["url"].split("/outs/", 1)[1].split("?", 1)[0]
            assert oss.get_object("outs", key)[1] == "image/png"
            assert key.rsplit("/", 1)[0] == uploaded["object"].rsplit("/", 1)[0]


def test_a_batch_goes_on_from_another_gateway_when_its_feeding_gateway_is_killed(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SIGKILL, not a stop: the dead gateway gives up nothing. Its lease runs out
    (STATUS_STALE_AFTER / 8), another gateway takes the batch over from what Redis holds, and a
    caller's SSE resumed there after its last event seen runs to the end; every item once. The
    dead gateway (a process) queues a window of 64: the batch is 16 items more, fed after it."""
    from tests.fleet import Tier

    server = request.getfixturevalue("redis_server")
    redis.Redis.from_url(server.url(31)).flushdb()  # a database of its own (the deployments take 32-63)
    tier = Tier(tmp_path, server.url(31), FAST)
    total = feeder.WINDOW + 16
    try:
        doomed = tier.gateway(process=True)
        for _ in range(2):
            tier.worker()
        for emulator in tier.emulators:
            requests.post(emulator.url + "/emulator/config", json={"node_delay": 0.02}, timeout=5)
        batch_id = create(doomed.url, colours(total)).json()["batch_id"]
        with requests.get(f"{doomed.url}{BATCHES}/{batch_id}/events", stream=True, timeout=60) as first:
            seen = sse_events(first, lambda events: len(events) >= 8)
        doomed.kill()
        other = tier.gateway(process=False)
        headers = {"Last-Event-ID": str(seen[-1]["id"])}
        with requests.get(f"{other.url}{BATCHES}/{batch_id}/events", headers=headers, stream=True, timeout=120) as rest:
            after = sse_events(rest, lambda events: events[-1]["type"] == "batch_end")
        last = seen[-1]["id"]
        assert [event["id"] for event in after] == list(range(last + 1, last + 1 + len(after)))
        assert after[-1]["data"]["counts"]["succeeded"] == total, after[-1]
        made = [path for emulator in tier.emulators for path in (emulator.root / "output").glob("c*.png")]
        assert len(made) == total, "each item ran once, whoever fed it"
    finally:
        tier.stop()
