"""Opt-in: the same app against a real ComfyUI (`REAL_COMFYUI_URL=http://127.0.0.1:8188`).

Runs only when REAL_COMFYUI_URL is set, because a real ComfyUI cannot be installed by CI here
(it needs PyTorch). The workflows are model-free, so any stock ComfyUI can run them.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter

import pytest
import requests
import websocket  # websocket-client

from tests.helpers import FIXTURES, OURS, decode_image, empty_image, post_run

REAL = os.environ.get("REAL_COMFYUI_URL", "")
pytestmark = pytest.mark.skipif(not REAL, reason="set REAL_COMFYUI_URL to run against a real ComfyUI")


@pytest.fixture
def real_app(start_app):
    return start_app(REAL)


def test_model_free_workflow_runs_unchanged_on_real_comfyui(real_app):
    workflow = empty_image(width=24, height=12, color=0x00FF00, prefix="real", batch=2)
    workflow["3"] = {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    workflow["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    workflow["5"] = {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": -1, "strength": 0.3}}
    workflow["6"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "noise"}}
    # float32 pixels: 1 - c/255, times 255, truncated (tests/test_emulator_nodes.py expects the same)
    workflow["7"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0xC8417F},
    }
    workflow["8"] = {"class_type": "ImageInvert", "inputs": {"image": ["7", 0]}}
    workflow["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    response = post_run(real_app.url, workflow, params={"output_base64": "1"})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    # ComfyUI reports outputs in execution order, which it does not fix: compare them as a multiset.
    keys = Counter((r["node_id"], r["batch_id"]) for r in data["results"])
    assert keys == Counter([("2", 0), ("2", 1), ("4", 0), ("4", 1), ("6", 0), ("6", 1), ("9", 0)])
    results = {(r["node_id"], r["batch_id"]): r for r in data["results"]}
    for batch in (0, 1):
        assert decode_image(results["2", batch]).convert("RGB").getpixel((0, 0)) == (0, 255, 0)
        assert decode_image(results["4", batch]).convert("RGB").getpixel((0, 0)) == (255, 0, 255)
    assert decode_image(results["9", 0]).convert("RGB").getpixel((0, 0)) == (54, 189, 127)
    sent = requests.get(f"{REAL}/history/{data['prompt_id']}", timeout=5).json()[data["prompt_id"]]["prompt"][2]
    assert data["seeds"] == {"5": {"seed": sent["5"]["inputs"]["seed"]}}


def test_errors_and_streams_on_real_comfyui(real_app):
    refused = post_run(real_app.url, {"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert refused.status_code == 400 and refused.json()["error_code"] == "PROMPT_ERROR"
    escaping = post_run(real_app.url, empty_image(prefix="../../escape"))
    assert escaping.status_code == 400 and escaping.json()["error_code"] == "INVALID_PARAMS"  # refused by us
    # A file ComfyUI holds that is no picture: ComfyUI accepts the prompt, then LoadImage fails.
    name = f"not-an-image-{uuid.uuid4().hex[:8]}.png"
    upload = requests.post(f"{REAL}/upload/image", files={"image": (name, b"not a picture")}, timeout=10)
    assert upload.status_code == 200
    failing = {
        "1": {"class_type": "LoadImage", "inputs": {"image": upload.json()["name"]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "never"}},
    }
    failed = post_run(real_app.url, failing)
    assert failed.status_code == 500 and failed.json()["error_code"] == "EXECUTION_FAILED"
    assert failed.json()["raw"]["node_type"] == "LoadImage"
    task_id = f"real-{uuid.uuid4().hex}"
    with requests.post(
        real_app.url + "/api/serverless/run",
        params={"stream": "true"},
        json=empty_image(prefix="sse"),
        headers={"x-fc-trace-id": task_id},
        stream=True,
        timeout=60,
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith(b"data: ")]
    assert lines[-1].startswith(b'data: {"type": "serverless_api"')
    logged = requests.get(real_app.url + "/api/serverless/status", params={"task_id": task_id}, timeout=10).json()
    assert len(logged) == len(lines) and logged[-1]["type"] == "serverless_api"


def test_the_documentations_websocket_and_async_clients_on_real_comfyui(real_app):
    ws = websocket.create_connection(real_app.url.replace("http://", "ws://") + "/api/serverless/ws", timeout=60)
    ws.send(json.dumps(empty_image(prefix="real-ws")))
    types = []
    while (message := json.loads(ws.recv()))["type"] not in ("serverless_api", "error"):
        types.append(message["type"])
    ws.close()
    assert message["type"] == "serverless_api" and message["data"]["results"][0]["node_id"] == "2"
    assert next(kind for kind in types if kind not in OURS) == "status" and "executed" in types

    task_id = f"real-async-{uuid.uuid4().hex}"
    accepted = post_run(
        real_app.url,
        empty_image(prefix="real-async"),
        headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Trace-Id": task_id},
    )
    assert accepted.status_code == 202 and accepted.json() == {"task_id": task_id}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the FC documentation's poller
        items = requests.get(real_app.url + "/api/serverless/status", params={"task_id": task_id}, timeout=10).json()
        if items and items[-1]["type"] in ("serverless_api", "error"):
            break
        time.sleep(0.1)
    assert items[-1]["type"] == "serverless_api"


CKPT = os.environ.get("REAL_COMFYUI_CKPT", "")


@pytest.mark.skipif(not CKPT, reason="set REAL_COMFYUI_CKPT to a checkpoint the real ComfyUI has")
def test_comfyuis_own_websocket_through_us_sends_what_comfyui_sends_previews_too(real_app):
    """ComfyUI's example client, directly and through our `/ws`: the same frames in the same order,
    sampler previews among them (the real ComfyUI started with `--preview-method latent2rgb`; a
    step of ~1 s on CPU, so the 4-a-second throttle lets each through). Needs a checkpoint: e.g. the
    random-weight SD 1.5 files `tests/tools/make_random_sd15.py` writes (its header says how)."""

    def frames(server: str, seed: int) -> list[object]:
        client_id = str(uuid.uuid4())
        ws = websocket.create_connection(f"ws://{server}/ws?clientId={client_id}", timeout=300)
        try:
            ws.recv()  # the greeting
            workflow = json.loads((FIXTURES / "txt2img_fc_doc.json").read_text())
            workflow["3"]["inputs"].update(seed=seed, steps=4)
            workflow["4"]["inputs"]["ckpt_name"] = CKPT
            workflow["5"]["inputs"].update(width=64, height=64)
            prompt_id = str(uuid.uuid4())
            body = {"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id}
            assert requests.post(f"http://{server}/prompt", json=body, timeout=30).status_code == 200
            seen: list[object] = []
            while True:
                opcode, data = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    seen.append(("preview", bytes(data[:8]).hex()))
                    continue
                message = json.loads(data)
                kind = message["type"]
                seen.append((kind, message["data"].get("node")) if kind == "executing" else kind)
                if kind == "executing" and message["data"].get("node") is None:
                    return seen
        finally:
            ws.close()

    # Seeds of their own: a prompt ComfyUI ran before would come from its cache, without previews.
    seed = int(time.time())
    frames(REAL.removeprefix("http://"), seed)  # the checkpoint loaded: both runs then sample alike
    direct = frames(REAL.removeprefix("http://"), seed + 1)
    ours = frames(real_app.url.removeprefix("http://"), seed + 2)
    assert ours == direct
    assert direct.count(("preview", "0000000100000001")) == 4, direct  # one a step, JPEG
