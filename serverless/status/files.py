"""The status folder's files: blocking operations, run in the status log's own threads.

A task's files (`~` is not a task id character, so one task's names never collide with another's):

    <task_id>              the current attempt, what `status` reads: a hard link to the newest
                           attempt's file, or a copy of it where the file system has no hard links
    <task_id>~attempt-<N>  attempt N's own log, claimed with O_CREAT|O_EXCL (dense, from 1)
    <task_id>~<other>      anything else of the task (temp names; sidecars such as `~cancel`)

Every open refuses symlinks (O_NOFOLLOW) and anything but a regular file (O_NONBLOCK, so a
fifo never blocks, then fstat), since a workflow's output may put anything in this folder.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
import uuid
from pathlib import Path

SEPARATOR = "~"
BIG_LINE = 1 << 20  # lines from this size on are written without being copied into a batch
MAX_ATTEMPTS = 10000
PUBLISH_TRIES = 20
# What link(2) answers on file systems without hard links (OSS FUSE mounts, some SMB shares).
NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


class NotAFile(Exception):
    """Something that is not a regular file sits where a status log belongs."""

    def __init__(self, name: str, kind: str) -> None:
        super().__init__(f"{name} is {kind}")
        self.name = name
        self.kind = kind


def attempt_path(directory: Path, task_id: str, number: int) -> Path:
    return directory / f"{task_id}{SEPARATOR}attempt-{number}"


def task_of(name: str) -> str:
    """The task a file name belongs to."""
    return name.split(SEPARATOR, 1)[0]


# -- opening ------------------------------------------------------------------------------------


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """An fd on the regular file at `path`; NotAFile for a symlink, fifo, directory or device."""
    return _open_regular(path, flags, mode)[0]


def _open_regular(path: Path, flags: int, mode: int = 0o644) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        kinds = {errno.ELOOP: "a symbolic link", errno.ENXIO: "a fifo", errno.EISDIR: "a directory"}
        if exc.errno in kinds:
            raise NotAFile(path.name, kinds[exc.errno]) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotAFile(path.name, _kind(st.st_mode))
    return fd, st


def refuse_non_regular(path: Path) -> None:
    """NotAFile when something other than a regular file is at `path`; fine when nothing is."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise NotAFile(path.name, _kind(st.st_mode))


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    return "not a regular file"


# -- one attempt's file -------------------------------------------------------------------------


def read(path: Path) -> tuple[bytes, float] | None:
    """The file's bytes and modification time; None when there is no such file."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        mtime = os.fstat(fd).st_mtime
        return f.read(), mtime


def first_line(path: Path, limit: int = 64 * 1024) -> bytes:
    """The file's first line (at most `limit` bytes); b"" when there is no such file."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return b""
    with os.fdopen(fd, "rb") as f:
        return f.readline(limit)


def append(path: Path, lines: list[bytes], lock: threading.Lock) -> None:
    """Append `lines` durably. `lock` keeps one attempt's appends in order even when an earlier
    one is stuck on the disk and was given up on."""
    with lock:
        write_lines(path, lines)


def write_lines(path: Path, lines: list[bytes]) -> None:
    """Append `lines` in as few writes as possible, then fsync."""
    fd, st = _open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)  # read: is the last line whole?
    try:
        size = st.st_size
        torn = bool(size) and os.pread(fd, 1, size - 1) != b"\n"
        _write_lines(fd, lines, torn)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_lines(fd: int, lines: list[bytes], torn: bool = False) -> None:
    small = bytearray(b"\n" if torn else b"")  # an earlier write was cut short: close its torn line off first
    for data in lines:
        if len(data) < BIG_LINE:
            small += data + b"\n"
            continue
        # A big result (base64 outputs) is written as it is, not copied into a batch.
        _write_all(fd, small)
        small.clear()
        _write_all(fd, data)
        small += b"\n"
    _write_all(fd, small)


def write_sidecar(directory: Path, task_id: str, name: str, data: bytes) -> None:
    """Replace `<task_id>~<name>` with `data` at once (a temp file renamed over it): a reader
    sees the old record or the new one, never half of one."""
    target = directory / f"{task_id}{SEPARATOR}{name}"
    temp = directory / f"{task_id}{SEPARATOR}{name}.tmp-{uuid.uuid4().hex}"
    fd = open_regular(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, target)


