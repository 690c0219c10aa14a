"""output_oss and oss:// inputs through the whole product: the app under uvicorn, the ComfyUI
emulator, and a local OSS server that checks V4 signatures (tests/oss_server.py), all real
processes or threads on loopback, driven by plain HTTP as users drive them.

The apps are configured as on FC: `OSS_BUCKET_DOMAIN=<bucket>.oss-cn-hangzhou.aliyuncs.com`, with
`OSS_ENDPOINT` pointing uploads at the local server. Secrets used here are distinctive strings, so
that any of them appearing in a log or an error can be found.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import websocket
from PIL import Image

from tests.conftest import base_env
from tests.helpers import comfyui_inverted, decode_image, empty_image, post_run, running_prompt, txt2img, wait_until
from tests.oss_server import LocalOss
from tests.servers import App, Emulator, InProcessApp

pytestmark = pytest.mark.timeout(30)

KEY_ID, SECRET = "LTAI-e2e-key-id", "e2e-secret-never-logged"
STS_ID, STS_SECRET, STS_TOKEN = "STS.e2e-key-id", "e2e-sts-secret-never-logged", "e2e-sts-token-never-logged"
WRONG_SECRET = "e2e-wrong-secret-never-logged"
REGION = "cn-hangzhou"
EXPIRES = 600
UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
OBJECT_KEY = re.compile(rf"serverless-api-output/{UUID4}\.png")
STS_HEADERS = {"x-fc-access-key-id": STS_ID, "x-fc-access-key-secret": STS_SECRET, "x-fc-security-token": STS_TOKEN}
NO_ENV_CREDENTIALS = {
    "ALIBABA_CLOUD_ACCESS_KEY_ID": "",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "",
    "ALIBABA_CLOUD_SECURITY_TOKEN": "",
}
OSS_ON = {"output_oss": "true"}


# --- servers --------------------------------------------------------------------------------------


def local_oss_server(bucket: str) -> LocalOss:
    return LocalOss({KEY_ID: (SECRET, None), STS_ID: (STS_SECRET, STS_TOKEN)}, [bucket], region=REGION)


def oss_env(
    server: LocalOss,
    bucket: str,
    expires: int = EXPIRES,
    sign_locally: bool = True,
    key_id: str = KEY_ID,
    secret: str = SECRET,
) -> dict[str, str]:
    """Settings of an app whose bucket lives on `server`; environment credentials `key_id`/`secret`
    (empty strings: none)."""
    env = {
        "OSS_BUCKET_DOMAIN": f"{bucket}.oss-{REGION}.aliyuncs.com",
        "OSS_ENDPOINT": server.endpoint,
        "OSS_EXPIRES_IN_SECOND": str(expires),
        **NO_ENV_CREDENTIALS,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": key_id,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret,
    }
    if sign_locally:
        env["OSS_SIGN_ENDPOINT"] = server.endpoint
    return env


@pytest.fixture(scope="module")
def bucket() -> str:
    return f"e2e-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def local_oss(bucket: str) -> Iterator[LocalOss]:
    with local_oss_server(bucket) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_records(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test sees only its own requests to the shared local OSS, on its real clock."""
    if "local_oss" not in request.fixturenames:
        yield
        return
    server: LocalOss = request.getfixturevalue("local_oss")
    server.requests.clear()
    server.time_offset = 0
    yield
    server.time_offset = 0


@pytest.fixture(scope="module")
def module_app(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., App]]:
    """Apps shared by this module's tests: `module_app(**env)` against the shared emulator."""
    started: list[App] = []

    def start(**env: str) -> App:
        logs = tmp_path_factory.mktemp("oss-app")
        server = InProcessApp(logs, {**base_env(emulator.url, logs / "status"), **env})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def signing_app(module_app: Callable[..., App], local_oss: LocalOss, bucket: str) -> App:
    """Signed URLs for 600 s, valid environment credentials, DEBUG logs (the log check is strictest)."""
    return module_app(**oss_env(local_oss, bucket), LOG_LEVEL="DEBUG")


@pytest.fixture(scope="module")
def upload_only_app(module_app: Callable[..., App], local_oss: LocalOss, bucket: str) -> App:
    """OSS_EXPIRES_IN_SECOND=0, and environment credentials with a stale secret."""
    return module_app(**oss_env(local_oss, bucket, expires=0, secret=WRONG_SECRET))


