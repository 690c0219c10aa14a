"""Versions and aliases of hosted workflows, and the environment check, on one box and on a
gateway with two workers: each PUT is a version, `<id>@<n>` and `<id>@<alias>` run the version
they name (ComfyUI's /history shows its values), an alias moves (promotion, rollback), results
and status logs say which version ran, versions outlive the instances that wrote them, and a
workflow needing a node class or a model the instance lacks is refused naming both."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.helpers import post_run, txt2img, wait_until
from tests.test_contract import ended
from tests.test_uiformat_e2e import ran
from tests.test_websocket import run as ws_run
from tests.topologies import Deployment

pytestmark = pytest.mark.timeout(240)

Deploy = Callable[..., Deployment]
API = "/api/workflows"
SAMPLER = "K采样器"  # the KSampler's title in tests/fixtures/txt2img_fc_doc.json (unique)


def put(url: str, ref: str, body: Any) -> requests.Response:
    return requests.put(f"{url}{API}/{ref}", data=json.dumps(body), timeout=30)


def run(url: str, ref: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    answer = requests.post(f"{url}{API}/{ref}/run", json=overrides or {}, timeout=60)
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()["data"]
    return data


def seed_ran(deployment: Deployment, data: dict[str, Any]) -> int:
    """The seed ComfyUI's /history shows for the run."""
    seed: int = ran(deployment, data["prompt_id"])["3"]["inputs"]["seed"]
    return seed


def move(url: str, workflow_id: str, alias: str, version: int) -> requests.Response:
    return requests.put(f"{url}{API}/{workflow_id}/aliases/{alias}", json={"version": version}, timeout=10)


def register_two(url: str, workflow_id: str) -> None:
    first = put(url, workflow_id, txt2img(seed=111, steps=2))
    second = put(url, workflow_id, txt2img(seed=222, steps=2))
    assert (first.status_code, second.status_code) == (201, 200), (first.text, second.text)
    assert (first.json()["version"], second.json()["version"]) == (1, 2)


def test_each_put_is_a_version_and_each_ref_runs_its_own(deployment: Deploy) -> None:
    deployed = deployment()
    url = deployed.url
    register_two(url, "portrait")
    listed = requests.get(f"{url}{API}/portrait/versions", timeout=10).json()
    assert [v["version"] for v in listed["versions"]] == [1, 2]
    assert listed["newest"] == listed["current"] == 2 and listed["aliases"] == {}
    assert all(v["created"].endswith("Z") for v in listed["versions"])

    for ref, seed, version in (("portrait@1", 111, 1), ("portrait@2", 222, 2), ("portrait", 222, 2)):
        data = run(url, ref)
        assert seed_ran(deployed, data) == seed, ref
        assert (data["workflow_id"], data["workflow_version"]) == ("portrait", version), ref

    # A title-named override reaches ComfyUI through a version's ref.
    data = run(url, "portrait@1", {f"{SAMPLER}.seed": 4242})
    assert seed_ran(deployed, data) == 4242 and data["workflow_version"] == 1

    # Each version describes itself, and has its own OpenAPI document.
    described = requests.get(f"{url}{API}/portrait@1", timeout=10).json()
    assert described["version"] == 1 and described["workflow"]["3"]["inputs"]["seed"] == 111
    document = requests.get(f"{url}{API}/portrait@1/openapi.json", timeout=10).json()
    assert "/api/workflows/portrait@1/run" in document["paths"]


def test_an_alias_promotes_and_rolls_back_and_default_is_the_bare_id(deployment: Deploy) -> None:
    deployed = deployment()
    url = deployed.url
    register_two(url, "poster")
    assert move(url, "poster", "prod", 1).json() == {"workflow_id": "poster", "alias": "prod", "version": 1}
    assert seed_ran(deployed, run(url, "poster@prod")) == 111
    assert move(url, "poster", "prod", 2).status_code == 200  # promotion
    data = run(url, "poster@prod")
    assert seed_ran(deployed, data) == 222 and data["workflow_version"] == 2
    assert move(url, "poster", "prod", 1).status_code == 200  # rollback
    assert seed_ran(deployed, run(url, "poster@prod")) == 111

    assert move(url, "poster", "default", 1).status_code == 200
    data = run(url, "poster")  # the bare id runs what `default` names, not the newest
    assert seed_ran(deployed, data) == 111 and data["workflow_version"] == 1
    listed = requests.get(f"{url}{API}/poster/versions", timeout=10).json()
    assert listed["current"] == 1 and listed["aliases"] == {"default": 1, "prod": 1}
    assert listed["versions"][0]["aliases"] == ["default", "prod"]

    refused = requests.delete(f"{url}{API}/poster/versions/1", timeout=10)
    assert refused.status_code == 409 and "move them first" in refused.json()["error_message"]
    assert sorted(refused.json()["raw"]["aliases"]) == ["default", "prod"]
    assert move(url, "poster", "nope", 9).status_code == 404
    assert requests.post(f"{url}{API}/poster@nope/run", json={}, timeout=10).status_code == 404
    assert requests.post(f"{url}{API}/poster@7/run", json={}, timeout=10).status_code == 404

    assert requests.delete(f"{url}{API}/poster/versions/2", timeout=10).status_code == 200
    listed = requests.get(f"{url}{API}/poster/versions", timeout=10).json()
    assert [v["version"] for v in listed["versions"]] == [1] and listed["newest"] == 1
    assert requests.delete(f"{url}{API}/poster", timeout=10).status_code == 200
    assert requests.get(f"{url}{API}/poster/versions", timeout=10).status_code == 404


