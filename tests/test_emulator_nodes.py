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

import numpy as np
import pytest
import requests
import websocket
from PIL import Image

from comfyui_emulator.folders import Folders
from comfyui_emulator.nodes import NodeContext
from comfyui_emulator.nodes.loaders import LoadImageMask
from tests.servers import InProcessEmulator as Emulator

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    server = Emulator(tmp_path_factory.mktemp("emu"))
    yield server
    server.stop()


def run(
    emu: Emulator, prompt: dict[str, Any], interrupt_at_progress: int | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Queue `prompt` on its own websocket; returns its text messages and its history entry."""
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(emu.url.replace("http", "ws") + f"/ws?clientId={client_id}", timeout=20)
    try:
        ws.recv()  # status
        reply = requests.post(emu.url + "/prompt", json={"prompt": prompt, "client_id": client_id}, timeout=10)
        assert reply.status_code == 200, reply.text
        prompt_id = reply.json()["prompt_id"]
        messages: list[dict[str, Any]] = []
        while not messages or messages[-1] != {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_BINARY:
                continue  # the sampler's preview frames (tests/test_previews.py)
            messages.append(json.loads(data))
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
    return {
        "class_type": "EmptyImage",
        "inputs": {"width": width, "height": height, "batch_size": batch, "color": color},
    }


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
    assert [ref["filename"] for ref in history["outputs"]["2"]["images"]] == ["empty_00001_.png", "empty_00002_.png"]
    assert json.loads(saved[0].info["prompt"])["2"]["inputs"]["filename_prefix"] == "nodes/empty"


def test_invert_inverts(emu: Emulator) -> None:
    prompt = {
        "1": empty(8, 8, 0x102030),
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": save("2", "nodes/invert"),
    }
    _, history = run(emu, prompt)
    assert images(emu, history, "3")[0].convert("RGB").getpixel((0, 0)) == (0xEF, 0xDF, 0xCF)


def test_scale_blur_and_noise_change_the_image(emu: Emulator) -> None:
    prompt = {
        "1": empty(64, 32, 0x808080),
        "2": {
            "class_type": "ImageScale",
            "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 16, "height": 0, "crop": "disabled"},
        },
        "3": {"class_type": "ImageAddNoise", "inputs": {"image": ["2", 0], "seed": 7, "strength": 0.5}},
        "4": {"class_type": "ImageBlur", "inputs": {"image": ["3", 0], "blur_radius": 2, "sigma": 1.0}},
        "5": save("3", "nodes/noise"),
        "6": save("4", "nodes/blur"),
    }
    _, history = run(emu, prompt)
    noisy, blurred = images(emu, history, "5")[0], images(emu, history, "6")[0]
    assert noisy.size == blurred.size == (16, 8)
    assert len(noisy.getcolors(1 << 16) or []) > 10  # noise, not a flat grey
    assert noisy.tobytes() != blurred.tobytes()


def test_load_image_reads_uploads_also_from_a_subfolder(emu: Emulator) -> None:
    picture = Image.new("RGB", (12, 10), (200, 10, 60))
    upload(emu, picture, "nodes_in.png", subfolder="sub")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "sub/nodes_in.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
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
    # ComfyUI's masks: float32 v / 255, and 1 - that for alpha
    assert (red.mode, red.size, red.getpixel((0, 0))) == ("F", (6, 4), np.float32(10) / np.float32(255))
    assert alpha.getpixel((0, 0)) == 0.0
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


def comfyui_saves(pixels: np.ndarray) -> np.ndarray:
    """What ComfyUI's SaveImage writes for a float32 image: clip(255 * x) truncated to bytes."""
    return np.clip(255.0 * pixels, 0, 255).astype(np.uint8)


def comfyui_loads(picture: Image.Image) -> np.ndarray:
    """ComfyUI's LoadImage: the RGB bytes as float32 / 255."""
    return np.array(picture.convert("RGB")).astype(np.float32) / 255.0


def test_pixels_follow_comfyuis_float32_arithmetic_so_inverted_200_saves_as_54(emu: Emulator) -> None:
    every_byte = np.arange(256)
    rows = np.stack([every_byte, every_byte[::-1], (every_byte * 7) % 256], axis=-1).astype(np.uint8)
    picture = Image.fromarray(rows.reshape(1, 256, 3), "RGB")
    upload(emu, picture, "every_byte.png")
    invert = {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "every_byte.png"}},
        "2": invert,
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": save("1", "nodes/float_as_is"),
        "5": save("2", "nodes/float_inverted"),
        "6": save("3", "nodes/float_inverted_twice"),
    }
    _, history = run(emu, prompt)
    as_is, inverted, twice = (np.array(images(emu, history, node)[0].convert("RGB")) for node in "456")
    assert inverted[0, 200, 0] == 54  # 1 - 200/255 is 0.21176469 in float32; 255 times that, truncated
    assert inverted[0, 0, 0] == 255 and inverted[0, 255, 0] == 0
    loaded = comfyui_loads(picture)
    assert np.array_equal(as_is, comfyui_saves(loaded))  # bytes survive a load and a save
    assert np.array_equal(inverted, comfyui_saves(np.float32(1.0) - loaded))
    assert np.array_equal(twice, comfyui_saves(np.float32(1.0) - (np.float32(1.0) - loaded)))
    assert not np.array_equal(twice, rows.reshape(1, 256, 3))  # float32 rounding shows, as in ComfyUI


