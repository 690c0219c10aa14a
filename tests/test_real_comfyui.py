"""Opt-in: the same app against a real ComfyUI (`REAL_COMFYUI_URL=http://127.0.0.1:8188`).

Runs only when REAL_COMFYUI_URL is set, because a real ComfyUI cannot be installed by CI here
(it needs PyTorch). The workflows are model-free, so any stock ComfyUI can run them.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter

import pytest
import requests

from tests.helpers import decode_image, empty_image, post_run

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
    failed = post_run(real_app.url, empty_image(prefix="../../escape"))
    assert failed.status_code == 500 and failed.json()["raw"]["node_type"] == "SaveImage"
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