def test_the_version_is_in_the_status_log_and_every_transport_takes_a_ref(deployment: Deploy) -> None:
    deployed = deployment()
    url = deployed.url
    register_two(url, "banner")
    assert move(url, "banner", "stable", 1).status_code == 200
    headers = {"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": "versioned-async-1"}
    answer = post_run(url, {f"{SAMPLER}.seed": 31}, params={"workflow_id": "banner@stable"}, headers=headers)
    assert answer.status_code == 202, answer.text
    logged = ended(url, "versioned-async-1")[-1]
    assert logged["type"] == "serverless_api", logged
    assert (logged["data"]["workflow_id"], logged["data"]["workflow_version"]) == ("banner", 1)
    assert seed_ran(deployed, logged["data"]) == 31

    texts, _ = ws_run(url, {}, "?workflow_id=banner@2")
    message = json.loads(texts[-1])
    assert message["type"] == "serverless_api" and message["data"]["workflow_version"] == 2
    assert seed_ran(deployed, message["data"]) == 222


def test_versions_outlive_the_instances_that_wrote_them(deployment: Deploy, tmp_path: Any) -> None:
    shared = str(tmp_path / "nas-workflows")
    first = deployment(WORKFLOWS_DIR=shared)
    register_two(first.url, "logo")
    assert move(first.url, "logo", "prod", 1).status_code == 200
    first.stop()
    again = deployment(WORKFLOWS_DIR=shared)  # a restart: another instance on the same disk
    assert seed_ran(again, run(again.url, "logo@prod")) == 111
    assert seed_ran(again, run(again.url, "logo@2")) == 222
    third = put(again.url, "logo", txt2img(seed=333, steps=2))
    assert third.status_code == 200 and third.json()["version"] == 3


def test_a_workflow_needing_what_the_instance_lacks_names_each_missing_node_and_model(deployment: Deploy) -> None:
    url = deployment().url
    workflow = txt2img(seed=1, steps=2)
    workflow["4"]["inputs"]["ckpt_name"] = "absent-model.safetensors"
    workflow["10"] = {"class_type": "FancyUpscaler", "inputs": {"image": ["8", 0]}}
    answer = put(url, "needs-more", workflow)
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert error["error_code"] == "INVALID_PARAMS"
    assert error["raw"]["missing"] == {"nodes": ["FancyUpscaler"], "models": ["absent-model.safetensors"]}
    assert "FancyUpscaler" in error["error_message"] and "absent-model.safetensors" in error["error_message"]

    # Registered fine, then run with a model the instance lacks: refused before ComfyUI sees it.
    assert put(url, "needs-model", txt2img(seed=1, steps=2)).status_code == 201
    answer = requests.post(f"{url}{API}/needs-model/run", json={"4.ckpt_name": "gone.safetensors"}, timeout=30)
    assert answer.status_code == 400 and answer.json()["raw"]["missing"] == {
        "nodes": [],
        "models": ["gone.safetensors"],
    }


def test_genstudio_runs_the_version_an_alias_names(deployment: Deploy) -> None:
    deployed = deployment(FILE_LINK_SECRET="v-link-secret")
    url = deployed.url
    register_two(url, "gs-versions")
    assert move(url, "gs-versions", "live", 1).status_code == 200
    api = url + "/api/maas/comfy_task_api"
    prompt = {SAMPLER: {"inputs": {"steps": 3}}}
    queued = requests.post(api + "/prompt", json={"workflow_id": "gs-versions@live", "prompt": prompt}, timeout=30)
    assert queued.json()["code"] == 0, queued.text
    prompt_id = queued.json()["data"]["prompt_id"]

    def done() -> dict[str, Any] | None:
        answer = requests.post(api + "/get_task_info", json={"comfy_task_ids": [prompt_id]}, timeout=10)
        (entry,) = answer.json()["data"]["comfy_task_info"]
        return entry if entry["status"] >= 3 else None

    assert wait_until(done, timeout=60)["status"] == 3
    histories = [requests.get(e.url + "/history", timeout=5).json() for e in deployed.emulators]
    sent = [item["prompt"][2]["3"]["inputs"] for history in histories for item in history.values()]
    assert [(inputs["seed"], inputs["steps"]) for inputs in sent] == [(111, 3)]


def test_another_key_sees_no_version_and_moves_no_alias(deployment: Deploy) -> None:
    owner, other = "sk-versions-owner-0123456789", "sk-versions-other-9876543210"
    url = deployment(API_KEYS=f"{owner},{other}").url
    mine, theirs = ({"Authorization": f"Bearer {key}"} for key in (owner, other))
    for seed in (1, 2):
        answer = requests.put(
            f"{url}{API}/private", data=json.dumps(txt2img(seed=seed, steps=2)), headers=mine, timeout=30
        )
        assert answer.status_code in (200, 201), answer.text
    listed = requests.get(f"{url}{API}/private/versions", headers=mine, timeout=10).json()
    assert [v["created_by"]["key"] for v in listed["versions"]] == [listed["versions"][0]["created_by"]["key"]] * 2
    assert owner not in json.dumps(listed)  # a digest's prefix, never the key
    alias = {"version": 1}
    for method, path, body in (
        ("GET", "/private/versions", None),
        ("GET", "/private@1", None),
        ("POST", "/private@1/run", {}),
        ("PUT", "/private/aliases/prod", alias),
        ("DELETE", "/private/versions/1", None),
    ):
        answer = requests.request(method, f"{url}{API}{path}", json=body, headers=theirs, timeout=30)
        assert answer.status_code == 404, (method, path, answer.text)
    assert requests.put(f"{url}{API}/private/aliases/prod", json=alias, headers=mine, timeout=10).status_code == 200
    assert requests.post(f"{url}{API}/private@prod/run", json={}, headers=theirs, timeout=30).status_code == 404
