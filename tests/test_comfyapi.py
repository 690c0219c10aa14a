"""ComfyUI's own API on our paths, on one box and through a gateway and two workers: ComfyUI's
own example client (`script_examples/websockets_api_example.py`: websocket-client and urllib, as
the script does) runs unchanged and gets the very bytes a direct run on ComfyUI (the emulator)
gives; `/ws` clients see only their own prompts; any gateway shows any prompt."""

from __future__ import annotations

import io
import json
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket  # websocket-client, as ComfyUI's example uses
from PIL import Image

from tests.helpers import empty_image, txt2img, wait_until
from tests.servers import InProcessApp, InProcessEmulator
from tests.topologies import Deployment

pytestmark = pytest.mark.timeout(120)


# -- ComfyUI's example client (script_examples/websockets_api_example.py), as documented ---------------


class ExampleClient:
    """The example script's functions over `server_address`, its client id its own."""

    def __init__(self, server_address: str) -> None:
        self.server_address = server_address
        self.client_id = str(uuid.uuid4())

    def queue_prompt(self, prompt: dict[str, Any], prompt_id: str) -> None:
        p = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        data = json.dumps(p).encode("utf-8")
        req = urllib.request.Request(f"http://{self.server_address}/prompt", data=data)
        urllib.request.urlopen(req).read()

    def get_image(self, filename: str, subfolder: str, folder_type: str) -> bytes:
        data = {"filename": filename, "subfolder": subfolder, "type": folder_type}
        url_values = urllib.parse.urlencode(data)
        with urllib.request.urlopen(f"http://{self.server_address}/view?{url_values}") as response:
            return bytes(response.read())

    def get_history(self, prompt_id: str) -> Any:
        with urllib.request.urlopen(f"http://{self.server_address}/history/{prompt_id}") as response:
            return json.loads(response.read())

    def get_images(self, ws: websocket.WebSocket, prompt: dict[str, Any]) -> dict[str, list[bytes]]:
        prompt_id = str(uuid.uuid4())
        self.queue_prompt(prompt, prompt_id)
        output_images = {}
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["node"] is None and data["prompt_id"] == prompt_id:
                        break  # Execution is done
            else:
                continue  # previews are binary data

        history = self.get_history(prompt_id)[prompt_id]
        for node_id in history["outputs"]:
            node_output = history["outputs"][node_id]
            images_output = []
            if "images" in node_output:
                for image in node_output["images"]:
                    image_data = self.get_image(image["filename"], image["subfolder"], image["type"])
                    images_output.append(image_data)
            output_images[node_id] = images_output
        return output_images

    def run(self, prompt: dict[str, Any]) -> dict[str, list[bytes]]:
        ws = websocket.WebSocket()
        ws.connect(f"ws://{self.server_address}/ws?clientId={self.client_id}")
        try:
            return self.get_images(ws, prompt)
        finally:
            ws.close()