@pytest.fixture(scope="module")
def keyless_app(module_app: Callable[..., App], local_oss: LocalOss, bucket: str) -> App:
    """No credentials in the environment, and URLs signed for the default (public) endpoint."""
    return module_app(**oss_env(local_oss, bucket, sign_locally=False, key_id="", secret=""))


# --- helpers --------------------------------------------------------------------------------------


def view_bytes(comfyui_url: str, raw: dict[str, Any]) -> bytes:
    """The file as ComfyUI's /view serves it."""
    params = {"filename": raw["filename"], "subfolder": raw["subfolder"], "type": raw["type"]}
    response = requests.get(comfyui_url + "/view", params=params, timeout=10)
    assert response.status_code == 200
    return response.content


def reported_oss(payload: Any) -> list[dict[str, Any]]:
    """Every `oss` object anywhere in a payload (results, or an error's `raw`)."""
    found: list[dict[str, Any]] = []
    if isinstance(payload, dict):
        if isinstance(payload.get("oss"), dict):
            found.append(payload["oss"])
        for value in payload.values():
            found.extend(reported_oss(value))
    elif isinstance(payload, list):
        for value in payload:
            found.extend(reported_oss(value))
    return found


def puts(server: LocalOss) -> list[tuple[str, int]]:
    return [(record.path, record.status) for record in server.requests if record.method == "PUT"]


def with_signature_changed(url: str) -> str:
    match = re.search(r"x-oss-signature=([0-9a-f]{64})", url)
    assert match is not None
    position = match.start(1) + 10
    return url[:position] + ("0" if url[position] != "0" else "1") + url[position + 1 :]


def assert_nothing_secret_in(text: str, *signed_urls: str) -> None:
    for secret in (SECRET, STS_SECRET, STS_TOKEN, WRONG_SECRET, KEY_ID, STS_ID):
        assert secret not in text
    assert "x-oss-signature" not in text and "x-oss-credential" not in text
    for url in signed_urls:
        assert url not in text
        assert parse_qs(urlsplit(url).query)["x-oss-signature"][0] not in text


def assert_log_clean(app: App, *signed_urls: str) -> None:
    # A job's end is logged once its caller's answer has gone: waited for, not read at once.
    text = wait_until(lambda: "job end" in (logged := app.log_text()) and logged, timeout=20)
    assert_nothing_secret_in(text, *signed_urls)


def png(width: int, height: int) -> bytes:
    """A small picture whose every pixel differs, so an inversion is easy to check."""
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


# --- output_oss -----------------------------------------------------------------------------------


