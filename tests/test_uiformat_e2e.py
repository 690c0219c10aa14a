"""UI-format workflows through real servers, on one box and on a gateway with two workers: the
corpus of tests/fixtures/uiformat converted by `POST /api/workflows/convert` as the editor would
export it, run by `POST /api/serverless/run` (sync, async, websocket) on the ComfyUI emulator,
registered as hosted workflows and run with parameters named by node title (GenStudio too)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
import requests
from PIL import Image

from tests.helpers import post_run, wait_until
from tests.test_contract import ended
from tests.test_uiformat import CORPUS, FIXTURES, load
from tests.test_websocket import run as ws_run
from tests.topologies import Deployment

pytestmark = pytest.mark.timeout(180)

Deploy = Callable[..., Deployment]
CONVERT = "/api/workflows/convert"
EMULATOR_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # one the emulator lists


def expected(name: str) -> dict[str, Any]:
    prompt: dict[str, Any] = json.loads((FIXTURES / f"{name}.api.json").read_text())
    return prompt


def runnable(name: str) -> dict[str, Any]:
    """A corpus workflow as it can run on the emulator: a checkpoint it lists, small and quick."""
    document = load(name)
    for node in document["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"] = [EMULATOR_CHECKPOINT]
        elif node["type"] == "EmptyLatentImage":
            node["widgets_values"] = [64, 64, 1]
        elif node["type"] == "KSampler":
            node["widgets_values"][2] = 2  # steps
    return document


def upload_input(deployment: Deployment) -> None:
    """The picture loadimage.json loads, on every emulator (any worker may run it)."""
    picture = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(picture, "PNG")
    for emulator in deployment.emulators:
        files = {"image": ("uiformat-input.png", picture.getvalue(), "image/png")}
        reply = requests.post(emulator.url + "/upload/image", files=files, data={"overwrite": "true"}, timeout=10)
        assert reply.status_code == 200, reply.text


def ran(deployment: Deployment, prompt_id: str) -> dict[str, Any]:
    """The prompt ComfyUI ran, from the /history of the emulator that ran it."""
    for emulator in deployment.emulators:
        history = requests.get(f"{emulator.url}/history/{prompt_id}", timeout=5).json()
        if prompt_id in history:
            prompt: dict[str, Any] = history[prompt_id]["prompt"][2]
            return prompt
    raise AssertionError(f"no emulator ran {prompt_id}")


def same_graph(sent: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """The prompt ComfyUI got is the converted one (output names aside: ours are per instance)."""

    def without_prefix(prompt: dict[str, Any]) -> dict[str, Any]:
        return {
            node_id: (node["class_type"], {k: v for k, v in node["inputs"].items() if k != "filename_prefix"})
            for node_id, node in prompt.items()
        }

    return without_prefix(sent) == without_prefix(wanted)


def test_convert_answers_the_editors_api_export_of_each_workflow(deployment: Deploy) -> None:
    url = deployment().url
    for name in CORPUS:
        answer = requests.post(url + CONVERT, data=json.dumps(load(name)), timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["prompt"] == expected(name), name
    wrapped = requests.post(url + CONVERT, json={"prompt": load("bypass_mute")}, timeout=30).json()
    assert wrapped["prompt"] == expected("bypass_mute") and len(wrapped["notes"]) == 3
    api = requests.post(url + CONVERT, json=expected("subgraph"), timeout=30).json()
    assert api == {"prompt": expected("subgraph"), "notes": ["already in the API format: returned as sent"]}


def test_a_class_comfyui_lacks_is_invalid_params_listing_it(deployment: Deploy) -> None:
    url = deployment().url
    answer = post_run(url, load("template_subgraph_zimage"))  # its bypassed ModelSamplingAuraFlow is not needed
    missing = ["CLIPLoader", "ConditioningZeroOut", "EmptySD3LatentImage", "UNETLoader", "VAELoader"]
    assert answer.status_code == 400 and answer.json()["raw"]["missing"]["nodes"] == missing
    document = load("bypass_mute")
    document["nodes"].append({"id": 9, "type": "FancyUpscaler", "mode": 0, "inputs": [], "outputs": []})
    for answer in (post_run(url, document), requests.post(url + CONVERT, json=document, timeout=30)):
        assert answer.status_code == 400
        error = answer.json()
        assert error["error_code"] == "INVALID_PARAMS" and "FancyUpscaler" in error["error_message"]
        assert error["raw"] == {"missing": {"nodes": ["FancyUpscaler"], "models": []}}


def test_each_workflow_of_the_corpus_runs_as_converted(deployment: Deploy) -> None:
    deployed = deployment()
    upload_input(deployed)
    for name in CORPUS:
        document = runnable(name)
        answer = post_run(deployed.url, document)
        assert answer.status_code == 200, (name, answer.text)
        data = answer.json()["data"]
        assert data["results"], name
        converted = requests.post(deployed.url + CONVERT, json=document, timeout=30).json()["prompt"]
        assert same_graph(ran(deployed, data["prompt_id"]), converted), name


def test_a_ui_workflow_runs_over_the_websocket_and_async(deployment: Deploy) -> None:
    deployed = deployment()
    texts, _ = ws_run(deployed.url, {"prompt": load("subgraph"), "extra_data": {"note": "ws"}})
    last = json.loads(texts[-1])
    assert last["type"] == "serverless_api", last
    assert same_graph(ran(deployed, last["data"]["prompt_id"]), expected("subgraph"))
    headers = {"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": "ui-async-1"}
    answer = post_run(deployed.url, load("bypass_mute"), headers=headers)
    assert answer.status_code == 202, answer.text
    logged = ended(deployed.url, "ui-async-1")
    assert logged[-1]["type"] == "serverless_api", logged[-1]
    assert same_graph(ran(deployed, logged[-1]["data"]["prompt_id"]), expected("bypass_mute"))


def test_a_ui_workflow_registers_and_its_titles_name_parameters_that_reach_comfyui(deployment: Deploy) -> None:
    deployed = deployment()
    url = deployed.url
    registered = requests.put(url + "/api/workflows/fox", data=json.dumps(runnable("reroute_primitive")), timeout=30)
    assert registered.status_code == 201, registered.text
    described = registered.json()
    assert described["workflow"]["3"]["_meta"]["title"] == "Sampler"  # stored in the API format
    names = {p["name"]: p["title_name"] for p in described["parameters"]}
    assert names["3.seed"] == "Sampler.seed" and names["6.text"] == "Positive.text"
    assert names["4.ckpt_name"] == "Load Checkpoint.ckpt_name"  # untitled: the class's display name
    document = requests.get(url + "/api/workflows/fox/openapi.json", timeout=10).json()
    assert {"3.seed", "Sampler.seed", "Positive.text"} <= set(
        document["components"]["schemas"]["Overrides"]["properties"]
    )

    body = {"Sampler.seed": 4242, "Positive.text": "a title override", "Result.filename_prefix": "titled"}
    answer = requests.post(url + "/api/workflows/fox/run", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    sent = ran(deployed, answer.json()["data"]["prompt_id"])
    assert sent["3"]["inputs"]["seed"] == 4242 and sent["6"]["inputs"]["text"] == "a title override"
    assert sent["9"]["inputs"]["filename_prefix"].startswith("titled")

    conflicting = requests.post(url + "/api/workflows/fox/run", json={"3.seed": 1, "Sampler.seed": 2}, timeout=30)
    assert conflicting.status_code == 400 and "given twice" in conflicting.json()["error_message"]


def test_genstudio_runs_a_ui_registered_workflow_with_title_keyed_overrides(deployment: Deploy) -> None:
    deployed = deployment(FILE_LINK_SECRET="ui-link-secret")
    url = deployed.url
    registered = requests.put(url + "/api/workflows/fox-gs", data=json.dumps(runnable("reroute_primitive")), timeout=30)
    assert registered.status_code == 201, registered.text
    api = url + "/api/maas/comfy_task_api"
    prompt = {"Sampler": {"inputs": {"seed": 77}}, "Negative": {"inputs": {"text": "fog"}}}
    queued = requests.post(api + "/prompt", json={"workflow_id": "fox-gs", "prompt": prompt}, timeout=30).json()
    assert queued["code"] == 0, queued

    def done() -> dict[str, Any] | None:
        answer = requests.post(
            api + "/get_task_info", json={"comfy_task_ids": [queued["data"]["prompt_id"]]}, timeout=10
        )
        (entry,) = answer.json()["data"]["comfy_task_info"]
        return entry if entry["status"] >= 3 else None

    entry = wait_until(done, timeout=60)
    assert entry["status"] == 3, entry
    histories = [requests.get(e.url + "/history", timeout=5).json() for e in deployed.emulators]
    prompts = [item["prompt"][2] for history in histories for item in history.values()]
    assert any(p["3"]["inputs"]["seed"] == 77 and p["7"]["inputs"]["text"] == "fog" for p in prompts)
