"""GET /api/tasks: every task, newest first, paged by cursor, on one box and on a fleet; with
API keys each key sees its own tasks only."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from tests.helpers import empty_image, post_run, wait_until
from tests.topologies import Deployment

Deploy = Callable[..., Deployment]
KEY_A, KEY_B = "tasks-key-a-0123456789", "tasks-key-b-0123456789"
TASKS = "/api/tasks"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _pages(url: str, key: str, limit: int, **params: str) -> list[list[dict[str, Any]]]:
    """Every page of the list, following `next_cursor` to its end."""
    pages, cursor = [], None
    while True:
        asked = {"limit": str(limit), **params, **({"cursor": cursor} if cursor else {})}
        answer = requests.get(url + TASKS, params=asked, headers=_auth(key), timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        pages.append(body["tasks"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "the cursor never ends"


def test_the_task_list_pages_through_250_tasks_each_key_its_own(deployment: Deploy) -> None:
    url = deployment(step_delay=0.0, API_KEYS=f"{KEY_A},{KEY_B}").url
    owners = {f"list-{n}": KEY_A if n % 5 < 3 else KEY_B for n in range(250)}  # 150 of A's, 100 of B's

    def run(task_id: str) -> None:
        headers = {**_auth(owners[task_id]), "X-Fc-Async-Task-Id": task_id}
        answer = post_run(url, {"prompt": empty_image(prefix=task_id)}, headers=headers)
        assert answer.status_code == 200, answer.text

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(run, owners))

    for key, count in ((KEY_A, 150), (KEY_B, 100)):
        pages = _pages(url, key, 40)
        rows = [row for page in pages for row in page]
        assert [len(page) for page in pages[:-1]] == [40] * (len(pages) - 1)
        ids = [row["task_id"] for row in rows]
        assert sorted(ids) == sorted(task for task, owner in owners.items() if owner == key)
        assert len(ids) == count
        created = [row["created_at"] for row in rows]
        assert created == sorted(created, reverse=True), "newest first"
        assert all(row["state"] == "succeeded" and "result" not in row for row in rows)

    assert _pages(url, KEY_A, 50, state="running") == [[]]
    assert len([row for page in _pages(url, KEY_B, 200, state="succeeded") for row in page]) == 100


def test_a_running_task_is_listed_first_and_filters_apply(deployment: Deploy) -> None:
    deployed = deployment(step_delay=0.3)
    url = deployed.url
    for n in range(3):
        assert post_run(url, {"prompt": empty_image(prefix=f"done{n}")}, headers={"X-Fc-Async-Task-Id": f"done-{n}"}).ok
    headers = {"X-Fc-Invocation-Type": "Async", "X-Fc-Async-Task-Id": "slow-one"}
    from tests.helpers import txt2img

    assert post_run(url, {"prompt": txt2img(steps=20)}, headers=headers).status_code == 202

    def running() -> list[dict[str, Any]]:
        answer = requests.get(url + TASKS, params={"state": "running"}, timeout=10).json()
        return list(answer["tasks"])

    assert [row["task_id"] for row in wait_until(running)] == ["slow-one"]
    newest = requests.get(url + TASKS, params={"limit": "2"}, timeout=10).json()
    assert [row["task_id"] for row in newest["tasks"]] == ["slow-one", "done-2"]
    assert newest["next_cursor"]
    bad = requests.get(url + TASKS, params={"cursor": "not-a-cursor"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error_code"] == "INVALID_PARAMS"
    bad = requests.get(url + TASKS, params={"limit": "0"}, timeout=10)
    assert bad.status_code == 400
    requests.post(url + "/api/serverless/cancel", params={"task_id": "slow-one"}, timeout=10)


def test_a_hosted_workflow_s_tasks_are_listed_by_its_id(deployment: Deploy) -> None:
    url = deployment(step_delay=0.0).url
    put = requests.put(url + "/api/workflows/tiny", data=json.dumps(empty_image(prefix="tiny")), timeout=10)
    assert put.status_code in (200, 201), put.text
    for n in range(3):
        answer = requests.post(url + "/api/workflows/tiny/run", json={}, headers={"X-Fc-Async-Task-Id": f"w-{n}"})
        assert answer.status_code == 200, answer.text
    assert post_run(url, {"prompt": empty_image(prefix="adhoc")}, headers={"X-Fc-Async-Task-Id": "adhoc"}).ok
    rows = requests.get(url + TASKS, params={"workflow_id": "tiny"}, timeout=10).json()["tasks"]
    assert [row["task_id"] for row in rows] == ["w-2", "w-1", "w-0"]
    assert all(row["workflow_id"] == "tiny" for row in rows)
