"""The GenStudio-compatible API (`/api/maas/...`) through real servers: the app under uvicorn, the
ComfyUI emulator, and for OSS the local OSS server. The client is GenStudio's own tutorial code
(tests/genstudio_doc_client.py), changed only in its base URL and key."""

from __future__ import annotations

import base64
import hmac
import importlib
import io
import itertools
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import websocket  # websocket-client
from PIL import Image, ImageChops

from serverless.genstudio import token
from serverless.genstudio.endpoints import TOKEN_KEY
from tests.helpers import FIXTURES, comfyui_inverted, txt2img, wait_until
from tests.servers import InProcessApp
from tests.test_oss_e2e import local_oss_server, oss_env
from tests.test_stream import set_step_delay

pytestmark = pytest.mark.timeout(60)

KEY_A = "sk-genstudio-a-0123456789"
KEY_B = "sk-genstudio-b-9876543210"
LINK_SECRET = "genstudio-link-secret-for-tests"
# Prompt tokens are signed with a key of their own derived from FILE_LINK_SECRET.
TOKEN_SECRET = hmac.new(LINK_SECRET.encode(), TOKEN_KEY, "sha256").digest()
T2I, I2I = "wf-c72qozydy6suxesa", "wf-c73epllu4i3bxvzr"  # the documents' workflow ids
API = "/api/maas/comfy_task_api"
PROGRESS = "/api/maas/comfy_task_ws_api/get_task_progress"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(app: InProcessApp, path: str, body: Any, key: str = KEY_A) -> requests.Response:
    return requests.post(app.url + API + path, json=body, headers=bearer(key), timeout=30)


def register(app: InProcessApp, workflow_id: str, workflow: dict[str, Any]) -> None:
    answer = requests.put(
        f"{app.url}/api/workflows/{workflow_id}", data=json.dumps(workflow), headers=bearer(KEY_A), timeout=30
    )
    assert answer.status_code in (200, 201), answer.text


def hosting(start_app: Callable[..., InProcessApp], comfyui_url: str, tmp_path: Path, **env: str) -> InProcessApp:
    """An app with two keys, the documents' two workflows registered under their ids."""
    app = start_app(
        comfyui_url,
        API_KEYS=f"{KEY_A},{KEY_B}",
        WORKFLOWS_DIR=str(tmp_path / "workflows"),
        **env,
    )
    register(app, T2I, json.loads((FIXTURES / "txt2img_fc_doc.json").read_text()))
    register(app, I2I, json.loads((FIXTURES / "img2img_invert.json").read_text()))
    return app


@pytest.fixture
def linked(start_app: Callable[..., InProcessApp], emulator: Any, tmp_path: Path) -> InProcessApp:
    """No OSS: files served through our signed links."""
    return hosting(start_app, emulator.url, tmp_path, FILE_LINK_SECRET=LINK_SECRET)


