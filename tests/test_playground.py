"""The playground in a real browser (headless Chromium) against the app and the emulator: pick the
registered FC text-to-image workflow, change the prompt, run it to 100 % and see its image, then
cancel a slow run."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
from PIL import Image

from tests.browser import chromium
from tests.helpers import running_prompt, txt2img, wait_until
from tests.servers import ROOT, App, Emulator
from tests.topologies import Deployment

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


def hosting_txt2img(start_app: Callable[..., App], emulator: Emulator, tmp_path: Path, **env: str) -> App:
    app = start_app(emulator.url, WORKFLOWS_DIR=str(tmp_path / "workflows"), **env)
    key = env.get("API_KEYS")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    workflow = json.loads((ROOT / "examples" / "txt2img.json").read_text())
    put = requests.put(app.url + "/api/workflows/txt2img", data=json.dumps(workflow), headers=headers, timeout=30)
    assert put.status_code == 201, put.text
    return app


OVERFLOW = """() => {
  const width = document.documentElement.clientWidth;
  const cards = [...document.querySelectorAll("main > section")].map((s) => s.getBoundingClientRect());
  const wide = [...document.querySelectorAll("body *")].filter((e) => e.getBoundingClientRect().right > width + 0.5);
  return { scroll: document.documentElement.scrollWidth, width, cards: cards.map((r) => [r.left, r.right, r.width]),
           wide: wide.map((e) => e.id || e.tagName) };
}"""


def test_the_playground_fits_a_phone_and_shows_every_card(
    start_app: Callable[..., App], emulator: Emulator, tmp_path: Path
) -> None:
    app = hosting_txt2img(start_app, emulator, tmp_path)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
        page.goto(app.url + "/")
        page.wait_for_selector("#workflow option:nth-child(2)", state="attached")
        page.select_option("#workflow", "txt2img")
        page.wait_for_selector("textarea[name='6.text']")
        page.click("#run")
        page.wait_for_selector("#state.succeeded", state="attached")
        layout = page.evaluate(OVERFLOW)
        assert layout["scroll"] <= layout["width"] == 390, layout
        assert layout["wide"] == [], layout
        assert len(layout["cards"]) == 5 and all(0 <= left and right <= 390 for left, right, _ in layout["cards"])
        for card in ("#pick", "#params", "#runbox", "#results", "#call"):
            page.locator(card).scroll_into_view_if_needed()
            assert page.locator(card).is_visible(), card
        page.screenshot(path=str(tmp_path / "playground-390.png"), full_page=True)
        artifacts = ROOT / ".ci" / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "playground-390.png", artifacts / "playground-390.png")


def test_on_a_desktop_run_stays_in_view_beside_the_parameters(
    start_app: Callable[..., App], emulator: Emulator, tmp_path: Path
) -> None:
    app = hosting_txt2img(start_app, emulator, tmp_path)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 600})
        page.goto(app.url + "/")
        page.wait_for_selector("#workflow option:nth-child(2)", state="attached")
        page.select_option("#workflow", "txt2img")
        page.wait_for_selector("textarea[name='6.text']")
        run, pick, params = (page.locator(s).bounding_box() for s in ("#run", "#pick", "#params"))
        assert run and pick and params
        assert params["y"] + params["height"] > 600  # its 13 parameters reach below the fold
        assert run["y"] + run["height"] <= 600, run  # Run does not
        assert pick["height"] < params["height"] / 2  # the Workflow card is not stretched to the Parameters'
        assert run["x"] < params["x"]  # under the workflow, beside the parameters


def test_a_wrong_api_key_can_be_entered_again_without_reloading(
    start_app: Callable[..., App], emulator: Emulator, tmp_path: Path
) -> None:
    key = "sk-playground-0123456789"
    app = hosting_txt2img(start_app, emulator, tmp_path, API_KEYS=key)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app.url + "/")
        page.wait_for_selector("#keydialog[open]")
        page.fill("#key", "sk-wrong")
        page.click("#keydialog button[value=ok]")
        page.wait_for_selector("#keyerror:has-text('refused')")
        assert page.locator("#keydialog").get_attribute("open") is not None  # asked again, saying why
        page.fill("#key", key)
        page.click("#keydialog button[value=ok]")
        page.wait_for_selector("#workflow option:nth-child(2)", state="attached")
        assert page.locator("#keybutton").is_visible()  # the key can be changed later
        page.click("#keybutton")
        page.wait_for_selector("#keydialog[open]")
        page.click("#keydialog button[value=cancel]")
        assert page.evaluate("sessionStorage.getItem('comfy-serverless-api-key')") == key
        page.select_option("#workflow", "txt2img")
        page.click("#run")
        page.wait_for_selector("#state.succeeded", state="attached")


def test_playground_takes_a_workflow_as_the_editor_saves_it(
    start_app: Callable[..., App], own_emulator: Emulator
) -> None:
    """Pasted UI-format JSON is converted by the server; its inputs become the form; it runs."""
    app = start_app(own_emulator.url)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app.url + "/")
        page.fill("#paste", (ROOT / "examples" / "txt2img.ui.json").read_text())
        page.click("#use-paste")
        page.wait_for_selector("textarea[name='6.text']")
        assert "converted from the UI format" in page.inner_text("#source")
        page.fill("textarea[name='6.text']", PROMPT)
        page.click("#run")
        page.wait_for_selector("#state.succeeded", state="attached")
    history = requests.get(own_emulator.url + "/history", timeout=5).json()
    assert [entry["prompt"][2]["6"]["inputs"]["text"] for entry in history.values()] == [PROMPT]


def test_playground_shows_the_image_forming_before_the_output(deployment: Callable[..., Deployment]) -> None:
    deployed = deployment(step_delay=0.1)
    put = requests.put(deployed.url + "/api/workflows/txt2img", data=json.dumps(txt2img(steps=20, size=96)), timeout=30)
    assert put.status_code == 201, put.text
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(deployed.url + "/")
        page.select_option("#workflow", "txt2img")
        page.click("#run")
        page.wait_for_selector("#preview:not([hidden]) #preview-img[src^='data:image/jpeg;base64,']")
        assert page.query_selector("#outputs img") is None, "the preview comes before the output"
        src = page.get_attribute("#preview-img", "src") or ""
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).load()
        assert "step" in page.inner_text("#preview-caption")
        page.wait_for_selector("#outputs img")
        page.wait_for_selector("#state.succeeded", state="attached")
        assert page.is_hidden("#preview") and page.inner_text("#percent") == "100%"


def pick_version_1(page: Any, url: str, workflow_id: str) -> None:
    """As a user does: the workflow in the picker, then its version 1, shown once loaded."""
    page.goto(url + "/")
    page.wait_for_selector(f"#workflow option[value='{workflow_id}']", state="attached")
    page.select_option("#workflow", workflow_id)
    page.wait_for_selector("#version option[value='1']", state="attached")
    page.select_option("#version", "1")
    page.wait_for_selector("#source:has-text('version 1')")


def test_a_trial_run_of_a_version_shows_the_curl_and_python_of_its_call(deployment: Callable[..., Deployment]) -> None:
    """Pick a registered workflow's version 1 (2 is newer), run it from the form: it runs (ComfyUI's
    /history shows version 1's seed), and the curl and Python client code shown make the same call."""
    deployed = deployment()
    for seed in (111, 222):
        put = requests.put(
            deployed.url + "/api/workflows/trial", data=json.dumps(txt2img(seed=seed, steps=2)), timeout=30
        )
        assert put.status_code in (200, 201), put.text
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        pick_version_1(page, deployed.url, "trial")
        assert page.input_value("input[name='3.seed']") == "111"
        page.click("#run")
        page.wait_for_selector("#state.succeeded", state="attached")
        curl, python = page.inner_text("#curl"), page.inner_text("#python")
    assert f"'{deployed.url}/api/workflows/trial@1/run?stream=true&output_base64=true&previews=true'" in curl
    assert 'workflow_id="trial@1"' in python and "client.stream(" in python
    histories = [requests.get(e.url + "/history", timeout=5).json() for e in deployed.emulators]
    assert [item["prompt"][2]["3"]["inputs"]["seed"] for h in histories for item in h.values()] == [111]

    # The code shown makes the very call again.
    by_curl = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=True).stdout
    last = json.loads([line for line in by_curl.splitlines() if line.startswith("data:")][-1][5:])
    assert last["type"] == "serverless_api" and (last["data"]["workflow_id"], last["data"]["workflow_version"]) == (
        "trial",
        1,
    )
    printed = io.StringIO()
    with redirect_stdout(printed):  # as `python -c` runs it, in a namespace of its own (in this interpreter)
        exec(compile(python, "<the playground's Python>", "exec"), {"__name__": "__main__"})
    by_python = printed.getvalue()
    assert by_python.splitlines()[-1] == "serverless_api"
    histories = [requests.get(e.url + "/history", timeout=5).json() for e in deployed.emulators]
    assert [item["prompt"][2]["3"]["inputs"]["seed"] for h in histories for item in h.values()] == [111] * 3


