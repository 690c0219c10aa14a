"""Files kept beside the status logs for job control: blocking operations, run in the status
log's own threads.

    <task_id>~cancel-<N>        a cancel request for attempt N (the owning instance looks for it)
    ~idempotency/<key>          an `Idempotency-Key` claim: `{"task_id", "digest"}` of the request

A cancel request names its attempt, so a later delivery of the same task is not cancelled by an
old request. Both are pruned with the logs: a cancel request is one of its task's files; a key
goes once it is past the retention and its task has no file left.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from . import files

KEYS = f"{files.SEPARATOR}idempotency"  # `~` is no task id character: never a task's name


def cancel_path(directory: Path, task_id: str, attempt: int) -> Path:
    return directory / f"{task_id}{files.SEPARATOR}cancel-{attempt}"


def request_cancel(directory: Path, task_id: str) -> int | None:
    """Leave a cancel request for the task's newest attempt (written to a temp name, then renamed:
    a reader sees all of it or nothing); returns the attempt, None for an unknown task."""
    numbers = files.numbers(directory, task_id)
    if not numbers:
        return None
    target = cancel_path(directory, task_id, numbers[-1])
    temp = directory / f"{task_id}{files.SEPARATOR}tmp-{uuid.uuid4().hex}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        files._write_all(fd, json.dumps({"requested_at": round(time.time(), 3)}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, target)
    return numbers[-1]


def cancels_asked(directory: Path, attempts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Those of `attempts` (task id, number) for which a cancel request is waiting."""
    return [(task, number) for task, number in attempts if os.path.lexists(cancel_path(directory, task, number))]


# -- idempotency keys ---------------------------------------------------------------------------


def key_path(directory: Path, key: str) -> Path:
    return directory / KEYS / key


def claim_key(directory: Path, key: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """Claim `key` for `record` (create-exclusive: of two claimers one wins); None when claimed
    here, else what the file holds ({} while its claimer has not written it yet)."""
    path = key_path(directory, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return read_key(directory, key)
    try:
        files._write_all(fd, json.dumps(record).encode())  # one small write: read whole or not at all
        os.fsync(fd)
    finally:
        os.close(fd)
    return None


def read_key(directory: Path, key: str) -> dict[str, Any]:
    """What a claimed key holds; {} when it is not (or not yet) there."""
    found = files.read(key_path(directory, key))
    if found is None:
        return {}
    try:
        record = json.loads(found[0])
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def release_key(directory: Path, key: str, task_id: str) -> None:
    """Give a claim up (its job could not start), unless it now holds another task."""
    if read_key(directory, key).get("task_id") == task_id:
        files._unlink(key_path(directory, key))


def prune(directory: Path, seconds: float) -> int:
    """Remove the tasks older than `seconds` (`files.remove_older_than`), then the keys past the
    retention whose task has no file left; returns how many tasks were removed."""
    removed = files.remove_older_than(directory, seconds)
    cutoff = time.time() - seconds
    try:
        keys = list(os.scandir(directory / KEYS))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in keys:
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
        except FileNotFoundError:
            continue
        task_id = read_key(directory, entry.name).get("task_id")
        if not isinstance(task_id, str) or not has_files(directory, task_id):
            files._unlink(Path(entry.path))
    return removed


def has_files(directory: Path, task_id: str) -> bool:
    """Whether the task has a log (current or any attempt)."""
    return os.path.lexists(directory / task_id) or bool(files.numbers(directory, task_id))