def test_batch_of_three_is_uploaded_with_signed_urls_that_serve_the_files(signing_app, emulator, local_oss, bucket):
    before = int(time.time())
    response = post_run(
        signing_app.url, empty_image(width=24, height=12, color=0x3366CC, batch=3, prefix="ossbatch"), params=OSS_ON
    )
    after = time.time()

    assert response.status_code == 200, response.text
    results = response.json()["data"]["results"]
    assert [r["batch_id"] for r in results] == [0, 1, 2]
    urls = []
    for result in results:
        output, oss = result["output"], result["output"]["oss"]
        assert (oss["region"], oss["bucket"]) == (f"oss-{REGION}", bucket)
        assert OBJECT_KEY.fullmatch(oss["object"]), oss["object"]
        served = view_bytes(emulator.url, output["raw"])
        assert local_oss.get_object(bucket, oss["object"]) == (served, "image/png")
        assert output["base64"]["content"] is None  # output_oss alone does not return the file
        assert output["bytes"] == len(served) and output["mime"] == "image/png"

        assert before + EXPIRES <= oss["expire"] <= after + EXPIRES
        query = parse_qs(urlsplit(oss["url"]).query)
        assert query["x-oss-expires"] == [str(EXPIRES)]
        signed_at = datetime.strptime(query["x-oss-date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
        assert oss["expire"] <= signed_at + EXPIRES  # the URL works until `expire`, at least
        assert oss["url"].startswith(f"{local_oss.endpoint}/{bucket}/{oss['object']}?")
        fetched = requests.get(oss["url"], timeout=10)
        assert (fetched.status_code, fetched.content) == (200, served)
        assert fetched.headers["Content-Type"] == "image/png"
        tampered = requests.get(with_signature_changed(oss["url"]), timeout=10)
        assert tampered.status_code == 403 and "SignatureDoesNotMatch" in tampered.text
        urls.append(oss["url"])
    assert len({r["output"]["oss"]["object"] for r in results}) == 3
    assert sorted(path for path, _ in puts(local_oss)) == sorted(
        f"/{bucket}/{r['output']['oss']['object']}" for r in results
    )

    soonest = min(r["output"]["oss"]["expire"] for r in results)
    local_oss.time_offset = soonest - 2 - time.time()  # the local server's clock: just before `expire`
    assert all(requests.get(url, timeout=10).status_code == 200 for url in urls)
    local_oss.time_offset = EXPIRES + 60  # past every URL's expiry
    for url in urls:
        expired = requests.get(url, timeout=10)
        assert expired.status_code == 403 and "expired" in expired.text
    assert_log_clean(signing_app, *urls)


def test_an_output_in_comfyuis_folder_on_our_disk_is_uploaded_from_there(module_app, emulator, local_oss, bucket):
    """With ComfyUI's output folder on this machine the file is streamed to OSS from disk (never read
    whole), and the result is the same as through /view."""
    app = module_app(**oss_env(local_oss, bucket), COMFYUI_OUTPUT_DIR=str(emulator.root / "output"))

    response = post_run(app.url, empty_image(width=20, height=10, prefix="ossdisk"), params=OSS_ON)

    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]["results"]
    output = result["output"]
    on_disk = (emulator.root / "output" / output["raw"]["filename"]).read_bytes()
    assert local_oss.get_object(bucket, output["oss"]["object"]) == (on_disk, "image/png")
    assert (output["mime"], output["bytes"]) == ("image/png", len(on_disk))
    assert [(r.method, r.status) for r in local_oss.requests] == [("PUT", 200)]
    assert requests.get(output["oss"]["url"], timeout=10).content == on_disk


def test_without_an_expiry_objects_are_uploaded_but_no_url_is_signed(upload_only_app, emulator, local_oss, bucket):
    response = post_run(upload_only_app.url, empty_image(prefix="unsigned"), params=OSS_ON, headers=STS_HEADERS)

    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]["results"]
    oss = result["output"]["oss"]
    assert (oss["region"], oss["bucket"], oss["url"], oss["expire"]) == (f"oss-{REGION}", bucket, None, None)
    assert OBJECT_KEY.fullmatch(oss["object"])
    assert local_oss.get_object(bucket, oss["object"]) == (
        view_bytes(emulator.url, result["output"]["raw"]),
        "image/png",
    )


def test_header_credentials_win_over_environment_ones(upload_only_app, signing_app, local_oss, bucket):
    # Environment has a stale secret, the request the right one (an STS key with its token).
    good = post_run(upload_only_app.url, empty_image(prefix="hdrwin"), params=OSS_ON, headers=STS_HEADERS)
    assert good.status_code == 200, good.text
    assert OBJECT_KEY.fullmatch(good.json()["data"]["results"][0]["output"]["oss"]["object"])

    # The same app without headers falls back on the stale environment: refused by OSS.
    keys_before = local_oss.keys(bucket)
    stale = post_run(upload_only_app.url, empty_image(batch=2, prefix="envstale"), params=OSS_ON)
    # Environment right, request headers wrong: the headers are used, and refused.
    wrong = post_run(
        signing_app.url,
        empty_image(batch=2, prefix="hdrwrong"),
        params=OSS_ON,
        headers={"x-fc-access-key-id": KEY_ID, "x-fc-access-key-secret": WRONG_SECRET},
    )

    for response in (stale, wrong):
        assert response.status_code == 500, response.text
        body = response.json()
        assert body["error_code"] == "OUTPUT_ERROR"
        assert "SignatureDoesNotMatch" in body["error_message"]
        assert all(oss["object"] is None and oss["url"] is None for oss in reported_oss(body["raw"]))
        assert_nothing_secret_in(response.text)
    assert local_oss.keys(bucket) == keys_before
    assert [status for _, status in puts(local_oss)] == [200, 403, 403, 403, 403]  # a refusal is not retried
    assert_log_clean(upload_only_app)
    assert_log_clean(signing_app)


def test_output_oss_without_any_credentials_is_invalid_params_before_anything_runs(keyless_app, emulator, local_oss):
    history_before = requests.get(emulator.url + "/history", timeout=10).json()

    response = post_run(keyless_app.url, empty_image(prefix="nocreds"), params=OSS_ON)

    assert response.status_code == 400
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMS" and "credentials" in body["error_message"]
    assert requests.get(emulator.url + "/history", timeout=10).json().keys() == history_before.keys()
    assert puts(local_oss) == []