def address(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A ComfyUI (the emulator) the example client talks to directly: what the images must be."""
    emulator = InProcessEmulator(Path(tmp_path_factory.mktemp("direct")), step_delay=0.0)
    yield ExampleClient(address(emulator.url))
    emulator.stop()


WORKFLOWS = {
    "fc_doc_txt2img": lambda: txt2img(seed=42, steps=3, prefix="comfyapi_fc", size=64),
    "model_free": lambda: empty_image(64, 64, color=0x3366CC, prefix="comfyapi_empty"),
}


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_comfyui_example_client_gets_the_images_a_direct_comfyui_run_gives(
    deployment: Any, direct: ExampleClient, name: str
) -> None:
    deployed: Deployment = deployment()
    expected = direct.run(WORKFLOWS[name]())
    images = ExampleClient(address(deployed.url)).run(WORKFLOWS[name]())
    assert images == expected and all(images.values()), "byte for byte what ComfyUI itself makes"


def test_two_websocket_clients_each_see_only_their_own_prompts(deployment: Any) -> None:
    deployed: Deployment = deployment()
    first, second = ExampleClient(address(deployed.url)), ExampleClient(address(deployed.url))
    sockets = {}
    for client in (first, second):
        ws = websocket.WebSocket()
        ws.connect(f"ws://{client.server_address}/ws?clientId={client.client_id}")
        greeting = json.loads(ws.recv())
        assert greeting == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client.client_id},
        }
        ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        flags = json.loads(ws.recv())
        assert flags["type"] == "feature_flags" and flags["data"]["max_upload_size"] > 0
        sockets[client.client_id] = ws
    try:
        ids = {client.client_id: str(uuid.uuid4()) for client in (first, second)}
        for client in (first, second):
            client.queue_prompt(empty_image(16, 16, prefix=f"own_{client.client_id[:8]}"), ids[client.client_id])
        for client in (first, second):
            seen = _until_done(sockets[client.client_id], ids[client.client_id])
            prompt_ids = {m["data"].get("prompt_id") for m in seen if isinstance(m.get("data"), dict)} - {None}
            assert prompt_ids == {ids[client.client_id]}, "only its own prompt's messages"
            types = [m["type"] for m in seen]
            assert types[0] in ("status", "execution_start") and types[-1] == "executing"
            assert {"execution_start", "executing", "executed", "execution_success"} <= set(types)
            assert not any(kind.startswith("serverless_") for kind in types)
    finally:
        for ws in sockets.values():
            ws.close()


def test_a_client_gets_the_messages_comfyui_itself_sends_it_for_a_prompt(
    deployment: Any, direct: ExampleClient
) -> None:
    """The same prompts, one at a time: through us the client gets ComfyUI's messages in
    ComfyUI's order, and no other (its queue broadcasts as the ComfyUI running it sends them;
    none replayed from an earlier prompt)."""
    deployed: Deployment = deployment()
    colors = [uuid.uuid4().int % 0xFFFFFF for _ in range(2)]  # prompts no ComfyUI has run (nothing cached)

    def messages(client: ExampleClient) -> list[list[Any]]:
        ws = websocket.WebSocket()
        ws.connect(f"ws://{client.server_address}/ws?clientId={client.client_id}")
        try:
            ws.recv()  # the greeting
            runs = []
            for color in colors:
                prompt_id = str(uuid.uuid4())
                client.queue_prompt(empty_image(16, 16, color=color, prefix="same_messages"), prompt_id)
                runs.append([_shape(message) for message in _until_done(ws, prompt_id)])
            return runs
        finally:
            ws.close()

    expected = messages(direct)
    assert messages(ExampleClient(address(deployed.url))) == expected
    assert [kind for kind in expected[1] if kind != "progress_state"][:3] == [
        ["status", {"exec_info": {"queue_remaining": 1}}],
        ["status", {"exec_info": {"queue_remaining": 1}}],
        "execution_start",
    ]


def _shape(message: dict[str, Any]) -> Any:
    """A message's type, with the node of `executing` and the queue of `status`."""
    if message["type"] in ("executing", "status"):
        return [message["type"], message["data"].get("node", message["data"].get("status"))]
    return message["type"]


