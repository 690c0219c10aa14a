"""Small helpers the end-to-end tests share: workflows and calls made the way users make them."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import requests
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
RUN = "/api/serverless/run"


def txt2img(seed: int = -1, steps: int = 4, prefix: str = "ComfyUI", size: int = 64) -> dict[str, Any]:
    """The FC documentation's text-to-image workflow, small enough to be quick."""
    workflow: dict[str, Any] = json.loads((FIXTURES / "txt2img_fc_doc.json").read_text())
    workflow["3"]["inputs"].update(seed=seed, steps=steps)
    workflow["5"]["inputs"].update(width=size, height=size)
    workflow["9"]["inputs"]["filename_prefix"] = prefix
    return workflow


def empty_image(
    width: int = 16, height: int = 16, color: int = 0, prefix: str = "test", batch: int = 1
) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": batch, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def post_run(
    base_url: str,
    body: Any,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(base_url + RUN, data=data, params=params or {}, headers=headers or {}, timeout=timeout)


def decode_image(result: dict[str, Any]) -> Image.Image:
    content = result["output"]["base64"]["content"]
    return Image.open(io.BytesIO(base64.b64decode(content)))


def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def running_prompt(comfyui_url: str) -> str | None:
    queue = requests.get(comfyui_url + "/queue", timeout=5).json()
    running = queue.get("queue_running") or []
    return running[0][1] if running else None


OURS = ("serverless_progress", "serverless_output")  # our own event types inside streams and logs


def comfyui_texts(texts: list[str]) -> list[str]:
    """The texts ComfyUI sent, without our own events between them."""
    return [text for text in texts if json.loads(text).get("type") not in OURS]


def failing_workflow(emulator_root: Path, prefix: str = "fails") -> dict[str, Any]:
    """A workflow ComfyUI accepts and then fails to run: its LoadImage names a file in the input
    folder that is not an image (node 1 fails with Pillow's "cannot identify image file")."""
    (emulator_root / "input").mkdir(parents=True, exist_ok=True)
    (emulator_root / "input" / "not-an-image.png").write_bytes(b"this is not a picture")
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "not-an-image.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }
