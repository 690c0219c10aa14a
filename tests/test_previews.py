"""Watching a job, on every topology (`tests.topologies`): sampler previews (`?previews=true`) and
progress that tells the truth (percent against the time gone by, eta_s against the time left).

The emulator frames previews as ComfyUI 0.3.64 does (checked here against its socket directly);
the app asks for the metadata form, so each frame names its prompt."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import requests.adapters
import websocket  # websocket-client
from PIL import Image

from tests.helpers import FIXTURES, RUN, txt2img, wait_until
from tests.test_stream import read_events
from tests.test_websocket import ws_url
from tests.topologies import Deployment

pytestmark = pytest.mark.timeout(120)

Deploy = Callable[..., Deployment]
STATUS, EVENTS = "/api/serverless/status", "/api/serverless/events"


def run_stream(url: str, workflow: dict[str, Any], params: dict[str, str]) -> list[tuple[float, dict[str, Any]]]:
    """Every payload of a streamed run, with when it arrived (monotonic)."""
    answer = requests.post(
        url + RUN, params={"stream": "true", **params}, data=json.dumps(workflow), stream=True, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return [(time.monotonic(), json.loads(event.data)) for event in read_events(answer) if event.data is not None]


def previews_of(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p["data"] for p in payloads if p["type"] == "serverless_preview"]


def decoded(preview: dict[str, Any]) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(preview["base64"])))
    image.load()
    return image


# -- the emulator frames previews as ComfyUI does ------------------------------------------------


def frames_of(comfyui_url: str, client_id: str, declare: bool, seed: int) -> tuple[str, list[Any]]:
    """Every frame a client of the emulator gets while its own prompt (3 steps) runs."""
    ws = websocket.create_connection(f"{comfyui_url.replace('http://', 'ws://')}/ws?clientId={client_id}", timeout=10)
    if declare:
        ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    ws.recv()  # status
    if declare:
        assert json.loads(ws.recv())["type"] == "feature_flags"
    body = {"prompt": txt2img(seed=seed, steps=3, size=64), "client_id": client_id}
    prompt_id = requests.post(comfyui_url + "/prompt", json=body, timeout=10).json()["prompt_id"]
    frames: list[Any] = []
    while True:
        opcode, data = ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_BINARY:
            frames.append(bytes(data))
            continue
        message = json.loads(data)
        frames.append(message)
        if message["type"] == "executing" and message["data"]["node"] is None:
            ws.close()
            return prompt_id, frames


def test_emulator_sends_one_preview_frame_per_step_in_the_form_each_client_declared(own_emulator: Any) -> None:
    comfyui = own_emulator.url
    prompt_id, frames = frames_of(comfyui, "meta", True, 5)
    binary = [f for f in frames if isinstance(f, bytes)]
    assert len(binary) == 3
    for frame in binary:
        event, length = struct.unpack_from(">II", frame)
        metadata = json.loads(frame[8 : 8 + length])
        assert event == 4 and metadata == {
            "node_id": "3",
            "prompt_id": prompt_id,
            "display_node_id": "3",
            "parent_node_id": None,
            "real_node_id": "3",
            "image_type": "image/jpeg",
        }
        image = Image.open(io.BytesIO(frame[8 + length :]))
        assert image.format == "JPEG" and max(image.size) == 512, "scaled to --preview-size, as ComfyUI does"
    # the metadata form comes after `progress_state` and before its `progress`, as trace p shows
    kinds = ["binary" if isinstance(f, bytes) else f["type"] for f in frames]
    first = kinds.index("binary")
    assert kinds[first - 1] == "progress_state" and kinds[first + 1] == "progress"

    _, frames = frames_of(comfyui, "plain", False, 6)
    binary = [f for f in frames if isinstance(f, bytes)]
    assert len(binary) == 3 and all(f[:8] == bytes.fromhex("0000000100000001") for f in binary)
    assert all(Image.open(io.BytesIO(f[8:])).format == "JPEG" for f in binary)
    kinds = ["binary" if isinstance(f, bytes) else f["type"] for f in frames]
    first = kinds.index("binary")
    assert kinds[first - 1] == "progress", "the legacy form follows its `progress`"


# -- previews through every transport ------------------------------------------------------------


def test_a_20_step_job_streams_rate_limited_decodable_previews_not_logged(
    deployment: Deploy, monkeypatch: pytest.MonkeyPatch
) -> None:
    fps = 8.0
    monkeypatch.setattr("serverless.jobs.previews.MAX_FPS", fps)
    deployed = deployment(step_delay=0.12)
    arrived = run_stream(deployed.url, txt2img(seed=7, steps=20, size=512), {"previews": "true"})
    payloads = [p for _, p in arrived]
    assert payloads[-1]["type"] == "serverless_api"
    task_id = payloads[-1]["data"]["task_id"]
    previews = previews_of(payloads)
    assert len(previews) >= 10, len(previews)
    for preview in previews:
        assert preview["task_id"] == task_id and preview["node"] == "3" and preview["mime"] == "image/jpeg"
        assert decoded(preview).format == "JPEG"
    steps = [p["step"] for p in previews]
    assert steps == sorted(steps) and 1 <= steps[0] and steps[-1] >= 18
    # at most `fps` a second over the time they came in (2.4 s of sampling: 20 frames, ~19 shown)
    times = [t for t, p in arrived if p["type"] == "serverless_preview"]
    assert len(previews) <= fps * (times[-1] - times[0]) + 2
    logged = requests.get(deployed.url + STATUS, params={"task_id": task_id}, timeout=10).json()
    assert logged[-1]["type"] == "serverless_api"
    assert not [p for p in logged if p["type"] == "serverless_preview"], "never in the status log"


def test_without_previews_asked_no_preview_is_sent(deployment: Deploy) -> None:
    deployed = deployment(step_delay=0.02)
    payloads = [p for _, p in run_stream(deployed.url, txt2img(seed=8, steps=6), {})]
    assert payloads[-1]["type"] == "serverless_api" and not previews_of(payloads)


def test_websocket_caller_gets_previews_when_asked(deployment: Deploy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("serverless.jobs.previews.MAX_FPS", 20.0)
    deployed = deployment(step_delay=0.05)
    ws = websocket.create_connection(ws_url(deployed.url, "?previews=true"), timeout=30)
    ws.send(json.dumps(txt2img(seed=9, steps=10, size=128)))
    payloads = []
    while (message := json.loads(ws.recv()))["type"] not in ("serverless_api", "error"):
        payloads.append(message)
    ws.close()
    assert message["type"] == "serverless_api"
    previews = previews_of(payloads)
    assert len(previews) >= 4 and all(decoded(p).format == "JPEG" for p in previews)


def test_a_late_events_reader_gets_the_newest_preview_not_a_backlog(
    deployment: Deploy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serverless.jobs.previews.MAX_FPS", 20.0)
    deployed = deployment(step_delay=0.1)
    started = requests.post(
        deployed.url + RUN,
        params={"previews": "true"},
        data=json.dumps(txt2img(seed=10, steps=30, size=128)),
        headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Trace-Id": "late-reader"},
        timeout=30,
    )
    assert started.status_code == 202, started.text

    def sampled() -> bool:
        logged = requests.get(deployed.url + STATUS, params={"task_id": "late-reader"}, timeout=10).json()
        return any(p["type"] == "progress" and p["data"]["value"] >= 12 for p in logged)

    wait_until(sampled, timeout=30)  # 12 frames shown already (20 fps asked, 10 a second sent)
    answer = requests.get(
        deployed.url + EVENTS, params={"task_id": "late-reader", "previews": "true"}, stream=True, timeout=60
    )
    payloads = [json.loads(e.data) for e in read_events(answer) if e.data is not None]
    steps = [p["step"] for p in previews_of(payloads)]
    assert steps and steps[0] >= 11, f"the first frame is the newest when it joined, not step 1: {steps}"
    assert steps == sorted(steps) and payloads[-1]["type"] == "serverless_api"
    plain = requests.get(deployed.url + EVENTS, params={"task_id": "late-reader"}, timeout=30)
    assert "serverless_preview" not in plain.text, "only a reader that asks gets them"


# -- progress that tells the truth -------------------------------------------------------------


def truthfulness(payloads: list[dict[str, Any]], sampling_s: float) -> dict[str, float]:
    """Percent against the fraction of the job's time gone by (at every progress event after the
    first sampling step), and eta_s against the time that was left (in the second half).

    `sampling_s` is the time the emulator sleeps in its steps. What the job took beyond it
    (`stall_s`: the other nodes, and whatever a loaded machine held the job up by) no estimate can
    foresee, so the bounds allow it (a quiet machine: about 0.2 s; a loaded CI machine has taken
    more than a second). An estimator that leaves out a sampler, or counts nodes instead of time,
    is off by seconds and fails either way."""
    progress = [p["data"] for p in payloads if p["type"] == "serverless_progress"]
    final = progress[-1]
    assert final["state"] == "succeeded" and final["percent"] == 100 and "eta_s" not in final
    percents = [p["percent"] for p in progress]
    assert percents == sorted(percents) and max(percents[:-1]) < 100, "monotonic, 100 only at the end"
    total = final["elapsed_s"]
    first_step = next(i for i, p in enumerate(payloads) if p["type"] == "progress")
    after = [p["data"] for p in payloads[first_step:-1] if p["type"] == "serverless_progress"][:-1]
    assert len(after) >= 10
    percent_error = max(abs(p["percent"] - 100 * p["elapsed_s"] / total) for p in after)
    second_half = [p for p in after if p["elapsed_s"] >= total / 2]
    assert all("eta_s" in p for p in second_half), "an estimate once steps were timed"
    stall = max(0.0, total - sampling_s)
    left = [total - p["elapsed_s"] for p in second_half]
    eta_off = [abs(p["eta_s"] - t) for p, t in zip(second_half, left, strict=True)]
    return {
        "percent_error": percent_error,
        "percent_allowed": 15 + 100 * stall / total,
        "eta_error": max(
            (max(0.0, off - stall) / t for off, t in zip(eta_off, left, strict=True) if t >= 0.5), default=0.0
        ),
        "eta_abs_error": max(eta_off),
        "eta_abs_allowed": 0.30 * total / 2 + stall,
        "stall_s": stall,
        "total_s": total,
        "events": len(after),
    }


def check_truthful(figures: dict[str, float]) -> None:
    print("progress figures:", json.dumps({k: round(v, 3) for k, v in figures.items()}))
    assert figures["percent_error"] < figures["percent_allowed"], figures
    assert figures["eta_error"] < 0.30, figures
    assert figures["eta_abs_error"] < figures["eta_abs_allowed"], figures


def test_fc_txt2img_progress_tracks_time_and_eta_shrinks(deployment: Deploy) -> None:
    deployed = deployment(step_delay=0.15)
    workflow = json.loads((FIXTURES / "txt2img_fc_doc.json").read_text())
    workflow["3"]["inputs"]["seed"] = 11
    payloads = [p for _, p in run_stream(deployed.url, workflow, {})]
    check_truthful(truthfulness(payloads, sampling_s=workflow["3"]["inputs"]["steps"] * 0.15))
    etas = [p["data"]["eta_s"] for p in payloads if p["type"] == "serverless_progress" and "eta_s" in p["data"]]
    assert etas[-1] < etas[0] and etas[-1] <= 0.5, etas


def test_two_samplers_with_an_upscale_between_progress_tracks_time(deployment: Deploy) -> None:
    deployed = deployment(step_delay=0.12)
    workflow = json.loads((FIXTURES / "hires_fix.json").read_text())
    payloads = [p for _, p in run_stream(deployed.url, workflow, {})]
    steps = workflow["3"]["inputs"]["steps"] + workflow["11"]["inputs"]["steps"]
    check_truthful(truthfulness(payloads, sampling_s=steps * 0.12))


def test_the_first_progress_events_carry_no_eta_until_a_step_is_timed(deployment: Deploy) -> None:
    deployed = deployment(step_delay=0.05)
    payloads = [p for _, p in run_stream(deployed.url, txt2img(seed=12, steps=10), {})]
    first_step = next(i for i, p in enumerate(payloads) if p["type"] == "progress")
    before = [p["data"] for p in payloads[:first_step] if p["type"] == "serverless_progress"]
    assert before and all("eta_s" not in p for p in before)


def test_previews_are_logged_when_preview_in_status_is_set(deployment: Deploy) -> None:
    deployed = deployment(step_delay=0.05, PREVIEW_IN_STATUS="true")
    started = requests.post(
        deployed.url + RUN,
        params={"previews": "true"},
        data=json.dumps(txt2img(seed=13, steps=10, size=128)),
        headers={"X-Fc-Invocation-Type": "Async", "X-Fc-Trace-Id": "logged-previews"},
        timeout=30,
    )
    assert started.status_code == 202, started.text

    def ended() -> list[dict[str, Any]] | None:
        logged = requests.get(deployed.url + STATUS, params={"task_id": "logged-previews"}, timeout=10).json()
        return logged if logged and logged[-1]["type"] in ("serverless_api", "error") else None

    logged = wait_until(ended, timeout=30)
    assert logged[-1]["type"] == "serverless_api"
    previews = previews_of(logged)
    assert previews and all(decoded(p).format == "JPEG" for p in previews)


def test_a_hosted_workflow_run_again_has_an_eta_from_its_first_progress(deployment: Deploy) -> None:
    deployed = deployment(step_delay=0.05)
    put = requests.put(deployed.url + "/api/workflows/learned", data=json.dumps(txt2img(seed=14, steps=20)), timeout=30)
    assert put.status_code == 201, put.text
    early: list[bool] = []
    for seed in range(3):  # two workers on a fleet: one of them runs it twice (each learns its own)
        answer = requests.post(
            deployed.url + "/api/workflows/learned/run",
            params={"stream": "true"},
            data=json.dumps({"3.seed": 100 + seed}),
            stream=True,
            timeout=60,
        )
        payloads = [json.loads(e.data) for e in read_events(answer) if e.data is not None]
        assert payloads[-1]["type"] == "serverless_api"
        first_step = next(i for i, p in enumerate(payloads) if p["type"] == "progress")
        running = [p["data"] for p in payloads[:first_step] if p["type"] == "serverless_progress"]
        early.append(any("eta_s" in p for p in running if p["state"] == "running"))
    assert early[0] is False, "nothing learned yet: no estimate before a step is timed"
    assert any(early[1:]), "a learned duration gives the first estimate"


class SmallWindow(requests.adapters.HTTPAdapter):
    """A client that takes in little at a time: its socket's receive buffer is 4 KB, so a server
    writing faster than it reads is held up in its sends."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["socket_options"] = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
        super().init_poolmanager(*args, **kwargs)


