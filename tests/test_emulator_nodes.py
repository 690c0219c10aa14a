"""The emulator's nodes really compute: images are PNGs of the right size and content, the
text-to-image chain is deterministic per seed, and KSampler reports (and stops at) its steps."""

from __future__ import annotations

import io
import json
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from PIL import Image

from serverless.emulator.folders import Folders
from serverless.emulator.nodes import NodeContext
from serverless.emulator.nodes.loaders import LoadImageMask
from tests.servers import InProcessEmulator as Emulator

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    server = Emulator(tmp_path_factory.mktemp("emu"))
    yield server
    server.stop()


def run(emu: Emulator, prompt: dict[str, Any], interrupt_at_progress: int | None = None
        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Queue `prompt` on its own websocket; returns its messages and its history entry."""
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(emu.url.replace("http", "ws") + f"/ws?clientId={client_id}", timeout=20)
    try:
        ws.recv()  # status
        reply = requests.post(emu.url + "/prompt", json={"prompt": prompt, "client_id": client_id}, timeout=10)
        assert reply.status_code == 200, reply.text
        prompt_id = reply.json()["prompt_id"]
        messages: list[dict[str, Any]] = []
        while not messages or messages[-1] != {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}:
            messages.append(json.loads(ws.recv()))
            if messages[-1]["type"] == "progress" and messages[-1]["data"]["value"] == interrupt_at_progress:
                requests.post(emu.url + "/interrupt", json={"prompt_id": prompt_id}, timeout=10)
    finally:
        ws.close()
    return messages, requests.get(f"{emu.url}/history/{prompt_id}", timeout=10).json()[prompt_id]


def images(emu: Emulator, history: dict[str, Any], node: str) -> list[Image.Image]:
    """The node's output images, fetched through /view and decoded."""
    decoded: list[Image.Image] = []
    for ref in history["outputs"][node]["images"]:
        reply = requests.get(emu.url + "/view", params=ref, timeout=10)
        assert reply.status_code == 200 and reply.headers["Content-Type"] == "image/png"
        decoded.append(Image.open(io.BytesIO(reply.content)))
    return decoded


def empty(width: int, height: int, color: int, batch: int = 1) -> dict[str, Any]:
    return {"class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": batch, "color": color}}


def save(source: str, prefix: str) -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": [source, 0], "filename_prefix": prefix}}


def txt2img(seed: int, steps: int, prefix: str) -> dict[str, Any]:
    workflow: dict[str, Any] = json.loads((FIXTURES / "txt2img_fc_doc.json").read_text())
    workflow["3"]["inputs"].update(seed=seed, steps=steps)
    workflow["5"]["inputs"].update(width=64, height=48)
    workflow["9"]["inputs"]["filename_prefix"] = prefix
    return workflow


def upload(emu: Emulator, image: Image.Image, name: str, subfolder: str = "") -> dict[str, Any]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    files = {"image": (name, buffer.getvalue(), "image/png")}
    reply = requests.post(emu.url + "/upload/image", files=files, data={"subfolder": subfolder}, timeout=10)
    assert reply.status_code == 200
    return dict(reply.json())


def test_empty_image_batch_is_saved_as_pngs_of_its_size_and_colour(emu: Emulator) -> None:
    _, history = run(emu, {"1": empty(40, 24, 0x123456, batch=2), "2": save("1", "nodes/empty")})
    saved = images(emu, history, "2")
    assert [im.size for im in saved] == [(40, 24), (40, 24)]
    assert [im.convert("RGB").getpixel((5, 5)) for im in saved] == [(0x12, 0x34, 0x56)] * 2
    assert [ref["filename"] for ref in history["outputs"]["2"]["images"]] == ["empty_00001_.png",
                                                                            "empty_00002_.png"]
    assert json.loads(saved[0].info["prompt"])["2"]["inputs"]["filename_prefix"] == "nodes/empty"


def test_invert_inverts(emu: Emulator) -> None:
    prompt = {"1": empty(8, 8, 0x102030), "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
              "3": save("2", "nodes/invert")}
    _, history = run(emu, prompt)
    assert images(emu, history, "3")[0].convert("RGB").getpixel((0, 0)) == (0xEF, 0xDF, 0xCF)


