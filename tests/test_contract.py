"""The contract, on every topology: each test runs once on one box and once through a gateway and
two workers (`tests.topologies`), driven by the clients our users run (FC's documented HTTP, SSE
and websocket clients, GenStudio's tutorial client) and by plain HTTP. A feature is done when both
pass: a caller cannot tell which one answered, but for speed."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import websocket  # websocket-client
from PIL import Image, ImageChops

from tests.helpers import FIXTURES, OURS, RUN, empty_image, post_run, txt2img, wait_until
from tests.test_stream import payloads, read_events
from tests.test_webhooks import SECRET as WEBHOOK_SECRET
from tests.test_webhooks import Receiver, verify
from tests.test_websocket import ws_url
from tests.topologies import Deployment

pytestmark = pytest.mark.timeout(120)

Deploy = Callable[..., Deployment]
LINK_SECRET = "contract-link-secret"
STATUS, TASK, CANCEL, EVENTS = (
    "/api/serverless/status",
    "/api/serverless/task",
    "/api/serverless/cancel",
    "/api/serverless/events",
)


def status(url: str, task_id: str) -> list[dict[str, Any]]:
    answer = requests.get(url + STATUS, params={"task_id": task_id}, timeout=10)
    assert answer.status_code == 200, answer.text
    return list(answer.json())


def ended(url: str, task_id: str, timeout: float = 60) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        logged = status(url, task_id)
        return logged if logged and logged[-1]["type"] in ("serverless_api", "error") else None

    return list(wait_until(done, timeout=timeout, interval=0.05))


def only_result(answer: dict[str, Any]) -> dict[str, Any]:
    (result,) = answer["data"]["results"]
    output: dict[str, Any] = result["output"]
    return output


def slow(seed: int, steps: int = 40) -> dict[str, Any]:
    """A job that samples for `steps` x the step delay (0.05 s: 2 s by default)."""
    return txt2img(seed=seed, steps=steps, prefix=f"slow{seed}")


# -- FC's documented clients ----------------------------------------------------------------------------


def test_sync_with_base64_gives_the_image_comfyui_wrote(deployment: Deploy) -> None:
    deployed = deployment()
    answer = post_run(deployed.url, txt2img(seed=-1), params={"output_base64": "true"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["type"] == "serverless_api" and set(body["data"]["seeds"]) == {"3"}  # -1: a seed drawn
    output = only_result(body)
    content = base64.b64decode(output["base64"]["content"])
    (written,) = deployed.output_files(output["raw"]["filename"])
    assert content == written.read_bytes(), "byte for byte what ComfyUI saved"
    assert output["mime"] == "image/png" and output["bytes"] == len(content)


def test_fc_doc_streaming_client_gets_progress_then_the_result(deployment: Deploy) -> None:
    url, workflow = deployment().url, txt2img(seed=-1, steps=4)
    types = []
    # The FC documentation's client, unchanged.
    resp = requests.post(url + "/api/serverless/run?stream=true", json=workflow, stream=True)
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            payload = json.loads(line[6:])
            types.append(payload["type"])
            if payload["type"] == "serverless_api":
                break
    resp.close()
    assert types[0] == "serverless_progress"
    types = [kind for kind in types if kind not in OURS]
    assert types[0] == "status" and types[-1] == "serverless_api"
    assert types.count("progress") == 4
    assert {"execution_start", "executing", "executed", "execution_success"} <= set(types)


def test_a_stream_numbers_its_events_and_its_log_holds_the_same(deployment: Deploy) -> None:
    url = deployment().url
    with requests.post(
        url + RUN, params={"stream": "true"}, json=txt2img(steps=3), headers={"X-Fc-Trace-Id": "s1"}, stream=True
    ) as response:
        events = list(read_events(response))
    received = [event for event in events if event.data is not None]
    assert [int(event.id or 0) for event in received] == list(range(1, len(received) + 1))
    assert ended(url, "s1") == payloads(received)


def test_the_moment_a_caller_has_its_jobs_end_the_status_log_ends_with_it(deployment: Deploy) -> None:
    """Read your writes: a caller who had a job's end from its stream or its sync answer finds it
    at the end of the task's status log when it asks next, however soon; a task it did not name
    too (its id read from the stream or the answer: its end is not held back for the log)."""
    url = deployment(step_delay=0).url
    for number in range(8):
        params = {"stream": "true"} if number % 2 else {}
        with requests.post(url + RUN, params=params, json=txt2img(steps=2), stream=True, timeout=60) as response:
            if params:
                last = payloads([event for event in read_events(response) if event.data is not None])[-1]
            else:
                last = response.json()
        assert last["type"] == "serverless_api", last
        logged = status(url, last["data"]["task_id"])
        assert logged and logged[-1] == last, (number, logged[-1:])


def test_fc_doc_websocket_client_gets_progress_then_the_result(deployment: Deploy) -> None:
    url, workflow = ws_url(deployment().url), txt2img(seed=-1, steps=4)
    messages: list[dict[str, Any]] = []
    closed: list[Any] = []

    # The FC documentation's client, unchanged.
    def on_message(ws, message):  # type: ignore[no-untyped-def]
        data = json.loads(message)
        messages.append(data)
        if data["type"] == "serverless_api":
            ws.close()

    def on_close(ws, close_status_code, close_msg):  # type: ignore[no-untyped-def]
        closed.append(close_status_code)

    ws = websocket.WebSocketApp(
        url, on_open=lambda ws: ws.send(json.dumps(workflow)), on_message=on_message, on_close=on_close
    )
    ws.run_forever()
    types = [message["type"] for message in messages if message["type"] not in OURS]
    assert types[0] == "status" and types[-1] == "serverless_api"
    assert types.count("progress") == 4 and closed


def test_an_async_job_answers_at_once_and_its_status_ends_with_the_result(deployment: Deploy) -> None:
    url = deployment().url
    headers = {"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": "later-1"}
    answer = post_run(url, txt2img(seed=3), params={"output_base64": "true"}, headers=headers)
    assert answer.status_code == 202 and answer.json() == {"task_id": "later-1"}
    logged = ended(url, "later-1")
    assert logged[0]["type"] == "serverless_progress" and logged[-1]["type"] == "serverless_api"
    assert base64.b64decode(only_result(logged[-1])["base64"]["content"]).startswith(b"\x89PNG")


def test_a_sync_job_nobody_named_keeps_comfyuis_status_broadcasts_out_of_its_log(deployment: Deploy) -> None:
    url = deployment().url
    answer = post_run(url, txt2img(seed=4, steps=2))
    assert answer.status_code == 200, answer.text
    kinds = [payload["type"] for payload in ended(url, answer.json()["data"]["task_id"])]
    assert kinds[-1] == "serverless_api" and {"execution_start", "executed"} <= set(kinds), kinds
    assert "status" not in kinds, "seen only in its answer: its log holds the job's own messages"


# -- delivery ---------------------------------------------------------------------------------------


def test_output_format_converts_the_image(deployment: Deploy) -> None:
    url = deployment().url
    params = {"output_base64": "true", "output_format": "jpeg", "output_quality": "80", "output_max_side": "32"}
    output = only_result(post_run(url, txt2img(size=64), params=params).json())
    picture = Image.open(io.BytesIO(base64.b64decode(output["base64"]["content"])))
    assert (picture.format, picture.size, output["mime"]) == ("JPEG", (32, 32), "image/jpeg")


def test_download_links_serve_the_output_from_where_the_caller_is(deployment: Deploy) -> None:
    url = deployment(FILE_LINK_SECRET=LINK_SECRET).url
    params = {"output_url": "true", "output_base64": "true"}
    output = only_result(post_run(url, txt2img(seed=5), params=params).json())
    assert output["url"].startswith(url + "/api/files/")
    fetched = requests.get(output["url"], timeout=10)
    assert fetched.status_code == 200 and fetched.content == base64.b64decode(output["base64"]["content"])
    ranged = requests.get(output["url"], headers={"Range": "bytes=0-7"}, timeout=10)
    assert ranged.status_code == 206 and ranged.content == b"\x89PNG\r\n\x1a\n"
    converted = only_result(post_run(url, txt2img(seed=5), params={**params, "output_format": "webp"}).json())
    served = requests.get(converted["url"], timeout=10)
    assert served.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(served.content)).format == "WEBP"


def test_a_webhook_posts_the_terminal_payload_once_signed_and_task_shows_how_it_went(deployment: Deploy) -> None:
    receiver = Receiver()
    try:
        url = deployment(WEBHOOK_ALLOWED_HOSTS="127.0.0.1", WEBHOOK_SECRET=WEBHOOK_SECRET).url
        answer = post_run(
            url,
            empty_image(prefix="hooked"),
            params={"callback_url": receiver.url},
            headers={"X-Fc-Trace-Id": "hook-1"},
        )
        assert answer.status_code == 200, answer.text
        wait_until(lambda: receiver.received, timeout=30)
        ((headers, body),) = receiver.received
        assert json.loads(body) == answer.json() and headers["x-serverless-task-id"] == "hook-1"
        assert verify(headers, body)
        summary = wait_until(
            lambda: requests.get(url + TASK, params={"task_id": "hook-1"}, timeout=10).json().get("webhook")
        )
        assert summary["delivered"] is True and summary["attempts"] == 1 and summary["url_host"] == "127.0.0.1"
        time.sleep(0.3)
        assert len(receiver.received) == 1, "delivered once"
    finally:
        receiver.close()


# -- hosted workflows ---------------------------------------------------------------------------------


def test_a_hosted_workflow_registers_describes_and_runs(deployment: Deploy) -> None:
    url = deployment().url
    workflow = json.loads((FIXTURES / "txt2img_fc_doc.json").read_text())
    put = requests.put(url + "/api/workflows/t2i", data=json.dumps(workflow), timeout=30)
    assert put.status_code in (200, 201), put.text
    described = requests.get(url + "/api/workflows/t2i", timeout=10).json()
    assert "3.seed" in json.dumps(described)
    assert requests.get(url + "/api/workflows/t2i/openapi.json", timeout=10).json()["openapi"].startswith("3.")
    overrides = {"3": {"inputs": {"seed": 11, "steps": 2}}, "5": {"inputs": {"width": 64, "height": 64}}}
    answer = requests.post(url + "/api/workflows/t2i/run", json={"prompt": overrides}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["workflow_id"] == "t2i"


# -- job control ------------------------------------------------------------------------------------


def test_a_running_job_cancelled_ends_interrupted_and_a_second_cancel_is_a_conflict(deployment: Deploy) -> None:
    deployed = deployment(step_delay=0.05)
    url = deployed.url
    headers = {"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": "stop-me"}
    assert post_run(url, slow(1), headers=headers).status_code == 202
    wait_until(
        lambda: requests.get(url + TASK, params={"task_id": "stop-me"}, timeout=10).json().get("state") == "running",
        timeout=30,
    )
    cancelled = requests.post(url + CANCEL, params={"task_id": "stop-me"}, timeout=10)
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelling"
    assert ended(url, "stop-me")[-1]["error_code"] == "EXECUTION_INTERRUPTED"
    again = requests.post(url + CANCEL, params={"task_id": "stop-me"}, timeout=10)
    assert again.status_code == 409 and again.json()["raw"]["state"] == "cancelled"
    assert requests.post(url + CANCEL, params={"task_id": "nobody"}, timeout=10).status_code == 404


def test_events_resume_after_the_last_seen_id(deployment: Deploy) -> None:
    url = deployment().url
    assert post_run(url, txt2img(steps=3), headers={"X-Fc-Trace-Id": "resume-1"}).status_code == 200
    logged = ended(url, "resume-1")
    with requests.get(
        url + EVENTS, params={"task_id": "resume-1"}, headers={"Last-Event-ID": "3"}, stream=True, timeout=30
    ) as response:
        resumed = [event for event in read_events(response) if event.data is not None]
    assert [int(event.id or 0) for event in resumed] == list(range(4, len(logged) + 1))
    assert payloads(resumed) == logged[3:]
    summary = requests.get(url + TASK, params={"task_id": "resume-1"}, timeout=10).json()
    assert summary["state"] == "succeeded" and summary["result"] == logged[-1]


def test_a_stream_with_nothing_to_say_yet_gets_its_head_at_once(deployment: Deploy) -> None:
    """A resumed stream of a job waiting silently behind others gets its head at once, not with a
    next event that is seconds away (nor with the first ping, 15 s): its caller knows it is
    connected."""
    url = deployment(step_delay=0.05).url
    ahead = [f"head-ahead-{seed}" for seed in range(2)]  # a fleet's two workers take one each (a box: one)
    for seed, task_id in enumerate(ahead):
        headers = {"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": task_id}
        assert post_run(url, slow(seed, steps=400), headers=headers).status_code == 202  # 20 s each
    async_headers = {"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": "head-behind"}
    assert post_run(url, slow(9), headers=async_headers).status_code == 202

    def state(task_id: str) -> str:
        return str(requests.get(url + TASK, params={"task_id": task_id}, timeout=10).json().get("state"))

    wait_until(lambda: any(state(task_id) == "running" for task_id in ahead), timeout=30)
    seen = len(status(url, "head-behind"))
    assert state("head-behind") == "queued"
    started = time.monotonic()
    with requests.get(
        url + EVENTS, params={"task_id": "head-behind"}, headers={"Last-Event-ID": str(seen)}, stream=True, timeout=30
    ) as response:
        waited = time.monotonic() - started
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert waited < 5, f"the head came after {waited:.1f}s: it waited for an event"
    assert state("head-behind") == "queued"  # so no event of its could have brought the head
    for task_id in [*ahead, "head-behind"]:  # not left to run out at teardown
        requests.post(url + CANCEL, params={"task_id": task_id}, timeout=10)


def test_a_caller_that_hangs_up_cancels_its_job(deployment: Deploy) -> None:
    deployed = deployment(step_delay=0.05)
    response = requests.post(
        deployed.url + RUN, params={"stream": "true"}, json=slow(2), headers={"X-Fc-Trace-Id": "hang-up"}, stream=True
    )
    for event in read_events(response):
        if event.data is not None and '"execution_start"' in event.data:
            break
    response.close()  # the caller goes away mid-job
    assert ended(deployed.url, "hang-up")[-1]["error_code"] == "EXECUTION_INTERRUPTED"


def test_a_sync_caller_that_hangs_up_cancels_its_job_and_the_job_logs_its_end(deployment: Deploy) -> None:
    """A sync caller waits for its answer on the open request; gone mid-job, the job is cancelled
    (CANCEL_ON_DISCONNECT is on by default) and its status log still ends with its terminal payload."""
    deployed = deployment(step_delay=0.05)
    url = urlsplit(deployed.url)
    body = json.dumps(slow(3)).encode()
    head = (
        f"POST {RUN} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"X-Fc-Trace-Id: sync-hang-up\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=10) as caller:
        caller.sendall(head.encode() + body)
        wait_until(lambda: any(p.get("type") == "execution_start" for p in status(deployed.url, "sync-hang-up")))
    logged = ended(deployed.url, "sync-hang-up")  # the caller went away mid-job
    assert logged[-1].get("error_code") == "EXECUTION_INTERRUPTED", logged[-1]


def test_an_idempotency_key_sent_twice_runs_the_job_once(deployment: Deploy) -> None:
    url = deployment().url
    first = post_run(url, txt2img(seed=9), headers={"Idempotency-Key": "once-1"})
    second = post_run(url, txt2img(seed=9), headers={"Idempotency-Key": "once-1"})
    assert first.status_code == second.status_code == 200
    assert first.json()["data"]["prompt_id"] == second.json()["data"]["prompt_id"]
    other = post_run(url, txt2img(seed=10), headers={"Idempotency-Key": "once-1"})
    assert other.status_code == 409


# -- operations ----------------------------------------------------------------------------------------


def test_ready_answers_with_the_admission_figures(deployment: Deploy) -> None:
    url = deployment().url
    ready = requests.get(url + "/api/serverless/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready" and "jobs" in ready.json()


def test_past_its_admission_limit_a_job_is_refused_busy_with_retry_after(deployment: Deploy, topology: str) -> None:
    limit = {"MAX_PENDING_JOBS": "1"} if topology == "box" else {"MAX_QUEUED_JOBS": "1"}
    url = deployment(step_delay=0.05, **limit).url
    answers = []
    for seed in range(8):  # a box admits 2, a fleet 2 running + 1 queued: the rest are refused
        headers = {"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": f"many-{seed}"}
        answers.append(post_run(url, slow(seed), headers=headers))
        if answers[-1].status_code == 503:
            break
    refused = answers[-1]
    assert refused.status_code == 503 and refused.json()["error_code"] == "BUSY", [a.status_code for a in answers]
    assert int(refused.headers["Retry-After"]) > 0
    assert all(answer.status_code == 202 for answer in answers[:-1])
    ready = requests.get(url + "/api/serverless/ready", timeout=10)
    if topology == "box":  # a load balancer sends the next job to another box
        assert ready.status_code == 503 and "full" in ready.json()["reason"]
    else:  # the queue is every gateway's: each stays in its load balancer, answering BUSY itself
        assert ready.status_code == 200 and ready.json()["queue_full"] is True
    for seed in range(len(answers) - 1):  # the admitted jobs: not left to run out at teardown
        requests.post(url + CANCEL, params={"task_id": f"many-{seed}"}, timeout=10)


def test_a_job_waiting_behind_others_is_told_its_place(deployment: Deploy) -> None:
    url = deployment(step_delay=0.05).url
    for seed in range(4):  # a fleet's two workers take two; a box's ComfyUI runs one
        headers = {"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": f"place-{seed}"}
        assert post_run(url, slow(seed), headers=headers).status_code == 202
    summary = wait_until(
        lambda: (
            (s := requests.get(url + TASK, params={"task_id": "place-3"}, timeout=10).json()).get("queue_position")
            and s
        ),
        timeout=30,
    )
    assert summary["state"] == "queued" and summary["queue_position"] >= 1
    for seed in range(4):  # not left to run out at teardown
        requests.post(url + CANCEL, params={"task_id": f"place-{seed}"}, timeout=10)


def test_metrics_count_jobs_and_refused_prompts(deployment: Deploy) -> None:
    url = deployment().url
    assert post_run(url, empty_image()).status_code == 200
    refused = post_run(url, {"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert refused.status_code == 400 and refused.json()["error_code"] in ("PROMPT_ERROR", "INVALID_PARAMS")
    text = requests.get(url + "/metrics", timeout=10).text
    assert 'serverless_jobs_ended_total{outcome="ok",transport="sync"} 1.0' in text
    if refused.json()["error_code"] == "PROMPT_ERROR":
        assert "serverless_prompt_refusals_total 1.0" in text


# -- GenStudio ----------------------------------------------------------------------------------------


JSON_ENDPOINTS = [
    ("POST", RUN),
    ("POST", "/api/workflows/convert"),
    ("PUT", "/api/workflows/contract-wf"),
    ("PUT", "/api/workflows/contract-wf/aliases/stable"),
    ("POST", "/api/models"),
    ("PUT", "/api/models/checkpoints/any.safetensors/pin"),
    ("POST", "/api/batches"),
    ("POST", "/api/maas/comfy_task_api/prompt"),
    ("POST", "/api/maas/comfy_task_api/get_task_info"),
    ("POST", "/api/maas/comfy_task_api/cancel"),
    ("POST", "/prompt"),
    ("POST", "/api/prompt"),
    ("POST", "/queue"),
    ("POST", "/interrupt"),
    ("POST", "/history"),
    ("POST", "/api/v2/jobs"),
    ("POST", "/api/v2/assets/from-hash"),
]


def test_every_endpoint_that_takes_json_refuses_a_body_it_cannot_read_with_a_clear_error(deployment: Deploy) -> None:
    """JSON nested deeper than a parser goes, and text that is not JSON: every endpoint that takes a
    JSON body answers with its own 4xx naming what is wrong, never a 500, and the caller's kept-alive
    connection serves its next request."""
    deployed = deployment()
    bodies = {
        "nested too deeply": '{"prompt": ' + "[" * 20_000 + "]" * 20_000 + "}",  # within every size limit
        "not valid JSON": '{"prompt": {"1": ',
    }
    with requests.Session() as session:  # one connection, kept alive from request to request
        for method, path in JSON_ENDPOINTS:
            for said, body in bodies.items():
                answer = session.request(
                    method, deployed.url + path, data=body, headers={"content-type": "application/json"}, timeout=30
                )
                # GenStudio's API answers its errors with HTTP 200 and the status in `code`, as documented
                status = answer.json()["code"] if path.startswith("/api/maas/") else answer.status_code
                assert 400 <= status < 500, (method, path, said, answer.status_code, answer.text[:300])
                assert said in answer.text, (method, path, answer.text[:300])
        assert session.get(deployed.url + "/api/serverless/health", timeout=10).status_code == 200


def test_genstudio_prompt_then_task_info_gives_the_files(deployment: Deploy) -> None:
    url = deployment(FILE_LINK_SECRET=LINK_SECRET).url
    workflow = json.loads((FIXTURES / "txt2img_fc_doc.json").read_text())
    assert requests.put(url + "/api/workflows/wf-t2i", data=json.dumps(workflow), timeout=30).status_code in (200, 201)
    api = url + "/api/maas/comfy_task_api"
    prompt = {"3": {"inputs": {"seed": 1, "steps": 2}}, "5": {"inputs": {"width": 64, "height": 64}}}
    queued = requests.post(api + "/prompt", json={"workflow_id": "wf-t2i", "prompt": prompt}, timeout=30).json()
    assert queued["code"] == 0, queued
    task_id = queued["data"]["prompt_id"]

    def done() -> dict[str, Any] | None:
        answer = requests.post(api + "/get_task_info", json={"comfy_task_ids": [task_id]}, timeout=10).json()
        (entry,) = answer["data"]["comfy_task_info"]
        return entry if entry["status"] >= 3 else None

    entry = wait_until(done, timeout=60)
    assert entry["status"] == 3 and entry["progress_num"] == 100
    downloaded = requests.get(entry["final_files"][0], timeout=30)
    assert downloaded.status_code == 200 and Image.open(io.BytesIO(downloaded.content)).size == (64, 64)


def test_genstudios_documented_txt2img_client_runs_unchanged(
    deployment: Deploy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.test_genstudio import KEY_A, T2I, doc_client

    deployed = deployment(FILE_LINK_SECRET=LINK_SECRET, API_KEYS=KEY_A)
    workflow = json.loads((FIXTURES / "txt2img_fc_doc.json").read_text())
    registered = requests.put(
        f"{deployed.url}/api/workflows/{T2I}", data=json.dumps(workflow), headers={"Authorization": f"Bearer {KEY_A}"}
    )
    assert registered.status_code in (200, 201), registered.text
    client = doc_client(deployed, monkeypatch, tmp_path)  # type: ignore[arg-type]
    # The tutorial's cells, in order.
    base_workflow_prompt = client.get_prompt_json_body(client.api_params_by_genstudio)
    client.id_to_class_type = client.get_id_to_class_type_map(client.COMFY_T2I_WORKFLOW_API_JSON_PATH)
    _modified, prompt_id = client.prompt_to_image(
        prompt=base_workflow_prompt,
        positive_prompt="a lighthouse at dusk",
        negative_prompt="ugly, deformed",
        output_path=str(tmp_path / "output"),
        save_previews=True,
    )
    assert prompt_id, "the client reported a failure (see the captured output)"
    (saved,) = sorted((tmp_path / "output" / "9").iterdir())
    assert Image.open(saved).size == (512, 512)
    (entry,) = client.get_task_info([prompt_id])["data"]["comfy_task_info"]
    assert entry["status"] == 3 and entry["final_files"] == entry["files"]["9"]
    downloaded = requests.get(entry["final_files"][0], timeout=30)
    assert downloaded.status_code == 200
    served, kept = Image.open(io.BytesIO(downloaded.content)).convert("RGB"), Image.open(saved).convert("RGB")
    assert ImageChops.difference(served, kept).getbbox() is None, "the same picture the client saved"
