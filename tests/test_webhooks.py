"""Webhooks: the terminal payload POSTed, signed, to `callback_url`, retried as documented, to a
real receiver on loopback (allowed by WEBHOOK_ALLOWED_HOSTS)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import empty_image, post_run, wait_until

pytestmark = pytest.mark.timeout(60)

SECRET = "webhook-secret-never-logged"
QUERY_SECRET = "query-token-never-logged"


class Receiver:
    """A webhook receiver: answers each POST with the next status of `statuses` (then 200)."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token={QUERY_SECRET}"
        # shutdown() waits for the loop to look again: every 0.05 s, not the default 0.5 s
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def hook_app(start_app, emulator, tmp_path):
    return start_app(
        emulator.url, status_dir=tmp_path / "status", WEBHOOK_ALLOWED_HOSTS="127.0.0.1", WEBHOOK_SECRET=SECRET
    )


def record(tmp_path: Path, task_id: str) -> dict[str, Any]:
    """The delivery record beside the task's status log, once it is written."""
    path = tmp_path / "status" / f"{task_id}~webhook"
    return json.loads(wait_until(lambda: path.exists() and path.read_text()))


def verify(headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does (README, "Webhooks")."""
    expected = hmac.new(
        SECRET.encode(), headers["x-serverless-timestamp"].encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(headers["x-serverless-signature"], "sha256=" + expected)


def test_each_job_posts_its_terminal_payload_once_signed(hook_app, receiver, tmp_path):
    response = post_run(
        hook_app.url,
        empty_image(prefix="hooked"),
        params={"callback_url": receiver.url},
        headers={"x-fc-trace-id": "hook-once"},
    )
    assert response.status_code == 200, response.text
    assert record(tmp_path, "hook-once") | {"at": 0} == {
        "url_host": "127.0.0.1",
        "status": 200,
        "attempts": 1,
        "delivered": True,
        "error": None,
        "at": 0,
    }
    ((headers, body),) = receiver.received
    assert json.loads(body) == response.json()
    assert headers["content-type"] == "application/json" and headers["x-serverless-task-id"] == "hook-once"
    assert verify(headers, body)
    assert not verify({**headers, "x-serverless-timestamp": "1"}, body)
    # Our own log lines (uvicorn's access log, off by default as deployed, shows request lines).
    log = "\n".join(line for line in hook_app.log_text().splitlines() if " serverless." in line)
    assert '"url_host": "127.0.0.1", "status": 200, "attempts": 1' in log
    assert QUERY_SECRET not in log and SECRET not in log
    metrics = requests.get(hook_app.url + "/metrics", timeout=5).text
    assert 'serverless_webhook_deliveries_total{outcome="ok"} 1.0' in metrics


def test_the_x_callback_url_header_works_as_the_query(hook_app, receiver, tmp_path):
    post_run(
        hook_app.url,
        empty_image(prefix="hooked"),
        headers={"x-fc-trace-id": "hook-header", "X-Callback-Url": receiver.url},
    )
    assert record(tmp_path, "hook-header")["delivered"]
    assert len(receiver.received) == 1


def test_two_server_errors_then_success_take_three_attempts(hook_app, receiver, tmp_path):
    receiver.statuses = [500, 503]
    post_run(
        hook_app.url,
        empty_image(prefix="retried"),
        params={"callback_url": receiver.url},
        headers={"x-fc-trace-id": "hook-retry"},
    )
    assert record(tmp_path, "hook-retry")["attempts"] == 3
    assert len(receiver.received) == 3 and all(verify(h, b) for h, b in receiver.received)


def test_a_client_error_is_not_retried(hook_app, receiver, tmp_path):
    receiver.statuses = [400]
    post_run(
        hook_app.url,
        empty_image(prefix="refused"),
        params={"callback_url": receiver.url},
        headers={"x-fc-trace-id": "hook-400"},
    )
    delivery = record(tmp_path, "hook-400")
    assert (delivery["status"], delivery["attempts"], delivery["delivered"]) == (400, 1, False)
    assert len(receiver.received) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest",
        "http://10.1.2.3/x",
        "http://localhost:9/hook",
        "ftp://example.com/x",
        "not a url",
    ],
)
def test_a_private_or_odd_callback_url_is_refused_before_anything_runs(app, url):
    response = post_run(app.url, empty_image(prefix="nohook"), params={"callback_url": url})
    assert response.status_code == 400 and response.json()["error_code"] == "INVALID_PARAMS", response.text
    assert "callback_url" in response.json()["error_message"]
    private = url.startswith("http://")  # the refusals an allow-list lifts name it
    assert ("WEBHOOK_ALLOWED_HOSTS" in response.json()["error_message"]) is private


def test_a_held_async_invocation_on_fc_answers_after_its_webhook(start_app, emulator, receiver, tmp_path):
    app = start_app(
        emulator.url,
        status_dir=tmp_path / "status",
        WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        FC_FUNCTION_NAME="comfyui",
        LIFECYCLE_TOKEN="t",
    )
    receiver.statuses = [500, 502]
    response = post_run(
        app.url,
        empty_image(prefix="heldhook"),
        params={"callback_url": receiver.url},
        headers={"X-Fc-Invocation-Type": "Async", "x-fc-async-task-id": "hook-held"},
    )
    assert response.status_code == 200, response.text
    assert len(receiver.received) == 3  # all before the answer: FC may freeze the instance after it
    assert (tmp_path / "status" / "hook-held~webhook").exists()
