"""Tenants (API_KEYS_FILE): keys scoped to workflows, rate and concurrency limits, usage per key,
the file read again while the app runs; on one box and through a gateway and two workers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket  # websocket-client

from serverless.cli import main as cli
from serverless.tenants.keyfile import KeyFileError, Rights, digest_of, parse, parse_line
from tests.helpers import empty_image, post_run, txt2img, wait_until
from tests.servers import InProcessApp

ADMIN = "sk-admin-0123456789abcdef"
SHOP = "sk-shop-0123456789abcdef"  # may run hosted workflow `shop-wf` only
FLOOD = "sk-flood-0123456789abcdef"  # one job at a time
SLOW = "sk-slow-0123456789abcdef"  # one job every 5 s
OTHER = "sk-other-0123456789abcdef"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(
        "# label and rights per key\n"
        f"{ADMIN} label=admin\n"
        f"sha256:{digest_of(SHOP).hex()} label=shop workflows=shop-wf\n"
        f"{FLOOD} label=flood raw=yes concurrency=1\n"
        f"{SLOW} label=slow rate=0.2/s\n"
        f"{OTHER} label=other raw=yes\n"
    )
    return path


def register(url: str, workflow_id: str) -> None:
    answer = requests.put(
        f"{url}/api/workflows/{workflow_id}",
        json=empty_image(prefix=workflow_id),
        params={"shared": "true"},
        headers=bearer(ADMIN),
        timeout=30,
    )
    assert answer.status_code in (200, 201), answer.text


def refused(answer: requests.Response, needs: str) -> None:
    assert answer.status_code == 403, answer.text
    error = answer.json()
    assert error["error_code"] == "FORBIDDEN" and "shop" in error["error_message"], error
    assert error["raw"]["needs"].startswith(needs)


def test_the_key_file_grammar() -> None:
    assert parse_line(f"{ADMIN}") is not None and parse_line(f"{ADMIN}").rights == Rights()  # type: ignore[union-attr]
    scoped = parse_line(f"{SHOP} workflows=a,b label=s")
    assert scoped is not None and scoped.rights.workflows == {"a", "b"} and not scoped.rights.raw
    assert not scoped.rights.admin and scoped.label == "s"
    limited = parse_line(f"{SHOP} rate=2.5/s concurrency=3")
    assert limited is not None and limited.rights.raw and limited.rights.admin  # limits take no right away
    assert limited.rights.rate == 2.5 and limited.rights.concurrency == 3
    hashed = parse(f"sha256:{digest_of(SHOP).hex()} raw=yes\n# comment\n\n")
    assert hashed[0].digest == digest_of(SHOP) and hashed[0].rights.workflows == frozenset()
    for bad in ("short", f"{SHOP} rate=fast", f"{SHOP} raw=maybe", f"{SHOP} colour=red", f"{SHOP} concurrency=0"):
        with pytest.raises(KeyFileError) as error:
            parse(bad)
        assert SHOP not in str(error.value)  # a key never in a message


def test_a_key_scoped_to_one_workflow_is_refused_everything_else_on_every_route(
    deployment: Any, tmp_path: Path
) -> None:
    d = deployment(API_KEYS_FILE=str(keys_file(tmp_path)), FILE_LINK_SECRET="link-secret-0123456789abcdef")
    url = d.url
    register(url, "shop-wf")
    register(url, "other-wf")
    shop = bearer(SHOP)
    ran = requests.post(f"{url}/api/workflows/shop-wf/run", json={}, headers=shop, timeout=60)
    assert ran.status_code == 200 and ran.json()["type"] == "serverless_api", ran.text
    refused(post_run(url, empty_image(prefix="raw"), headers=shop), "raw=yes")  # sync
    refused(post_run(url, empty_image(prefix="raw"), params={"stream": "true"}, headers=shop), "raw=yes")  # SSE
    refused(post_run(url, empty_image(), headers={**shop, "x-fc-invocation-type": "Async"}), "raw=yes")  # async
    refused(requests.post(f"{url}/api/workflows/other-wf/run", json={}, headers=shop, timeout=30), "workflows=")
    refused(post_run(url, {}, params={"workflow_id": "other-wf"}, headers=shop), "workflows=")
    refused(requests.put(f"{url}/api/workflows/mine", json=empty_image(), headers=shop, timeout=30), "admin=yes")
    refused(requests.delete(f"{url}/api/workflows/shop-wf", headers=shop, timeout=30), "admin=yes")
    # Our websocket: the error object is its last message.
    ws = websocket.create_connection(
        url.replace("http", "ws") + "/api/serverless/ws", header=[f"Authorization: Bearer {SHOP}"]
    )
    ws.send(json.dumps(empty_image()))
    error = json.loads(ws.recv())
    assert error["error_code"] == "FORBIDDEN" and "raw=no" in error["error_message"]
    ws.close()
    # GenStudio: its own envelope, code 403.
    genstudio = requests.post(
        f"{url}/api/maas/comfy_task_api/prompt",
        json={"workflow_id": "other-wf", "prompt": {}},
        headers=shop,
        timeout=30,
    )
    assert genstudio.json()["code"] == 403 and "other-wf" in genstudio.json()["msg"], genstudio.text
    # ComfyUI's own API (it runs raw workflows) and Comfy API v2.
    for path in ("/prompt", "/api/prompt", "/api/v2/jobs"):
        answer = requests.post(
            url + path, json={"prompt": empty_image(), "workflow": empty_image()}, headers=shop, timeout=30
        )
        refused(answer, "raw=yes")
    assert requests.get(url + "/history", headers=shop, timeout=30).status_code == 403
    closed = websocket.create_connection(url.replace("http", "ws") + f"/ws?clientId=x&token={SHOP}")
    try:  # accepted, then closed with why (1008)
        assert closed.recv() == ""
    except websocket.WebSocketConnectionClosedException:
        pass
    # A key with every right still does all of it.
    assert post_run(url, empty_image(prefix="admin-raw"), headers=bearer(ADMIN)).status_code == 200


def test_a_key_over_its_rate_is_told_when_to_come_back(deployment: Any, tmp_path: Path) -> None:
    d = deployment(API_KEYS_FILE=str(keys_file(tmp_path)))
    slow = {**bearer(SLOW), "x-fc-invocation-type": "Async"}
    assert post_run(d.url, empty_image(prefix="rate"), headers=slow).status_code == 202
    second = post_run(d.url, empty_image(prefix="rate"), headers=slow)
    assert second.status_code == 429 and second.json()["error_code"] == "RATE_LIMITED", second.text
    assert 1 <= int(second.headers["Retry-After"]) <= 5
    assert "slow" in second.json()["error_message"] and SLOW not in second.text
    # Another key is not slowed by it.
    assert (
        post_run(
            d.url, empty_image(prefix="rate"), headers={**bearer(OTHER), "x-fc-invocation-type": "Async"}
        ).status_code
        == 202
    )


def test_two_gateways_sharing_redis_count_one_rate(tier_pair: tuple[str, str]) -> None:
    first, second = tier_pair
    slow = {**bearer(SLOW), "x-fc-invocation-type": "Async"}
    assert post_run(first, empty_image(prefix="rate2"), headers=slow).status_code == 202
    again = post_run(second, empty_image(prefix="rate2"), headers=slow)
    assert again.status_code == 429 and 1 <= int(again.headers["Retry-After"]) <= 5, again.text


@pytest.fixture
def tier_pair(deployment: Any, tmp_path: Path, topology: str) -> Any:
    """Two gateways over one fleet (the deployment's and another on the same Redis)."""
    if topology != "fleet":
        pytest.skip("two gateways are a fleet's")
    keys = keys_file(tmp_path)
    d = deployment(API_KEYS_FILE=str(keys))
    gateway = d.apps[-1]
    env = {
        "FC_INSTANCE_ID": "gateway2",
        "STATUS_BACKEND": "redis",
        "QUEUE_BACKEND": "redis",
        "REDIS_URL": d.redis_url,
        "ROLE": "gateway",
        "COMFYUI_URL": "http://127.0.0.1:9",
        "STATUS_DIR": str(tmp_path / "unused"),
        "WORKFLOWS_DIR": str(tmp_path / "deployment0" / "workflows"),
        "API_KEYS_FILE": str(keys),
    }
    other = InProcessApp(tmp_path, env)
    try:
        yield gateway.url, other.url
    finally:
        other.stop()


def _ended(url: str, key: str, task_id: str) -> bool:
    answer = requests.get(url + "/api/serverless/task", params={"task_id": task_id}, headers=bearer(key), timeout=10)
    return answer.status_code == 200 and answer.json().get("state") in ("succeeded", "failed", "cancelled")


def test_a_flood_from_one_key_waits_behind_its_own_and_another_keys_job_passes_it(
    deployment: Any, tmp_path: Path
) -> None:
    d = deployment(API_KEYS_FILE=str(keys_file(tmp_path)), step_delay=0.1)
    flood = [f"flood-{n}" for n in range(6)]
    for task_id in flood:
        headers = {**bearer(FLOOD), "x-fc-invocation-type": "Async", "x-fc-async-task-id": task_id}
        assert post_run(d.url, txt2img(steps=5, prefix="flood"), headers=headers).status_code == 202
    wait_until(lambda: _ended(d.url, FLOOD, flood[0]), timeout=60)  # the flood is under way
    mine = post_run(d.url, txt2img(steps=5, prefix="other"), headers=bearer(OTHER), timeout=120)
    assert mine.status_code == 200, mine.text
    ended = sum(_ended(d.url, FLOOD, task_id) for task_id in flood)
    # Without the limit the other key's job would wait for most of the flood (it came last).
    assert ended <= 3, f"{ended} of the flood's jobs ended before the other key's one"
    # The held ones still run, in order, and a held one can be cancelled.
    cancel = requests.post(
        d.url + "/api/serverless/cancel", params={"task_id": flood[-1]}, headers=bearer(FLOOD), timeout=10
    )
    assert cancel.status_code in (200, 202), cancel.text
    for task_id in flood:
        wait_until(lambda task_id=task_id: _ended(d.url, FLOOD, task_id), timeout=120, interval=0.2)
    last = requests.get(
        d.url + "/api/serverless/task", params={"task_id": flood[-1]}, headers=bearer(FLOOD), timeout=10
    )
    assert last.json()["state"] == "cancelled"
    # Its usage: every job by how it ended, the cancelled one (never run) included.
    counted = {"submitted": 6, "succeeded": 5, "failed": 0, "cancelled": 1}
    wait_until(lambda: usage_of(d.url, FLOOD)["jobs"] == counted, timeout=20, interval=0.1)


def usage_of(url: str, key: str) -> dict[str, Any]:
    answer = requests.get(url + "/api/usage", headers=bearer(key), timeout=10)
    assert answer.status_code == 200, answer.text
    shown: dict[str, Any] = answer.json()["keys"][0]
    return shown


def test_revoking_a_key_in_the_file_counts_within_a_second_and_drops_no_request(
    deployment: Any, tmp_path: Path
) -> None:
    path = keys_file(tmp_path)
    d = deployment(API_KEYS_FILE=str(path), step_delay=0.3)
    answers: list[requests.Response] = []
    inflight = threading.Thread(
        target=lambda: answers.append(
            post_run(d.url, txt2img(steps=8, prefix="inflight"), headers=bearer(OTHER), timeout=120)
        )
    )
    inflight.start()
    time.sleep(0.5)
    assert cli(["keys", "revoke", "--file", str(path), "other"]) == 0
    revoked_at = time.monotonic()
    assert not answers  # its request is still under way

    def turned_away() -> bool:  # a call that runs nothing, so that it answers at once
        answer = requests.get(d.url + "/api/usage", headers=bearer(OTHER), timeout=10)
        return answer.status_code == 401

    wait_until(turned_away, timeout=10, interval=0.05)
    took = time.monotonic() - revoked_at
    print(f"revoked key refused {took:.2f}s after the file changed")
    inflight.join(120)
    assert answers and answers[0].status_code == 200 and answers[0].json()["type"] == "serverless_api"
    assert took < 3, f"the revoked key was accepted for {took:.2f}s"  # polled every 0.5 s (tenants.keys.POLL_INTERVAL)
    # A key added the same way works at once, without a restart.
    added = _captured_key(path, "newcomer")
    wait_until(
        lambda: post_run(d.url, empty_image(), headers=bearer(added)).status_code == 200, timeout=10, interval=0.05
    )


def _captured_key(path: Path, label: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["keys", "add", "--file", str(path), "--label", label, "--raw", "yes"]) == 0
    key = out.getvalue().strip()
    assert key not in path.read_text()  # the file holds its digest only
    return key


def test_usage_per_key_matches_the_jobs_run(deployment: Any, tmp_path: Path) -> None:
    d = deployment(API_KEYS_FILE=str(keys_file(tmp_path)))
    results = [
        post_run(d.url, empty_image(prefix=f"usage{n}"), params={"output_base64": "true"}, headers=bearer(OTHER))
        for n in range(3)
    ]
    assert all(r.status_code == 200 for r in results)
    failed = post_run(d.url, {"1": {"class_type": "NoSuchNode", "inputs": {}}}, headers=bearer(OTHER))
    assert failed.status_code >= 400

    def usage() -> dict[str, Any]:
        answer = requests.get(d.url + "/api/usage", headers=bearer(OTHER), timeout=10)
        assert answer.status_code == 200, answer.text
        shown: dict[str, Any] = answer.json()["keys"][0]
        return shown

    wait_until(lambda: usage()["jobs"]["succeeded"] == 3, timeout=20, interval=0.1)
    shown = usage()
    assert shown["key"] == "other" and shown["jobs"]["submitted"] >= 3
    execution = sum(r.json()["data"]["timings"]["execution_s"] for r in results)
    assert abs(shown["gpu_seconds"] - execution) <= 0.01 * len(results) + 0.01
    assert shown["bytes_out"] >= sum(
        len(r.json()["data"]["results"][0]["output"]["base64"]["content"]) for r in results
    )
    # Another key's usage: an admin's to read, not another key's.
    assert (
        requests.get(d.url + "/api/usage", params={"key": "other"}, headers=bearer(SHOP), timeout=10).status_code == 403
    )
    theirs = requests.get(d.url + "/api/usage", params={"key": "other"}, headers=bearer(ADMIN), timeout=10).json()
    assert theirs["keys"][0]["jobs"]["succeeded"] == 3
    assert (
        requests.get(
            d.url + "/api/usage", params={"since": "2999-01-01T00:00:00Z"}, headers=bearer(OTHER), timeout=10
        ).json()["keys"][0]["jobs"]["succeeded"]
        == 0
    )
    metrics = requests.get(d.url + "/metrics", headers=bearer(ADMIN), timeout=10).text
    assert 'serverless_key_jobs{key="other",state="succeeded"} 3.0' in metrics
    assert OTHER not in metrics and "sk-" not in metrics


def test_the_memory_rate_admits_a_seconds_burst_then_says_when() -> None:
    import asyncio

    from serverless.tenants.limits import MemoryRate

    async def scenario() -> list[float]:
        rate = MemoryRate()
        waits = [await rate.wait_for("a", 2.0) for _ in range(3)]  # a burst of 2, then 1/2 s apart
        waits.append(await rate.wait_for("b", 2.0))  # another key has its own
        return waits

    first, second, third, other = asyncio.run(scenario())
    assert first == second == 0 and 0 < third <= 0.5 and other == 0


def test_a_keys_gate_lets_n_of_its_jobs_run_and_others_pass() -> None:
    import asyncio

    from serverless.tenants.limits import KeyGates

    async def scenario() -> tuple[int, list[str]]:
        gates, running, most, order = KeyGates(), {"a": 0, "b": 0}, {"a": 0, "b": 0}, []

        async def job(owner: str, name: str) -> None:
            async with gates.slot(owner, 1 if owner == "a" else 0):
                running[owner] += 1
                most[owner] = max(most[owner], running[owner])
                order.append(name)
                await asyncio.sleep(0.01)
                running[owner] -= 1

        await asyncio.gather(*(job("a", f"a{n}") for n in range(4)), job("b", "b0"))
        return most["a"], order

    most, order = asyncio.run(scenario())
    assert most == 1 and order.index("b0") <= 1  # b's job never waits behind a's queue


def test_file_usage_sums_by_hour_and_key(tmp_path: Path) -> None:
    import asyncio

    from serverless.tenants.usage import FileUsage

    async def scenario() -> dict[str, dict[str, float]]:
        usage = FileUsage(tmp_path / "usage", 7)
        await usage.count("a", {"jobs_succeeded": 1, "gpu_seconds": 1.5}, at=time.time() - 7200)
        await usage.count("a", {"jobs_succeeded": 1, "gpu_seconds": 0.5, "bytes_out": 10})
        await usage.count(None, {"jobs_failed": 1})
        recent = await usage.read(["a"], time.time() - 60)
        return {"recent": recent["a"], **await usage.read(["a", "-"], 0)}

    found = asyncio.run(scenario())
    assert found["recent"]["jobs_succeeded"] == 1 and found["recent"]["gpu_seconds"] == 0.5
    assert found["a"]["jobs_succeeded"] == 2 and found["a"]["gpu_seconds"] == 2.0 and found["a"]["bytes_out"] == 10
    assert found["-"]["jobs_failed"] == 1
