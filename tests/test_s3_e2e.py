"""STORAGE=s3 through the whole product: the app under uvicorn, the ComfyUI emulator, and a local
S3 server that checks SigV4 signatures as S3 does (tests/s3_server.py), driven by plain HTTP as
FC clients drive it: `output_oss=true` uploads to the S3 bucket and the result's `oss` object keeps
its shape, `s3://` loader inputs are read from the buckets the settings name and no other, and a
200 MB output goes up in parts while the app's memory stays flat.

Secrets used here are distinctive strings, so that any of them in a log or an error can be found.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from PIL import Image

from tests.conftest import base_env
from tests.helpers import RUN, comfyui_inverted, decode_image, empty_image, post_run, wait_until
from tests.s3_server import LocalS3
from tests.servers import App, InProcessApp, InProcessEmulator
from tests.test_delivery_outputs import sse_payloads, two_outputs

pytestmark = pytest.mark.timeout(60)

KEY_ID, SECRET = "AKIA-e2e-key-id", "s3-e2e-secret-never-logged"
WRONG_SECRET = "s3-e2e-wrong-secret-never-logged"
REGION = "eu-central-1"
EXPIRES = 600
UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
OSS_ON = {"output_oss": "true"}
MiB = 1024 * 1024
BIG = 200 * MiB


@pytest.fixture(scope="module")
def buckets() -> tuple[str, str, str]:
    """The output bucket, an S3_INPUT_BUCKETS bucket, and one the settings never name."""
    tag = uuid.uuid4().hex[:10]
    return f"e2e-out-{tag}", f"e2e-in-{tag}", f"e2e-foreign-{tag}"


@pytest.fixture(scope="module")
def local_s3(buckets: tuple[str, str, str]) -> Iterator[LocalS3]:
    with LocalS3({KEY_ID: (SECRET, None)}, buckets, region=REGION) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test sees only its own requests to the shared local S3, on its real clock."""
    if "local_s3" in request.fixturenames:
        server: LocalS3 = request.getfixturevalue("local_s3")
        server.requests.clear()
        server.time_offset = 0
    yield


def s3_env(server: LocalS3, buckets: tuple[str, str, str], secret: str = SECRET, **extra: str) -> dict[str, str]:
    """An S3 instance: no Alibaba Cloud keys at all, the instance's AWS keys in the environment."""
    out, inputs, _ = buckets
    return {
        "STORAGE": "s3",
        "S3_ENDPOINT_URL": server.endpoint,
        "S3_BUCKET": out,
        "S3_REGION": REGION,
        "S3_INPUT_BUCKETS": inputs,
        "OSS_EXPIRES_IN_SECOND": str(EXPIRES),
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": secret,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "",
        "ALIBABA_CLOUD_SECURITY_TOKEN": "",
        **extra,
    }


@pytest.fixture(scope="module")
def s3_app(
    emulator: Any, local_s3: LocalS3, buckets: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessApp]:
    logs = tmp_path_factory.mktemp("s3-app")
    env = {**base_env(emulator.url, logs / "status"), **s3_env(local_s3, buckets), "LOG_LEVEL": "DEBUG"}
    server = InProcessApp(logs, env)
    yield server
    server.stop()


def view_bytes(comfyui_url: str, raw: dict[str, Any]) -> bytes:
    params = {"filename": raw["filename"], "subfolder": raw["subfolder"], "type": raw["type"]}
    response = requests.get(comfyui_url + "/view", params=params, timeout=10)
    assert response.status_code == 200
    return response.content


def assert_log_clean(app: InProcessApp | App, *signed_urls: str) -> None:
    # A job's end is logged once its caller's answer has gone: waited for, not read at once.
    text = wait_until(lambda: "job end" in (logged := app.log_text()) and logged, timeout=20)
    assert SECRET not in text and WRONG_SECRET not in text and KEY_ID not in text
    assert "X-Amz-Signature" not in text and "X-Amz-Credential" not in text
    for url in signed_urls:
        assert url not in text


