"""API keys: every /api/ route needs one when API_KEYS is set (health stays open), keys are never
logged, and one caller never sees another's task."""

from __future__ import annotations

import json

import pytest
import requests
import websocket  # websocket-client

from serverless.settings import Settings, SettingsError
from tests.helpers import RUN, empty_image, post_run, txt2img, wait_until

KEY_A = "sk-a-0123456789abcdef"
KEY_B = "sk-b-fedcba9876543210"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(start_app, emulator, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# one key a line\n{KEY_B}\n")
    return start_app(emulator.url, API_KEYS=KEY_A, API_KEYS_FILE=str(keys))


def test_without_a_valid_key_every_api_route_is_401_in_its_own_shape(keyed):
    for headers in ({}, bearer("sk-not-a-key-at-all"), {"Authorization": KEY_A}, bearer(KEY_A + "x")):
        refused = post_run(keyed.url, empty_image(prefix="auth"), headers=headers)
        assert refused.status_code == 401 and refused.json()["error_code"] == "UNAUTHORIZED"
        assert refused.headers["www-authenticate"] == "Bearer"
        status = requests.get(keyed.url + "/api/serverless/status", params={"task_id": "x"}, headers=headers)
        assert status.status_code == 401
    genstudio = requests.post(keyed.url + "/api/maas/comfy_task_api/get_task_info", json={}, timeout=10)
    assert genstudio.status_code == 401 and genstudio.json()["code"] == 401 and genstudio.json()["msg"]
    assert requests.get(keyed.url + "/api/serverless/health", timeout=10).status_code == 200


def test_either_key_runs_and_keys_never_reach_the_log(keyed):
    for key in (KEY_A, KEY_B):
        response = post_run(keyed.url, empty_image(prefix="auth-ok"), headers=bearer(key))
        assert response.status_code == 200 and response.json()["type"] == "serverless_api"
    log = keyed.log_text()
    assert KEY_A not in log and KEY_B not in log


def test_one_key_never_sees_anothers_task(keyed):
    headers = {**bearer(KEY_A), "x-fc-trace-id": "auth-owned"}
    assert post_run(keyed.url, empty_image(prefix="auth-own"), headers=headers).status_code == 200
    query = {"task_id": "auth-owned"}
    mine = requests.get(keyed.url + "/api/serverless/status", params=query, headers=bearer(KEY_A), timeout=10)
    assert mine.status_code == 200 and mine.json()[-1]["type"] == "serverless_api"
    theirs = requests.get(keyed.url + "/api/serverless/status", params=query, headers=bearer(KEY_B), timeout=10)
    assert theirs.status_code == 404 and theirs.json()["error_code"] == "NOT_FOUND"
    assert "serverless_api" not in theirs.text


def test_the_websocket_needs_a_key_too(keyed):
    url = keyed.url.replace("http://", "ws://") + "/api/serverless/ws"
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(url, timeout=10)
    ws = websocket.create_connection(url, header=[f"Authorization: Bearer {KEY_B}"], timeout=30)
    ws.send(json.dumps(empty_image(prefix="auth-ws")))
    while (message := json.loads(ws.recv()))["type"] not in ("serverless_api", "error"):
        pass
    ws.close()
    assert message["type"] == "serverless_api"


def test_a_key_too_short_is_a_settings_error_naming_the_variable():
    with pytest.raises(SettingsError, match="API_KEYS"):
        Settings.from_env({"API_KEYS": "short"})


def test_without_keys_the_api_is_open(app):
    assert requests.post(app.url + RUN, data=json.dumps(empty_image(prefix="open")), timeout=30).status_code == 200


def test_another_key_cannot_summarise_follow_or_cancel_a_task(keyed, emulator):
    requests.post(emulator.url + "/emulator/config", json={"step_delay": 0.05}, timeout=5)
    try:
        headers = {**bearer(KEY_A), "X-Fc-Invocation-Type": "Async", "X-Fc-Trace-Id": "auth-control"}
        accepted = post_run(keyed.url, txt2img(seed=11, steps=60), headers=headers)
        assert accepted.status_code == 202
        query = {"task_id": "auth-control"}
        wait_until(
            lambda: (
                requests.get(
                    keyed.url + "/api/serverless/task", params=query, headers=bearer(KEY_A), timeout=10
                ).status_code
                == 200
            )
        )  # its first event is in the log
        for method, path in (
            ("GET", "/api/serverless/task"),
            ("POST", "/api/serverless/cancel"),
            ("GET", "/api/serverless/events"),
        ):
            theirs = requests.request(method, keyed.url + path, params=query, headers=bearer(KEY_B), timeout=10)
            assert theirs.status_code == 404 and theirs.json()["raw"]["state"] == "unknown", (path, theirs.text)
        mine = requests.get(keyed.url + "/api/serverless/task", params=query, headers=bearer(KEY_A), timeout=10)
        assert mine.status_code == 200 and mine.json()["state"] in ("queued", "running")
        cancel = requests.post(keyed.url + "/api/serverless/cancel", params=query, headers=bearer(KEY_A), timeout=10)
        assert cancel.status_code == 202
    finally:
        requests.post(emulator.url + "/emulator/config", json={"step_delay": 0.02}, timeout=5)
