"""Models on demand, on one box and through a gateway and two workers (CONTRACT.md section 8,
"Models"): a checkpoint named by URL is fetched once into the content-addressed store, placed
in the emulator's models folder (which it lists at once, as ComfyUI does) and reported in
`data.models`; refusals leave nothing placed; the models API imports with byte progress, lists,
deletes and pins. The file server is real HTTP on loopback and counts its GETs."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import post_run, txt2img, wait_until
from tests.model_server import ModelServer, safetensors
from tests.test_stream import read_events
from tests.topologies import Deployment

Deploy = Callable[..., Deployment]


@pytest.fixture
def files() -> Iterator[ModelServer]:
    server = ModelServer()
    yield server
    server.stop()


def model_env(root: Path, **more: str) -> dict[str, str]:
    return {"MODELS_DIR": str(root / "models"), "MODEL_ALLOWED_HOSTS": "127.0.0.1", **more}


def with_checkpoint(reference: str, prefix: str = "models") -> dict[str, Any]:
    workflow = txt2img(steps=2, prefix=prefix, size=32)
    workflow["4"]["inputs"]["ckpt_name"] = reference
    return workflow


def placed(root: Path) -> list[str]:
    """Every file in ComfyUI's checkpoints folder and the store's blobs."""
    found = [p.name for p in (root / "models" / "checkpoints").glob("*")] if (root / "models").exists() else []
    return found + [p.name for p in (root / "models" / ".cache" / "blobs").glob("*")]


def test_a_checkpoint_by_url_runs_then_comes_from_the_store(
    deployment: Deploy, files: ModelServer, tmp_path: Path
) -> None:
    data = safetensors(300_000)
    url = files.add("tiny.safetensors", data)
    app = deployment(**model_env(tmp_path))

    first = post_run(app.url, with_checkpoint(url))
    assert first.status_code == 200, first.text
    [model] = first.json()["data"]["models"]
    assert model["node_id"] == "4" and model["input"] == "ckpt_name"
    assert model["source"] == url and model["name"] == "tiny.safetensors"
    assert model["sha256"] == hashlib.sha256(data).hexdigest() and model["bytes"] == len(data)
    assert model["cached"] is False and model["download_s"] > 0
    assert (tmp_path / "models" / "checkpoints" / "tiny.safetensors").read_bytes() == data

    second = post_run(app.url, with_checkpoint(url))
    assert second.status_code == 200, second.text
    [again] = second.json()["data"]["models"]
    assert again["cached"] is True and again["name"] == "tiny.safetensors"
    assert files.gets["tiny.safetensors"] == 1


def test_a_hosts_authorization_goes_to_it_and_is_never_logged(
    deployment: Deploy, files: ModelServer, tmp_path: Path
) -> None:
    url = files.add("private.safetensors", safetensors(20_000))
    token = "Bearer model-registry-token-never-logged"
    app = deployment(**model_env(tmp_path, MODEL_AUTH_HEADERS=json.dumps({"127.0.0.1": token})))
    answer = post_run(app.url, with_checkpoint(url))
    assert answer.status_code == 200, answer.text
    assert files.authorizations == [token]
    assert "model-registry-token" not in app.log_text()


def test_five_runs_naming_a_new_url_make_one_download(deployment: Deploy, files: ModelServer, tmp_path: Path) -> None:
    url = files.add("shared.safetensors", safetensors(2_000_000))
    files.delay = 0.005  # ~30 chunks: the five requests overlap the download
    app = deployment(**model_env(tmp_path))
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda i: post_run(app.url, with_checkpoint(url, f"five{i}")), range(5)))
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
    assert files.gets["shared.safetensors"] == 1
    names = {a.json()["data"]["models"][0]["name"] for a in answers}
    assert names == {"shared.safetensors"}


@pytest.mark.parametrize("case", ["wrong pin", "private address", "too large", "not safetensors"])
def test_a_refused_model_fails_clearly_and_nothing_is_placed(
    deployment: Deploy, files: ModelServer, tmp_path: Path, case: str
) -> None:
    data = safetensors(100_000)
    url = files.add("refused.safetensors", data)
    env = model_env(tmp_path)
    if case == "wrong pin":
        reference, expected = f"{url}#sha256={'0' * 64}", "not the pinned"
    elif case == "private address":
        reference, expected = "http://169.254.169.254/latest/model.safetensors", "blocked address"
    elif case == "too large":
        reference, expected = url, "larger than"
        env["MODEL_CACHE_MAX_BYTES"] = "50000"
    else:
        reference, expected = files.add("page.safetensors", b"<html>Not Found</html>" * 10), "not a usable safetensors"
    app = deployment(**env)
    answer = post_run(app.url, with_checkpoint(reference))
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert error["error_code"] == "INPUT_ERROR"
    assert expected in error["error_message"] and "node 4" in error["error_message"]
    assert error["raw"]["input_name"] == "ckpt_name"
    assert placed(tmp_path) == []
    if case == "private address":
        assert files.gets["refused.safetensors"] == 0


def test_an_import_streams_its_progress_then_lists_and_deletes(
    deployment: Deploy, files: ModelServer, tmp_path: Path
) -> None:
    data = safetensors(3_000_000)
    url = files.add("imported.safetensors", data)
    files.delay = 0.02  # about a second: several progress events
    app = deployment(**model_env(tmp_path))
    started = requests.post(
        app.url + "/api/models", json={"source": url, "folder": "loras", "name": "mine.safetensors"}, timeout=30
    )
    assert started.status_code == 202, started.text
    task_id = started.json()["task_id"]
    stream = requests.get(app.url + "/api/serverless/events", params={"task_id": task_id}, stream=True, timeout=60)
    payloads = [json.loads(e.data) for e in read_events(stream) if e.data]
    done = [
        p["data"]["bytes_done"] for p in payloads if p["type"] == "serverless_progress" and "bytes_done" in p["data"]
    ]
    assert len(done) >= 2 and done == sorted(done) and done[-1] == len(data)
    assert payloads[-1]["type"] == "serverless_api"
    assert payloads[-1]["data"]["model"]["name"] == "mine.safetensors"

    task = requests.get(app.url + "/api/serverless/task", params={"task_id": task_id}, timeout=10).json()
    assert task["state"] == "succeeded"
    listed = requests.get(app.url + "/api/models", params={"folder": "loras"}, timeout=10).json()["models"]
    assert [(m["folder"], m["name"], m["sha256"], m["bytes"], m["pinned"]) for m in listed] == [
        ("loras", "mine.safetensors", hashlib.sha256(data).hexdigest(), len(data), False)
    ]
    assert listed[0]["source"] == url and listed[0]["last_used"]

    gone = requests.delete(app.url + "/api/models/loras/mine.safetensors", timeout=30)
    assert gone.status_code == 200, gone.text
    assert requests.get(app.url + "/api/models", timeout=10).json()["models"] == []
    assert not (tmp_path / "models" / "loras" / "mine.safetensors").exists()
    missing = requests.delete(app.url + "/api/models/loras/mine.safetensors", timeout=30)
    assert missing.status_code == 404


def test_eviction_keeps_pinned_models(deployment: Deploy, files: ModelServer, tmp_path: Path) -> None:
    size = 400_000
    urls = [files.add(f"m{i}.safetensors", safetensors(size, seed=i)) for i in range(3)]
    app = deployment(**model_env(tmp_path, MODEL_CACHE_MAX_BYTES=str(2 * size + 1000)))
    assert post_run(app.url, with_checkpoint(urls[0], "ev0")).status_code == 200
    pinned = requests.put(app.url + "/api/models/checkpoints/m0.safetensors/pin", json={"pinned": True}, timeout=30)
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True, pinned.text
    time.sleep(0.05)  # m1 used after m0: m0 is the least recently used
    assert post_run(app.url, with_checkpoint(urls[1], "ev1")).status_code == 200
    assert post_run(app.url, with_checkpoint(urls[2], "ev2")).status_code == 200
    names = {m["name"] for m in requests.get(app.url + "/api/models", timeout=10).json()["models"]}
    assert names == {"m0.safetensors", "m2.safetensors"}  # m1 evicted, m0 pinned
    assert not (tmp_path / "models" / "checkpoints" / "m1.safetensors").exists()


def test_eviction_keeps_a_model_a_running_job_uses(deployment: Deploy, files: ModelServer, tmp_path: Path) -> None:
    size = 400_000
    urls = [files.add(f"u{i}.safetensors", safetensors(size, seed=10 + i)) for i in range(3)]
    app = deployment(step_delay=0.05, **model_env(tmp_path, MODEL_CACHE_MAX_BYTES=str(2 * size + 1000)))
    long_run = with_checkpoint(urls[0], "long")
    long_run["3"]["inputs"]["steps"] = 80  # about 4 s: u0 is in use meanwhile, and the least recently used
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post_run, app.url, long_run, None, {"x-fc-trace-id": "uses-u0"})
        wait_until(lambda: _state(app.url, "uses-u0") == "running", timeout=30)
        # Imports take no ComfyUI time: both land while the long run still uses u0.
        for url in urls[1:]:
            imported(app.url, {"source": url, "folder": "checkpoints"})
        assert _state(app.url, "uses-u0") == "running"
        names = {m["name"] for m in requests.get(app.url + "/api/models", timeout=10).json()["models"]}
        assert names == {"u0.safetensors", "u2.safetensors"}  # u1 evicted: u0 is in use
        assert running.result().status_code == 200


def imported(url: str, body: dict[str, Any]) -> str:
    """An import through the models API, waited for; its task id."""
    started = requests.post(url + "/api/models", json=body, timeout=30)
    assert started.status_code == 202, started.text
    task_id: str = started.json()["task_id"]
    wait_until(lambda: _state(url, task_id) in ("succeeded", "failed"), timeout=60)
    return task_id


def _state(url: str, task_id: str) -> str | None:
    answer = requests.get(url + "/api/serverless/task", params={"task_id": task_id}, timeout=10)
    return answer.json().get("state") if answer.status_code == 200 else None


def test_a_placed_model_is_listed_by_comfyui_at_once(deployment: Deploy, files: ModelServer, tmp_path: Path) -> None:
    url = files.add("listed.safetensors", safetensors(50_000))
    app = deployment(**model_env(tmp_path))
    assert post_run(app.url, with_checkpoint(url)).status_code == 200
    for emulator in app.emulators:
        info = requests.get(emulator.url + "/object_info/CheckpointLoaderSimple", timeout=10).json()
        assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["listed.safetensors"]
    wait_until(lambda: "listed.safetensors" in _listed_by_app(app.url), timeout=20)


def _listed_by_app(url: str) -> str:
    return requests.get(url + "/object_info/CheckpointLoaderSimple", timeout=10).text


def test_an_oss_checkpoint_is_read_with_the_jobs_credentials(deployment: Deploy, tmp_path: Path) -> None:
    from tests.test_oss_e2e import KEY_ID, local_oss_server, oss_env

    bucket = "models-e2e"
    data = safetensors(120_000, seed=7)
    with local_oss_server(bucket) as oss:
        oss.put_object(bucket, "ckpt/oss.safetensors", data)
        app = deployment(**model_env(tmp_path), **oss_env(oss, bucket))
        answer = post_run(app.url, with_checkpoint(f"oss://{bucket}/ckpt/oss.safetensors"))
        assert answer.status_code == 200, answer.text
        [model] = answer.json()["data"]["models"]
        assert model["name"] == "oss.safetensors" and model["sha256"] == hashlib.sha256(data).hexdigest()
        assert KEY_ID not in app.log_text()
        # Another bucket is not the instance's to read (no confused deputy through a model reference).
        other = post_run(app.url, with_checkpoint("oss://someone-elses/ckpt/x.safetensors"))
        assert other.status_code == 400 and other.json()["error_code"] == "INPUT_ERROR", other.text


def test_a_broken_download_resumes_where_it_stopped(deployment: Deploy, files: ModelServer, tmp_path: Path) -> None:
    data = safetensors(1_000_000, seed=3)
    url = files.add("resumed.safetensors", data)
    files.break_after["resumed.safetensors"] = 600_000
    app = deployment(**model_env(tmp_path))
    broken = post_run(app.url, with_checkpoint(url))
    assert broken.status_code == 400 and broken.json()["error_code"] == "INPUT_ERROR", broken.text
    assert placed(tmp_path) == []
    again = post_run(app.url, with_checkpoint(url))
    assert again.status_code == 200, again.text
    assert again.json()["data"]["models"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    [resumed_at] = files.ranges
    assert resumed_at.startswith("bytes=") and 600_000 <= int(resumed_at[6:-1]) < len(data)  # not from 0


def test_a_hash_names_a_model_the_store_holds(deployment: Deploy, files: ModelServer, tmp_path: Path) -> None:
    data = safetensors(80_000, seed=5)
    digest = hashlib.sha256(data).hexdigest()
    url = files.add("byhash.safetensors", data)
    app = deployment(**model_env(tmp_path))
    unknown = post_run(app.url, with_checkpoint(f"sha256:{digest}"))
    assert unknown.status_code == 400 and "holds no" in unknown.json()["error_message"], unknown.text
    imported(app.url, {"source": f"{url}#sha256={digest}", "folder": "checkpoints", "pin": True})
    answer = post_run(app.url, with_checkpoint(f"sha256:{digest}"))
    assert answer.status_code == 200, answer.text
    [model] = answer.json()["data"]["models"]
    assert model["cached"] is True and model["name"] == "byhash.safetensors" and model["source"] == f"sha256:{digest}"
    [listed] = requests.get(app.url + "/api/models", params={"folder": "checkpoints"}, timeout=10).json()["models"]
    assert listed["pinned"] is True


def test_a_malformed_reference_is_refused_before_it_runs(deployment: Deploy, tmp_path: Path) -> None:
    app = deployment(**model_env(tmp_path))
    answer = post_run(app.url, with_checkpoint("sha256:abc"))
    assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMS", answer.text
    assert "node 4" in answer.json()["error_message"]


def test_a_hosted_workflow_lists_its_models_and_whether_they_are_held(
    deployment: Deploy, files: ModelServer, tmp_path: Path
) -> None:
    url = files.add("hosted.safetensors", safetensors(60_000, seed=9))
    app = deployment(**model_env(tmp_path))
    put = requests.put(app.url + "/api/workflows/by-url", json=with_checkpoint(url), timeout=30)
    assert put.status_code == 201, put.text

    def needs() -> list[dict[str, Any]]:
        described = requests.get(app.url + "/api/workflows/by-url", timeout=10).json()
        return [m for m in described["models"] if m["node_id"] == "4"]

    assert needs() == [{"node_id": "4", "input": "ckpt_name", "folder": "checkpoints", "model": url, "held": False}]
    assert requests.post(app.url + "/api/workflows/by-url/run", json={}, timeout=60).status_code == 200
    wait_until(lambda: needs()[0]["held"], timeout=20)


def test_preload_workflows_fetches_their_models_before_the_app_is_up(files: ModelServer, tmp_path: Path) -> None:
    from tests.servers import InProcessApp, InProcessEmulator

    url = files.add("preloaded.safetensors", safetensors(70_000, seed=11))
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "pre.json").write_text(json.dumps(with_checkpoint(url)))
    emulator = InProcessEmulator(tmp_path / "emulator", models_dir=tmp_path / "models")
    try:
        env = {
            **model_env(tmp_path, PRELOAD_WORKFLOWS="pre"),
            "COMFYUI_URL": emulator.url,
            "STATUS_DIR": str(tmp_path / "status"),
            "WORKFLOWS_DIR": str(tmp_path / "workflows"),
        }
        app = InProcessApp(tmp_path, env)
        try:
            assert files.gets["preloaded.safetensors"] == 1  # before the app answered anything
            assert (tmp_path / "models" / "checkpoints" / "preloaded.safetensors").exists()
        finally:
            app.stop()
    finally:
        emulator.stop()


def test_with_api_keys_changing_models_needs_a_key(deployment: Deploy, files: ModelServer, tmp_path: Path) -> None:
    url = files.add("keyed.safetensors", safetensors(30_000))
    app = deployment(**model_env(tmp_path, API_KEYS="models-api-key-0001"))
    refused = requests.post(app.url + "/api/models", json={"source": url, "folder": "loras"}, timeout=30)
    assert refused.status_code == 401 and refused.json()["error_code"] == "UNAUTHORIZED"
    keyed = {"Authorization": "Bearer models-api-key-0001"}
    started = requests.post(app.url + "/api/models", json={"source": url, "folder": "loras"}, headers=keyed, timeout=30)
    assert started.status_code == 202, started.text
    assert requests.delete(app.url + "/api/models/loras/keyed.safetensors", timeout=30).status_code == 401