def _until_done(ws: websocket.WebSocket, prompt_id: str) -> list[dict[str, Any]]:
    ws.settimeout(30)
    seen = []
    while True:
        out = ws.recv()
        if not isinstance(out, str):
            continue
        message = json.loads(out)
        seen.append(message)
        data = message.get("data") or {}
        if message["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return seen


def test_history_has_comfyuis_shape_and_views_serve_its_outputs(deployment: Any) -> None:
    deployed: Deployment = deployment()
    client = ExampleClient(address(deployed.url))
    images = client.run(empty_image(32, 32, color=0xFF0000, prefix="hist"))
    listing = requests.get(deployed.url + "/history", params={"max_items": 5}, timeout=10).json()
    ((prompt_id, entry),) = listing.items()
    _number, listed_id, prompt, extra, outputs = entry["prompt"]
    assert listed_id == prompt_id and prompt["2"]["inputs"]["filename_prefix"] == "hist"
    assert extra == {"client_id": client.client_id} and outputs == ["2"]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert kinds[0] == "execution_start" and kinds[-1] == "execution_success"
    (image,) = entry["outputs"]["2"]["images"]
    assert image["filename"] == "hist_00001_.png" and image["type"] == "output"
    assert entry["meta"]["2"]["node_id"] == "2"
    assert requests.get(deployed.url + "/api/history/" + prompt_id, timeout=10).json() == {prompt_id: entry}
    assert requests.get(deployed.url + "/history/no-such-prompt", timeout=10).json() == {}
    view = requests.get(
        deployed.url + "/api/view", params={"filename": image["filename"], "type": "output"}, timeout=10
    )
    assert view.status_code == 200 and view.content == images["2"][0]


def test_history_asked_as_the_end_is_read_has_the_prompt_while_its_outputs_are_still_collected(
    deployment: Any,
) -> None:
    deployed: Deployment = deployment()
    for emulator in deployed.emulators:  # the job reads its outputs after ComfyUI's end, slowly
        requests.post(emulator.url + "/emulator/config", json={"view_delay": 1.0}, timeout=5).raise_for_status()
    client = ExampleClient(address(deployed.url))
    ws = websocket.WebSocket()
    ws.connect(f"ws://{client.server_address}/ws?clientId={client.client_id}")
    try:
        prompt_id = str(uuid.uuid4())
        client.queue_prompt(empty_image(16, 16, color=0x00FF00, prefix="slow_outputs"), prompt_id)
        _until_done(ws, prompt_id)
        entry = client.get_history(prompt_id)[prompt_id]  # at once, as ComfyUI's example asks
    finally:
        ws.close()
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"]["2"]["images"][0]["filename"] == "slow_outputs_00001_.png"


def test_prompt_refusals_have_comfyuis_shape(deployment: Any) -> None:
    url = deployment().url
    missing = requests.post(
        url + "/prompt", json={"prompt": {"1": {"class_type": "NoSuchNodeType", "inputs": {}}}}, timeout=10
    )
    assert missing.status_code == 400
    assert missing.json()["error"]["type"] == "invalid_prompt" and missing.json()["node_errors"] == {}
    broken = empty_image()
    broken["1"]["inputs"]["width"] = 99999
    refused = requests.post(url + "/prompt", json={"prompt": broken}, timeout=10)
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation" and "1" in body["node_errors"]
    assert requests.post(url + "/prompt", json={}, timeout=10).json()["error"]["type"] == "no_prompt"
    partial = {**empty_image(prefix="partial"), "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}
    answer = requests.post(url + "/prompt", json={"prompt": partial}, timeout=10)
    assert answer.status_code == 200, "as ComfyUI: the valid output runs, node_errors tells of the other"
    (error,) = answer.json()["node_errors"].values()
    assert answer.json()["node_errors"].keys() == {"3"} and error["dependent_outputs"] == ["3"]
    prompt_id = answer.json()["prompt_id"]
    entry = wait_until(lambda: requests.get(url + "/history/" + prompt_id, timeout=10).json(), timeout=30)
    assert entry[prompt_id]["prompt"][4] == ["2"] and entry[prompt_id]["status"]["status_str"] == "success"


def test_a_prompt_queued_on_one_gateway_shows_on_another(deployment: Any, tmp_path: Path) -> None:
    deployed: Deployment = deployment(step_delay=0.2)
    other = deployed.url
    if deployed.topology == "fleet":  # a second gateway over the same Redis
        other = _second_gateway(deployed, tmp_path)
    answer = requests.post(deployed.url + "/prompt", json={"prompt": txt2img(seed=1, steps=10)}, timeout=10)
    assert answer.status_code == 200, answer.text
    prompt_id = answer.json()["prompt_id"]
    assert isinstance(answer.json()["number"], int) and answer.json()["node_errors"] == {}

    def queued() -> bool:
        queue = requests.get(other + "/queue", timeout=10).json()
        return prompt_id in [item[1] for item in queue["queue_running"] + queue["queue_pending"]]

    wait_until(queued, timeout=20)
    assert requests.get(other + "/prompt", timeout=10).json()["exec_info"]["queue_remaining"] >= 1
    wait_until(lambda: requests.get(other + "/history/" + prompt_id, timeout=10).json(), timeout=60)
    queue = requests.get(other + "/queue", timeout=10).json()
    assert queue == {"queue_running": [], "queue_pending": []}


def test_the_moment_history_has_a_prompt_the_queue_no_longer_does(deployment: Any) -> None:
    """ComfyUI moves a prompt from its queue to its history at once: a client that sees its entry
    in `/history` finds it in neither `/queue` nor `/prompt`'s count, on the instance it asked."""
    deployed: Deployment = deployment(step_delay=0)
    url = deployed.url
    for seed in range(6):
        workflow = empty_image(512, 512, color=seed + 1, prefix=f"q{seed}", batch=4)  # outputs to collect
        answer = requests.post(url + "/prompt", json={"prompt": workflow}, timeout=10)
        assert answer.status_code == 200, answer.text
        prompt_id, entry = answer.json()["prompt_id"], url + "/history/" + answer.json()["prompt_id"]
        wait_until(lambda entry=entry: requests.get(entry, timeout=10).json(), 60, 0.001)
        queue = requests.get(url + "/queue", timeout=10).json()
        listed = {name: [item[1] for item in items] for name, items in queue.items()}
        assert prompt_id not in listed["queue_running"] + listed["queue_pending"], listed
        assert requests.get(url + "/prompt", timeout=10).json()["exec_info"]["queue_remaining"] == 0


def test_a_prompt_is_found_everywhere_the_moment_its_answer_names_it(deployment: Any) -> None:
    """A prompt sent without its own id is answered before its status log is written (one box
    claims it with its first write): the moment the answer names it, `/queue`, the task's summary
    and its cancel find it, and its end is in `/history` and in its status log."""
    deployed: Deployment = deployment(step_delay=0.3)
    url = deployed.url
    answer = requests.post(url + "/prompt", json={"prompt": txt2img(seed=4, steps=30)}, timeout=10)
    assert answer.status_code == 200, answer.text
    prompt_id = answer.json()["prompt_id"]
    queue = requests.get(url + "/queue", timeout=10).json()
    assert prompt_id in [item[1] for item in queue["queue_running"] + queue["queue_pending"]]
    task = requests.get(url + "/api/serverless/task", params={"task_id": prompt_id}, timeout=10)
    assert task.status_code == 200 and task.json()["state"] in ("queued", "running"), task.text
    assert requests.get(url + "/history/" + prompt_id, timeout=10).json() == {}, "not ended: as ComfyUI, {}"
    cancel = requests.post(url + "/api/serverless/cancel", params={"task_id": prompt_id}, timeout=10)
    assert cancel.status_code == 202, cancel.text
    entry = wait_until(lambda: requests.get(url + "/history/" + prompt_id, timeout=10).json(), timeout=30)
    assert entry[prompt_id]["status"]["status_str"] == "error"

    def logged() -> Any:
        payloads = requests.get(url + "/api/serverless/status", params={"task_id": prompt_id}, timeout=10).json()
        return payloads and payloads[-1]["type"] == "error" and payloads

    assert wait_until(logged, timeout=30)[-1]["error_code"] == "EXECUTION_INTERRUPTED"


def test_a_prompt_whose_log_cannot_be_claimed_is_refused_and_stopped_in_comfyui(tmp_path: Path) -> None:
    """One box sends a prompt to ComfyUI while its status log is claimed: when the claim fails
    (here something not a file squats the prompt id's name in the status folder), the prompt is
    refused and ComfyUI does not go on with it. (A fleet's gateway queues prompts through Redis.)"""
    emulator = InProcessEmulator(tmp_path / "emulator", step_delay=0.3)
    status = tmp_path / "status"
    app = InProcessApp(tmp_path, {"COMFYUI_URL": emulator.url, "STATUS_DIR": str(status), "DRAIN_TIMEOUT": "5"})
    try:
        prompt_id = str(uuid.uuid4())
        (status / prompt_id).mkdir(parents=True)
        answer = requests.post(
            app.url + "/prompt", json={"prompt": txt2img(seed=3, steps=30), "prompt_id": prompt_id}, timeout=10
        )
        assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMS", answer.text
        assert requests.get(app.url + "/queue", timeout=10).json() == {"queue_running": [], "queue_pending": []}

        def stopped_in_comfyui() -> bool:
            queue = requests.get(emulator.url + "/queue", timeout=10).json()
            held = [item[1] for item in queue["queue_running"] + queue["queue_pending"]]
            return prompt_id not in held

        wait_until(stopped_in_comfyui, timeout=20)
        history = requests.get(emulator.url + "/history/" + prompt_id, timeout=10).json()
        assert not history or history[prompt_id]["status"]["status_str"] == "error", "interrupted, not run to its end"
    finally:
        app.stop()
        emulator.stop()


def test_interrupt_and_queue_delete_cancel_our_jobs(deployment: Any) -> None:
    deployed: Deployment = deployment(step_delay=0.3)
    url = deployed.url
    ids = [
        requests.post(url + "/prompt", json={"prompt": txt2img(seed=n, steps=30)}, timeout=10).json()["prompt_id"]
        for n in (1, 2, 3)
    ]

    def running() -> list[Any]:
        return list(requests.get(url + "/queue", timeout=10).json()["queue_running"])

    wait_until(running, timeout=20)
    queue = requests.get(url + "/queue", timeout=10).json()
    pending = [item[1] for item in queue["queue_pending"]]
    for prompt_id in pending:
        assert requests.post(url + "/queue", json={"delete": [prompt_id]}, timeout=10).status_code == 200
    assert requests.post(url + "/interrupt", timeout=10).status_code == 200
    for prompt_id in ids:
        entry = wait_until(lambda p=prompt_id: requests.get(url + "/history/" + p, timeout=10).json(), timeout=30)
        assert entry[prompt_id]["status"]["status_str"] == "error"


def test_upload_image_stages_an_input_a_prompt_loads(deployment: Any) -> None:
    deployed: Deployment = deployment()
    client = ExampleClient(address(deployed.url))
    direct_png = client.run(empty_image(16, 16, color=0x00FF00, prefix="upload_src"))["2"][0]
    files = {"image": ("green.png", direct_png, "image/png")}
    uploaded = requests.post(deployed.url + "/upload/image", files=files, data={"overwrite": "true"}, timeout=10)
    assert uploaded.status_code == 200, uploaded.text
    name = uploaded.json()["name"]
    assert uploaded.json()["type"] == "input" and name.endswith(".png")
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "loaded"}},
    }
    images = client.run(workflow)
    assert len(images["2"]) == 1 and images["2"][0].startswith(b"\x89PNG")
    staged = requests.get(deployed.url + "/view", params={"filename": name, "type": "input"}, timeout=10)
    assert staged.status_code == 200 and staged.content == direct_png
    # The editor's mask: the original with the mask's alpha, as ComfyUI makes it
    mask = io.BytesIO()
    Image.new("RGBA", (16, 16), (0, 0, 0, 77)).save(mask, format="PNG")
    ref = json.dumps({"filename": name, "subfolder": "", "type": "input"})
    files = {"image": ("mask.png", mask.getvalue(), "image/png")}
    masked = requests.post(deployed.url + "/upload/mask", files=files, data={"original_ref": ref}, timeout=10)
    assert masked.status_code == 200, masked.text
    made = requests.get(deployed.url + "/view", params={"filename": masked.json()["name"], "type": "input"}, timeout=10)
    with Image.open(io.BytesIO(made.content)) as image:
        assert image.mode == "RGBA" and image.getpixel((3, 3)) == (0, 255, 0, 77)


