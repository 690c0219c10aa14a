"""Fleet scheduling (issue #33), through a gateway and workers sharing Redis: workers advertise
what they hold; a job goes to a worker holding its models (another takes it after AFFINITY_WAIT);
only workers able to run a job take it; one no worker can run is refused with `raw.missing`."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.fleet import RedisServer, Tier
from tests.helpers import post_run, txt2img, wait_until
from tests.test_inputs_e2e import LOADERS, mp4

pytestmark = pytest.mark.timeout(300)

CKPT_A, CKPT_B = "v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"
GiB = 1 << 30


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Tier]]:
    made: list[Tier] = []
    databases = iter(range(1, 64))

    def make(**env: str) -> Tier:
        redis.Redis.from_url(redis_server.url(db := next(databases))).flushdb()
        root = tmp_path / f"tier{len(made)}"
        root.mkdir()
        made.append(Tier(root, redis_server.url(db), env))
        return made[-1]

    yield make
    for each in made:
        each.stop()


def with_ckpt(ckpt: str, steps: int = 2, prefix: str = "sched") -> dict[str, Any]:
    workflow = txt2img(steps=steps, prefix=prefix)
    workflow["4"]["inputs"]["ckpt_name"] = ckpt
    return workflow


def workers(url: str) -> list[dict[str, Any]]:
    answer = requests.get(url + "/api/fleet/workers", timeout=10)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["workers"])


def submit(url: str, task_id: str, workflow: dict[str, Any]) -> None:
    headers = {"x-fc-invocation-type": "async", "x-fc-async-task-id": task_id}
    answer = post_run(url, workflow, headers=headers)
    assert answer.status_code == 202, answer.text


def ended(url: str, task_id: str) -> dict[str, Any] | None:
    task = requests.get(url + "/api/serverless/task", params={"task_id": task_id}, timeout=10)
    return task.json() if task.ok and task.json()["state"] in ("succeeded", "failed", "cancelled") else None


def load_costs(tier: Tier, seconds: float) -> None:
    """Every worker's ComfyUI takes `seconds` to load a checkpoint (on an emulated 24 GiB GPU)."""
    for emulator in tier.emulators:
        knobs = {"model_load_delay": seconds, "vram_total": 24 * GiB, "model_bytes": 4 * GiB}
        assert requests.post(emulator.url + "/emulator/config", json=knobs, timeout=5).ok


def holder(url: str, ckpt: str) -> str:
    return str(wait_until(lambda: next((w["name"] for w in workers(url) if w["resident_models"] == [ckpt]), None)))


def test_workers_advertise_their_nodes_model_files_resident_models_and_vram(fleet: Callable[..., Tier]) -> None:
    tier = fleet()
    gateway = tier.gateway()
    default, big = tier.worker(), tier.worker(WORKER_LANE="big")
    load_costs(tier, 0.0)

    def advertised() -> list[dict[str, Any]] | None:
        seen = workers(gateway.url)  # a beat a second: the GPU shows at the next
        return seen if len(seen) == 2 and all(w["vram_total"] == 24 * GiB for w in seen) else None

    seen = wait_until(advertised)
    assert sorted(w["lane"] for w in seen) == ["", "big"]
    assert all(CKPT_A in w["model_files"] and w["nodes"] > 10 for w in seen)
    assert post_run(gateway.url, with_ckpt(CKPT_A)).status_code == 200
    name = holder(gateway.url, CKPT_A)
    ran = next(w for w in workers(gateway.url) if w["name"] == name)
    assert ran["lane"] == "" and ran["vram_free"] == 20 * GiB, "its checkpoint takes its VRAM"
    for n in range(3):  # a lane's jobs run on its own workers only
        laned = post_run(
            gateway.url, with_ckpt(CKPT_B), params={"lane": "big"}, headers={"x-fc-async-task-id": f"big-{n}"}
        )
        assert laned.status_code == 200, laned.text
    assert {f"big-{n}" for n in range(3)} <= set(big.started())
    assert not any(task.startswith("big-") for task in default.started())


def test_a_job_runs_where_its_models_are_and_switches_nothing(fleet: Callable[..., Tier]) -> None:
    tier = fleet(AFFINITY_WAIT="20")
    gateway = tier.gateway()
    nodes = [tier.worker(step_delay=0.05), tier.worker(step_delay=0.05)]
    load_costs(tier, 0.3)
    wait_until(lambda: len(workers(gateway.url)) == 2)
    submit(gateway.url, "warm-a", with_ckpt(CKPT_A, steps=10))  # both at once: one each
    submit(gateway.url, "warm-b", with_ckpt(CKPT_B, steps=10))
    assert wait_until(lambda: ended(gateway.url, "warm-a") and ended(gateway.url, "warm-b"), timeout=60)
    if holder(gateway.url, CKPT_A) == holder(gateway.url, CKPT_B):
        pytest.skip("one worker took both warm-up jobs: nothing to tell apart")
    a_name, b_name = holder(gateway.url, CKPT_A), holder(gateway.url, CKPT_B)
    mixed = [(f"mixed-{n}", CKPT_A if n % 2 else CKPT_B) for n in range(8)]
    for task_id, ckpt in mixed:
        submit(gateway.url, task_id, with_ckpt(ckpt))
    for task_id, _ in mixed:
        assert wait_until(lambda task_id=task_id: ended(gateway.url, task_id), timeout=60)["state"] == "succeeded"
    ran_a = {task for task, ckpt in mixed if ckpt == CKPT_A}
    ran_b = {task for task, ckpt in mixed if ckpt == CKPT_B}
    placed = [set(node.started()) & (ran_a | ran_b) for node in nodes]
    assert placed in ([ran_a, ran_b], [ran_b, ran_a]), f"A held by {a_name}, B by {b_name}: {placed}"
    metrics = "".join(requests.get(n.url + "/metrics", timeout=10).text for n in nodes)
    switches = sum(
        float(line.split()[1]) for line in metrics.splitlines() if line.startswith("serverless_model_switches_total ")
    )
    assert switches == 2, "the two warm-up loads only"