def test_urls_are_signed_for_the_public_endpoint_while_uploads_use_oss_endpoint(keyless_app, local_oss, bucket):
    response = post_run(keyless_app.url, empty_image(prefix="public"), params=OSS_ON, headers=STS_HEADERS)

    assert response.status_code == 200, response.text
    oss = response.json()["data"]["results"][0]["output"]["oss"]
    assert puts(local_oss) == [(f"/{bucket}/{oss['object']}", 200)]
    public = urlsplit(oss["url"])
    assert (public.scheme, public.netloc, public.path) == (
        "https",
        f"{bucket}.oss-{REGION}.aliyuncs.com",
        f"/{oss['object']}",
    )
    assert parse_qs(public.query)["x-oss-security-token"] == [STS_TOKEN]
    # V4 signs /<bucket>/<key>, not the host: the same request path-style reaches the local server.
    replayed = requests.get(f"{local_oss.endpoint}/{bucket}{public.path}?{public.query}", timeout=10)
    assert replayed.status_code == 200
    assert replayed.content == local_oss.get_object(bucket, oss["object"])[0]
    assert_log_clean(keyless_app, oss["url"])


def test_each_output_is_uploaded_once_though_both_executed_and_history_name_it(signing_app, local_oss, bucket):
    workflow = empty_image(batch=2, prefix="once")
    workflow["3"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    task_id = f"once-{uuid.uuid4().hex}"

    response = post_run(signing_app.url, workflow, params=OSS_ON, headers={"x-fc-trace-id": task_id})

    assert response.status_code == 200, response.text
    events = requests.get(signing_app.url + "/api/serverless/status", params={"task_id": task_id}, timeout=10).json()
    announced = {
        (item["type"], item["filename"])
        for event in events
        if event["type"] == "executed"
        for item in event["data"]["output"]["images"]
    }
    results = response.json()["data"]["results"]
    assert {(r["output"]["raw"]["type"], r["output"]["raw"]["filename"]) for r in results} == announced
    assert {r["output"]["raw"]["type"] for r in results} == {"output", "temp"} and len(results) == 4
    objects = [f"/{bucket}/{r['output']['oss']['object']}" for r in results]
    assert sorted(puts(local_oss)) == sorted((path, 200) for path in objects)
    assert_log_clean(signing_app, *(r["output"]["oss"]["url"] for r in results))


def test_an_output_is_uploaded_while_the_rest_of_the_job_still_runs(own_emulator, start_app, local_oss, bucket):
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.1}, timeout=5)
    server = start_app(own_emulator.url, **oss_env(local_oss, bucket))
    workflow = txt2img(seed=3, steps=40, prefix="late")
    workflow.update(empty_image(prefix="early"))  # nodes 1, 2: saved before the sampler starts
    answer: dict[str, requests.Response] = {}
    thread = threading.Thread(target=lambda: answer.update(r=post_run(server.url, workflow, params=OSS_ON)))
    thread.start()

    wait_until(lambda: puts(local_oss))
    assert puts(local_oss)[0][1] == 200
    assert running_prompt(own_emulator.url) is not None, "the first upload must not wait for the job's end"
    thread.join(25)
    response = answer["r"]
    assert response.status_code == 200, response.text
    results = response.json()["data"]["results"]
    assert {r["node_id"] for r in results} == {"2", "9"}
    assert sorted(puts(local_oss)) == sorted((f"/{bucket}/{r['output']['oss']['object']}", 200) for r in results)


class GatedOss(LocalOss):
    """A local OSS that holds each PUT until `parties` PUTs are in flight together (at most
    `wait` seconds), and records for each whether they all were."""

    def __init__(self, bucket: str, parties: int, wait: float = 10.0) -> None:
        self.gate = threading.Barrier(parties, timeout=wait)
        self.met: list[bool] = []
        super().__init__({KEY_ID: (SECRET, None)}, [bucket], region=REGION)

    def _handle(self, request: Any, body: bytes) -> Any:
        if request.method == "PUT":
            try:
                self.gate.wait()
                self.met.append(True)
            except threading.BrokenBarrierError:
                self.met.append(False)
        return super()._handle(request, body)


def test_a_jobs_uploads_are_all_in_flight_at_once(start_app, emulator):
    bucket = f"e2e-gated-{uuid.uuid4().hex[:8]}"
    with GatedOss(bucket, parties=8) as server:
        app = start_app(emulator.url, **oss_env(server, bucket))

        response = post_run(app.url, empty_image(batch=8, prefix="gated"), params=OSS_ON)

        assert response.status_code == 200, response.text
        assert server.met == [True] * 8, "every upload waited for all eight to be in flight"
        assert len(server.keys(bucket)) == 8