def test_empty_image_colour_is_float32_as_torch_full_makes_it(emu: Emulator) -> None:
    prompt = {
        "1": empty(4, 4, 0xC8417F),
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": save("2", "nodes/empty_inverted"),
    }
    _, history = run(emu, prompt)
    saved = np.array(images(emu, history, "3")[0].convert("RGB"))[0, 0]
    colour = np.array([0xC8, 0x41, 0x7F], dtype=np.float32) / 255.0  # torch.full(..., c / 0xFF), float32
    assert saved.tolist() == comfyui_saves(np.float32(1.0) - colour).tolist() == [54, 189, 127]  # not 255 - c


def test_preview_any_shows_any_value_as_text(emu: Emulator) -> None:
    prompt = {
        "1": empty(8, 6, 0),
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": "a caption"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": 42}},
    }
    messages, history = run(emu, prompt)
    outputs = history["outputs"]
    assert outputs["3"] == {"text": ["a caption"]} and outputs["4"] == {"text": ["42"]}
    assert outputs["2"] == {"text": ["[<IMAGE float32 [6, 8, 3]>]"]}  # ComfyUI shows torch's repr here
    executed = {m["data"]["node"]: m["data"]["output"] for m in messages if m["type"] == "executed"}
    assert executed == outputs


def test_object_info_entries_are_comfyuis(emu: Emulator) -> None:
    """Every node recorded in full from ComfyUI 0.3.64 that the emulator has is published the same."""
    recorded = json.loads((FIXTURES / "traces" / "object_info_subset.json").read_text())["full_entries"]
    published = requests.get(emu.url + "/object_info", timeout=10).json()
    shared = set(recorded) & set(published)
    assert {"PreviewAny", "EmptyImage", "SaveImage", "KSampler"} <= shared
    for name in shared - {"LoadImage"}:  # LoadImage lists the input folder
        assert published[name] == recorded[name], name


def test_model_folders_embeddings_and_the_root_page_answer_as_comfyui_does(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "checkpoints" / "sd15").mkdir(parents=True)
    (models / "checkpoints" / "sd15" / "a.safetensors").write_bytes(b"x")
    (models / "checkpoints" / "notes.txt").write_text("not a model")
    (models / "embeddings").mkdir()
    (models / "embeddings" / "easy.pt").write_bytes(b"x")
    emulator = Emulator(tmp_path / "emulator", models_dir=models)
    try:
        folders = requests.get(emulator.url + "/models", timeout=5).json()
        assert folders[0] == "checkpoints" and {"loras", "vae", "embeddings", "upscale_models"} <= set(folders)
        assert requests.get(emulator.url + "/api/models/checkpoints", timeout=5).json() == ["sd15/a.safetensors"]
        assert requests.get(emulator.url + "/models/loras", timeout=5).json() == []
        missing = requests.get(emulator.url + "/models/nope", timeout=5)
        assert missing.status_code == 404 and missing.content == b""
        assert requests.get(emulator.url + "/embeddings", timeout=5).json() == ["easy"]
        root = requests.get(emulator.url + "/", timeout=5)  # ComfyUI's frontend page; health checks ping it
        assert root.status_code == 200 and root.headers["Content-Type"].startswith("text/html")
    finally:
        emulator.stop()
