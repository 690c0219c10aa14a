"""The playground in a real browser (headless Chromium) against the app and the emulator: pick the
registered FC text-to-image workflow, change the prompt, run it to 100 % and see its image, then
cancel a slow run."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import requests
from PIL import Image

from tests.browser import chromium
from tests.helpers import running_prompt, txt2img, wait_until
from tests.servers import ROOT, App, Emulator

PROMPT = "a red fox in fresh snow, watercolour"


def test_playground_runs_a_hosted_workflow_and_cancels_a_slow_one(
    start_app: Callable[..., App], own_emulator: Emulator, tmp_path: Path
) -> None:
    app = start_app(own_emulator.url, WORKFLOWS_DIR=str(tmp_path / "workflows"))
    put = requests.put(app.url + "/api/workflows/txt2img", data=json.dumps(txt2img(steps=8, size=96)), timeout=30)
    assert put.status_code == 201, put.text
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(app.url + "/")
        page.select_option("#workflow", "txt2img")
        page.fill("textarea[name='6.text']", PROMPT)
        page.click("#run")
        page.wait_for_selector("#outputs img")
        page.wait_for_selector("#state.succeeded")  # selectors, not eval: the page's CSP forbids it
        assert page.inner_text("#percent") == "100%"
        assert page.get_attribute("#bar", "aria-valuenow") == "100"
        src = page.get_attribute("#outputs img", "src") or ""
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        image.load()
        assert image.size == (96, 96)
        assert "Seeds used: 3.seed = " in page.inner_text("#seeds")
        assert int(page.inner_text("#count")) > 0  # ComfyUI's raw messages, in the collapsible log
        history = requests.get(own_emulator.url + "/history", timeout=5).json()
        prompts = [entry["prompt"][2]["6"]["inputs"]["text"] for entry in history.values()]
        assert prompts == [PROMPT]
        screenshot = tmp_path / "playground.png"
        page.screenshot(path=str(screenshot), full_page=True)
        artifacts = (
            ROOT / ".ci" / "artifacts"
        )  # CI's artefact folder (git-ignored); docs/playground.png is the README's
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, artifacts / "playground.png")

        # a slow run (100 steps of 0.2 s), cancelled once it runs
        requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.2}, timeout=5).raise_for_status()
        page.fill("input[name='3.steps']", "100")
        page.click("#run")
        page.locator("#state").filter(has_text=re.compile(r"^running")).wait_for()
        page.click("#cancel")
        page.wait_for_selector("#state.cancelled")
        assert "cancelled" in page.inner_text("#state")
        wait_until(lambda: running_prompt(own_emulator.url) is None, timeout=8)  # 20 s had it run on
    assert all(urlparse(url).hostname == "127.0.0.1" for url in requested if not url.startswith("data:"))