def test_affinity_never_starves_a_job_whose_holder_is_busy(fleet: Callable[..., Tier]) -> None:
    tier = fleet(AFFINITY_WAIT="1")
    gateway = tier.gateway()
    nodes = [tier.worker(step_delay=0.2), tier.worker(step_delay=0.2)]
    load_costs(tier, 0.0)
    wait_until(lambda: len(workers(gateway.url)) == 2)
    submit(gateway.url, "long-a", with_ckpt(CKPT_A, steps=40))  # 8 s on its worker
    wait_until(lambda: any(w["busy"] for w in workers(gateway.url)))
    submit(gateway.url, "short-a", with_ckpt(CKPT_A, steps=2))
    short = wait_until(lambda: ended(gateway.url, "short-a"), timeout=30)
    assert short["state"] == "succeeded"
    assert ended(gateway.url, "long-a") is None, "it did not wait for the busy holder"
    assert sum("short-a" in node.started() for node in nodes) == 1
    assert next(n for n in nodes if "long-a" in n.started()) is not next(n for n in nodes if "short-a" in n.started())
    cancelled = requests.post(gateway.url + "/api/serverless/cancel", params={"task_id": "long-a"}, timeout=10)
    assert cancelled.status_code == 202  # nothing left running for the teardown to drain (5 s)


def test_a_node_class_only_one_worker_has_runs_there_and_none_has_is_refused(fleet: Callable[..., Tier]) -> None:
    tier = fleet()
    gateway = tier.gateway()
    with_vhs, without = tier.worker(), tier.worker(custom_nodes=False)
    wait_until(lambda: len(workers(gateway.url)) == 2)
    video = base64.b64encode(mp4("clip")).decode()
    for n in range(4):
        submit(gateway.url, f"vhs-{n}", LOADERS["VHS_LoadVideo"].workflow(video))
    for n in range(4):
        done = wait_until(lambda n=n: ended(gateway.url, f"vhs-{n}"), timeout=60)
        assert done["state"] == "succeeded", done
    assert {f"vhs-{n}" for n in range(4)} <= set(with_vhs.started())
    assert not any(task.startswith("vhs-") for task in without.started())

    refused = post_run(gateway.url, {"1": {"class_type": "NoSuchNode", "inputs": {}}, **txt2img()})
    assert refused.status_code == 400 and refused.json()["error_code"] == "INVALID_PARAMS"
    assert refused.json()["raw"]["missing"] == {"nodes": ["NoSuchNode"], "models": []}
    no_model = post_run(gateway.url, with_ckpt("not-on-any-disk.safetensors"))
    assert no_model.status_code == 400 and no_model.json()["raw"]["missing"]["models"] == [
        "not-on-any-disk.safetensors"
    ]
    lane = post_run(gateway.url, txt2img(), params={"lane": "Bad Lane"})
    assert lane.status_code == 400 and lane.json()["error_code"] == "INVALID_PARAMS"


def test_a_lane_s_workers_scale_on_the_lane_s_own_streams() -> None:
    """deploy/kubernetes/lanes/large.yaml: its workers serve lane `large`; KEDA counts that lane's
    streams (waiting and running, every priority) and no other."""
    import yaml

    from serverless.fleet.wire import GROUP, PRIORITIES, stream

    path = Path(__file__).parent.parent / "deploy" / "kubernetes" / "lanes" / "large.yaml"
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}
    deployment, scaled = documents["Deployment"], documents["ScaledObject"]
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert any({"name": "WORKER_LANE", "value": "large"} in c.get("env", []) for c in containers)
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    watched = [trigger["metadata"] for trigger in scaled["spec"]["triggers"]]
    assert {metadata["stream"] for metadata in watched} == {stream(priority, "large") for priority in PRIORITIES}
    assert all(metadata["consumerGroup"] == GROUP for metadata in watched)
    for priority in PRIORITIES:
        modes = sorted("lagCount" in m for m in watched if m["stream"] == stream(priority, "large"))
        assert modes == [False, True], "waiting and running jobs of each priority"


def test_a_hosted_workflow_registered_with_a_lane_runs_on_that_lanes_workers(fleet: Callable[..., Tier]) -> None:
    tier = fleet()
    gateway = tier.gateway()
    default, big = tier.worker(), tier.worker(WORKER_LANE="big")
    wait_until(lambda: len(workers(gateway.url)) == 2)
    registered = requests.put(
        gateway.url + "/api/workflows/on-big", params={"lane": "big"}, json=with_ckpt(CKPT_B), timeout=30
    )
    assert registered.status_code == 201, registered.text
    assert registered.json()["lane"] == "big"
    for n in range(2):  # the workflow's lane, without the run naming one
        ran = requests.post(
            gateway.url + "/api/workflows/on-big/run", json={}, headers={"x-fc-async-task-id": f"hosted-big-{n}"}
        )
        assert ran.status_code == 200, ran.text
    assert {"hosted-big-0", "hosted-big-1"} <= set(big.started())
    assert not any(task.startswith("hosted-big-") for task in default.started())
    bad = requests.put(gateway.url + "/api/workflows/on-bad", params={"lane": "Bad Lane"}, json=with_ckpt(CKPT_B))
    assert bad.status_code == 400 and bad.json()["error_code"] == "INVALID_PARAMS"