def test_object_info_and_system_stats_answer_from_a_workers_comfyui(deployment: Any) -> None:
    url = deployment().url
    info = requests.get(url + "/object_info", timeout=10).json()
    assert "KSampler" in info and info["SaveImage"]["output_node"] is True
    one = requests.get(url + "/api/object_info/SaveImage", timeout=10).json()
    assert list(one) == ["SaveImage"]
    stats = requests.get(url + "/system_stats", timeout=10)
    assert stats.status_code == 200 and stats.json()["system"]["comfyui_version"]


def test_model_folders_and_embeddings_answer_as_comfyui_lists_them(deployment: Any) -> None:
    url = deployment().url
    # a gateway answers from what its workers published (at their start, beside /object_info)
    folders = wait_until(lambda: (answer := requests.get(url + "/models", timeout=10)).ok and answer.json())
    assert folders[:3] == ["checkpoints", "configs", "loras"] and "embeddings" in folders
    checkpoints = requests.get(url + "/api/models/checkpoints", timeout=10).json()
    options = requests.get(url + "/object_info/CheckpointLoaderSimple", timeout=10).json()
    assert checkpoints == options["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert requests.get(url + "/models/loras", timeout=10).json() == []
    assert requests.get(url + "/embeddings", timeout=10).json() == []
    assert requests.get(url + "/models/no-such-folder", timeout=10).status_code == 404


def _second_gateway(deployed: Deployment, root: Path) -> str:
    """Another gateway of the same fleet (its own process state, the fleet's Redis)."""
    assert deployed.redis_url is not None
    env = {
        "STATUS_BACKEND": "redis",
        "QUEUE_BACKEND": "redis",
        "REDIS_URL": deployed.redis_url,
        "ROLE": "gateway",
        "COMFYUI_URL": "http://127.0.0.1:9",
        "FC_INSTANCE_ID": "gateway2",
        "STATUS_DIR": str(root / "unused-status"),
        "WORKFLOWS_DIR": str(root / "workflows"),
    }
    second = InProcessApp(root, env)
    deployed.apps.append(second)
    return second.url


def test_api_keys_guard_comfyuis_paths_and_the_websocket_takes_a_token(deployment: Any) -> None:
    url = deployment(API_KEYS="key-one-0123456789,key-two-0123456789").url
    mine, theirs = {"Authorization": "Bearer key-one-0123456789"}, {"Authorization": "Bearer key-two-0123456789"}
    assert requests.post(url + "/prompt", json={"prompt": empty_image()}, timeout=10).status_code == 401
    assert requests.get(url + "/history", timeout=10).status_code == 401
    with pytest.raises(websocket.WebSocketException):
        websocket.create_connection(f"ws://{address(url)}/ws?clientId=x").recv()
    client_id = str(uuid.uuid4())
    ws = websocket.create_connection(f"ws://{address(url)}/ws?clientId={client_id}&token=key-one-0123456789")
    try:
        assert json.loads(ws.recv())["data"]["sid"] == client_id
        body = {"prompt": empty_image(prefix="keyed"), "client_id": client_id}
        answer = requests.post(url + "/prompt", json=body, headers=mine, timeout=10)
        assert answer.status_code == 200, answer.text
        prompt_id = answer.json()["prompt_id"]
        _until_done(ws, prompt_id)
    finally:
        ws.close()
    assert prompt_id in requests.get(url + "/history/" + prompt_id, headers=mine, timeout=10).json()
    assert requests.get(url + "/history/" + prompt_id, headers=theirs, timeout=10).json() == {}
    assert prompt_id not in requests.get(url + "/history", headers=theirs, timeout=10).json()


# -- Comfy API v2, driven by the official client (comfy-sdk) --------------------------------------


@pytest.fixture
def comfy_sdk(monkeypatch: pytest.MonkeyPatch) -> Any:
    sdk = pytest.importorskip("comfy_sdk")

    def client(url: str) -> Any:
        monkeypatch.setenv("COMFY_BASE_URL", url)  # the SDK's documented way to target a deployment
        monkeypatch.delenv("COMFY_API_KEY", raising=False)
        return sdk.Comfy()

    return client


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_comfy_sdk_runs_a_workflow_and_gets_the_images_a_direct_run_gives(
    deployment: Any, direct: ExampleClient, comfy_sdk: Any, name: str
) -> None:
    deployed: Deployment = deployment()
    expected = direct.run(WORKFLOWS[name]())
    client = comfy_sdk(deployed.url)
    # The SDK's getting-started pattern, unchanged but for the workflow's source.
    wf = client.workflows.from_json(WORKFLOWS[name]())
    job = client.run(wf, timeout=60)
    (node,) = expected
    outputs = job.get_outputs(node)
    assert [output.to_bytes() for output in outputs] == expected[node]
    assert job.status == "succeeded" and outputs[0].content_type == "image/png"
    assert client.jobs.get(job.id).get_workflow().graph == WORKFLOWS[name]()
    assert job.id in [summary.id for summary in client.list_jobs()]
    client.close()


def test_comfy_sdk_uploads_an_asset_a_workflow_loads(deployment: Any, direct: ExampleClient, comfy_sdk: Any) -> None:
    deployed: Deployment = deployment()
    png = direct.run(empty_image(16, 16, color=0x0000FF, prefix="asset_src"))["2"][0]
    client = comfy_sdk(deployed.url)
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "from_asset"}},
    }
    wf = client.workflows.from_json(workflow)
    wf.set_input("1", "image", client.assets.from_bytes(png, filename="blue.png"))
    job = client.run(wf, timeout=60)
    (output,) = job.get_outputs("2")
    assert output.to_bytes().startswith(b"\x89PNG") and job.status == "succeeded"
    again = client.assets.from_bytes(png, filename="blue-again.png")  # the same bytes: found by hash, not sent again
    wf.set_input("1", "image", again)
    assert client.run(wf, timeout=60).status == "succeeded"
    client.close()


