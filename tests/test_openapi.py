"""The whole API's OpenAPI document and its reference page: the document validates, names every
route the app serves, every path it documents is served, and /docs renders with no request
leaving loopback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import requests
from openapi_spec_validator import validate as validate_openapi
from starlette.routing import Mount, Route, WebSocketRoute

from serverless.app import create_app
from serverless.docs.openapi import build_document
from serverless.settings import Settings
from tests.browser import chromium
from tests.helpers import txt2img
from tests.servers import App, Emulator

SIDE_EFFECTS_LAST = ("/initialize", "/pre-stop")  # hooks that wait or drain: probed after the rest


def app_routes() -> set[tuple[str, str]]:
    """(path, method) of every route the app's route table holds; static mounts are assets."""
    served: set[tuple[str, str]] = set()
    for route in create_app(Settings.from_env({})).routes:
        if isinstance(route, WebSocketRoute):
            served.add((route.path, "get"))
        elif isinstance(route, Route):
            served.update((route.path, method.lower()) for method in route.methods or () if method != "HEAD")
        else:
            assert isinstance(route, Mount), f"a route of an unknown kind: {route!r}"
    return served


def documented(document: dict[str, object]) -> set[tuple[str, str]]:
    paths = document["paths"]
    assert isinstance(paths, dict)
    return {(path, method) for path, item in paths.items() for method in item}


def test_document_validates_as_openapi_3_1() -> None:
    document = build_document("http://127.0.0.1:9000", ["txt2img"])
    validate_openapi(document)
    assert document["openapi"] == "3.1.0"
    assert "/api/workflows/txt2img/openapi.json" in document["info"]["description"]


def test_every_route_the_app_serves_is_documented() -> None:
    missing = app_routes() - documented(build_document("http://x"))
    assert not missing, f"routes without an entry in serverless/docs/catalog.py: {sorted(missing)}"


def test_every_documented_path_is_served_by_the_running_app(
    start_app: Callable[..., App], emulator: Emulator, tmp_path: Path
) -> None:
    """Every path the document describes answers (not 404/405): no entry for a route the app lacks."""
    app = start_app(emulator.url, WORKFLOWS_DIR=str(tmp_path / "workflows"))
    document = requests.get(app.url + "/api/openapi.json", timeout=10).json()
    validate_openapi(document)
    unserved = []
    websockets = {("/api/serverless/ws", "get"), ("/api/maas/comfy_task_ws_api/get_task_progress", "get")}
    websockets |= {("/ws", "get"), ("/api/ws", "get")}  # ComfyUI's websocket
    pairs = sorted(documented(document) - websockets, key=lambda pair: (pair[0] in SIDE_EFFECTS_LAST, pair))
    for path, method in pairs:
        url = app.url + path.replace("{workflow_id}", "nosuch").replace("{token}", "nosuch")
        answer = requests.request(method, url, params={"task_id": "nosuch"}, timeout=30)
        text = answer.text if answer.headers.get("content-type", "").startswith("application/json") else ""
        if answer.status_code == 405 or "no such endpoint" in text:
            unserved.append(f"{method.upper()} {path}")
    assert not unserved, f"documented but not served: {unserved}"


def test_document_links_each_hosted_workflow(start_app: Callable[..., App], emulator: Emulator, tmp_path: Path) -> None:
    app = start_app(emulator.url, WORKFLOWS_DIR=str(tmp_path / "workflows"))
    put = requests.put(app.url + "/api/workflows/txt2img", data=json.dumps(txt2img()), timeout=30)
    assert put.status_code == 201, put.text
    document = requests.get(app.url + "/api/openapi.json", timeout=10).json()
    assert "](/api/workflows/txt2img/openapi.json)" in document["info"]["description"]
    assert document["servers"] == [{"url": app.url}]


def test_docs_page_renders_offline(app: App) -> None:
    with chromium() as browser:
        page = browser.new_page()
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(app.url + "/docs")
        page.get_by_text("/api/serverless/run", exact=True).first.wait_for()
        page.get_by_text("/api/workflows/{workflow_id}/run", exact=True).first.wait_for()
        assert page.locator(".swagger-ui .version", has_text="OAS 3.1").count() == 1
    assert requested, "the page made no request at all"
    outside = [url for url in requested if urlparse(url).hostname != "127.0.0.1"]
    assert not outside, f"requests left loopback: {outside}"


def test_docs_with_api_keys_loads_without_a_key_and_takes_one_through_authorize(
    start_app: Callable[..., App], emulator: Emulator, tmp_path: Path
) -> None:
    """A fresh tab on /docs: the document loads (it is not a secret), the API itself still needs
    the key, and the key given to Authorize is sent by "Try it out" and lists the workflows' documents."""
    key = "sk-docs-0123456789"
    app = start_app(emulator.url, API_KEYS=key, WORKFLOWS_DIR=str(tmp_path / "workflows"))
    bearer = {"Authorization": f"Bearer {key}"}
    put = requests.put(app.url + "/api/workflows/txt2img", data=json.dumps(txt2img()), headers=bearer, timeout=30)
    assert put.status_code == 201, put.text
    assert requests.get(app.url + "/api/openapi.json", timeout=10).status_code == 200
    for path in ("/api/workflows", "/api/workflows/txt2img/openapi.json", "/api/serverless/task?task_id=x"):
        assert requests.get(app.url + path, timeout=10).status_code == 401, path
    with chromium() as browser:
        page = browser.new_page()
        page.goto(app.url + "/docs")
        page.get_by_text("/api/serverless/run", exact=True).first.wait_for()
        assert page.get_by_text("Failed to load API definition").count() == 0
        page.click(".swagger-ui .auth-wrapper button.authorize")
        page.fill(".swagger-ui .modal-ux input", key)
        page.click(".swagger-ui .modal-ux button.authorize")
        # the page reloads once, the key kept: the hosted workflow's document is listed
        page.wait_for_selector(".topbar select option:text-is('workflow: txt2img')", state="attached")
        page.get_by_text("/api/serverless/run", exact=True).first.wait_for()
        operation = page.locator("#operations-workflows-listWorkflows")
        operation.locator(".opblock-summary").click()
        operation.get_by_role("button", name="Try it out").click()
        operation.get_by_role("button", name="Execute").click()
        status = operation.locator(".live-responses-table .response .response-col_status").first
        status.wait_for()
        assert status.inner_text().strip() == "200"