def doc_client(app: InProcessApp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key: str = KEY_A) -> ModuleType:
    """GenStudio's tutorial client, configured as its settings cell reads it (environment)."""
    settings = {
        "COMFYUI_API_KEY": key,
        "COMFYUI_SERVER_ADDRESS": app.url.removeprefix("http://"),
        "DEFAULT_WORKFLOW_ID": T2I,
        "DEFAULT_OUTPUT_PATH": str(tmp_path / "output"),
        "DEFAULT_INPUT_PATH": str(tmp_path / "input.png"),
        "COMFY_T2I_WORKFLOW_API_JSON_PATH": str(FIXTURES / "txt2img_fc_doc.json"),
        "CHECKPOINT_NAME": "sd-v1-5-inpainting.ckpt",  # "以 GenStudio 工作流【查看参数】的中可选值为准"
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    sys.modules.pop("tests.genstudio_doc_client", None)
    return importlib.import_module("tests.genstudio_doc_client")


def info(app: InProcessApp, task_ids: list[str], key: str = KEY_A, **extra: Any) -> list[dict[str, Any]]:
    answer = call(app, "/get_task_info", {"comfy_task_ids": task_ids, **extra}, key)
    assert answer.status_code == 200 and answer.json()["code"] == 0, answer.text
    entries: list[dict[str, Any]] = answer.json()["data"]["comfy_task_info"]
    return entries


def finished(app: InProcessApp, task_id: str, **extra: Any) -> dict[str, Any]:
    return wait_until(lambda: next((e for e in info(app, [task_id], **extra) if e["status"] >= 3), None))


def queue(app: InProcessApp, workflow_id: str, prompt: Any, key: str = KEY_A) -> dict[str, str]:
    answer = call(app, "/prompt", {"workflow_id": workflow_id, "prompt": prompt}, key)
    body = answer.json()
    assert answer.status_code == 200 and body["code"] == 0 and body["msg"] == "Success", answer.text
    data: dict[str, str] = body["data"]
    return data


def small_t2i(seed: int = 1, steps: int = 4) -> dict[str, Any]:
    return {"3": {"inputs": {"seed": seed, "steps": steps}}, "5": {"inputs": {"width": 64, "height": 64}}}


def picture(color: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(out, "PNG")
    return out.getvalue()


# -- the documented clients ----------------------------------------------------------------------------


def test_the_documented_txt2img_client_runs_unchanged(linked, monkeypatch, tmp_path):
    client = doc_client(linked, monkeypatch, tmp_path)
    # The tutorial's cells, in order.
    base_workflow_prompt = client.get_prompt_json_body(client.api_params_by_genstudio)
    client.id_to_class_type = client.get_id_to_class_type_map(client.COMFY_T2I_WORKFLOW_API_JSON_PATH)
    _modified, prompt_id = client.prompt_to_image(
        prompt=base_workflow_prompt,
        positive_prompt="Spiderman in a red suit standing in middle of a crowded place, skyscrapers in the "
        "background, cinematic, neon colors, realistic look",
        negative_prompt="ugly, deformed",
        output_path=str(tmp_path / "output"),
        save_previews=True,
    )
    assert prompt_id, "the client reported a failure (see the captured output)"
    saved = sorted((tmp_path / "output" / "9").iterdir())
    assert len(saved) == 1 and saved[0].suffix == ".png"
    assert Image.open(saved[0]).size == (512, 512)
    # The API document's way: final_files downloaded as they are.
    (entry,) = client.get_task_info([prompt_id])["data"]["comfy_task_info"]
    assert entry["status"] == 3 and entry["progress_num"] == 100 and entry["errMsg"] == ""
    assert entry["final_files"] == entry["files"]["9"]
    downloaded = requests.get(entry["final_files"][0], timeout=30)
    assert downloaded.status_code == 200
    assert (
        ImageChops.difference(
            Image.open(io.BytesIO(downloaded.content)).convert("RGB"), Image.open(saved[0]).convert("RGB")
        ).getbbox()
        is None
    )


def test_the_documented_img2img_client_uploads_and_runs_unchanged(linked, monkeypatch, tmp_path):
    client = doc_client(linked, monkeypatch, tmp_path)
    source = tmp_path / "spiderman-in-red-suit.png"
    source.write_bytes(picture())
    uploaded = client.upload_image(str(source))
    assert uploaded["code"] == 0 and uploaded["msg"] == "Success"
    image_id = uploaded["data"]["image_id"]
    assert client.upload_image(str(source))["data"]["image_id"] == image_id  # stored under its content hash
    prompt_id = client.generate_image_by_prompt_and_image(
        workflow_id=I2I, prompt={"10": {"inputs": {"image": image_id}}}, output_path=str(tmp_path / "i2i")
    )
    assert prompt_id
    (saved,) = (tmp_path / "i2i" / "9").iterdir()
    expected = comfyui_inverted(Image.open(io.BytesIO(picture())))
    assert ImageChops.difference(Image.open(saved).convert("RGB"), expected.convert("RGB")).getbbox() is None


def test_the_tutorials_image_beside_inputs_is_taken_as_the_input(linked):
    """GenStudio's tutorial sets `prompt[load_image]['image'] = image_id` (beside `inputs`)."""
    image_id = requests.post(
        linked.url + API + "/upload/image",
        files={"source_file": ("a.png", picture((1, 2, 3)))},
        headers=bearer(KEY_A),
        timeout=30,
    ).json()["data"]["image_id"]
    queued = queue(linked, I2I, {"10": {"inputs": {"image": "example.png"}, "image": image_id}})
    entry = finished(linked, queued["prompt_id"])
    assert entry["status"] == 3, entry
    result = Image.open(io.BytesIO(requests.get(entry["final_files"][0], timeout=30).content)).convert("RGB")
    assert result.getpixel((0, 0)) == (254, 253, 252)


def test_the_websocket_progress_client_gets_every_change_until_the_end(linked):
    queued = queue(linked, T2I, small_t2i(seed=2, steps=20))
    url = linked.url.replace("http://", "ws://") + PROGRESS + "?authorization=" + queued["prompt_token"]
    socket = websocket.create_connection(url, timeout=30)
    messages = []
    while True:
        try:
            text = socket.recv()
        except websocket.WebSocketConnectionClosedException:
            break
        if not text:  # the server's close
            break
        messages.append(json.loads(text)["comfy_task_info"])
    socket.close()
    assert messages and all(m["comfy_task_id"] == queued["prompt_id"] for m in messages)
    statuses, percents = [m["status"] for m in messages], [m["progress_num"] for m in messages]
    assert statuses == sorted(statuses) and percents == sorted(percents)
    assert 2 in statuses and len(set(percents)) > 2, messages
    last = messages[-1]
    assert last["status"] == 3 and last["progress_num"] == 100 and len(last["final_files"]) == 1
    assert all(m["final_files"] and m["files"] for m in messages if m["status"] == 3), messages
    assert requests.get(last["final_files"][0], timeout=30).status_code == 200
    assert all(a != b for a, b in itertools.pairwise(messages))  # sent on changes only


def test_the_progress_socket_shows_previews_of_a_task_prompted_with_previews(deployment):
    deployed = deployment(
        step_delay=0.05,
        API_KEYS=f"{KEY_A},{KEY_B}",
        FILE_LINK_SECRET=LINK_SECRET,
    )
    register(deployed, T2I, json.loads((FIXTURES / "txt2img_fc_doc.json").read_text()))
    answer = requests.post(
        deployed.url + API + "/prompt",
        params={"previews": "true"},
        json={"workflow_id": T2I, "prompt": small_t2i(seed=21, steps=20)},
        headers=bearer(KEY_A),
        timeout=30,
    )
    queued = answer.json()["data"]
    url = deployed.url.replace("http://", "ws://") + PROGRESS + "?previews=true&authorization=" + queued["prompt_token"]
    socket = websocket.create_connection(url, timeout=30)
    messages = []
    while text := socket.recv():
        messages.append(json.loads(text)["comfy_task_info"])
    socket.close()
    previews = [m["preview"] for m in messages if "preview" in m]
    assert len(previews) >= 2 and all(p["mime"] == "image/jpeg" and p["node"] == "3" for p in previews)
    image = Image.open(io.BytesIO(base64.b64decode(previews[-1]["base64"])))
    assert image.format == "JPEG" and messages[-1]["status"] == 3 and "preview" not in messages[-1]


def test_a_missing_forged_or_expired_prompt_token_is_refused_at_the_handshake(linked):
    queued = queue(linked, T2I, small_t2i(seed=3))
    base = linked.url.replace("http://", "ws://") + PROGRESS
    claims, _, mac = queued["prompt_token"].rpartition(".")
    expired = token.issue(TOKEN_SECRET, queued["prompt_id"], None, time.time() - 25 * 3600)
    other = token.issue(b"not-the-secret", queued["prompt_id"], None, time.time())
    for query in (
        "",
        "?authorization=",
        f"?authorization={claims}.{mac[:-2]}AA",
        f"?authorization={expired}",
        f"?authorization={other}",
        "?authorization=a.b.c",
    ):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(base + query, timeout=10)
        assert refused.value.status_code == 403


# -- task states ---------------------------------------------------------------------------------------


def test_a_cancelled_task_reports_status_4(own_emulator, start_app, tmp_path):
    app = hosting(start_app, own_emulator.url, tmp_path, FILE_LINK_SECRET=LINK_SECRET)
    set_step_delay(own_emulator, 0.05)
    queued = queue(app, T2I, small_t2i(seed=4, steps=400))
    wait_until(lambda: info(app, [queued["prompt_id"]])[0]["status"] == 2)
    answer = call(app, "/cancel", {"comfy_task_id": queued["prompt_id"]})
    assert answer.status_code == 200 and answer.json()["code"] == 0, answer.text
    entry = finished(app, queued["prompt_id"])
    assert entry["status"] == 4 and "cancelled" in entry["errMsg"] and entry["final_files"] == []
    again = call(app, "/cancel", {"comfy_task_ids": [queued["prompt_id"]]})
    assert again.status_code == 200 and again.json()["code"] == 409 and "already ended" in again.json()["msg"]


def test_another_keys_task_is_status_5_and_unknown_ids_get_their_own_entry(linked):
    queued = queue(linked, T2I, small_t2i(seed=5))
    mine = finished(linked, queued["prompt_id"])
    assert mine["status"] == 3
    never = f"cft-{uuid.uuid4().hex[:16]}"
    theirs, unknown, malformed = info(linked, [queued["prompt_id"], never, "no spaces"], key=KEY_B)
    assert theirs == {
        "comfy_task_id": queued["prompt_id"],
        "status": 5,
        "queue_size": 0,
        "current_position": 0,
        "errMsg": "permission denied",
        "files": {},
        "final_files": [],
        "progress_num": 0,
    }
    assert unknown["status"] == 4 and unknown["errMsg"] == f"no task {never}" and unknown["comfy_task_id"] == never
    assert malformed["status"] == 4 and malformed["comfy_task_id"] == "no spaces"
    refused = call(linked, "/cancel", {"comfy_task_id": queued["prompt_id"]}, key=KEY_B)
    assert refused.json()["code"] == 404


# -- files ---------------------------------------------------------------------------------------------


def test_without_oss_links_download_converted_and_tampered_or_expired_links_are_403(linked):
    queued = queue(linked, T2I, small_t2i(seed=6))
    finished(linked, queued["prompt_id"])
    asked = {"url_expire_period": 600, "image_post_process_cmd": {"format": "jpg", "quality": {"q": 80}}}
    (entry,) = info(linked, [queued["prompt_id"]], **asked)
    url = entry["final_files"][0]
    assert url.startswith(linked.url + "/api/files/") and url.endswith(".jpg")
    answer = requests.get(url, timeout=30)  # no key: the link is the grant
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    converted = Image.open(io.BytesIO(answer.content))
    reference = io.BytesIO()
    converted.convert("RGB").save(reference, "JPEG", quality=80)
    assert converted.format == "JPEG" and converted.quantization == Image.open(reference).quantization
    (plain,) = info(linked, [queued["prompt_id"]])[0]["final_files"]
    assert Image.open(io.BytesIO(requests.get(plain, timeout=30).content)).format == "PNG"
    token_part = url.split("/api/files/")[1].split("/")[0]
    tampered = url.replace(token_part, token_part[:-3] + ("AAA" if token_part[-3:] != "AAA" else "BBB"))
    assert requests.get(tampered, timeout=30).status_code == 403
    (short,) = info(linked, [queued["prompt_id"]], url_expire_period=1)[0]["final_files"]
    wait_until(lambda: requests.get(short, timeout=30).status_code == 403, timeout=5, interval=0.2)


def test_with_oss_urls_are_signed_anew_with_the_expiry_and_processing_asked(start_app, emulator, tmp_path):
    bucket = f"gs-{uuid.uuid4().hex[:12]}"
    with local_oss_server(bucket) as oss:
        app = hosting(start_app, emulator.url, tmp_path, **oss_env(oss, bucket))
        queued = queue(app, T2I, small_t2i(seed=7))
        finished(app, queued["prompt_id"])
        asked = {"url_expire_period": 1000, "image_post_process_cmd": {"format": "jpg", "quality": {"Q": 90}}}
        (entry,) = info(app, [queued["prompt_id"]], **asked)
        (url,) = entry["final_files"]
        query = parse_qs(urlsplit(url).query)
        assert query["x-oss-expires"] == ["1000"]
        assert query["x-oss-process"] == ["image/format,jpg/quality,Q_90"]
        assert urlsplit(url).path.startswith(f"/{bucket}/serverless-api-output/") or bucket in urlsplit(url).netloc
        assert requests.get(url, timeout=30).status_code == 200  # the signature covers the processing
        (default,) = info(app, [queued["prompt_id"]])[0]["final_files"]
        assert parse_qs(urlsplit(default).query)["x-oss-expires"] == ["600"]
        assert "x-oss-process" not in parse_qs(urlsplit(default).query)


# -- errors and keys -----------------------------------------------------------------------------------


def test_each_request_error_has_its_own_code_and_message(linked):
    unknown = call(linked, "/prompt", {"workflow_id": "wf-nosuch", "prompt": {}})
    assert unknown.status_code == 200 and unknown.json()["code"] == 404 and "wf-nosuch" in unknown.json()["msg"]
    bad = call(linked, "/prompt", {"workflow_id": T2I, "prompt": {"3": {"inputs": {"steps": "many"}}}})
    assert bad.json()["code"] == 400 and "was refused" in bad.json()["msg"]
    whole = call(linked, "/prompt", {"workflow_id": T2I, "prompt": txt2img()})
    assert whole.json()["code"] == 400 and "whole workflow" in whole.json()["msg"]
    ranges = call(
        linked,
        "/prompt",
        {"workflow_id": T2I, "prompt": {"3": {"inputs": {"steps": {"type": "INT", "current": 20, "spec": {}}}}}},
    )
    assert ranges.json()["code"] == 400 and "current" in ranges.json()["msg"]
    assert call(linked, "/get_task_info", {"comfy_task_ids": []}).json()["code"] == 400
    assert call(linked, "/cancel", {"comfy_task_id": "cft-never"}).json()["code"] == 404
    not_image = requests.post(
        linked.url + API + "/upload/image",
        files={"source_file": ("a.png", b"not an image")},
        headers=bearer(KEY_A),
        timeout=30,
    )
    assert not_image.status_code == 200 and not_image.json()["code"] == 400
    cut = requests.post(
        linked.url + API + "/upload/image",
        files={"source_file": ("a.png", picture()[:-20])},
        headers=bearer(KEY_A),
        timeout=30,
    )
    assert cut.json()["code"] == 400
    no_field = requests.post(
        linked.url + API + "/upload/image", files={"image": ("a.png", picture())}, headers=bearer(KEY_A), timeout=30
    )
    assert no_field.json()["code"] == 400 and "source_file" in no_field.json()["msg"]


def test_a_wrong_or_missing_key_is_401_everywhere_but_health(linked):
    for path in ("/prompt", "/get_task_info", "/cancel", "/upload/image"):
        for headers in ({}, bearer("sk-not-a-key-of-ours")):
            answer = requests.post(linked.url + API + path, json={}, headers=headers, timeout=30)
            assert answer.status_code == 401 and answer.json()["code"] == 401, (path, answer.text)
    assert requests.get(linked.url + "/api/serverless/health", timeout=30).status_code == 200