def test_v2_job_events_stream_status_progress_outputs_and_resume(deployment: Any) -> None:
    url = deployment().url
    created = requests.post(url + "/api/v2/jobs", json={"workflow": txt2img(seed=5, steps=3)}, timeout=10)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] in ("queued", "running") and job["urls"]["events"].endswith("/events")
    frames = _sse(requests.get(url + job["urls"]["events"], stream=True, timeout=60))
    kinds = [kind for _, kind, _ in frames]
    assert kinds[0] == "status" and kinds[-1] == "status" and "progress" in kinds and "output" in kinds
    assert frames[-1][2] == {"status": "succeeded", "queue_position": None}
    resumed = _sse(
        requests.get(url + job["urls"]["events"], headers={"Last-Event-ID": frames[0][0]}, stream=True, timeout=60)
    )
    assert resumed[-1][2]["status"] == "succeeded"
    done = requests.get(url + job["urls"]["self"], timeout=10).json()
    assert done["status"] == "succeeded" and done["progress"]["value"] == 1.0 and len(done["outputs"]) == 1
    listed = requests.get(url + "/api/v2/jobs", timeout=10).json()
    assert job["id"] in [each["id"] for each in listed["jobs"]]
    ui = {"nodes": [], "links": []}
    refused = requests.post(url + "/api/v2/jobs", json={"workflow": ui}, timeout=10)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "workflow_format_ui"
    broken = empty_image()
    broken["1"]["inputs"]["width"] = 99999
    invalid = requests.post(url + "/api/v2/jobs", json={"workflow": broken}, timeout=10)
    assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_workflow"
    assert requests.get(url + "/api/v2/jobs/nosuch", timeout=10).status_code == 404
    key = {"Idempotency-Key": str(uuid.uuid4())}
    once = requests.post(url + "/api/v2/jobs", json={"workflow": broken}, headers=key, timeout=10)
    assert once.status_code == 422, "refused: the key is not spent"
    first = requests.post(url + "/api/v2/jobs", json={"workflow": empty_image()}, headers=key, timeout=10)
    again = requests.post(url + "/api/v2/jobs", json={"workflow": empty_image()}, headers=key, timeout=10)
    assert first.status_code == 201 and again.status_code == 422
    assert again.json()["error"]["code"] == "idempotency_key_reuse"