def read_sidecar(directory: Path, task_id: str, name: str, limit: int = 64 * 1024) -> bytes | None:
    """The record `<task_id>~<name>` (at most `limit` bytes), None when there is none."""
    try:
        fd = open_regular(directory / f"{task_id}{SEPARATOR}{name}", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def touch(path: Path) -> None:
    """Refresh the file's time: its owner lives."""
    try:
        os.utime(path, follow_symlinks=False)
    except FileNotFoundError:
        pass


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- attempts ---------------------------------------------------------------------------------


def create(directory: Path, task_id: str, lines: list[bytes]) -> bool | None:
    """Claim, write and publish attempt 1 of a task nothing of which exists yet (a task id no
    one has used: most jobs' case), in a handful of system calls: the file is created whole,
    fsynced (unless empty, as `claim` leaves it), then linked as `<task_id>`. Returns whether
    hard links work; None when something of the task exists (then `claim`, `append` and
    `publish` take over, with their checks)."""
    current, first = directory / task_id, attempt_path(directory, task_id, 1)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    if os.path.lexists(current):
        return None  # an earlier attempt, a legacy log, or something squatting the name
    try:
        fd = os.open(first, flags, 0o644)
    except FileNotFoundError:  # no folder yet
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(first, flags, 0o644)
    except FileExistsError:
        return None  # a concurrent claimer took number 1
    try:
        if lines:
            _write_lines(fd, lines)
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(first, current, follow_symlinks=False)
    except OSError as exc:  # a concurrent claimer published a later attempt, or no hard links
        if exc.errno != errno.EEXIST and exc.errno not in NO_HARD_LINKS:
            raise
        return publish(directory, task_id, 1, exc.errno == errno.EEXIST)
    return True


def claim(directory: Path, task_id: str) -> int:
    """Create the next attempt's file (empty) and return its number. Two claimers never get the
    same number: O_EXCL lets one win, the other takes the next. The empty file is not fsynced
    (its first append is): a claim a crash forgets is simply claimed again."""
    directory.mkdir(parents=True, exist_ok=True)
    current = directory / task_id
    refuse_non_regular(current)
    _adopt_legacy(directory, task_id)
    for number in range(1, MAX_ATTEMPTS + 1):
        try:
            fd = os.open(
                attempt_path(directory, task_id, number),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
            )
        except FileExistsError:
            continue
        os.close(fd)
        return number
    raise OSError(errno.EMLINK, f"more than {MAX_ATTEMPTS} attempts of one task")


def _adopt_legacy(directory: Path, task_id: str) -> None:
    """A `<task_id>` without attempt files was written before attempts were kept apart: keep it
    as attempt 1 (a claimer always creates attempt 1 before `<task_id>`, so this is unambiguous)."""
    current, first = directory / task_id, attempt_path(directory, task_id, 1)
    if os.path.lexists(first) or not os.path.lexists(current):
        return
    try:
        fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return  # a concurrent claimer took number 1 (and adopted or will adopt nothing)
    try:
        found = read(current)
        _write_all(fd, found[0] if found else b"")
        os.fsync(fd)
    finally:
        os.close(fd)


def newest(directory: Path, task_id: str, start: int) -> int:
    """The highest attempt number, knowing attempt `start` exists (numbers are dense)."""
    number = start
    while os.path.lexists(attempt_path(directory, task_id, number + 1)):
        number += 1
    return number


def numbers(directory: Path, task_id: str) -> list[int]:
    """Every attempt number of the task, oldest first."""
    if not os.path.lexists(attempt_path(directory, task_id, 1)):
        return []
    return list(range(1, newest(directory, task_id, 1) + 1))


def publish(directory: Path, task_id: str, number: int, links: bool) -> bool:
    """Make `<task_id>` the newest attempt's file (`number` is one that exists); returns whether
    hard links work. Anyone may publish, and a publisher checks afterwards that no newer attempt
    (nor, for a copy, newer bytes) arrived meanwhile, and publishes again if one did: the last
    publisher to finish leaves the newest attempt in place, whatever the order of their steps."""
    current = directory / task_id
    for _ in range(PUBLISH_TRIES):
        top = newest(directory, task_id, number)
        source = attempt_path(directory, task_id, top)
        temp = directory / f"{task_id}{SEPARATOR}tmp-{uuid.uuid4().hex}"
        copied: int | None = None
        if links:
            try:
                os.link(source, temp, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in NO_HARD_LINKS:
                    raise
                links = False
        if not links:
            copied = _copy(source, temp)
        try:
            os.replace(temp, current)
        except OSError as exc:
            _unlink(temp)
            if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise NotAFile(task_id, "a directory") from None
            raise
        _unlink(temp)  # rename(2) does nothing when both names already link the same file
        if newest(directory, task_id, top) == top and (copied is None or copied == os.stat(source).st_size):
            return links
        number = top
    raise OSError(errno.EAGAIN, f"attempts of task {task_id} kept changing while being published")


def _copy(source: Path, target: Path) -> int:
    found = read(source)
    data = found[0] if found else b""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- the folder -------------------------------------------------------------------------------


def probe(directory: Path) -> None:
    """Create, fsync and remove a small file: raises the OSError that stops writing, if any."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{SEPARATOR}probe-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, b"probe\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        _unlink(path)


def remove_older_than(directory: Path, seconds: float) -> int:
    """Remove the files of every task whose files are all older than `seconds` (a task's
    attempts and sidecars go together); returns how many tasks were removed."""
    cutoff = time.time() - seconds
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    groups: dict[str, list[os.DirEntry[str]]] = {}
    for entry in entries:
        groups.setdefault(task_of(entry.name), []).append(entry)
    removed = 0
    for group in groups.values():
        try:
            files = [entry for entry in group if entry.is_file(follow_symlinks=False)]
            if not files or any(entry.stat(follow_symlinks=False).st_mtime >= cutoff for entry in files):
                continue
        except FileNotFoundError:
            continue
        for entry in files:
            _unlink(Path(entry.path))
        removed += 1
    return removed
