"""The fleet's dead letters: listed and queued again by an operator; with API keys an admin key
sees and queues everyone's, any other key its own only. A box has no queue: its list is empty."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import redis
import requests

from serverless.auth import digest
from serverless.fleet.wire import encode_spec
from serverless.jobs.spec import JobSpec
from tests.helpers import empty_image, wait_until
from tests.topologies import Deployment

Deploy = Callable[..., Deployment]
KEY_A, KEY_B = "dead-letters-key-a-0123", "dead-letters-key-b-0123"
ADMIN = "dead-letters-admin-0123"
LETTERS = "/api/fleet/dead-letters"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _bury(url: str, task_id: str, key: str, spec: bytes | None = None) -> None:
    """A dead letter as a worker keeps one (a job whose workers died under it twice)."""
    owner = digest(key)[:32]
    made = JobSpec(empty_image(prefix=task_id), mode="async", task_id=task_id, owner=owner)
    fields = {
        "task_id": task_id,
        "spec": spec if spec is not None else encode_spec(made),
        "dead_from": "jobs:normal",
        "dead_entry": "1-0",
        "dead_reason": "the job's worker died on attempt 2 too: it is not run again",
        "dead_consumer": "gone:1",
    }
    client = redis.Redis.from_url(url)
    client.set(f"task:{task_id}:owner", owner)
    client.xadd("dead:jobs", fields)  # type: ignore[arg-type]


def test_an_operator_lists_a_dead_letter_and_queues_it_again(deployment: Deploy, topology: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_A} raw=yes label=a\n{KEY_B} raw=yes label=b\n{ADMIN} admin=yes label=ops\n")
    deployed = deployment(API_KEYS_FILE=str(keys))
    url = deployed.url
    if topology == "box":
        assert requests.get(url + LETTERS, headers=_auth(KEY_A), timeout=10).json() == {"dead_letters": []}
        gone = requests.post(url + LETTERS + "/1-0/requeue", headers=_auth(KEY_A), timeout=10)
        assert gone.status_code == 404 and gone.json()["error_code"] == "NOT_FOUND"
        return
    assert deployed.redis_url is not None
    _bury(deployed.redis_url, "twice-lost", KEY_A)
    unreadable = b'{"owner": "%s"}' % digest(KEY_A)[:32].encode()  # whose, but no workflow
    _bury(deployed.redis_url, "unreadable-one", KEY_A, spec=unreadable)
    assert requests.get(url + LETTERS, timeout=10).status_code == 401, "a key is needed"
    assert requests.get(url + LETTERS, headers=_auth(KEY_B), timeout=10).json() == {"dead_letters": []}
    letters = requests.get(url + LETTERS, headers=_auth(KEY_A), timeout=10).json()["dead_letters"]
    assert [letter["task_id"] for letter in letters] == ["unreadable-one", "twice-lost"], "newest first"
    assert requests.get(url + LETTERS, headers=_auth(ADMIN), timeout=10).json()["dead_letters"] == letters
    assert letters[1]["reason"].startswith("the job's worker died") and letters[1]["priority"] == "normal"

    refused = requests.post(url + LETTERS + f"/{letters[0]['id']}/requeue", headers=_auth(KEY_A), timeout=10)
    assert refused.status_code == 400 and refused.json()["error_code"] == "INVALID_PARAMS"
    other = requests.post(url + LETTERS + f"/{letters[1]['id']}/requeue", headers=_auth(KEY_B), timeout=10)
    assert other.status_code == 404, "another key's dead letter is not there for it"
    queued = requests.post(url + LETTERS + f"/{letters[1]['id']}/requeue", headers=_auth(KEY_A), timeout=10)
    assert queued.status_code == 202, queued.text
    assert queued.json()["task_id"] == "twice-lost" and queued.json()["state"] == "queued"

    def ended() -> dict[str, object] | None:
        task = requests.get(url + "/api/serverless/task", params={"task_id": "twice-lost"}, headers=_auth(KEY_A))
        return task.json() if task.ok and task.json()["state"] == "succeeded" else None

    assert wait_until(ended, timeout=30)
    left = requests.get(url + LETTERS, headers=_auth(KEY_A), timeout=10).json()["dead_letters"]
    assert [letter["task_id"] for letter in left] == ["unreadable-one"]
    again = requests.post(url + LETTERS + f"/{letters[1]['id']}/requeue", headers=_auth(KEY_A), timeout=10)
    assert again.status_code == 404, "queued once"