def png(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 40 % 256, y * 60 % 256, (x * y * 13 + 7) % 256) for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def invert_workflow(image: str, prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


# --- output_oss=true on S3 --------------------------------------------------------------------------


def test_output_oss_uploads_to_s3_with_presigned_urls_that_serve_the_files(
    s3_app: InProcessApp, emulator: Any, local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    before = int(time.time())
    response = post_run(s3_app.url, empty_image(width=24, height=12, batch=2, prefix="s3batch"), params=OSS_ON)
    after = time.time()

    assert response.status_code == 200, response.text
    results = response.json()["data"]["results"]
    urls = []
    for result in results:
        output, oss = result["output"], result["output"]["oss"]
        assert sorted(oss) == ["bucket", "expire", "object", "region", "url"], "FC's shape, unchanged"
        assert (oss["region"], oss["bucket"]) == (REGION, buckets[0])
        assert re.fullmatch(rf"serverless-api-output/{UUID4}\.png", oss["object"]), oss["object"]
        served = view_bytes(emulator.url, output["raw"])
        body, headers = local_s3.get_object(buckets[0], oss["object"])
        assert (body, headers["content-type"]) == (served, "image/png")
        assert output["bytes"] == len(served) and output["base64"]["content"] is None

        assert before + EXPIRES <= oss["expire"] <= after + EXPIRES
        assert oss["url"].startswith(f"{local_s3.endpoint}/{buckets[0]}/{oss['object']}?")
        assert parse_qs(urlsplit(oss["url"]).query)["X-Amz-Expires"] == [str(EXPIRES)]
        fetched = requests.get(oss["url"], timeout=10)
        assert (fetched.status_code, fetched.content) == (200, served)
        urls.append(oss["url"])
    assert len({r["output"]["oss"]["object"] for r in results}) == 2

    local_s3.time_offset = EXPIRES + 60  # the server's clock, past every URL's expiry
    for url in urls:
        expired = requests.get(url, timeout=10)
        assert expired.status_code == 403 and "expired" in expired.text
    assert_log_clean(s3_app, *urls)


def test_an_early_output_is_in_the_bucket_while_the_job_still_runs(
    own_emulator: Any, start_app: Callable[..., InProcessApp], local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    """The upload overlaps the job as OSS uploads do: the first output's `serverless_output` event
    names an object that is already in the bucket, before the second output's node starts."""
    app = start_app(own_emulator.url, **s3_env(local_s3, buckets))
    # Each KSampler step takes 0.5 s until the first output has been seen: 20 s of margin.
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.5}, timeout=5).raise_for_status()
    events: list[tuple[int, dict[str, Any]]] = []
    in_bucket_when_told = False
    with requests.post(
        app.url + RUN,
        data=json.dumps(two_outputs(steps=40)),
        stream=True,
        timeout=60,
        params={"stream": "true", **OSS_ON},
    ) as response:
        for seq, payload, _ in sse_payloads(response):
            events.append((seq, payload))
            if payload["type"] == "serverless_output" and not in_bucket_when_told:
                local_s3.get_object(buckets[0], payload["data"]["output"]["oss"]["object"])  # KeyError if absent
                in_bucket_when_told = True
                requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0}, timeout=5)

    early = [(seq, p) for seq, p in events if p["type"] == "serverless_output"]
    second_starts = next(seq for seq, p in events if p["type"] == "executing" and p["data"].get("node") == "9")
    assert in_bucket_when_told and early[0][1]["data"]["node_id"] == "101" and early[0][0] < second_starts
    terminal = events[-1][1]
    assert terminal["type"] == "serverless_api"
    objects = {r["node_id"]: r["output"]["oss"]["object"] for r in terminal["data"]["results"]}
    assert objects["101"] == early[0][1]["data"]["output"]["oss"]["object"] and objects["9"]


def test_a_wrong_aws_secret_fails_the_upload_with_output_error_and_reports_no_object(
    emulator: Any, local_s3: LocalS3, buckets: tuple[str, str, str], start_app: Callable[..., InProcessApp]
) -> None:
    app = start_app(emulator.url, **s3_env(local_s3, buckets, secret=WRONG_SECRET))

    response = post_run(app.url, empty_image(prefix="s3wrong"), params=OSS_ON)

    assert response.status_code == 500, response.text
    body = response.json()
    assert body["error_code"] == "OUTPUT_ERROR"
    assert f"S3 upload to bucket {buckets[0]} failed: SignatureDoesNotMatch (HTTP 403)" in body["error_message"]
    assert body["raw"]["results"] == []
    assert all(r.status == 403 for r in local_s3.requests)
    assert_log_clean(app)


