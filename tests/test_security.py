"""Security and DoS, round two (issue #28), through real servers: the app on loopback, the ComfyUI
emulator, and for the Redis tier a real redis-server with gateway and worker processes. Each test
plays a caller with a valid key of its own (or none) doing what an attacker would."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import select
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import websocket  # websocket-client
from PIL import Image

from serverless.core.conversion import Conversion
from serverless.delivery import links
from serverless.delivery.convert import Converter
from serverless.errors import Busy
from serverless.settings import Settings
from tests.fleet import RedisServer, Tier
from tests.helpers import FIXTURES, empty_image, post_run, wait_until
from tests.servers import InProcessApp
from tests.test_inputs_e2e import ALLOW_LOOPBACK, INPUT_MAX_BYTES, MiB, files, load_image, memory_kib, padded_png  # noqa: F401
from tests.test_inputs_e2e import png as inputs_png
from tests.test_redis_tier import tier  # noqa: F401  (a fixture; redis_server is conftest's)
from tests.test_responsiveness import Poller

pytestmark = pytest.mark.timeout(120)

KEY_A = "sk-owner-a-0123456789abcdef"
KEY_B = "sk-other-b-fedcba9876543210"
STATUS = "/api/serverless/status"
LINK_SECRET = "link-secret-for-the-security-tests"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(start_app: Callable[..., InProcessApp], emulator: Any, tmp_path: Path) -> InProcessApp:
    return start_app(
        emulator.url,
        API_KEYS=f"{KEY_A},{KEY_B}",
        WORKFLOWS_DIR=str(tmp_path / "workflows"),
        FILE_LINK_SECRET=LINK_SECRET,
    )


def status_of(app_url: str, key: str, **params: str) -> requests.Response:
    return requests.get(app_url + STATUS, params=params, headers=bearer(key), timeout=10)


# -- 1. a task id belongs to the key that first used it -------------------------------------------


def test_another_key_naming_a_task_id_is_refused_and_never_reads_its_attempts(keyed: InProcessApp) -> None:
    mine = post_run(keyed.url, empty_image(prefix="sec-mine"), headers={**bearer(KEY_A), "x-fc-trace-id": "order-42"})
    assert mine.status_code == 200 and mine.json()["type"] == "serverless_api"
    theirs = post_run(
        keyed.url, empty_image(prefix="sec-theirs"), headers={**bearer(KEY_B), "x-fc-trace-id": "order-42"}
    )
    assert theirs.status_code == 409 and theirs.json()["error_code"] == "INVALID_PARAMS", theirs.text
    assert "serverless_api" not in theirs.text
    for params in ({"task_id": "order-42"}, {"task_id": "order-42", "attempt": "1"}):
        peek = status_of(keyed.url, KEY_B, **params)
        assert peek.status_code == 404 and "sec-mine" not in peek.text, peek.text
        own = status_of(keyed.url, KEY_A, **params)
        assert own.status_code == 200 and own.json()[-1] == mine.json(), own.text
    again = post_run(keyed.url, empty_image(prefix="sec-mine"), headers={**bearer(KEY_A), "x-fc-trace-id": "order-42"})
    assert again.status_code == 200, "the owner itself may run its task again"


def test_genstudio_prompt_naming_another_keys_task_is_refused(keyed: InProcessApp) -> None:
    registered = requests.put(  # shared: B may run it, only not under A's task id
        keyed.url + "/api/workflows/sec-wf",
        data=json.dumps(empty_image(prefix="sec-gs")),
        params={"shared": "true"},
        headers=bearer(KEY_A),
    )
    assert registered.status_code in (200, 201), registered.text
    headers = {**bearer(KEY_A), "x-fc-invocation-type": "Async", "x-fc-async-task-id": "order-43"}
    assert post_run(keyed.url, empty_image(prefix="sec-gs-a"), headers=headers).status_code == 202
    theirs = requests.post(
        keyed.url + "/api/maas/comfy_task_api/prompt",
        json={"workflow_id": "sec-wf", "prompt": {}},
        headers={**bearer(KEY_B), "x-fc-trace-id": "order-43"},
        timeout=30,
    )
    assert theirs.json()["code"] == 409, theirs.text
    assert status_of(keyed.url, KEY_A, task_id="order-43").status_code == 200


def test_on_the_redis_tier_a_task_id_stays_the_first_keys_even_when_two_keys_race(
    tier: Callable[..., Tier],  # noqa: F811
    redis_server: RedisServer,
) -> None:
    fleet = tier(API_KEYS=f"{KEY_A},{KEY_B}")
    first, second = fleet.gateway(), fleet.gateway()

    def submit(url: str, key: str, task_id: str) -> int:
        headers = {**bearer(key), "x-fc-invocation-type": "async", "x-fc-async-task-id": task_id}
        return post_run(url, empty_image(prefix="sec-tier"), headers=headers).status_code

    assert submit(first.url, KEY_A, "order-42") == 202
    assert submit(second.url, KEY_B, "order-42") == 409
    database = redis.Redis.from_url(fleet.redis_url)
    owner_before = database.get("task:order-42:owner")
    with ThreadPoolExecutor(8) as pool:  # both first uses at once, through two gateways
        races = [
            (pool.submit(submit, first.url, KEY_A, f"race-{n}"), pool.submit(submit, second.url, KEY_B, f"race-{n}"))
            for n in range(12)
        ]
        answers = [sorted((a.result(), b.result())) for a, b in races]
    assert answers == [[202, 409]] * 12, answers
    assert database.get("task:order-42:owner") == owner_before
    fleet.worker()
    logged = lambda: status_of(first.url, KEY_A, task_id="order-42").json()  # noqa: E731
    wait_until(lambda: (found := logged()) and found[-1]["type"] == "serverless_api", 60)
    for params in ({"task_id": "order-42"}, {"task_id": "order-42", "attempt": "1"}):
        assert status_of(second.url, KEY_B, **params).status_code == 404
    assert status_of(second.url, KEY_A, task_id="order-42", attempt="2").json() == []


# -- 3. conversions through download links are bounded, made once and kept -----------------------


def bomb_png(side: int) -> bytes:
    """side x side black pixels in mode "1": a few KB of PNG that decode to side² pixels."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def png(side: int, color: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buffer, format="PNG")
    return buffer.getvalue()