def test_v2_cancel_ends_a_job_canceled(deployment: Any) -> None:
    url = deployment(step_delay=0.3).url
    job = requests.post(url + "/api/v2/jobs", json={"workflow": txt2img(seed=7, steps=40)}, timeout=10).json()
    answer = requests.post(url + job["urls"]["cancel"], timeout=10)
    assert answer.status_code == 200 and answer.json()["status"] in ("canceling", "canceled")

    def ended() -> dict[str, Any] | None:
        view = requests.get(url + job["urls"]["self"], timeout=10).json()
        return view if view["status"] in ("canceled", "failed", "succeeded") else None

    assert wait_until(ended, timeout=30)["status"] == "canceled"


def _sse(response: requests.Response) -> list[tuple[str, str, Any]]:
    frames, seq, kind = [], "", ""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("id: "):
            seq = line[4:]
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            frames.append((seq, kind, json.loads(line[6:])))
    return frames


def test_a_prompt_its_comfyui_refuses_still_ends_on_the_websocket(deployment: Any) -> None:
    deployed: Deployment = deployment()
    client = ExampleClient(address(deployed.url))
    ws = websocket.create_connection(f"ws://{client.server_address}/ws?clientId={client.client_id}")
    try:
        ws.recv()  # the greeting
        workflow = {  # passes our checks; the worker's ComfyUI refuses it (no such input file)
            "1": {"class_type": "LoadImage", "inputs": {"image": "no_such_file.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "never"}},
        }
        prompt_id = str(uuid.uuid4())
        client.queue_prompt(workflow, prompt_id)
        seen = _until_done(ws, prompt_id)
    finally:
        ws.close()
    assert [message["type"] for message in seen][-2:] == ["execution_error", "executing"]
    entry = client.get_history(prompt_id)[prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}


def test_a_client_back_mid_run_gets_the_running_node_then_the_rest(deployment: Any) -> None:
    deployed: Deployment = deployment(step_delay=0.1)
    client = ExampleClient(address(deployed.url))
    url = f"ws://{client.server_address}/ws?clientId={client.client_id}"
    first = websocket.create_connection(url)
    first.recv()
    prompt_id = str(uuid.uuid4())
    client.queue_prompt(txt2img(seed=3, steps=30), prompt_id)
    first.settimeout(30)
    while json.loads(first.recv()).get("type") != "progress":
        pass  # the sampler runs
    first.close()
    second = websocket.create_connection(url)  # the same clientId, as ComfyUI's reconnecting clients do
    try:
        assert json.loads(second.recv())["data"]["sid"] == client.client_id
        assert json.loads(second.recv()) == {"type": "executing", "data": {"node": "3"}}, "the node running now"
        seen = _until_done(second, prompt_id)
    finally:
        second.close()
    types = [message["type"] for message in seen]
    assert "execution_success" in types and types[-1] == "executing" and "execution_start" not in types


def test_a_client_that_stops_reading_gets_every_message_in_order_once_it_reads_again(
    deployment: Any, tmp_path: Path
) -> None:
    """Sampler previews of hundreds of KB while the client reads nothing: what does not fit the
    socket waits its turn, and once the client reads, ComfyUI's messages are all there in
    ComfyUI's order, with previews among them as ComfyUI's binary frames, each a whole image, each
    after a step's `progress` and before the sampler's output."""
    deployed: Deployment = deployment(step_delay=0.05)
    seed = uuid.uuid4().int % 100_000  # a prompt no ComfyUI has run (nothing cached)
    big = {"preview_size": 1024, "step_delay": 0.05}  # ~200 KB a preview, 20 steps in a second

    def frames(client: ExampleClient, urls: list[str]) -> list[Any]:
        for url in urls:
            requests.post(url + "/emulator/config", json=big, timeout=5)
        ws = websocket.create_connection(f"ws://{client.server_address}/ws?clientId={client.client_id}")
        try:
            ws.recv()  # the greeting
            prompt_id = str(uuid.uuid4())
            client.queue_prompt(txt2img(seed=seed, steps=20, size=512, prefix="unread"), prompt_id)
            wait_until(lambda: prompt_id in client.get_history(prompt_id), timeout=60)  # read nothing till the end
            ws.settimeout(30)
            seen: list[Any] = []
            while True:
                opcode, data = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    assert bytes(data[:8]) == bytes([0, 0, 0, 1, 0, 0, 0, 1])  # a preview, JPEG (ComfyUI's types)
                    with Image.open(io.BytesIO(bytes(data)[8:])) as image:
                        image.load()  # whole
                    seen.append("preview")
                    continue
                message = json.loads(data)
                seen.append(_shape(message))
                if message["type"] == "executing" and message["data"].get("node") is None:
                    return seen
        finally:
            ws.close()
            for url in urls:
                requests.post(url + "/emulator/config", json={"preview_size": 512, "step_delay": 0.0}, timeout=5)

    fresh = InProcessEmulator(tmp_path / "direct", step_delay=0.05)  # as fresh as the deployment's: nothing cached
    try:
        expected = frames(ExampleClient(address(fresh.url)), [fresh.url])
    finally:
        fresh.stop()
    got = frames(ExampleClient(address(deployed.url)), [emulator.url for emulator in deployed.emulators])
    assert [frame for frame in got if frame != "preview"] == [frame for frame in expected if frame != "preview"]
    assert expected.count("preview") == 20
    assert 2 <= got.count("preview") <= 20, "the newest, at most 4 a second: a job of a second shows some"
    sampler_output = got.index("executed")
    for at, frame in enumerate(got):
        if frame == "preview":
            assert "progress" in got[:at] and at < sampler_output


def test_a_client_message_nested_past_any_parser_leaves_the_websocket_serving(deployment: Any) -> None:
    """A client's text that names `feature_flags` but nests deeper than JSON parsers go is not
    taken for ComfyUI's flags: the socket goes on serving the client's prompts."""
    deployed: Deployment = deployment()
    client = ExampleClient(address(deployed.url))
    ws = websocket.create_connection(f"ws://{client.server_address}/ws?clientId={client.client_id}", timeout=30)
    try:
        ws.recv()  # the greeting
        ws.send('{"type": "feature_flags", "data": ' + "[" * 50_000 + "]" * 50_000 + "}")
        prompt_id = str(uuid.uuid4())
        client.queue_prompt(empty_image(16, 16, color=uuid.uuid4().int % 0xFFFFFF, prefix="nested_flags"), prompt_id)
        assert _until_done(ws, prompt_id)[-1]["data"] == {"node": None, "prompt_id": prompt_id}
    finally:
        ws.close()


def test_comfy_sdk_follows_a_jobs_live_events(deployment: Any, comfy_sdk: Any) -> None:
    client = comfy_sdk(deployment(step_delay=0.05).url)
    job = client.submit(client.workflows.from_json(txt2img(seed=1, steps=5)))
    kinds = [type(event).__name__ for event in job.events()]  # the SDK's typed events, to the end
    assert kinds[0] == "StatusChange" and kinds[-1] == "StatusChange"
    assert "Progress" in kinds and "OutputReady" in kinds
    assert job.refresh().status == "succeeded"
    client.close()


def test_view_of_a_file_nobody_made_answers_404(deployment: Any) -> None:
    """On a gateway a file not kept yet is waited for a moment (a worker keeps an output just after
    ComfyUI's `executed` names it); one nobody made is still a 404."""
    url = deployment().url
    missing = requests.get(url + "/view", params={"filename": "nobody_00001_.png", "type": "output"}, timeout=30)
    assert missing.status_code == 404
