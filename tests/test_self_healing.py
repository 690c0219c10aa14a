"""Self-healing GPUs (issue #33): a sampler that runs out of GPU memory is reported as
OUT_OF_MEMORY, ComfyUI is asked to free its memory and the job runs once more (on one box and
through a gateway and workers); a fleet worker whose ComfyUI's RSS passes COMFYUI_RSS_MAX
restarts it between jobs, and no job is lost."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.fleet import InProcessNode, Tier
from tests.helpers import post_run, txt2img, wait_until
from tests.servers import EMULATOR_MODULE, free_port
from tests.test_scheduling import ended, fleet, submit  # noqa: F401 (fixtures)
from tests.topologies import Deployment

pytestmark = pytest.mark.timeout(300)

Deploy = Callable[..., Deployment]


def counted(urls: list[str], name: str) -> float:
    text = "".join(requests.get(url + "/metrics", timeout=10).text for url in urls)
    return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith(f"serverless_{name}_total "))


def answers(url: str) -> bool:
    try:
        return requests.get(url + "/system_stats", timeout=2).ok
    except requests.RequestException:
        return False


def oom_next(deployed: Deployment, times: int) -> None:
    for emulator in deployed.emulators:
        assert requests.post(emulator.url + "/emulator/config", json={"oom_next": times}, timeout=5).ok


def test_an_out_of_memory_job_is_run_once_more_after_comfyui_frees_its_memory(deployment: Deploy) -> None:
    deployed = deployment()
    apps = [app.url for app in deployed.apps]
    oom_next(deployed, 1)
    answer = post_run(deployed.url, txt2img(steps=2))
    assert answer.status_code == 200, answer.text
    assert answer.json()["type"] == "serverless_api", "the second run succeeded"
    assert counted(apps, "comfyui_ooms") == 1 and counted(apps, "comfyui_frees") == 1

    oom_next(deployed, 2)
    failed = post_run(deployed.url, txt2img(steps=2))
    assert failed.status_code == 500 and failed.json()["error_code"] == "OUT_OF_MEMORY", failed.text
    assert "torch.OutOfMemoryError" in failed.json()["error_message"]


def test_a_worker_restarts_its_comfyui_past_the_rss_watermark_and_loses_no_job(
    fleet: Callable[..., Tier],  # noqa: F811
    tmp_path: Path,
) -> None:
    tier = fleet()
    gateway = tier.gateway()
    port = free_port()
    comfyui_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", EMULATOR_MODULE, "--port", str(port), "--root", str(tmp_path / "comfyui")]
    command += ["--step-delay", "0.02"]
    env = {**tier.common(), "ROLE": "worker", "COMFYUI_URL": comfyui_url, "COMFYUI_CMD": shlex.join(command)}
    worker = InProcessNode(tier.root, {**env, "COMFYUI_RSS_MAX": str(400 << 20)}, "supervising")
    tier.workers.append(worker)
    wait_until(lambda: answers(comfyui_url), timeout=60)
    leak = {"leak_bytes": 150 << 20}  # each prompt keeps 150 MiB: past 400 MiB within a few jobs
    assert requests.post(comfyui_url + "/emulator/config", json=leak, timeout=5).ok
    for n in range(6):
        submit(gateway.url, f"leaky-{n}", txt2img(steps=2, prefix=f"leaky{n}"))
    for n in range(6):
        done = wait_until(lambda n=n: ended(gateway.url, f"leaky-{n}"), timeout=120)
        assert done["state"] == "succeeded", done
    assert counted([worker.url], "comfyui_memory_restarts") >= 1
    assert "restarting it between jobs" in worker.log_text()
