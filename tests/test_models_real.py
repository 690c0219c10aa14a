"""Opt-in: a model the store places appears in a real ComfyUI's own `/object_info`.

Runs only when REAL_COMFYUI_URL is set and REAL_COMFYUI_MODELS_DIR names that ComfyUI's models
folder (the app must write there): e.g. `REAL_COMFYUI_URL=http://127.0.0.1:8188
REAL_COMFYUI_MODELS_DIR=/opt/ComfyUI/models`. The model is a small valid safetensors file placed
as a LoRA (nothing loads it), and deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers import wait_until
from tests.model_server import ModelServer, safetensors

REAL = os.environ.get("REAL_COMFYUI_URL", "")
MODELS = os.environ.get("REAL_COMFYUI_MODELS_DIR", "")
pytestmark = pytest.mark.skipif(
    not (REAL and MODELS), reason="set REAL_COMFYUI_URL and REAL_COMFYUI_MODELS_DIR to run against a real ComfyUI"
)


@pytest.fixture
def files() -> Iterator[ModelServer]:
    server = ModelServer()
    yield server
    server.stop()


def test_a_placed_model_appears_in_real_comfyuis_object_info(start_app, files: ModelServer, tmp_path: Path) -> None:
    name = f"serverless-test-{uuid.uuid4().hex[:8]}.safetensors"
    url = files.add(name, safetensors(4096))
    app = start_app(REAL, MODELS_DIR=MODELS, MODEL_CACHE_DIR=str(tmp_path / "cache"), MODEL_ALLOWED_HOSTS="127.0.0.1")
    started = requests.post(app.url + "/api/models", json={"source": url, "folder": "loras"}, timeout=30)
    assert started.status_code == 202, started.text
    task_id = started.json()["task_id"]

    def state() -> str | None:
        return requests.get(app.url + "/api/serverless/task", params={"task_id": task_id}, timeout=10).json()["state"]

    wait_until(lambda: state() in ("succeeded", "failed"), timeout=60)
    assert state() == "succeeded"
    try:
        info = requests.get(f"{REAL}/object_info/LoraLoader", timeout=30).json()
        assert name in info["LoraLoader"]["input"]["required"]["lora_name"][0]
    finally:
        assert requests.delete(f"{app.url}/api/models/loras/{name}", timeout=30).status_code == 200
    info = requests.get(f"{REAL}/object_info/LoraLoader", timeout=30).json()
    assert name not in info["LoraLoader"]["input"]["required"]["lora_name"][0]
