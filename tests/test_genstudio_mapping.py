"""GenStudio's `comfy_task_info` built from a task's summary (pure)."""

from __future__ import annotations

from typing import Any

from serverless.genstudio.mapping import RUNNING, SUCCEEDED, outputs, task_info
from serverless.status.summary import summarise

PROGRESS = {"type": "serverless_progress", "data": {"state": "succeeded", "percent": 100.0, "at": 2.0}}
RESULT = {
    "type": "serverless_api",
    "data": {
        "results": [{"node_id": "9", "output": {"type": "image", "raw": {"filename": "a.png", "type": "output"}}}]
    },
}


def info(payloads: list[Any]) -> dict[str, Any]:
    summary = summarise("t", payloads)
    return task_info("t", summary, [f"https://files/{i}" for i, _ in enumerate(outputs(summary))])


def test_a_task_is_status_3_only_with_its_files() -> None:
    """Its last progress says succeeded a moment before its result is logged: still running then."""
    before = info([PROGRESS])
    assert before["status"] == RUNNING and before["final_files"] == []
    done = info([PROGRESS, RESULT])
    assert done["status"] == SUCCEEDED and done["progress_num"] == 100
    assert done["files"] == {"9": ["https://files/0"]} and done["final_files"] == ["https://files/0"]