def link_to(app: InProcessApp, emulator: Any, name: str, data: bytes, conversion: Conversion) -> str:
    """A signed link to a file in ComfyUI's output folder, as a job with output_url=true makes."""
    (Path(emulator.root) / "output" / name).write_bytes(data)
    item = {"type": "output", "subfolder": "", "filename": name}
    return f"{app.url}/api/files/{links.sign(LINK_SECRET.encode(), item, int(time.time()) + 600, conversion)}"


def get_at_once(url: str, times: int) -> list[requests.Response]:
    with ThreadPoolExecutor(times) as pool:
        return list(pool.map(lambda _: requests.get(url, timeout=60), range(times)))


def test_a_converted_link_to_an_image_over_the_pixel_bound_is_refused_from_its_header(
    start_app: Callable[..., InProcessApp], emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serverless.delivery.convert.MAX_PIXELS", 4000000)
    app = start_app(emulator.url, FILE_LINK_SECRET=LINK_SECRET)
    data = bomb_png(3000)  # 9 megapixels in a few KB
    assert len(data) < 64 * 1024
    for answer in get_at_once(link_to(app, emulator, "sec-bomb.png", data, Conversion("jpeg")), 4):
        assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMS", answer.text[:200]
        assert "3000x3000" in answer.json()["error_message"] and "4000000 pixels" in answer.text
    unconverted = requests.get(link_to(app, emulator, "sec-bomb.png", data, Conversion()), timeout=30)
    assert unconverted.status_code == 200 and unconverted.content == data, "the file itself is still served"


def test_by_default_a_36_megapixel_output_is_not_converted_by_a_job_nor_a_link(
    start_app: Callable[..., InProcessApp], emulator: Any
) -> None:
    app = start_app(emulator.url, FILE_LINK_SECRET=LINK_SECRET)
    refused = requests.get(link_to(app, emulator, "sec-big.png", bomb_png(6000), Conversion("webp")), timeout=60)
    assert refused.status_code == 400 and "more than this instance converts" in refused.text, refused.text[:300]
    job = post_run(app.url, empty_image(6000, 6000, prefix="sec-big-job"), params={"output_format": "jpeg"})
    assert job.json()["error_code"] == "OUTPUT_ERROR", job.text[:300]  # the output was made; not convertible
    assert "6000x6000 pixels, more than this instance converts" in job.json()["error_message"]


def test_a_converted_link_is_made_once_and_kept_for_its_lifetime(
    start_app: Callable[..., InProcessApp], emulator: Any
) -> None:
    app = start_app(emulator.url, FILE_LINK_SECRET=LINK_SECRET)
    url = link_to(app, emulator, "sec-kept.png", png(300), Conversion("jpeg", 70))
    first = get_at_once(url, 4)
    assert {(answer.status_code, answer.headers["content-type"]) for answer in first} == {(200, "image/jpeg")}
    assert len({answer.content for answer in first}) == 1
    requests.post(emulator.url + "/emulator/config", json={"view_status": 500}, timeout=5)
    try:
        again = requests.get(url, timeout=30)  # ComfyUI is not asked again: the kept result is served
    finally:
        requests.post(emulator.url + "/emulator/config", json={"view_status": 0}, timeout=5)
    assert (again.status_code, again.content) == (200, first[0].content)


def test_conversions_past_the_pool_and_its_queue_are_busy_not_queued_without_bound() -> None:
    async def scenario() -> str:
        converter = Converter(concurrency=1, max_waiting=1)
        async with converter.slot():
            waiting = asyncio.create_task(converter.convert(png(8), Conversion("jpeg")))
            await asyncio.sleep(0)  # it waits for the slot
            try:
                await converter.convert(png(8), Conversion("jpeg"))
            except Busy as exc:
                refused = exc.message
        converted = await waiting
        assert converted is not None and converted.mime == "image/jpeg"
        return refused

    assert "conversions are waiting already" in asyncio.run(scenario())


# -- 4. a hosted workflow is the key's that registered it -----------------------------------------


def put_workflow(app: InProcessApp, key: str, workflow_id: str, prefix: str, **params: str) -> requests.Response:
    return requests.put(
        f"{app.url}/api/workflows/{workflow_id}",
        data=json.dumps(empty_image(prefix=prefix)),
        params=params,
        headers=bearer(key),
        timeout=30,
    )


def test_another_key_cannot_read_replace_delete_or_run_a_workflow_unless_shared(keyed: InProcessApp) -> None:
    assert put_workflow(keyed, KEY_A, "sec-private", "sec-by-a").status_code == 201
    base = f"{keyed.url}/api/workflows/sec-private"
    for method, url in (("GET", base), ("GET", base + "/openapi.json"), ("DELETE", base), ("POST", base + "/run")):
        theirs = requests.request(method, url, data="{}", headers=bearer(KEY_B), timeout=30)
        assert theirs.status_code == 404 and "sec-by-a" not in theirs.text, (method, url, theirs.text)
    listed = requests.get(keyed.url + "/api/workflows", headers=bearer(KEY_B), timeout=10).json()["workflows"]
    assert "sec-private" not in [item["workflow_id"] for item in listed]
    assert "sec-private" not in requests.get(keyed.url + "/api/openapi.json", headers=bearer(KEY_B), timeout=10).text
    replaced = put_workflow(keyed, KEY_B, "sec-private", "sec-by-b")
    assert replaced.status_code == 409 and replaced.json()["error_code"] == "INVALID_PARAMS", replaced.text
    run = requests.post(base + "/run", data="{}", headers=bearer(KEY_A), timeout=30)
    assert run.status_code == 200, run.text
    assert run.json()["data"]["results"][0]["output"]["raw"]["filename"].startswith("sec-by-a"), "A runs A's graph"
    assert put_workflow(keyed, KEY_A, "sec-private", "sec-by-a2").status_code == 200, "its owner replaces it"


def test_a_shared_workflow_is_read_and_run_by_other_keys_but_changed_only_by_its_owner(keyed: InProcessApp) -> None:
    assert put_workflow(keyed, KEY_A, "sec-shared", "sec-shared-a", shared="true").status_code == 201
    base = f"{keyed.url}/api/workflows/sec-shared"
    assert requests.get(base, headers=bearer(KEY_B), timeout=30).status_code == 200
    assert requests.post(base + "/run", data="{}", headers=bearer(KEY_B), timeout=30).status_code == 200
    assert put_workflow(keyed, KEY_B, "sec-shared", "sec-shared-b").status_code == 409
    assert requests.delete(base, headers=bearer(KEY_B), timeout=30).status_code == 409
    assert requests.delete(base, headers=bearer(KEY_A), timeout=30).status_code == 200


# -- 5. query parameter names are checked before the job starts ----------------------------------


@pytest.mark.parametrize(
    "name",
    ["x\r\nSet-Cookie: a=b", "outputBase64\n2026-12-05 INFO forged: ok", "größe", "名前"],
    ids=["crlf", "forged-line", "latin1", "cjk"],
)
def test_a_flag_name_with_line_breaks_or_non_latin1_is_refused_before_the_job_runs(
    start_app: Callable[..., InProcessApp], emulator: Any, name: str
) -> None:
    app = start_app(emulator.url)
    answer = post_run(app.url, empty_image(prefix="sec-flag"), params={name: "1"})
    assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMS", answer.text
    assert "set-cookie" not in answer.headers and "query parameter names" in answer.json()["error_message"]
    log = app.log_text()
    assert "job start" not in log and "prompt_id=" not in log, "nothing ran"
    assert not any(line.startswith("2026-12-05 INFO forged") for line in log.splitlines())


# -- 6. GenStudio's url_expire_period is capped by FILE_LINK_EXPIRES -----------------------------


def link_expiry(url: str) -> int:
    claims = url.split("/api/files/")[1].split("/")[0].split(".")[0]
    expires: int = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["exp"]
    return expires


@pytest.mark.parametrize("env", [{"FILE_LINK_EXPIRES": "60"}])
def test_genstudio_links_live_no_longer_than_the_setting_allows(
    start_app: Callable[..., InProcessApp], emulator: Any, tmp_path: Path, env: dict[str, str]
) -> None:
    app = start_app(
        emulator.url, API_KEYS=KEY_A, WORKFLOWS_DIR=str(tmp_path / "wf"), FILE_LINK_SECRET=LINK_SECRET, **env
    )
    assert put_workflow(app, KEY_A, "sec-expiry", "sec-expiry").status_code == 201
    api = app.url + "/api/maas/comfy_task_api"
    queued = requests.post(api + "/prompt", json={"workflow_id": "sec-expiry", "prompt": {}}, headers=bearer(KEY_A))
    task_id = queued.json()["data"]["prompt_id"]
    asked = {"comfy_task_ids": [task_id], "url_expire_period": 7 * 24 * 3600}

    def final_files() -> list[str] | None:
        entry = requests.post(api + "/get_task_info", json=asked, headers=bearer(KEY_A), timeout=10).json()
        found: list[str] = entry["data"]["comfy_task_info"][0]["final_files"]
        return found or None

    (url,) = wait_until(final_files)
    allowed = int(env["FILE_LINK_EXPIRES"])
    assert link_expiry(url) <= time.time() + allowed + 5, "not the 7 days asked"
    assert requests.get(url, timeout=30).status_code == 200


def test_the_old_link_lifetime_cap_is_no_longer_read_and_says_so() -> None:
    settings = Settings.from_env({"FILE_LINK_EXPIRES": "600", "FILE_LINK_MAX_EXPIRES": "60"})
    assert settings.outputs.link_expires == 600
    assert settings.deprecated == (
        "FILE_LINK_MAX_EXPIRES is no longer read: no link lives longer than FILE_LINK_EXPIRES "
        "(a caller may ask for shorter)",
    )


# -- 7. /metrics with API keys and METRICS_TOKEN answers the token -------------------------------


def test_with_api_keys_and_a_metrics_token_the_token_reads_the_metrics_and_a_key_does_not(
    start_app: Callable[..., InProcessApp], emulator: Any
) -> None:
    token = "metrics-token-0123456789"
    app = start_app(emulator.url, API_KEYS=KEY_A, METRICS_TOKEN=token)
    scraped = requests.get(app.url + "/metrics", headers=bearer(token), timeout=10)
    assert scraped.status_code == 200 and "serverless_jobs_in_flight" in scraped.text
    for headers in (bearer(KEY_A), {}, bearer("not-the-token")):
        assert requests.get(app.url + "/metrics", headers=headers, timeout=10).status_code == 401
    keyed_only = start_app(emulator.url, API_KEYS=KEY_A)
    assert requests.get(keyed_only.url + "/metrics", headers=bearer(KEY_A), timeout=10).status_code == 200
    assert requests.get(keyed_only.url + "/metrics", timeout=10).status_code == 401


# -- 9. Idempotency-Keys are per API key ----------------------------------------------------------


def test_another_keys_use_of_an_idempotency_key_never_blocks_or_joins_mine(keyed: InProcessApp) -> None:
    def post(key: str, prefix: str) -> requests.Response:
        headers = {**bearer(key), "Idempotency-Key": "checkout-1"}
        return post_run(keyed.url, empty_image(prefix=prefix), headers=headers)

    theirs = post(KEY_B, "sec-idem-b")
    assert theirs.status_code == 200
    mine = post(KEY_A, "sec-idem-a")
    assert mine.status_code == 200, mine.text
    assert mine.json()["data"]["results"][0]["output"]["raw"]["filename"].startswith("sec-idem-a")
    again = post(KEY_A, "sec-idem-a")
    assert again.json()["data"]["task_id"] == mine.json()["data"]["task_id"], "my retry joins my task"
    assert post(KEY_B, "sec-idem-b").json()["data"]["task_id"] == theirs.json()["data"]["task_id"]


def test_on_the_redis_tier_idempotency_keys_are_per_api_key(
    tier: Callable[..., Tier],  # noqa: F811
) -> None:
    gateway = tier(API_KEYS=f"{KEY_A},{KEY_B}").gateway()

    def submit(key: str, prefix: str) -> requests.Response:
        headers = {**bearer(key), "x-fc-invocation-type": "async", "Idempotency-Key": "checkout-1"}
        return post_run(gateway.url, empty_image(prefix=prefix), headers=headers)

    theirs = submit(KEY_B, "sec-tier-idem-b")
    mine = submit(KEY_A, "sec-tier-idem-a")
    assert (theirs.status_code, mine.status_code) == (202, 202), mine.text
    assert mine.json()["task_id"] != theirs.json()["task_id"]
    assert submit(KEY_A, "sec-tier-idem-a").json()["task_id"] == mine.json()["task_id"]


# -- 10. non-finite overrides and odd query numbers are INVALID_PARAMS ----------------------------


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "1e400", "NaN"], ids=["inf", "-inf", "1e400", "nan"])
def test_a_non_finite_override_is_refused_before_comfyui_sees_it(keyed: InProcessApp, value: str) -> None:
    workflow = json.loads((FIXTURES / "txt2img_fc_doc.json").read_text())
    registered = requests.put(
        keyed.url + "/api/workflows/sec-finite", data=json.dumps(workflow), headers=bearer(KEY_A), timeout=30
    )
    assert registered.status_code in (200, 201), registered.text
    for body in (f'{{"3.cfg": {value}}}', f'{{"3": {{"inputs": {{"cfg": {value}}}}}}}'):
        answer = requests.post(
            keyed.url + "/api/workflows/sec-finite/run", data=body, headers=bearer(KEY_A), timeout=30
        )
        assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMS", answer.text
        assert "finite" in answer.json()["error_message"]