def test_without_output_oss_nothing_is_uploaded_and_the_oss_object_names_the_bucket(
    s3_app: InProcessApp, local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    response = post_run(s3_app.url, empty_image(prefix="s3off"))

    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]["results"]
    assert result["output"]["oss"] == {
        "region": REGION,
        "bucket": buckets[0],
        "object": None,
        "url": None,
        "expire": None,
    }
    assert local_s3.requests == []


# --- s3:// inputs -----------------------------------------------------------------------------------


def test_s3_inputs_are_read_from_the_named_buckets_and_used_by_the_workflow(
    s3_app: InProcessApp, local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    out, inputs, _ = buckets
    picture = png(5, 4)
    local_s3.put_object(out, "inputs/e2e cat.png", picture, "image/png")
    local_s3.put_object(inputs, "common/cat.png", picture, "image/png")
    expected = comfyui_inverted(Image.open(io.BytesIO(picture)))

    for url in (f"s3://{out}/inputs/e2e cat.png", f"s3://{inputs}/common/cat.png"):
        response = post_run(s3_app.url, invert_workflow(url, "s3in"), params={"output_base64": "true"})
        assert response.status_code == 200, response.text
        (result,) = response.json()["data"]["results"]
        assert decode_image(result).convert("RGB").tobytes() == expected.tobytes()
    assert [(r.method, r.status) for r in local_s3.requests] == [("GET", 200), ("GET", 200)]


def test_s3_input_from_a_bucket_the_settings_do_not_name_is_refused_without_asking_it(
    s3_app: InProcessApp, local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    out, inputs, foreign = buckets
    local_s3.put_object(foreign, "x.png", png(3, 2), "image/png")  # the instance's keys could read it

    refused = post_run(s3_app.url, invert_workflow(f"s3://{foreign}/x.png", "deputy"))

    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["error_code"] == "INPUT_ERROR" and body["raw"]["node_id"] == "1"
    assert body["error_message"] == (
        f"node 1 (LoadImage) input 'image': cannot read from S3: s3://{foreign}/x.png is not readable by this "
        f"instance (S3_BUCKET, S3_INPUT_BUCKETS: {out}, {inputs})"
    )
    assert local_s3.requests == [], "the object was not even asked for"


def test_missing_s3_input_or_an_oss_input_on_s3_is_input_error_naming_the_node(
    s3_app: InProcessApp, buckets: tuple[str, str, str]
) -> None:
    missing = post_run(s3_app.url, invert_workflow(f"s3://{buckets[0]}/inputs/none-such.png", "x"))
    oss = post_run(s3_app.url, invert_workflow("oss://bucket/in/cat.png", "x"))

    assert missing.status_code == 400 and missing.json()["error_code"] == "INPUT_ERROR"
    assert missing.json()["error_message"].endswith(f"s3://{buckets[0]}/inputs/none-such.png not found")
    assert oss.status_code == 400 and oss.json()["error_code"] == "INPUT_ERROR"
    assert "oss:// inputs need OSS to be configured" in oss.json()["error_message"]


# --- one contract, two topologies -------------------------------------------------------------------


def test_on_a_box_and_through_a_fleet_s3_inputs_are_read_and_outputs_uploaded(
    deployment: Callable[..., Any], local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    """Gateway and workers carry the same S3 settings; the workers read and upload with their own
    AWS credentials (nothing of them goes through Redis)."""
    out, _, foreign = buckets
    url = deployment(**s3_env(local_s3, buckets)).url
    picture = png(4, 3)
    local_s3.put_object(out, "inputs/topology.png", picture, "image/png")
    local_s3.put_object(foreign, "inputs/topology.png", picture, "image/png")

    response = post_run(url, invert_workflow(f"s3://{out}/inputs/topology.png", "s3topo"), params=OSS_ON)
    refused = post_run(url, invert_workflow(f"s3://{foreign}/inputs/topology.png", "s3topo"), params=OSS_ON)

    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]["results"]
    oss = result["output"]["oss"]
    stored, headers = local_s3.get_object(out, oss["object"])
    assert headers["content-type"] == "image/png" and requests.get(oss["url"], timeout=10).content == stored
    expected = comfyui_inverted(Image.open(io.BytesIO(picture)))
    assert Image.open(io.BytesIO(stored)).convert("RGB").tobytes() == expected.tobytes()
    assert refused.status_code == 400 and refused.json()["error_code"] == "INPUT_ERROR"
    assert "is not readable by this instance" in refused.json()["error_message"]


# --- a big output: in parts, from disk, memory flat ---------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines()) if k in ("VmRSS", "VmHWM")
    }


@pytest.mark.parametrize("read_from", ["disk", "view"])
def test_a_200_MB_output_is_uploaded_in_parts_with_flat_memory(
    read_from: str,
    tmp_path: Path,
    local_s3: LocalS3,
    buckets: tuple[str, str, str],
    start_app_process: Callable[..., App],
) -> None:
    """The app runs in its own process (its peak RSS is its own; the emulator serves from this one);
    the emulator's SaveVideo copies a 200 MB input into its output folder, which the app reads as
    ComfyUI's output folder (`disk`), or, not knowing that folder, through ComfyUI's /view (`view`:
    spooled to a temporary file)."""
    emulator = InProcessEmulator(tmp_path / "emulator")
    try:
        block = uuid.uuid4().bytes * (MiB // 16)
        (tmp_path / "emulator" / "input").mkdir(parents=True, exist_ok=True)
        with open(tmp_path / "emulator" / "input" / "big.mp4", "wb") as f:
            for _ in range(BIG // MiB):
                f.write(block)
        folder = {"COMFYUI_OUTPUT_DIR": str(tmp_path / "emulator" / "output")} if read_from == "disk" else {}
        env = s3_env(local_s3, buckets, **folder, TMPDIR=str(tmp_path))
        app = start_app_process(emulator.url, **env)
        warm = post_run(app.url, empty_image(prefix="warm"), params=OSS_ON)  # imports, pools, runtimes
        assert warm.status_code == 200, warm.text
        Path(f"/proc/{app.proc.pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to now
        before = memory_kib(app.proc.pid)["VmRSS"]
        local_s3.requests.clear()

        workflow = {
            "1": {"class_type": "LoadVideo", "inputs": {"file": "big.mp4"}},
            "2": {
                "class_type": "SaveVideo",
                "inputs": {"video": ["1", 0], "filename_prefix": "big/out", "format": "auto", "codec": "auto"},
            },
        }
        response = post_run(app.url, workflow, params=OSS_ON, timeout=120)
        peak = memory_kib(app.proc.pid)["VmHWM"]

        assert response.status_code == 200, response.text
        (result,) = response.json()["data"]["results"]
        oss = result["output"]["oss"]
        assert result["output"]["bytes"] == BIG and result["output"]["mime"] == "video/mp4"
        body, headers = local_s3.get_object(buckets[0], oss["object"])
        assert len(body) == BIG and body[:16] == block[:16] and body[-16:] == block[-16:]
        assert headers["etag"].endswith('-25"'), "25 parts of 8 MiB"
        parts = [r for r in local_s3.requests if r.method == "PUT" and "partNumber" in r.query_names]
        assert len(parts) == 25 and all(r.status == 200 for r in parts)
        growth_mib = (peak - before) / 1024
        print(f"\napp peak RSS growth while uploading {BIG // MiB} MiB from {read_from}: {growth_mib:.1f} MiB")
        # Parts in flight and being filled (8 MiB each, 4 uploading): 56-72 MiB measured, whatever
        # the file's size (400 MiB: the same). Whole in memory it would be 200 MiB at least.
        assert growth_mib < BIG / MiB / 2, (
            f"the app's memory grew by {growth_mib:.0f} MiB for a {BIG // MiB} MiB output"
        )
        assert_log_clean(app)
        assert not list(tmp_path.glob("serverless-output-*")), "the spooled copy is removed"
    finally:
        emulator.stop()
