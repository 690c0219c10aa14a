"""Signed download links (`output_url=true`, `GET /api/files/{token}`), served by any instance
with the same FILE_LINK_SECRET, through the emulator's `/view`."""

from __future__ import annotations

import base64
import io
import json
import time
from urllib.parse import urlsplit

import pytest
import requests
import websocket
from PIL import Image

from serverless.core.conversion import Conversion
from serverless.delivery.links import sign
from tests.helpers import empty_image, post_run

pytestmark = pytest.mark.timeout(60)

LINK_SECRET = "file-link-secret-never-logged"


@pytest.fixture
def two_apps(start_app, emulator):
    """Two instances sharing one ComfyUI output folder and one link secret."""
    return (
        start_app(emulator.url, FILE_LINK_SECRET=LINK_SECRET),
        start_app(emulator.url, FILE_LINK_SECRET=LINK_SECRET, FILE_LINK_EXPIRES="60"),
    )


def on(app_url: str, link: str) -> str:
    """The same link, asked of another instance."""
    parts = urlsplit(link)
    return app_url + parts.path + (f"?{parts.query}" if parts.query else "")


def first_output(app_url: str, **params: str) -> dict:
    response = post_run(
        app_url,
        empty_image(width=40, height=30, color=0xAA3300, prefix="linked"),
        params={"output_url": "true", "output_base64": "true", **params},
    )
    assert response.status_code == 200, response.text
    return response.json()["data"]["results"][0]["output"]


def test_a_link_downloads_the_same_bytes_from_a_second_instance(two_apps):
    first, second = two_apps
    output = first_output(first.url)
    assert output["url"].startswith(first.url + "/api/files/")
    content = base64.b64decode(output["base64"]["content"])
    downloaded = requests.get(on(second.url, output["url"]), timeout=10)
    assert (downloaded.status_code, downloaded.content) == (200, content)
    assert downloaded.headers["content-type"] == "image/png"


def test_a_changed_character_or_an_expired_link_is_forbidden(two_apps):
    first, second = two_apps
    link = on(second.url, first_output(first.url)["url"])
    token = link.rsplit("/", 1)[1]
    for position in (3, len(token) // 2, len(token) - 2):
        changed = token[:position] + ("A" if token[position] != "A" else "B") + token[position + 1 :]
        answer = requests.get(link.replace(token, changed), timeout=10)
        assert answer.status_code == 403 and answer.json()["error_code"] == "UNAUTHORIZED", answer.text
    expired = sign(
        LINK_SECRET.encode(),
        {"type": "output", "subfolder": "", "filename": "x.png"},
        int(time.time()) - 1,
        Conversion(),
    )
    answer = requests.get(f"{second.url}/api/files/{expired}", timeout=10)
    assert answer.status_code == 403 and "expired" in answer.json()["error_message"]
    foreign = sign(
        b"another secret", {"type": "output", "subfolder": "", "filename": "x.png"}, int(time.time()) + 60, Conversion()
    )
    assert requests.get(f"{second.url}/api/files/{foreign}", timeout=10).status_code == 403


def test_a_range_request_gets_206_with_those_bytes(two_apps):
    first, second = two_apps
    output = first_output(first.url)
    content = base64.b64decode(output["base64"]["content"])
    part = requests.get(on(second.url, output["url"]), headers={"Range": "bytes=10-29"}, timeout=10)
    assert part.status_code == 206 and part.content == content[10:30]
    assert part.headers["content-range"] == f"bytes 10-29/{len(content)}"


def test_a_converted_link_serves_the_converted_bytes_and_only_the_signed_format(two_apps):
    first, second = two_apps
    output = first_output(first.url, output_format="jpeg", output_quality="80", output_max_side="20")
    content = base64.b64decode(output["base64"]["content"])
    link = on(second.url, output["url"])
    downloaded = requests.get(link, timeout=10)
    assert (downloaded.status_code, downloaded.content) == (200, content)
    assert downloaded.headers["content-type"] == "image/jpeg" == output["mime"]
    assert Image.open(io.BytesIO(downloaded.content)).size == (20, 15)
    assert requests.get(link, params={"format": "jpeg", "q": "80"}, timeout=10).content == content
    assert requests.get(link, params={"format": "png"}, timeout=10).status_code == 403
    assert requests.get(link, params={"q": "100"}, timeout=10).status_code == 403
    part = requests.get(link, headers={"Range": "bytes=-5"}, timeout=10)
    assert part.status_code == 206 and part.content == content[-5:]


def test_output_url_needs_a_link_secret(app):
    response = post_run(app.url, empty_image(prefix="nolink"), params={"output_url": "true"})
    assert response.status_code == 400 and "FILE_LINK_SECRET" in response.json()["error_message"]


def test_a_websocket_run_gets_http_links(two_apps):
    first, second = two_apps
    ws = websocket.create_connection(first.url.replace("http", "ws") + "/api/serverless/ws?output_url=1", timeout=30)
    ws.send(json.dumps(empty_image(prefix="wslink")))
    while (message := json.loads(ws.recv()))["type"] not in ("serverless_api", "error"):
        pass
    ws.close()
    link = message["data"]["results"][0]["output"]["url"]
    assert link.startswith(first.url + "/api/files/")
    assert requests.get(on(second.url, link), timeout=10).status_code == 200