@pytest.mark.parametrize(
    "params",
    [
        {"output_quality": "²"},
        {"output_quality": "9" * 5000},
        {"output_max_side": "٣"},
        {"output_max_side": "1" * 5000},
        {"output_format": "jpeg", "output_quality": "+80"},
    ],
    ids=["superscript", "5000-digit-quality", "arabic-indic", "5000-digit-side", "signed"],
)
def test_odd_numbers_in_the_query_are_invalid_params_not_500(app: InProcessApp, params: dict[str, str]) -> None:
    answer = post_run(app.url, empty_image(prefix="sec-number"), params=params)
    assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMS", answer.text[:300]
    for name in ("after", "attempt"):
        polled = requests.get(app.url + STATUS, params={"task_id": "x", name: "9" * 5000}, timeout=10)
        assert polled.status_code == 400, polled.text[:200]


# -- 11. page headers; one Authorization header -------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_the_html_pages_forbid_framing_sniffing_and_foreign_scripts(app: InProcessApp, path: str) -> None:
    page = requests.get(app.url + path, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"


def test_two_authorization_headers_are_refused_whichever_comes_first(
    start_app: Callable[..., InProcessApp], emulator: Any
) -> None:
    token = "metrics-token-0123456789"
    app = start_app(emulator.url, API_KEYS=KEY_A, METRICS_TOKEN=token)
    for pair in ((KEY_A, "nonsense-key-xxxxxxxx"), ("nonsense-key-xxxxxxxx", KEY_A), (KEY_A, KEY_A)):
        raw = [("Authorization", f"Bearer {pair[0]}"), ("Authorization", f"Bearer {pair[1]}")]
        status = http_get(app.url, STATUS + "?task_id=x", raw)
        assert status == 401, pair
    assert http_get(app.url, STATUS + "?task_id=x", [("Authorization", f"Bearer {KEY_A}")]) == 200  # one: heard
    both = [("Authorization", f"Bearer {token}"), ("Authorization", "Bearer other")]
    assert http_get(app.url, "/metrics", both) == 401
    assert http_get(app.url, "/metrics", [("Authorization", f"Bearer {token}")]) == 200


def http_get(base_url: str, path: str, headers: list[tuple[str, str]]) -> int:
    """A GET with repeated headers as sent (requests folds a dict's keys into one)."""
    connection = http.client.HTTPConnection(base_url.removeprefix("http://"), timeout=10)
    try:
        connection.putrequest("GET", path)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


# -- 8. a big hosted workflow does not hold the event loop ---------------------------------------


def big_workflow(images: int) -> dict[str, Any]:
    """One output and `images` EmptyImage nodes nothing uses: every one of their literals is a
    parameter, so the schema and the OpenAPI document are as big as the workflow."""
    workflow = {
        str(n): {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": n}}
        for n in range(3, images + 3)
    }
    workflow["1"] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
    workflow["2"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "sec-big-wf"}}
    return workflow


class StatusPoller(Poller):
    """Asks only the status store: health asks ComfyUI, whose own loop a 4 MB prompt keeps busy."""

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                started = time.perf_counter()
                assert session.get(self.url + STATUS + "?task_id=probe", timeout=10).status_code == 200
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.answers += 1
                time.sleep(0.005)


BUSY_BOUND = 1.0  # loose for a loaded machine: idle, < 0.25 s


def test_describe_openapi_and_run_of_a_4_mb_workflow_keep_other_callers_answered(
    start_app_process: Callable[..., Any], emulator_process: Any, tmp_path: Path
) -> None:
    # Both in processes of their own: the 4 MB prompt must not hold the GIL of the poller's process.
    server = start_app_process(emulator_process.url, WORKFLOWS_DIR=str(tmp_path / "workflows"))
    body = json.dumps(big_workflow(37500)).encode()
    assert len(body) > 4_000_000
    registered = requests.put(server.url + "/api/workflows/sec-big", data=body, timeout=120)
    assert registered.status_code == 201, registered.text[:300]
    base = server.url + "/api/workflows/sec-big"
    calls = (("GET", base), ("GET", base + "/openapi.json"), ("POST", base + "/run"))
    delays = {}
    for method, url in calls:
        best = None
        for _ in range(3):  # the best of three: a busy moment of a shared machine rarely hits all
            poller = StatusPoller(server.url)
            poller.start()
            while poller.answers < 20:
                time.sleep(0.01)
            usual, poller.slowest = poller.slowest, 0.0
            answer = requests.request(method, url, data="{}" if method == "POST" else None, timeout=120)
            poller.stop.set()
            poller.join()
            assert answer.status_code == 200, answer.text[:300]
            delay = poller.slowest - usual
            best = delay if best is None else min(best, delay)
            if best < BUSY_BOUND:
                break  # the best of three is below the bound already
        delays[url.rsplit("/", 1)[-1]] = round(best or 0.0, 3)
    print("status answered slower by (s):", delays)
    assert max(delays.values()) < BUSY_BOUND, delays


# -- 12. connections: a slow body is closed, a stalled reader is dropped with its answer ----------


def raw_request(port: int, head: bytes, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(head)
    return sock


def closed_while_dripping(sock: socket.socket, seconds: float) -> bool:
    """Drip a byte every 0.2 s; True once the server closes (EOF, reset or a refused write)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.sendall(b" ")
        except OSError:
            return True
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable:
            try:
                if sock.recv(65536) == b"":
                    return True
            except OSError:
                return True
    return False


def test_a_body_dripping_past_the_body_timeout_is_answered_400_and_its_connection_closed(
    start_app: Callable[..., InProcessApp], emulator: Any
) -> None:
    app = start_app(emulator.url, INPUT_TIMEOUT="0.5")
    head = b"POST /api/serverless/run HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{"
    sock = raw_request(app.port, head)
    try:
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert closed_while_dripping(sock, 8.0), "the drip kept its connection after the 400"
    finally:
        sock.close()


def held_connections(pid: int, client_ports: set[int]) -> int:
    """How many of the clients' connections process `pid` still holds a socket of."""
    inodes = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) in client_ports:
            held += 1
    return held


def test_a_caller_that_stops_reading_loses_its_connection_and_the_app_drops_the_answer(
    start_app: Callable[..., InProcessApp], emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serverless.transports.caller.WRITE_TIMEOUT", 1.0)
    app = start_app(emulator.url)  # in this process: its sockets are ours
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": 1, "strength": 1.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "sec-stall"}},
    }
    warm = post_run(app.url, workflow, params={"output_base64": "true"})
    assert warm.status_code == 200 and len(warm.content) > 3_000_000
    body = json.dumps(workflow).encode()
    head = (
        b"POST /api/serverless/run?output_base64=true HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    stalled = [raw_request(app.port, head, rcvbuf=4096) for _ in range(3)]  # they never read
    ports = {sock.getsockname()[1] for sock in stalled}
    try:
        wait_until(lambda: held_connections(os.getpid(), ports) == 3)
        wait_until(lambda: app.log_text().count("its connection is closed") >= 3, timeout=60)
        # Dropped at once: not held (with the rest of the answer) until the caller reads, as
        # uvicorn alone would (a websocket's still was after 100 s).
        wait_until(lambda: held_connections(os.getpid(), ports) == 0, timeout=60)
    finally:
        for sock in stalled:
            sock.close()


NOISY = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": 1, "strength": 1.0}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "sec-stall"}},
}


def test_a_websocket_reader_that_stops_reading_loses_its_connection_and_the_app_drops_the_answer(
    start_app: Callable[..., InProcessApp], emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serverless.transports.caller.WRITE_TIMEOUT", 1.0)
    app = start_app(emulator.url)  # in this process: its sockets are ours
    url = app.url.replace("http://", "ws://") + "/api/serverless/ws?output_base64=true"
    sockopt = ((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),)
    stalled = [websocket.create_connection(url, timeout=10, sockopt=sockopt) for _ in range(3)]
    ports = {ws.sock.getsockname()[1] for ws in stalled}
    try:
        for ws in stalled:
            ws.send(json.dumps(NOISY))  # and never read
        wait_until(lambda: held_connections(os.getpid(), ports) == 3)
        wait_until(lambda: app.log_text().count("its connection is closed") >= 3, timeout=60)
        # Dropped at once; left to uvicorn, it stays held (a websocket's still was after 100 s).
        wait_until(lambda: held_connections(os.getpid(), ports) == 0, timeout=60)
    finally:
        for ws in stalled:
            ws.sock.close()


def test_a_small_request_naming_many_big_inputs_never_holds_much_more_than_the_per_request_cap(
    own_emulator: Any,
    start_app_process: Callable[..., Any],
    files: Any,  # noqa: F811
) -> None:
    cap = 2 * INPUT_MAX_BYTES
    server = start_app_process(own_emulator.url, INPUT_MAX_JOB_BYTES=str(cap), **ALLOW_LOOPBACK)
    warm_up = post_run(server.url, load_image(files.add("sec-warm.png", inputs_png(8), "image/png")))
    assert warm_up.status_code == 200, warm_up.text
    size = INPUT_MAX_BYTES - 64 * 1024
    urls = [files.add(f"sec-cap-{i}.png", padded_png(i, size), "image/png") for i in range(8)]
    workflow = load_image(urls[0])
    workflow.update(
        {f"L{i}": {"class_type": "LoadImage", "inputs": {"image": url}} for i, url in enumerate(urls[1:], 1)}
    )
    assert len(json.dumps(workflow)) < 2048, "a small request"
    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = memory_kib(pid)
    answer = post_run(server.url, workflow)
    growth = (memory_kib(pid)["VmHWM"] - before["VmRSS"]) * 1024
    print(f"\n8 inputs of {size / MiB:.1f} MiB, cap {cap / MiB:g} MiB: peak growth {growth / MiB:.1f} MiB")
    assert answer.status_code == 400 and "(INPUT_MAX_JOB_BYTES)" in answer.json()["error_message"]
    # At most the cap, plus one input fetched past it before the total is known, plus room for the rest.
    assert growth < cap + INPUT_MAX_BYTES + INPUT_MAX_BYTES // 2, f"{growth / MiB:.1f} MiB"