def test_debug_logs_of_a_websocket_run_hold_no_signed_url(start_app, emulator, local_oss, bucket):
    server = start_app(emulator.url, **oss_env(local_oss, bucket), LOG_LEVEL="DEBUG")
    ws = websocket.create_connection(
        server.url.replace("http", "ws") + "/api/serverless/ws?output_oss=true", timeout=20
    )
    try:
        ws.send(json.dumps(empty_image(prefix="wsdebug")))
        while (message := json.loads(ws.recv()))["type"] not in ("serverless_api", "error"):
            pass
    finally:
        ws.close()

    assert message["type"] == "serverless_api", message
    assert_log_clean(server, message["data"]["results"][0]["output"]["oss"]["url"])


def test_debug_logs_of_a_streamed_run_hold_no_signed_url(start_app, emulator, local_oss, bucket):
    server = start_app(emulator.url, **oss_env(local_oss, bucket), LOG_LEVEL="DEBUG")

    response = post_run(server.url, empty_image(prefix="ssedebug"), params={**OSS_ON, "stream": "true"})

    terminal = json.loads([line for line in response.text.splitlines() if line.startswith("data: ")][-1][6:])
    assert terminal["type"] == "serverless_api", terminal
    assert_log_clean(server, terminal["data"]["results"][0]["output"]["oss"]["url"])


# --- oss:// inputs --------------------------------------------------------------------------------


def test_oss_inputs_are_read_and_used_by_the_workflow(signing_app, keyless_app, local_oss, bucket):
    picture = png(5, 4)
    local_oss.put_object(bucket, "inputs/e2e cat.png", picture, "image/png")
    expected = comfyui_inverted(Image.open(io.BytesIO(picture)))

    short = post_run(
        signing_app.url,
        invert_workflow(f"oss://{bucket}/inputs/e2e cat.png", "ossin"),
        params={"output_base64": "true"},
    )
    # The endpoint form, read with the request's own credentials (this app has none in its env).
    full = post_run(
        keyless_app.url,
        invert_workflow(f"oss://{bucket}.oss-{REGION}.aliyuncs.com/inputs/e2e cat.png", "ossin2"),
        params={"output_base64": "true"},
        headers=STS_HEADERS,
    )

    for response in (short, full):
        assert response.status_code == 200, response.text
        (result,) = response.json()["data"]["results"]
        assert decode_image(result).convert("RGB").tobytes() == expected.tobytes()
    assert [(r.method, r.status) for r in local_oss.requests] == [("GET", 200), ("GET", 200)]
    assert_log_clean(signing_app)
    assert_log_clean(keyless_app)


def test_missing_or_unreadable_oss_input_is_input_error_naming_the_node(signing_app, keyless_app, local_oss, bucket):
    local_oss.put_object(bucket, "inputs/private.png", png(2, 2), "image/png")

    missing = post_run(signing_app.url, invert_workflow(f"oss://{bucket}/inputs/none-such.png", "x"))
    anonymous = post_run(keyless_app.url, invert_workflow(f"oss://{bucket}/inputs/private.png", "x"))

    assert missing.status_code == 400
    body = missing.json()
    assert body["error_code"] == "INPUT_ERROR"
    assert "node 1 (LoadImage) input 'image'" in body["error_message"] and "not found" in body["error_message"]
    assert body["raw"]["node_id"] == "1"
    assert anonymous.status_code == 400
    assert anonymous.json()["error_code"] == "INPUT_ERROR" and "access denied" in anonymous.json()["error_message"]


# --- oss:// with the instance's credentials: only the allowed buckets (no confused deputy) ---------


@pytest.fixture(scope="module")
def two_buckets() -> Iterator[tuple[LocalOss, str, str]]:
    """A local OSS holding the configured bucket and another one the same keys can read."""
    mine, other = f"e2e-mine-{uuid.uuid4().hex[:8]}", f"e2e-other-{uuid.uuid4().hex[:8]}"
    with LocalOss({KEY_ID: (SECRET, None), STS_ID: (STS_SECRET, STS_TOKEN)}, [mine, other], region=REGION) as server:
        server.put_object(mine, "in/cat.png", png(3, 3), "image/png")
        server.put_object(other, "x.png", png(3, 2), "image/png")
        server.put_object(other, "common/x.png", png(2, 3), "image/png")
        server.put_object(other, "commonx/x.png", png(2, 2), "image/png")
        yield server, mine, other


