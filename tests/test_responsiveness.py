"""Big bodies do not stall other callers: health and status keep answering while a 25 MB body is
read, parsed, prepared and submitted. On an idle machine they answer within 0.1 s of their usual
time (`python -m bench` measures it); the bound here, 0.5 s, is loose enough for a loaded machine
and still well inside what a body handled on the event loop costs (its parse alone: 0.1-0.2 s for
25 MB of text here, 1 s for three million values, then preparing and writing it again).

Each body is posted up to five times and the best attempt is judged (the first under the bound ends
the trials): work done on the event loop stalls every attempt alike, while a slow moment of a shared
CI machine (other processes on its cores) rarely falls on all of them. The app and the emulator are
processes of their own (the GIL is the point), shared by the module's tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import base_env
from tests.helpers import RUN
from tests.servers import App, Emulator

PROBES = ("/api/serverless/health", "/api/serverless/status?task_id=probe")


class Poller(threading.Thread):
    """Asks health and status in turn until stopped; keeps the slowest answer's time."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.slowest = 0.0
        self.answers = 0

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                for path in PROBES:
                    started = time.perf_counter()
                    assert session.get(self.url + path, timeout=10).status_code == 200
                    self.slowest = max(self.slowest, time.perf_counter() - started)
                    self.answers += 1
                time.sleep(0.005)


ATTEMPTS = 5
STALL_BOUND = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """One app process and one emulator process for the module: the big bodies disturb neither."""
    root = tmp_path_factory.mktemp("responsiveness")
    emulator = Emulator(root / "emulator")
    try:
        app = App(root, base_env(emulator.url, root / "status"))
        yield app
        app.stop()
    finally:
        emulator.stop()


def _post_while_polling(url: str, body: bytes, path: str = RUN) -> tuple[list[requests.Response], float]:
    """The answers to `body` posted to `path` ATTEMPTS times, and the least of how much slower
    than usual health and status were during each."""
    answers, delays = [], []
    for _ in range(ATTEMPTS):
        response, delay = _post_once(url, body, path)
        answers.append(response)
        delays.append(delay)
        if delay < STALL_BOUND:
            break
    return answers, min(delays)


def _post_once(url: str, body: bytes, path: str) -> tuple[requests.Response, float]:
    """The answer to `body`, and how much slower than usual health and status were meanwhile: the
    slowest answer during the POST, less the slowest of as many answers before it (the machine's
    own noise, e.g. other tests sharing its cores)."""
    poller = Poller(url)
    poller.start()
    while poller.answers < 50:  # the usual: the poller's connection open, answers flowing
        time.sleep(0.01)
    usual, poller.slowest = poller.slowest, 0.0
    response = requests.post(url + path, data=body, headers={"Content-Type": "application/json"}, timeout=120)
    poller.stop.set()
    poller.join()
    assert poller.answers > 50, "health and status kept answering"
    return response, poller.slowest - usual


def test_a_25_mb_body_does_not_keep_health_and_status_waiting(server):
    text = "iVBORw0KGgoAAAANSUhEUg" * (25 * 1024 * 1024 // 22)  # base64-like: what big bodies hold
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}},
        "3": {"class_type": "UnknownTextNode", "inputs": {"text": text}},
    }
    body = json.dumps(workflow).encode()
    assert len(body) > 25_000_000
    answers, delay = _post_while_polling(server.url, body)
    for response in answers:
        assert response.status_code == 400 and response.json()["error_code"] == "PROMPT_ERROR"  # it reached ComfyUI
    assert delay < STALL_BOUND, f"health/status answered {delay:.3f}s slower than usual"


def test_a_25_mb_prompt_on_comfyuis_own_api_does_not_keep_health_and_status_waiting(server):
    text = "iVBORw0KGgoAAAANSUhEUg" * (25 * 1024 * 1024 // 22)
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}},
        "3": {"class_type": "UnknownTextNode", "inputs": {"text": text}},
    }
    body = json.dumps({"prompt": prompt}).encode()
    answers, delay = _post_while_polling(server.url, body, "/prompt")
    for response in answers:  # refused as ComfyUI refuses it: an unknown node class
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_prompt"
    assert delay < STALL_BOUND, f"health/status answered {delay:.3f}s slower than usual"


@pytest.mark.parametrize("path", [RUN, "/prompt"])
def test_a_body_of_millions_of_tiny_values_is_refused_at_once(server, path):
    """On our run and on ComfyUI's own `/prompt` alike."""
    workflow = {"1": {"class_type": "X", "inputs": {"values": list(range(3_000_000))}}}
    body = json.dumps(workflow if path == RUN else {"prompt": workflow}).encode()
    assert len(body) > 25_000_000
    answers, delay = _post_while_polling(server.url, body, path)
    for response in answers:
        assert response.status_code == 400 and response.json()["error_code"] == "INVALID_PARAMS"
        assert "more than 1000000 JSON items" in response.json()["error_message"]
    assert delay < STALL_BOUND, f"health/status answered {delay:.3f}s slower than usual"
