"""Outputs as they are ready (`serverless_output` events) and in the format asked, through the
real app, the emulator and the local OSS server."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from tests.helpers import RUN, comfyui_texts, empty_image, post_run, txt2img, wait_until
from tests.oss_server import LocalOss
from tests.test_oss_e2e import KEY_ID, REGION, SECRET, oss_env

pytestmark = pytest.mark.timeout(60)

JPEG_SMALL = {"output_format": "jpeg", "output_quality": "70", "output_max_side": "32"}


def two_outputs(steps: int) -> dict[str, Any]:
    """The documentation's txt2img (its SaveImage is node 9, behind the KSampler), and an
    EmptyImage -> SaveImage branch (node 101) ComfyUI runs first: it feeds an output at once."""
    workflow = txt2img(seed=7, steps=steps, prefix="late")
    workflow["100"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": 24, "height": 16, "batch_size": 1, "color": 0x00FF00},
    }
    workflow["101"] = {"class_type": "SaveImage", "inputs": {"images": ["100", 0], "filename_prefix": "early"}}
    return workflow


def sse_payloads(response: requests.Response) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(id, payload, text) of each event of an SSE response, as a plain client reads them."""
    seq = 0
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("id:"):
            seq = int(line[3:].strip())
        elif line.startswith("data:"):
            text = line[5:].strip()
            yield seq, json.loads(text), text


def test_the_first_output_is_streamed_before_the_second_output_node_starts(own_emulator, start_app):
    app = start_app(own_emulator.url)
    # Each KSampler step takes 0.5 s until the first output has been seen: 20 s of margin.
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.5}, timeout=5).raise_for_status()
    events: list[tuple[int, dict[str, Any], str]] = []
    with requests.post(
        app.url + RUN,
        data=json.dumps(two_outputs(steps=40)),
        stream=True,
        timeout=60,
        params={"stream": "true", "output_base64": "true"},
    ) as response:
        for event in sse_payloads(response):
            events.append(event)
            if event[1]["type"] == "serverless_output" and len(events_of(events, "serverless_output")) == 1:
                requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0}, timeout=5)

    early = events_of(events, "serverless_output")
    assert [item["data"]["node_id"] for _, item in early] == ["101", "9"]
    second_starts = next(
        seq for seq, payload, _ in events if payload["type"] == "executing" and payload["data"].get("node") == "9"
    )
    assert early[0][0] < second_starts
    terminal = events[-1][1]
    assert terminal["type"] == "serverless_api"
    results = {r["node_id"]: r for r in terminal["data"]["results"]}
    assert set(results) == {"9", "101"}
    for _, item in early:
        final = results[item["data"]["node_id"]]
        assert final["output"]["base64"]["content"]  # the content is in the terminal payload, once
        assert item["data"]["output"]["base64"] == {"content": None, "in_result": True}
        assert {**item["data"]["output"], "base64": None} == {**final["output"], "base64": None}
    # The status log holds the same sequence; the early events there carry no base64 either. A
    # stream nobody named does not wait for its log's last append: poll until it is done, as a
    # status client does (done when the last element is the terminal payload).
    status = app.url + "/api/serverless/status"

    def complete_log() -> list[dict[str, Any]] | None:
        logged = requests.get(status, params={"task_id": terminal["data"]["task_id"]}, timeout=10).json()
        return logged if logged and logged[-1]["type"] in ("serverless_api", "error") else None

    assert wait_until(complete_log, timeout=10) == [payload for _, payload, _ in events]
    assert comfyui_texts([text for _, _, text in events])[-1] == events[-1][2]  # compat: the end is last


def events_of(events: list[tuple[int, dict[str, Any], str]], kind: str) -> list[tuple[int, dict[str, Any]]]:
    return [(seq, payload) for seq, payload, _ in events if payload["type"] == kind]