def test_scale_blur_and_noise_change_the_image(emu: Emulator) -> None:
    prompt = {
        "1": empty(64, 32, 0x808080),
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                     "width": 16, "height": 0, "crop": "disabled"}},
        "3": {"class_type": "ImageAddNoise", "inputs": {"image": ["2", 0], "seed": 7, "strength": 0.5}},
        "4": {"class_type": "ImageBlur", "inputs": {"image": ["3", 0], "blur_radius": 2, "sigma": 1.0}},
        "5": save("3", "nodes/noise"), "6": save("4", "nodes/blur"),
    }
    _, history = run(emu, prompt)
    noisy, blurred = images(emu, history, "5")[0], images(emu, history, "6")[0]
    assert noisy.size == blurred.size == (16, 8)
    assert len(noisy.getcolors(1 << 16) or []) > 10  # noise, not a flat grey
    assert noisy.tobytes() != blurred.tobytes()


def test_load_image_reads_uploads_also_from_a_subfolder(emu: Emulator) -> None:
    picture = Image.new("RGB", (12, 10), (200, 10, 60))
    upload(emu, picture, "nodes_in.png", subfolder="sub")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "sub/nodes_in.png"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    _, history = run(emu, prompt)
    ref = history["outputs"]["2"]["images"][0]
    assert ref["type"] == "temp" and re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", ref["filename"])
    assert images(emu, history, "2")[0].convert("RGB").tobytes() == picture.tobytes()


def test_load_image_mask_takes_one_channel(tmp_path: Path) -> None:
    # No emulated node consumes a MASK, so no valid prompt can reach LoadImageMask: call it directly.
    folders = Folders(tmp_path)
    folders.prepare()
    Image.new("RGBA", (6, 4), (10, 20, 30, 255)).save(Path(folders.input, "m.png"))
    node = LoadImageMask(folders)
    ctx = NodeContext("1", "p", folders, lambda: 0.0, threading.Event(), lambda value, total: None)
    red = node.run(ctx, image="m.png", channel="red").values[0][0]
    alpha = node.run(ctx, image="m.png", channel="alpha").values[0][0]
    assert (red.size, red.getpixel((0, 0)), alpha.getpixel((0, 0))) == ((6, 4), 10, 0)
    assert LoadImageMask.validate(folders, image="nope.png") == "Invalid image file: nope.png"


def test_txt2img_is_deterministic_per_seed_and_reports_every_step(emu: Emulator) -> None:
    first_messages, first = run(emu, txt2img(seed=1, steps=3, prefix="nodes/t2i_a"))
    _, other_seed = run(emu, txt2img(seed=2, steps=3, prefix="nodes/t2i_b"))
    again_messages, again = run(emu, txt2img(seed=1, steps=3, prefix="nodes/t2i_c"))
    one, two, three = (images(emu, h, "9")[0] for h in (first, other_seed, again))
    assert one.size == (64, 48)
    assert one.tobytes() == three.tobytes() != two.tobytes()
    for messages in (first_messages, again_messages):  # the third run re-samples (cache evicted)
        steps = [m["data"] for m in messages if m["type"] == "progress"]
        assert [(s["value"], s["max"], s["node"]) for s in steps] == [(1, 3, "3"), (2, 3, "3"), (3, 3, "3")]
    executing = [m["data"]["node"] for m in first_messages if m["type"] == "executing"]
    assert executing == ["4", "5", "7", "6", "3", "8", "9", None]  # ComfyUI's order for this graph
    executing = [m["data"]["node"] for m in again_messages if m["type"] == "executing"]
    assert executing == ["3", "8", "9", None]  # loader, prompts and latent cached from the 2nd run


def test_interrupt_between_sampler_steps_stops_it_as_in_trace_p(emu: Emulator) -> None:
    messages, history = run(emu, txt2img(seed=3, steps=200, prefix="nodes/stopped"), interrupt_at_progress=2)
    types = [m["type"] for m in messages]
    assert types[-3:] == ["execution_interrupted", "status", "executing"]
    assert types[-5:-3] == ["progress_state", "progress"]
    assert sum(t == "progress" for t in types) < 200
    interrupted = messages[-3]["data"]
    assert (interrupted["node_id"], interrupted["node_type"]) == ("3", "KSampler")
    assert history["status"]["status_str"] == "error" and history["status"]["completed"] is False


def test_view_converts_on_request(emu: Emulator) -> None:
    _, history = run(emu, {"1": empty(10, 10, 0x00FF00), "2": save("1", "nodes/view")})
    ref = history["outputs"]["2"]["images"][0]
    jpeg = requests.get(emu.url + "/view", params={**ref, "preview": "jpeg;80"}, timeout=10)
    assert jpeg.headers["Content-Type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"
    alpha = requests.get(emu.url + "/view", params={**ref, "channel": "a"}, timeout=10)
    assert Image.open(io.BytesIO(alpha.content)).mode == "RGBA"
