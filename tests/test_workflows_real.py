"""Opt-in: hosted workflows against a real ComfyUI (`REAL_COMFYUI_URL=http://127.0.0.1:8188`),
with a model-free workflow (EmptyImage -> ImageInvert -> SaveImage), as tests/test_real_comfyui.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests

from tests.helpers import decode_image, empty_image

REAL = os.environ.get("REAL_COMFYUI_URL", "")
pytestmark = pytest.mark.skipif(not REAL, reason="set REAL_COMFYUI_URL to run against a real ComfyUI")


def test_a_hosted_model_free_workflow_registers_and_runs_on_real_comfyui(start_app, tmp_path: Path) -> None:
    app = start_app(REAL, WORKFLOWS_DIR=str(tmp_path / "workflows"))
    workflow = empty_image(width=24, height=12, color=0x00FF00, prefix="hosted-real")
    workflow["3"] = {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    workflow["2"]["inputs"]["images"] = ["3", 0]
    registered = requests.put(f"{app.url}/api/workflows/invert", data=json.dumps(workflow), timeout=30)
    assert registered.status_code == 201, registered.text
    schema = {p["name"]: p for p in registered.json()["parameters"]}
    assert schema["1.color"]["spec"]["max"] == 16777215 and schema["1.width"]["type"] == "INT"
    refused = requests.post(f"{app.url}/api/workflows/invert/run", data='{"1.width": 0}', timeout=30)
    assert refused.status_code == 400 and refused.json()["error_code"] == "INVALID_PARAMS"
    response = requests.post(
        f"{app.url}/api/workflows/invert/run",
        params={"output_base64": "1"},
        data=json.dumps({"1.color": 0xFF0000, "1.width": 8}),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["workflow_id"] == "invert"
    image = decode_image(data["results"][0]).convert("RGB")
    assert image.size == (8, 12) and image.getpixel((0, 0)) == (0, 255, 255)


def test_converted_editor_workflows_validate_in_real_comfyuis_own_prompt(start_app, tmp_path: Path) -> None:
    """Each workflow of the UI-format corpus whose classes and checkpoint the real ComfyUI has,
    converted by us, is accepted by its `/prompt` (then removed from its queue, or interrupted
    when ComfyUI already began it: its queue is empty, so it starts at once)."""
    from tests.test_uiformat import CORPUS, load  # the editor's saves (tests/fixtures/uiformat)

    app = start_app(REAL, WORKFLOWS_DIR=str(tmp_path / "workflows"))
    info = requests.get(f"{REAL}/object_info", timeout=60).json()
    checkpoints = info.get("CheckpointLoaderSimple", {}).get("input", {}).get("required", {}).get("ckpt_name", [[]])[0]
    picture = requests.post(
        f"{REAL}/upload/image",
        files={"image": ("uiformat-input.png", decode_png_bytes(), "image/png")},
        data={"overwrite": "true"},
        timeout=30,
    )
    assert picture.status_code == 200, picture.text
    validated = []
    for name in CORPUS:
        document = load(name)
        nodes = document["nodes"]
        if any(node["type"] == "CheckpointLoaderSimple" for node in nodes):
            if not checkpoints:
                continue  # this ComfyUI has no checkpoint to name
            for node in nodes:
                if node["type"] == "CheckpointLoaderSimple":
                    node["widgets_values"] = [checkpoints[0]]
        converted = requests.post(f"{app.url}/api/workflows/convert", json=document, timeout=60)
        if converted.status_code == 400 and "missing" in converted.json().get("raw", {}):
            continue  # a class this ComfyUI lacks
        assert converted.status_code == 200, (name, converted.text)
        queued = requests.post(f"{REAL}/prompt", json={"prompt": converted.json()["prompt"]}, timeout=60)
        assert queued.status_code == 200, (name, queued.text)
        requests.post(f"{REAL}/queue", json={"delete": [queued.json()["prompt_id"]]}, timeout=10)
        requests.post(f"{REAL}/interrupt", timeout=10)  # begun already: stopped before its sampler runs long
        validated.append(name)
    if not validated:
        pytest.skip("the real ComfyUI has none of the corpus's classes and models")


def decode_png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()