def test_outputs_come_as_jpeg_at_the_quality_and_size_asked(app):
    response = post_run(
        app.url,
        empty_image(width=64, height=48, color=0x3366CC, prefix="jpegged"),
        params={**JPEG_SMALL, "output_base64": "true"},
    )
    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]["results"]
    output = result["output"]
    content = base64.b64decode(output["base64"]["content"])
    image = Image.open(io.BytesIO(content))
    assert (image.format, image.size) == ("JPEG", (32, 24))
    assert (output["mime"], output["bytes"]) == ("image/jpeg", len(content))
    assert output["raw"]["filename"].endswith(".png")  # ComfyUI's own file keeps its name


def test_without_base64_mime_and_bytes_still_describe_the_converted_file(app):
    response = post_run(app.url, empty_image(width=64, height=64, prefix="webp"), params={"output_format": "webp"})
    assert response.status_code == 200, response.text
    output = response.json()["data"]["results"][0]["output"]
    assert output["mime"] == "image/webp" and output["base64"]["content"] is None and output["bytes"] > 0


@pytest.mark.parametrize(
    "params",
    [
        {"output_format": "bmp"},
        {"output_quality": "0"},
        {"output_quality": "high"},
        {"output_max_side": "-1"},
        {"output_url": "true"},  # no FILE_LINK_SECRET on this app
    ],
)
def test_bad_delivery_values_are_refused_before_anything_runs(app, emulator, params):
    before = len(requests.get(emulator.url + "/history", timeout=5).json())
    response = post_run(app.url, empty_image(prefix="refused"), params=params)
    assert response.status_code == 400 and response.json()["error_code"] == "INVALID_PARAMS", response.text
    assert len(requests.get(emulator.url + "/history", timeout=5).json()) == before


def test_with_output_oss_the_stored_object_is_the_converted_jpeg(emulator, start_app):
    bucket = "convert-e2e"
    with LocalOss({KEY_ID: (SECRET, None)}, [bucket], region=REGION) as oss:
        app = start_app(emulator.url, **oss_env(oss, bucket))
        response = post_run(
            app.url, empty_image(width=80, height=40, prefix="ossjpeg"), params={**JPEG_SMALL, "output_oss": "true"}
        )
        assert response.status_code == 200, response.text
        output = response.json()["data"]["results"][0]["output"]
        assert output["oss"]["object"].endswith(".jpg")
        stored, content_type = oss.get_object(bucket, output["oss"]["object"])
    assert content_type == "image/jpeg" and (output["mime"], output["bytes"]) == ("image/jpeg", len(stored))
    assert Image.open(io.BytesIO(stored)).size == (32, 16)


def test_a_hosted_run_body_may_ask_the_format_and_the_query_wins(emulator, start_app, tmp_path):
    app = start_app(emulator.url, WORKFLOWS_DIR=str(tmp_path / "workflows"))
    stored = requests.put(
        f"{app.url}/api/workflows/small", data=json.dumps(empty_image(width=60, height=30)), timeout=30
    )
    assert stored.status_code in (200, 201), stored.text
    run = f"{app.url}/api/workflows/small/run"
    body = {"1.color": 0xFF0000, "output": {"format": "jpeg", "quality": 60, "max_side": 20}}
    output = requests.post(run, data=json.dumps(body), timeout=60).json()["data"]["results"][0]["output"]
    assert output["mime"] == "image/jpeg"
    output = requests.post(
        run, data=json.dumps(body), params={"output_format": "webp", "output_base64": "1"}, timeout=60
    ).json()["data"]["results"][0]["output"]
    assert output["mime"] == "image/webp"
    assert Image.open(io.BytesIO(base64.b64decode(output["base64"]["content"]))).size == (20, 10)
    refused = requests.post(run, data=json.dumps({"output": {"format": "tiff"}}), timeout=60)
    assert refused.status_code == 400 and refused.json()["error_code"] == "INVALID_PARAMS"
    refused = requests.post(run, data=json.dumps({"output": {"colour": "red"}}), timeout=60)
    assert refused.status_code == 400 and refused.json()["error_code"] == "INVALID_PARAMS"