def test_a_late_answer_to_an_earlier_pick_does_not_replace_the_version_picked(
    start_app: Callable[..., App], own_emulator: Emulator, tmp_path: Path
) -> None:
    """On a loaded server the answers come out of order: the workflow's own description (its newest
    version, 2) arrives after version 1 was picked and shown. The pick stands: the form, the source
    line and the run are version 1's."""
    app = start_app(own_emulator.url, WORKFLOWS_DIR=str(tmp_path / "workflows"))
    for seed in (111, 222):
        put = requests.put(app.url + "/api/workflows/late", data=json.dumps(txt2img(seed=seed, steps=2)), timeout=30)
        assert put.status_code in (200, 201), put.text
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        held: list[Any] = []
        newest = re.compile(r".*/api/workflows/late$")  # the workflow's own description: its newest version
        page.route(newest, lambda route: held.append(route))  # held until version 1 is shown
        pick_version_1(page, app.url, "late")
        assert len(held) == 1
        with page.expect_response(newest):
            held[0].continue_()
        page.click("#run")
        page.wait_for_selector("#state.succeeded", state="attached")
        assert "version 1" in page.inner_text("#source") and page.input_value("input[name='3.seed']") == "111"
        assert "late@1/run" in page.inner_text("#curl")
    (item,) = requests.get(own_emulator.url + "/history", timeout=5).json().values()
    assert item["prompt"][2]["3"]["inputs"]["seed"] == 111
