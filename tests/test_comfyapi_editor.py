"""ComfyUI's own editor (`comfyui-frontend-package`) served at `/comfyui/` by one box and by a
fleet's gateway, driven in headless Chromium: it loads its nodes, queues a workflow, follows it
over its websocket and shows the image."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from tests.helpers import wait_until
from tests.topologies import Deployment

pytest.importorskip("comfyui_frontend_package")
pytest.importorskip("playwright")

pytestmark = pytest.mark.timeout(120)

WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 255}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "editor"}},
}


def test_comfyuis_editor_queues_a_workflow_and_shows_its_image(deployment: Any) -> None:
    from tests.browser import chromium

    deployed: Deployment = deployment()
    with chromium() as browser:
        page = browser.new_page()
        views: list[int] = []
        page.on("response", lambda r: views.append(r.status) if "/comfyui/api/view?" in r.url else None)
        page.goto(deployed.url + "/comfyui/", wait_until="load")
        page.wait_for_function("() => window.app && window.app.api && window.LiteGraph", timeout=30000)
        page.wait_for_function("() => 'KSampler' in window.LiteGraph.registered_node_types", timeout=30000)
        # Its start-up ends by opening the workflow it had (a blank one, new): one loaded before that
        # is replaced (a loaded machine's editor then showed an empty graph). As a person does, the
        # workflow is loaded once the editor shows its own.
        page.wait_for_function("() => window.app.extensionManager.workflow.activeWorkflow", timeout=30000)
        # A prompt's messages go to the client id it is queued with, which the editor learns from its
        # websocket's greeting: queued before that (a loaded machine's socket opens late), no message
        # reaches the editor, from ComfyUI as from us. As a person waits for it to show "connected".
        page.wait_for_function(
            "() => window.app.api.socket && window.app.api.socket.readyState === 1 && window.app.api.clientId",
            timeout=30000,
        )
        page.evaluate(
            """async (workflow) => {
                window.__executed = [];
                window.app.api.addEventListener('executed', (e) => window.__executed.push(e.detail));
                await window.app.loadApiJson(workflow, 'editor test');
                await window.app.queuePrompt(0, 1);
            }""",
            WORKFLOW,
        )
        page.wait_for_function("() => window.__executed.length > 0", timeout=60000)
        executed = page.evaluate("() => window.__executed[0]")
        (image,) = executed["output"]["images"]
        assert image["filename"] == "editor_00001_.png"
        # `executed` comes before the prompt's end (ComfyUI's too): its history entry follows it.
        entry = deployed.url + "/history/" + executed["prompt_id"]
        history = wait_until(lambda: requests.get(entry, timeout=10).json(), timeout=30)
        assert history[executed["prompt_id"]]["status"]["status_str"] == "success"
        # The node shows its image: the editor asks /view for it as it next draws the node. A headless
        # page's canvas is redrawn only when marked dirty, on its next animation frame (on a loaded CI
        # machine, no /view came within 45 s of the `executed` message, twice): it is drawn here, as a
        # person's mouse move over it would have it drawn.
        for _ in range(225):
            if 200 in views:
                break
            page.evaluate("() => window.app.canvas.draw(true, true)")
            page.wait_for_timeout(200)
        shown = page.evaluate(
            """() => ({outputs: Object.keys(window.app.nodeOutputs || {}),
                       nodes: window.app.graph._nodes.map((n) => [n.id, n.type, Array.from(n.pos)]),
                       visible: Array.from(window.app.canvas.visible_area || [])})"""
        )
        assert 200 in views, f"the editor asked /view {len(views)} times (statuses {views}) in 45 s: {shown}"
