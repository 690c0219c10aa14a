"""POST /api/serverless/run, synchronous, end to end: app under uvicorn, emulator on a real port."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.helpers import decode_image, empty_image, failing_workflow, post_run, running_prompt, txt2img, wait_until

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_fc_doc_txt2img_returns_one_png_and_reports_the_seed_comfyui_used(app, emulator):
    response = post_run(app.url, txt2img(seed=-1), params={"output_base64": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "serverless_api"
    data = body["data"]
    assert len(data["results"]) == 1
    result = data["results"][0]
    assert result["node_id"] == "9" and result["batch_id"] == 0 and result["index"] == 0
    output = result["output"]
    assert output["type"] == "images"
    assert output["raw"]["filepath"].startswith("output/")
    assert output["raw"]["filepath"] == f"output/{output['raw']['filename']}"
    assert output["raw"]["filename"].startswith("ComfyUI_test-1_")
    content = base64.b64decode(output["base64"]["content"])
    assert content.startswith(PNG_MAGIC)
    assert output["mime"] == "image/png" and output["bytes"] == len(content)
    assert set(output["oss"]) >= {"region", "bucket", "object", "url"} and output["oss"]["object"] is None
    history = requests.get(f"{emulator.url}/history/{data['prompt_id']}", timeout=5).json()
    sent = history[data["prompt_id"]]["prompt"][2]
    assert data["seeds"] == {"3": {"seed": sent["3"]["inputs"]["seed"]}}
    assert 0 <= data["seeds"]["3"]["seed"] < 2**32
    assert data["task_id"] == data["prompt_id"]
    assert set(data["timings"]) == {"queued_s", "execution_s", "outputs_s", "total_s"}
    assert data["execution_time"] >= 0


def test_without_base64_the_content_is_null_but_size_and_type_are_known(app):
    response = post_run(app.url, empty_image(prefix="nob64"))
    output = response.json()["data"]["results"][0]["output"]
    assert output["base64"]["content"] is None
    assert output["mime"] == "image/png" and output["bytes"] > 0


def test_same_seed_same_picture_different_seed_different_picture(app):
    def picture(seed: int) -> bytes:
        body = post_run(app.url, txt2img(seed=seed), params={"output_base64": "1"}).json()
        return decode_image(body["data"]["results"][0]).tobytes()

    assert picture(11) == picture(11)
    assert picture(11) != picture(12)


def test_batch_of_three_gives_three_results_in_order(app):
    body = post_run(app.url, empty_image(batch=3, prefix="batch/b"), params={"output_base64": "1"}).json()
    results = body["data"]["results"]
    assert [r["batch_id"] for r in results] == [0, 1, 2]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert all(r["output"]["raw"]["subfolder"] == "batch" for r in results)
    assert all(r["output"]["raw"]["filepath"].startswith("output/batch/") for r in results)


def test_temp_previews_are_reported_with_their_type(app):
    workflow = empty_image(prefix="both")
    workflow["3"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    results = post_run(app.url, workflow, params={"output_base64": "1"}).json()["data"]["results"]
    kinds = {r["node_id"]: r["output"]["raw"]["type"] for r in results}
    assert kinds == {"2": "output", "3": "temp"}
    assert all(decode_image(r).size == (16, 16) for r in results)


def test_refused_prompt_is_prompt_error_with_comfyuis_node_errors(app):
    workflow = empty_image()
    del workflow["2"]["inputs"]["images"]
    response = post_run(app.url, workflow)
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error" and body["error_code"] == "PROMPT_ERROR"
    assert body["raw"]["node_errors"]["2"]["errors"][0]["type"] == "required_input_missing"
    assert "images" in body["error_message"]


def test_partly_accepted_prompt_reports_the_refused_outputs(app):
    workflow = empty_image(prefix="partial")
    workflow["3"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}
    response = post_run(app.url, workflow)
    assert response.status_code == 200
    data = response.json()["data"]
    assert [r["node_id"] for r in data["results"]] == ["2"]
    assert data["node_errors"]["3"]["errors"][0]["type"] == "required_input_missing"


def test_execution_error_is_execution_failed_naming_node_and_exception(app, emulator):
    workflow = failing_workflow(emulator.root)
    response = post_run(app.url, workflow)
    assert response.status_code == 500
    body = response.json()
    assert body["error_code"] == "EXECUTION_FAILED"
    assert body["raw"]["node_id"] == "1" and body["raw"]["node_type"] == "LoadImage"
    assert "node 1 (LoadImage)" in body["error_message"]
    assert "cannot identify image file" in body["error_message"]


def test_comfyui_not_running_is_unavailable_within_seconds(start_app, dead_url):
    server = start_app(dead_url)
    started = time.monotonic()
    response = post_run(server.url, empty_image())
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["error_code"] == "COMFYUI_UNAVAILABLE"
    assert elapsed < 10, "a dead ComfyUI must be reported at once, not at the job deadline"
    health = requests.get(server.url + "/api/serverless/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"


def test_bad_bodies_are_invalid_params(app):
    ui_format = {"last_node_id": 9, "nodes": [{"id": 1}], "links": [], "version": 0.4}
    for body in (b"{oops", b"[1, 2, 3]", json.dumps(ui_format).encode(), b""):
        response = post_run(app.url, body)
        assert response.status_code == 400, body
        payload = response.json()
        assert payload["type"] == "error" and payload["error_code"] == "INVALID_PARAMS"
        assert payload["error_message"]
    ui = post_run(app.url, ui_format).json()  # converted, and a node without a type is refused
    assert "without a type" in ui["error_message"]


def test_output_oss_without_oss_configured_is_invalid_params(app):
    response = post_run(app.url, empty_image(), params={"output_oss": "true"})
    assert response.status_code == 400
    assert "OSS" in response.json()["error_message"]


def test_malformed_task_id_header_is_invalid_params(app):
    response = post_run(app.url, empty_image(), headers={"x-fc-trace-id": "../../etc/passwd"})
    assert response.status_code == 400 and response.json()["error_code"] == "INVALID_PARAMS"


def test_twenty_concurrent_runs_each_get_exactly_their_own_outputs(app):
    def one(i: int) -> tuple[int, dict]:
        workflow = empty_image(width=8 + i, height=4 + i, color=i * 100_003 % 0xFFFFFF, prefix=f"conc{i}")
        response = post_run(app.url, workflow, params={"output_base64": "true"})
        assert response.status_code == 200, response.text
        return i, response.json()["data"]

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20)))
    assert len({data["prompt_id"] for _, data in answers}) == 20
    for i, data in answers:
        (result,) = data["results"]
        assert result["output"]["raw"]["filename"].startswith(f"conc{i}_test-1_")
        image = decode_image(result).convert("RGB")
        assert image.size == (8 + i, 4 + i)
        color = i * 100_003 % 0xFFFFFF
        assert image.getpixel((0, 0)) == ((color >> 16) & 255, (color >> 8) & 255, color & 255)


def test_job_survives_comfyui_dropping_the_websocket_mid_run(own_emulator, start_app):
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.05}, timeout=5)
    server = start_app(own_emulator.url)
    answer: dict = {}
    task_id = f"cut-{uuid.uuid4().hex}"
    thread = threading.Thread(
        target=lambda: answer.update(
            r=post_run(
                server.url, txt2img(seed=5, steps=30), params={"output_base64": "1"}, headers={"x-fc-trace-id": task_id}
            )
        )
    )
    thread.start()
    wait_until(lambda: running_prompt(own_emulator.url))
    # Mid-run: the app has had progress from ComfyUI's websocket.
    wait_until(
        lambda: any(
            item.get("type") == "progress"
            for item in requests.get(
                server.url + "/api/serverless/status", params={"task_id": task_id}, timeout=5
            ).json()
        )
    )
    requests.post(own_emulator.url + "/emulator/drop_websockets", timeout=5)
    thread.join(60)
    response = answer["r"]
    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]["results"]
    assert decode_image(result).size == (64, 64)
    assert "websocket lost" in server.log_text()


def test_deadline_gives_timeout_and_cancels_the_job_in_comfyui(own_emulator, start_app):
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.1}, timeout=5)
    server = start_app(own_emulator.url, JOB_TIMEOUT="1")
    response = post_run(server.url, txt2img(seed=1, steps=200))
    assert response.status_code == 504
    assert response.json()["error_code"] == "TIMEOUT"
    wait_until(lambda: running_prompt(own_emulator.url) is None, timeout=10)


def test_health_reports_comfyui_and_queue(app):
    response = requests.get(app.url + "/api/serverless/health", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["comfyui"]["version"] == "0.3.64"
    assert body["queue"] == {"running": 0, "pending": 0} or set(body["queue"]) == {"running", "pending"}
    assert isinstance(body["jobs"], int)