def test_a_slow_stream_reader_gets_the_newest_frames_not_a_backlog(
    deployment: Deploy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serverless.jobs.previews.MAX_FPS", 10.0)
    deployed = deployment(step_delay=0.12)
    for emulator in deployed.emulators:  # frames of ~750 KB as base64: more than the sockets hold
        requests.post(emulator.url + "/emulator/config", json={"preview_size": 2048}, timeout=5).raise_for_status()
    session = requests.Session()
    session.mount("http://", SmallWindow())
    answer = session.post(
        deployed.url + RUN,
        params={"stream": "true", "previews": "true"},
        data=json.dumps(txt2img(seed=15, steps=30, size=512)),
        headers={"X-Fc-Trace-Id": "slow-reader"},
        stream=True,
        timeout=60,
    )
    chunks = answer.iter_content(chunk_size=1024)
    head = next(chunks)

    def sampled() -> bool:  # the job samples for 3.6 s, longer on a busy machine; frames of ~750 KB
        logged = requests.get(deployed.url + STATUS, params={"task_id": "slow-reader"}, timeout=10).json()
        return any(p["type"] == "progress" and p["data"]["value"] >= 18 for p in logged)

    wait_until(sampled, timeout=120, interval=0.1)  # reading nothing meanwhile: 18 frames shown, ~13 MB
    text = (head + b"".join(chunks)).decode()
    payloads = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]
    assert payloads[-1]["type"] == "serverless_api"
    steps = [p["step"] for p in previews_of(payloads)]
    print("slow reader got previews of steps", steps)
    assert steps == sorted(steps) and steps[-1] >= 18, steps
    assert len(steps) <= 22, f"stale frames were skipped, not queued: {steps}"