def gets(server: LocalOss) -> list[str]:
    return [record.path for record in server.requests if record.method == "GET"]


def test_another_bucket_is_refused_with_instance_credentials_and_read_with_the_callers(module_app, two_buckets):
    server, mine, other = two_buckets
    app = module_app(**oss_env(server, mine))  # environment credentials: the instance's own
    server.requests.clear()

    refused = post_run(app.url, invert_workflow(f"oss://{other}/x.png", "deputy"))
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["error_code"] == "INPUT_ERROR" and body["raw"]["node_id"] == "1"
    assert (
        f"oss://{other}/x.png is not readable with the instance's credentials (OSS_INPUT_ALLOWED: {mine})"
        in body["error_message"]
    )
    assert gets(server) == [], "the object was not even asked for"

    own = post_run(app.url, invert_workflow(f"oss://{other}/x.png", "caller"), headers=STS_HEADERS)
    configured = post_run(app.url, invert_workflow(f"oss://{mine}/in/cat.png", "configured"))

    assert own.status_code == 200, own.text
    assert configured.status_code == 200, configured.text
    assert len(gets(server)) == 2
    assert_log_clean(app)


def test_OSS_INPUT_ALLOWED_lists_the_buckets_and_folders_instance_credentials_may_read(module_app, two_buckets):
    server, mine, other = two_buckets
    app = module_app(**oss_env(server, mine), OSS_INPUT_ALLOWED=f"{other}/common")

    allowed = post_run(app.url, invert_workflow(f"oss://{other}/common/x.png", "allowed"))
    beside = post_run(app.url, invert_workflow(f"oss://{other}/commonx/x.png", "beside"))
    unlisted = post_run(app.url, invert_workflow(f"oss://{mine}/in/cat.png", "unlisted"))

    assert allowed.status_code == 200, allowed.text
    for response in (beside, unlisted):
        assert response.status_code == 400, response.text
        assert f"(OSS_INPUT_ALLOWED: {other}/common)" in response.json()["error_message"]


# --- OSS failing ----------------------------------------------------------------------------------


@pytest.fixture
def faulty(start_app: Callable[..., App], emulator: Emulator) -> Iterator[tuple[LocalOss, App, str]]:
    """A local OSS of its own (failures injected into it leak into no other test) and its app."""
    bucket = f"e2e-faulty-{uuid.uuid4().hex[:8]}"
    with local_oss_server(bucket) as server:
        yield server, start_app(emulator.url, **oss_env(server, bucket)), bucket


def test_a_transient_oss_failure_is_retried_and_the_run_succeeds(faulty):
    server, app, bucket = faulty
    server.fail_next(1, 503)

    response = post_run(app.url, empty_image(batch=3, prefix="transient"), params=OSS_ON)

    assert response.status_code == 200, response.text
    objects = [r["output"]["oss"]["object"] for r in response.json()["data"]["results"]]
    assert sorted(server.keys(bucket)) == sorted(objects)
    assert sorted(status for _, status in puts(server)) == [200, 200, 200, 503]
    assert "retrying" in app.log_text()
    assert_log_clean(app)


def test_a_persistent_oss_failure_is_output_error_reporting_no_object(faulty):
    server, app, bucket = faulty
    server.fail_next(100, 503)

    response = post_run(app.url, empty_image(prefix="persistent"), params=OSS_ON)

    assert response.status_code == 500, response.text
    body = response.json()
    assert body["error_code"] == "OUTPUT_ERROR" and "HTTP 503" in body["error_message"]
    assert all(oss["object"] is None for oss in reported_oss(body["raw"]))
    statuses = [status for _, status in puts(server)]
    assert len(statuses) > 1 and set(statuses) == {503}, "retried, and never stored"
    assert server.keys(bucket) == []
    assert_log_clean(app)


def test_when_some_uploads_fail_only_the_uploaded_objects_are_reported(faulty):
    server, app, bucket = faulty
    server.fail_next(1, 403)  # not transient: that output fails at once, the others are stored

    response = post_run(app.url, empty_image(batch=3, prefix="partial"), params=OSS_ON)

    assert response.status_code == 500, response.text
    body = response.json()
    assert body["error_code"] == "OUTPUT_ERROR" and body["error_message"].startswith("1 of 3 outputs failed")
    reported = [oss["object"] for oss in reported_oss(body["raw"]) if oss["object"] is not None]
    assert len(reported) == 2 and sorted(reported) == server.keys(bucket)
    assert_log_clean(app)
