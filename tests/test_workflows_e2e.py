"""Hosted workflows through real servers: the app under uvicorn, the ComfyUI emulator, a temp dir
as the shared disk. Register, describe, run with overrides in every form and transport, refuse
bad registrations and overrides before ComfyUI sees anything, and share the folder between two
instances."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket  # websocket-client
from openapi_spec_validator import validate as validate_openapi

from tests.conftest import base_env
from tests.helpers import FIXTURES, empty_image, txt2img
from tests.servers import InProcessApp as App
from tests.servers import InProcessEmulator as Emulator

API = "/api/workflows"
NEW_PROMPT = "a lighthouse at dusk, oil painting"


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nas") / "workflows"


@pytest.fixture(scope="module")
def hosted(emulator: Emulator, shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """An app whose WORKFLOWS_DIR is `shared_dir`."""
    logs = tmp_path_factory.mktemp("hosted")
    server = App(logs, {**base_env(emulator.url, logs / "status"), "WORKFLOWS_DIR": str(shared_dir)})
    yield server
    server.stop()


def put(base: str, workflow_id: str, body: Any) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.put(f"{base}{API}/{workflow_id}", data=data, timeout=30)


def run(base: str, workflow_id: str, body: Any, params: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{base}{API}/{workflow_id}/run", data=json.dumps(body), params=params or {}, timeout=60)


def history_count(comfyui_url: str) -> int:
    return len(requests.get(comfyui_url + "/history", timeout=5).json())


def sent_prompt(comfyui_url: str, data: dict[str, Any]) -> dict[str, Any]:
    """The prompt ComfyUI ran for a result, from its /history."""
    history = requests.get(f"{comfyui_url}/history/{data['prompt_id']}", timeout=5).json()
    prompt: dict[str, Any] = history[data["prompt_id"]]["prompt"][2]
    return prompt


@pytest.fixture(scope="module")
def txt2img_id(hosted: App) -> str:
    response = put(hosted.url, "txt2img", txt2img(seed=123, steps=4, size=64))
    assert response.status_code == 201, response.text  # new: 201; replaced: 200 (below)
    return "txt2img"


def test_registration_answers_201_then_200_and_describes_the_schema(hosted: App, txt2img_id: str) -> None:
    again = put(hosted.url, txt2img_id, {"prompt": txt2img(seed=123, steps=4, size=64)})
    assert again.status_code == 200
    described = requests.get(f"{hosted.url}{API}/{txt2img_id}", timeout=10).json()
    assert described["workflow"]["6"]["_meta"]["title"] == "CLIP文本编码(提示)"  # stored as sent, titles kept
    schema = {p["name"]: p for p in described["parameters"]}
    assert schema["3.seed"]["type"] == "INT" and schema["3.seed"]["spec"]["min"] == 0
    assert schema["3.steps"]["spec"]["default"] == 4
    assert schema["3.sampler_name"]["type"] == "COMBO" and "euler" in schema["3.sampler_name"]["spec"]["options"]
    assert schema["6.text"]["type"] == "STRING" and schema["6.text"]["spec"]["multiline"] is True
    assert schema["4.ckpt_name"]["type"] == "COMBO" and schema["5.width"]["spec"]["min"] == 16


@pytest.mark.parametrize(
    ("form", "body"),
    [
        ("advanced", {"3": {"inputs": {"seed": -1}}, "6": {"inputs": {"text": NEW_PROMPT}}}),
        ("flat", {"3.seed": -1, "6.text": NEW_PROMPT}),
        ("simple", {"prompt": NEW_PROMPT, "3.seed": -1}),
    ],
)
def test_a_hosted_run_sends_comfyui_the_overridden_values(
    hosted: App, emulator: Emulator, txt2img_id: str, form: str, body: dict[str, Any]
) -> None:
    response = run(hosted.url, txt2img_id, body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["workflow_id"] == txt2img_id
    prompt = sent_prompt(emulator.url, data)
    assert prompt["6"]["inputs"]["text"] == NEW_PROMPT
    assert prompt["3"]["inputs"]["seed"] == data["seeds"]["3"]["seed"] != -1
    assert prompt["7"]["inputs"]["text"] == "text, watermark"  # the negative prompt is untouched
    assert data["results"] and data["results"][0]["output"]["raw"]["filename"].startswith("ComfyUI_test-1")


def test_fc_clients_run_a_hosted_workflow_through_the_one_run_url(
    hosted: App, emulator: Emulator, txt2img_id: str
) -> None:
    response = requests.post(
        f"{hosted.url}/api/serverless/run",
        params={"workflow_id": txt2img_id},
        data=json.dumps({"3.steps": 2, "6.text": NEW_PROMPT}),
        timeout=60,
    )
    assert response.status_code == 200 and "Warning" not in response.headers
    data = response.json()["data"]
    assert data["workflow_id"] == txt2img_id and sent_prompt(emulator.url, data)["3"]["inputs"]["steps"] == 2


def test_a_hosted_run_streams_and_runs_over_the_websocket(hosted: App, txt2img_id: str) -> None:
    streamed = run(hosted.url, txt2img_id, {"3.seed": -1}, {"stream": "true", "output_base64": "true"})
    lines = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    last = json.loads(lines[-1])
    assert last["type"] == "serverless_api" and last["data"]["workflow_id"] == txt2img_id
    assert last["data"]["results"][0]["output"]["base64"]["content"]
    ws = websocket.create_connection(
        hosted.url.replace("http", "ws") + f"/api/serverless/ws?workflow_id={txt2img_id}", timeout=30
    )
    ws.send(json.dumps({"prompt": "a quiet harbour"}))
    messages = []
    while True:
        opcode, frame = ws.recv_data()
        if opcode != websocket.ABNF.OPCODE_TEXT:
            break
        messages.append(json.loads(frame))
    assert messages[-1]["type"] == "serverless_api" and messages[-1]["data"]["workflow_id"] == txt2img_id


@pytest.mark.parametrize(
    ("body", "node", "kind"),
    [
        ({"3.steps": 0}, "3", "value_smaller_than_min"),
        ({"3.steps": "four"}, "3", "invalid_input_type"),
        ({"3.sampler_name": "warp_drive"}, "3", "value_not_in_list"),
        ({"3.model": ["5", 0]}, "3", "link_overridden"),
        ({"3.nonsense": 1}, "3", "unknown_input"),
        ({"77": {"inputs": {"text": "x"}}}, "77", "unknown_node"),
        ({"prompt": "x", "target_node": "5"}, "5", "unknown_input"),
    ],
)
def test_each_bad_override_is_refused_before_comfyui_sees_it(
    hosted: App, emulator: Emulator, txt2img_id: str, body: dict[str, Any], node: str, kind: str
) -> None:
    before = history_count(emulator.url)
    response = run(hosted.url, txt2img_id, body)
    assert response.status_code == 400
    error = response.json()
    assert error["error_code"] == "INVALID_PARAMS" and f"node {node}" in error["error_message"]
    assert kind in [e["type"] for e in error["raw"]["node_errors"][node]["errors"]]
    assert history_count(emulator.url) == before


def test_the_allowed_values_are_named_in_a_refusal(hosted: App, txt2img_id: str) -> None:
    error = run(hosted.url, txt2img_id, {"3.sampler_name": "warp_drive", "3.steps": 0}).json()
    assert "'euler'" in error["error_message"] and "minimum 1" in error["error_message"]
    found = {e["type"]: e["extra_info"] for e in error["raw"]["node_errors"]["3"]["errors"]}
    assert "euler" in found["value_not_in_list"]["allowed"]["options"]
    assert found["value_smaller_than_min"]["allowed"]["min"] == 1


def test_each_bad_registration_is_refused_naming_every_problem(hosted: App, emulator: Emulator) -> None:
    before = history_count(emulator.url)
    bad = txt2img()
    bad["3"]["inputs"]["cfg"] = 500.0
    bad["3"]["inputs"]["scheduler"] = "sometimes"
    del bad["5"]["inputs"]["width"]
    bad["8"]["inputs"]["vae"] = ["4", 9]
    bad["7"]["inputs"]["clip"] = ["40", 1]
    bad["9"]["inputs"]["images"] = ["4", 0]
    bad["11"] = {"class_type": "MysteryNode", "inputs": {}}
    response = put(hosted.url, "bad-one", bad)
    assert response.status_code == 400
    error = response.json()
    assert error["error_code"] == "INVALID_PARAMS"
    found = {(node, e["type"]) for node, entry in error["raw"]["node_errors"].items() for e in entry["errors"]}
    assert found == {
        ("3", "value_bigger_than_max"),
        ("3", "value_not_in_list"),
        ("5", "required_input_missing"),
        ("8", "bad_linked_input"),
        ("7", "bad_linked_input"),
        ("9", "return_type_mismatch"),
        ("11", "unknown_class_type"),
    }
    assert requests.get(f"{hosted.url}{API}/bad-one", timeout=10).status_code == 404
    ui = put(hosted.url, "ui", {"nodes": [], "links": []})
    assert ui.status_code == 400 and "no node that ComfyUI would run" in ui.json()["error_message"]  # converted
    assert put(hosted.url, "..", empty_image()).status_code in (400, 404)
    assert put(hosted.url, "bad%20id", empty_image()).json()["error_code"] == "INVALID_PARAMS"
    assert (
        put(hosted.url, "no-output", {"1": empty_image()["1"]}).json()["raw"]["node_errors"][""]["errors"][0]["type"]
        == "prompt_no_outputs"
    )
    assert put(hosted.url, "wrapped", {"prompt": empty_image(), "extra_data": {"k": 1}}).status_code == 400
    assert history_count(emulator.url) == before


def test_unknown_workflows_are_not_found_and_delete_removes(hosted: App) -> None:
    missing = requests.post(f"{hosted.url}{API}/nope/run", data="{}", timeout=10)
    assert missing.status_code == 404 and missing.json()["error_code"] == "NOT_FOUND"
    assert requests.get(f"{hosted.url}{API}/nope/openapi.json", timeout=10).status_code == 404
    assert put(hosted.url, "short-lived", empty_image()).status_code == 201
    assert requests.delete(f"{hosted.url}{API}/short-lived", timeout=10).json() == {
        "workflow_id": "short-lived",
        "deleted": True,
    }
    assert requests.delete(f"{hosted.url}{API}/short-lived", timeout=10).status_code == 404


def test_two_instances_share_the_folder(
    hosted: App, emulator: Emulator, shared_dir: Path, start_app: Callable[..., App]
) -> None:
    other = start_app(emulator.url, WORKFLOWS_DIR=str(shared_dir))
    assert put(hosted.url, "shared", empty_image(prefix="shared")).status_code == 201
    listed = requests.get(f"{other.url}{API}", timeout=10).json()["workflows"]
    entry = next(w for w in listed if w["workflow_id"] == "shared")
    assert entry["parameters"] == 5 and entry["title"] == "shared" and entry["modified"].endswith("Z")
    assert requests.get(f"{other.url}{API}/shared", timeout=10).json()["workflow"] == empty_image(prefix="shared")
    result = run(other.url, "shared", {"1.color": 255})
    assert result.status_code == 200 and result.json()["data"]["workflow_id"] == "shared"
    assert sent_prompt(emulator.url, result.json()["data"])["1"]["inputs"]["color"] == 255
    replaced = put(other.url, "shared", empty_image(width=32, prefix="shared"))  # seen at once by the first
    assert replaced.status_code == 200
    assert requests.get(f"{hosted.url}{API}/shared", timeout=10).json()["workflow"]["1"]["inputs"]["width"] == 32
    requests.delete(f"{other.url}{API}/shared", timeout=10)
    assert requests.get(f"{hosted.url}{API}/shared", timeout=10).status_code == 404


def test_a_file_dropped_into_the_folder_by_hand_is_served_and_checked_at_run(
    hosted: App, emulator: Emulator, shared_dir: Path
) -> None:
    shared_dir.mkdir(parents=True, exist_ok=True)
    (shared_dir / "by-hand.json").write_text(json.dumps({"prompt": empty_image(prefix="hand")}))
    assert run(hosted.url, "by-hand", {}).json()["data"]["workflow_id"] == "by-hand"
    broken = empty_image()
    broken["1"]["inputs"]["width"] = 0
    (shared_dir / "broken.json").write_text(json.dumps(broken))
    before = history_count(emulator.url)
    refused = run(hosted.url, "broken", {})
    assert refused.status_code == 400 and "value_smaller_than_min" in refused.text
    assert history_count(emulator.url) == before


def test_the_openapi_document_validates_and_its_defaults_run(hosted: App, emulator: Emulator, txt2img_id: str) -> None:
    document = requests.get(f"{hosted.url}{API}/{txt2img_id}/openapi.json", timeout=10).json()
    validate_openapi(document)
    (path,) = document["paths"]
    assert path == f"/api/workflows/{txt2img_id}/run"
    properties = document["components"]["schemas"]["Overrides"]["properties"]
    body = {name: schema["default"] for name, schema in properties.items()}
    response = requests.post(document["servers"][0]["url"] + path, data=json.dumps(body), timeout=60)
    assert response.status_code == 200, response.text
    assert sent_prompt(emulator.url, response.json()["data"])["3"]["inputs"]["seed"] == 123


def test_object_info_is_cached_until_a_refresh_is_asked(hosted: App, emulator: Emulator) -> None:
    loader = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "https://example.com/x.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    assert put(hosted.url, "loader", loader).status_code in (200, 201)
    options = lambda query: next(  # noqa: E731
        p
        for p in requests.get(f"{hosted.url}{API}/loader{query}", timeout=10).json()["parameters"]
        if p["name"] == "1.image"
    )["spec"]["options"]
    before = options("")
    (emulator.root / "input").mkdir(exist_ok=True)
    (emulator.root / "input" / "new-upload.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert options("") == before and "new-upload.png" not in before
    assert "new-upload.png" in options("?refresh=true")


def test_each_workflow_is_listed_under_the_name_it_was_registered_with(hosted: App) -> None:
    """Not its SaveImage node's title, which a Chinese ComfyUI gives every workflow alike."""
    workflow = json.loads((FIXTURES / "txt2img_fc_doc.json").read_text())
    assert any(node.get("_meta", {}).get("title") == "保存图像" for node in workflow.values())
    for workflow_id in ("portrait", "landscape"):
        assert put(hosted.url, workflow_id, workflow).status_code in (200, 201)
    listed = {w["workflow_id"]: w["title"] for w in requests.get(f"{hosted.url}{API}", timeout=10).json()["workflows"]}
    assert listed["portrait"] == "portrait" and listed["landscape"] == "landscape"
    described = requests.get(f"{hosted.url}{API}/portrait/openapi.json", timeout=10).json()
    assert "保存图像" not in described["info"]["title"] and "portrait" in described["info"]["title"]


PROMPT_NODE = {
    "prompt": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "save": {"class_type": "SaveImage", "inputs": {"images": ["prompt", 0], "filename_prefix": "prompt-node"}},
}


def test_a_workflow_with_a_node_named_prompt_runs_and_is_hosted_whole(hosted: App, emulator: Emulator) -> None:
    """A node id "prompt" is not the `{"prompt": ...}` wrapper (whose prompt has no class_type)."""
    ran = requests.post(
        hosted.url + "/api/serverless/run", data=json.dumps(PROMPT_NODE), params={"output_base64": "true"}, timeout=30
    )
    assert ran.status_code == 200, ran.text
    assert [r["node_id"] for r in ran.json()["data"]["results"]] == ["save"]
    assert put(hosted.url, "prompt-node", PROMPT_NODE).status_code in (200, 201)
    assert requests.get(f"{hosted.url}{API}/prompt-node", timeout=10).json()["workflow"] == PROMPT_NODE
    changed = run(hosted.url, "prompt-node", {"prompt": {"inputs": {"color": 255}}}, {"output_base64": "true"})
    assert changed.status_code == 200, changed.text
    assert sent_prompt(emulator.url, changed.json()["data"])["prompt"]["inputs"]["color"] == 255
