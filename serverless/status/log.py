"""The status log on the shared disk: `<STATUS_DIR>/<task_id>`, one JSON payload per line.

Any instance may write a task's log and any may read it. Each delivery of a task is an attempt
with its own file (`files` draws the layout); `<task_id>` is always the newest attempt's, so a
poller that stops at the last element's type never sees an older attempt's end. Appends are
single `write` calls on a file opened with O_APPEND, followed by fsync; a process killed
mid-write can leave at most one torn line, which readers skip.

All file I/O runs in the log's own small thread pool, each operation bounded by `io_timeout`:
a shared disk that stops answering pins those threads only, never asyncio's default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..core import jsontext
from ..core.request import validate_task_id
from ..errors import InvalidParams, ServerlessError, Unavailable
from ..jobs.feed import Feed
from . import files, sidecars
from .body import Lines, json_array, owner_named, parse_after, parse_attempt, usable_lines
from .filelist import FileTaskIndex
from .store import Entry
from .summary import summarise
from .tasklist import TaskPage, TaskQuery

__all__ = ["Attempt", "StatusLog", "parse_after", "parse_attempt"]

log = logging.getLogger(__name__)

WEBHOOK = "webhook"  # the sidecar holding how a task's webhook went

T = TypeVar("T")
BATCH_INTERVAL = 0.05  # seconds between durable appends of one job's events
# Seconds a task nobody can ask about before its answer (`record_new`) waits to write its terminal
# payload: the answer goes first, not beside a trip to a worker thread that takes turns with it.
ANSWER_FIRST = 0.005
PROBE_TTL = 5.0  # seconds a write probe's answer is trusted
POLL = 0.25  # seconds between reads of a log another instance writes (`follow`)
IO_TIMEOUT = 10.0  # seconds one status-folder operation may take (its own threads); then UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery of a task, and the file its events go to."""

    task_id: str
    number: int
    path: Path


@dataclass(frozen=True, slots=True)
class Unclaimed:
    """A task whose attempt is claimed with its first append (`StatusLog.record_new`)."""

    task_id: str
    claimed: Callable[[Attempt], None] | None = None  # told the attempt once it is claimed


class StatusLog:
    """The folder of status logs."""

    def __init__(
        self,
        directory: Path,
        stale_after: float,
        io_timeout: float = 10.0,
        threads: int = 4,
        on_append: Callable[[float], None] | None = None,
    ) -> None:
        self.directory = directory
        self.on_append = on_append  # told each durable append's duration (metrics)
        self.stale_after = stale_after
        self.io_timeout = io_timeout
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="status-io")
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._links = True  # until link(2) says otherwise
        self._last_error: str | None = None
        self._probed: tuple[float, bool, str | None] | None = None  # (when, writable, why not)
        self._refresh: asyncio.Task[bool] | None = None  # a background probe (`writable_now`)
        self._index = FileTaskIndex(directory)

    def path(self, task_id: str) -> Path:
        """The log of a task; the id is validated, and the path must stay inside the folder."""
        validate_task_id(task_id)
        path = self.directory / task_id
        if path.parent != self.directory:
            raise InvalidParams("task id does not name a file in the status folder")
        return path

    def validate(self, task_id: str) -> None:
        """InvalidParams for an id that does not name a file in the folder (`path`)."""
        self.path(task_id)

    # -- attempts ----------------------------------------------------------------------------

    async def begin(self, task_id: str) -> Attempt:
        """Claim the task's next attempt: its file exists (empty) from now on and `<task_id>`
        reads it. InvalidParams when something not a file squats the task's name."""
        self.path(task_id)
        with self._translated(task_id):
            number, links = await self._run(self._claim, task_id)
            self._note_links(task_id, links)
        if number > 1:
            log.info("task_id=%s: attempt %d begins (earlier attempts kept beside it)", task_id, number)
        return Attempt(task_id, number, files.attempt_path(self.directory, task_id, number))

    async def attempts(self, task_id: str) -> list[int]:
        """The numbers of the task's attempts, oldest first (`[]` for an unknown task, or for a
        log written before attempts were kept apart and never retried)."""
        self.path(task_id)
        with self._translated(task_id):
            return await self._run(files.numbers, self.directory, task_id)

    def _claim(
        self, task_id: str, lines: list[bytes] | None = None, lock: threading.Lock | None = None
    ) -> tuple[int, bool]:
        """Claim the next attempt (with its first `lines`) and publish it, in one trip to a
        worker thread."""
        if self._links:
            links = files.create(self.directory, task_id, lines or [])
            if links is not None:
                return 1, links
        number = files.claim(self.directory, task_id)
        if lines:
            files.append(files.attempt_path(self.directory, task_id, number), lines, lock or threading.Lock())
        return number, files.publish(self.directory, task_id, number, self._links)

    async def _publish(self, task_id: str, number: int) -> None:
        self._note_links(task_id, await self._run(files.publish, self.directory, task_id, number, self._links))

    def _note_links(self, task_id: str, links: bool) -> None:
        if self._links and not links:
            log.warning(
                "the status folder %s has no hard links: %s is kept as a copy of the newest "
                "attempt, refreshed after every append",
                self.directory,
                task_id,
            )
        self._links = links

    # -- writing -----------------------------------------------------------------------------

    async def record_new(self, task_id: str, feed: Feed, claimed: Callable[[Attempt], None] | None = None) -> None:
        """`record` for a task nobody can ask about yet: its attempt is claimed, written and
        published with its first append, in one trip to a worker thread (a job shorter than
        BATCH_INTERVAL costs one), then told to `claimed`. Its terminal payload is written
        ANSWER_FIRST seconds after the job's end: its caller's next request goes first (a sync
        job's answer, which alone names the task; a ComfyUI client's `/history` and `/view`)."""
        self.path(task_id)
        await self.record(Unclaimed(task_id, claimed), feed)

    async def record(self, attempt: Attempt | Unclaimed, feed: Feed) -> None:
        """Append every event of `feed` to the attempt's file until its terminal payload, at most
        one durable append per BATCH_INTERVAL (the terminal payload at once); refresh the file's
        time while the job is silent so readers know its owner lives. Whatever fails, the
        terminal payload is tried."""
        heartbeat = max(self.stale_after / 4, 0.05)
        answer_first = isinstance(attempt, Unclaimed)  # nobody asks about it before its answer
        lock = threading.Lock()  # one attempt's appends stay in order, even after a timeout
        pending: list[bytes] = []
        ended = False
        loop = asyncio.get_running_loop()
        next_write = loop.time() + BATCH_INTERVAL  # a short job is then one append, its terminal included
        try:
            async for event in feed.follow(idle=heartbeat, pinned=True):
                if event is None:
                    if isinstance(attempt, Attempt):
                        await self._run(self._heartbeat, attempt)
                    continue
                pending.append(event.data)
                if event.seq != feed.last_seq:
                    continue  # more is ready: take it into this batch
                if not event.terminal and loop.time() < next_write:
                    with contextlib.suppress(TimeoutError):  # gather more, but never hold back the end
                        async with asyncio.timeout(next_write - loop.time()):
                            await feed.wait()
                    if feed.last_seq != event.seq:
                        continue
                if event.terminal and answer_first:
                    await asyncio.sleep(ANSWER_FIRST)
                attempt = await self._write(attempt, pending, lock)
                ended = event.terminal
                pending = []
                next_write = loop.time() + BATCH_INTERVAL
        except Exception as exc:  # disk trouble or a bug: the log must still end with its terminal
            self._last_error = f"recording task {attempt.task_id}: {exc}"
            log.error(
                "status log of task_id=%s attempt %s could not follow the job (%s)%s",
                attempt.task_id,
                attempt.number if isinstance(attempt, Attempt) else "(unclaimed)",
                exc,
                "" if ended else "; writing its terminal payload",
            )
            if not ended:
                terminal = await feed.wait()
                try:
                    await self._write(attempt, [terminal.data], lock)
                except (OSError, ServerlessError, files.NotAFile) as again:
                    log.error("status log of task_id=%s could not be written: %s", attempt.task_id, again)

    async def _write(self, attempt: Attempt | Unclaimed, lines: list[bytes], lock: threading.Lock) -> Attempt:
        """Append `lines` durably; an unclaimed task's attempt is claimed and published with them."""
        started = time.monotonic()
        if isinstance(attempt, Unclaimed):
            with self._translated(attempt.task_id):
                number, links = await self._run(self._claim, attempt.task_id, lines, lock)
            self._note_links(attempt.task_id, links)
            claimed = attempt.claimed
            attempt = Attempt(attempt.task_id, number, files.attempt_path(self.directory, attempt.task_id, number))
            if claimed is not None:
                claimed(attempt)
        else:
            await self._run(files.append, attempt.path, lines, lock)
            if not self._links:
                await self._publish(attempt.task_id, attempt.number)
        if self.on_append is not None:
            self.on_append(time.monotonic() - started)
        return attempt

    async def record_webhook(self, task_id: str, record: bytes) -> None:
        """How the task's webhook went, as `<task_id>~webhook` beside its log (replacing any
        earlier record); kept and pruned with the task's log."""
        self.path(task_id)
        with self._translated(task_id):
            await self._run(files.write_sidecar, self.directory, task_id, WEBHOOK, record)

    async def webhook_record(self, task_id: str) -> bytes | None:
        """The task's last webhook record, None when it has none."""
        self.path(task_id)
        with self._translated(task_id):
            return await self._run(files.read_sidecar, self.directory, task_id, WEBHOOK)

    def _heartbeat(self, attempt: Attempt) -> None:
        files.touch(attempt.path)
        if not self._links and files.newest(self.directory, attempt.task_id, attempt.number) == attempt.number:
            files.touch(self.directory / attempt.task_id)  # the copy readers look at

    # -- reading -----------------------------------------------------------------------------

    async def read(self, task_id: str, after: int = 0, attempt: int | None = None) -> bytes:
        """The response body: a JSON array of the payloads after the first `after`, of the
        current attempt or of attempt number `attempt`; `[]` for an unknown task or attempt. A
        log without a terminal payload whose owner has been silent past `stale_after` (even an
        empty one: claimed, nothing written yet) ends with an "instance lost" error.
        InvalidParams when something that is not a file squats the task's name."""
        path = self.path(task_id)
        if attempt is not None:
            if attempt < 1:
                raise InvalidParams("attempt must be a whole number from 1", raw={"attempt": attempt})
            path = files.attempt_path(self.directory, task_id, attempt)
        with self._translated(task_id):
            return await self._run(self._read, task_id, path, after, attempt is None)

    async def owner(self, task_id: str) -> str | None:
        """Whose the task is: the `owner` its first event names; None when it names none (made
        without API keys: anyone's); "" while that is not known yet (no first event written)."""
        path = self.path(task_id)
        with self._translated(task_id):
            first = await self._run(files.first_line, path)
        if not first.endswith(b"\n"):
            return ""  # claimed, its first event not written yet (or no such task)
        return owner_named(first)

    def _read(self, task_id: str, path: Path, after: int, current: bool) -> bytes:
        return json_array(self._lines(task_id, path, current).lines[after:])

    def _lines(self, task_id: str, path: Path, current: bool) -> Lines:
        """The attempt's usable lines, with the "instance lost" error after them when its owner
        has been silent too long without a terminal payload (`ended` is then set)."""
        found = files.read(path)
        if found is None and current:
            # Claimed but not yet published (or its owner died in between): the newest attempt.
            numbers = files.numbers(self.directory, task_id)
            found = files.read(files.attempt_path(self.directory, task_id, numbers[-1])) if numbers else None
        if found is None:
            return Lines([])
        raw, mtime = found
        usable = usable_lines(raw)
        silent_for = time.time() - mtime
        if not usable.ended and silent_for > self.stale_after:
            lost = Unavailable(
                f"instance lost: the job's log has had no news for {silent_for:.0f}s and no result",
                raw={"silent_s": round(silent_for, 1)},
            )
            return Lines([*usable.lines, jsontext.dumps(lost.to_payload())], lost.to_payload())
        return usable

    # -- job control -------------------------------------------------------------------------

    async def known(self, task_id: str) -> bool:
        """Whether any instance has started the task (its log exists, maybe still empty)."""
        self.path(task_id)
        with self._translated(task_id):
            return await self._run(sidecars.has_files, self.directory, task_id)

    async def tail(self, task_id: str, after: int, attempt: int | None = None) -> tuple[list[bytes], bool]:
        """The current attempt's (or attempt `attempt`'s) stored payloads after the first `after`,
        and whether the log has ended (its last payload, or the "instance lost" error added, is
        terminal)."""
        path = self.path(task_id)
        if attempt is not None:
            path = files.attempt_path(self.directory, task_id, attempt)
        with self._translated(task_id):
            lines = await self._run(self._lines, task_id, path, attempt is None)
        return lines.lines[after:], lines.ended

    async def follow(
        self,
        task_id: str,
        after: int = 0,
        attempt: int | None = None,
        idle: float | None = None,
        previews: bool = False,
    ) -> AsyncIterator[Entry | None]:
        """The log's payloads after `after`, read again every POLL seconds until its terminal
        payload (the "instance lost" error added counts as one); None after `idle` seconds
        without one. Nothing when resumed after the terminal payload. A folder keeps no
        previews (`previews` is for the Redis store's sake): they reach callers from the job."""
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        cursor = after
        while True:
            lines, ended = await self.tail(task_id, cursor, attempt)
            for index, line in enumerate(lines, start=1):
                cursor += 1
                last = ended and index == len(lines)
                yield Entry(cursor, line, last, more=index < len(lines))
                if last:
                    return
            if ended:
                return  # resumed after the terminal payload: nothing more to say
            if lines:
                quiet_since = loop.time()
            elif idle is not None and loop.time() - quiet_since >= idle:
                quiet_since = loop.time()
                yield None
            await asyncio.sleep(POLL)

    async def summary(self, task_id: str) -> dict[str, Any] | None:
        """The task's summary (`summary.summarise`) from its current attempt; None when no
        instance has started it."""
        path = self.path(task_id)
        with self._translated(task_id):
            return await self._run(self._summary, task_id, path)

    def _summary(self, task_id: str, path: Path) -> dict[str, Any] | None:
        if not sidecars.has_files(self.directory, task_id):
            return None
        return summarise(task_id, [json.loads(line) for line in self._lines(task_id, path, True).lines])

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        """A page of the folder's tasks, newest first (`serverless.status.tasklist`)."""
        with self._translated("-"):
            return await self._run(self._index.page, query, self._summary_if_task)

    def _summary_if_task(self, task_id: str) -> dict[str, Any] | None:
        try:
            path = self.path(task_id)
        except InvalidParams:
            return None  # a name in the folder that is no task's
        return self._summary(task_id, path)

    async def request_cancel(self, task_id: str) -> int | None:
        """Leave a cancel request beside the task's newest attempt; None for an unknown task."""
        self.path(task_id)
        with self._translated(task_id):
            return await self._run(sidecars.request_cancel, self.directory, task_id)

    async def cancels_asked(self, attempts: list[Attempt]) -> list[Attempt]:
        """Those of `attempts` another instance asked to cancel."""
        asked = set(await self._run(sidecars.cancels_asked, self.directory, [(a.task_id, a.number) for a in attempts]))
        return [attempt for attempt in attempts if (attempt.task_id, attempt.number) in asked]

    async def claim_key(self, key: str, task_id: str, digest: str) -> dict[str, Any] | None:
        """Claim an `Idempotency-Key` for the task (create-exclusive on the shared folder): None
        when claimed here, else the claim found ({} while its claimer is still writing it)."""
        record = {"task_id": task_id, "digest": digest}
        with self._translated(task_id):
            return await self._run(sidecars.claim_key, self.directory, key, record)

    async def read_key(self, key: str) -> dict[str, Any]:
        with self._translated(key):
            return await self._run(sidecars.read_key, self.directory, key)

    async def release_key(self, key: str, task_id: str) -> None:
        """Give a claim up: its job could not start."""
        with self._translated(task_id):
            await self._run(sidecars.release_key, self.directory, key, task_id)

    # -- health ------------------------------------------------------------------------------

    async def writable(self) -> bool:
        """Whether a file can be created, fsynced and removed in the folder (the answer is kept
        PROBE_TTL seconds); why not is in `health()`."""
        now = time.monotonic()
        if self._probed is not None and now - self._probed[0] < PROBE_TTL:
            return self._probed[1]
        try:
            await self._run(files.probe, self.directory)
            self._probed = (now, True, None)
        except (OSError, ServerlessError) as exc:
            reason = exc.message if isinstance(exc, ServerlessError) else f"{type(exc).__name__}: {exc}"
            self._probed = (now, False, reason)
            self._last_error = reason
        return self._probed[1]

    def writable_now(self) -> bool | None:
        """The last probe's answer at once (None before any), refreshing it in the background when
        it is older than PROBE_TTL: health must answer while the folder hangs, not wait for it."""
        stale = self._probed is None or time.monotonic() - self._probed[0] >= PROBE_TTL
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.get_running_loop().create_task(self.writable(), name="status write probe")
        return None if self._probed is None else self._probed[1]

    async def check_at_startup(self) -> bool:
        """Probe the folder once at start-up and say loudly when it cannot be written."""
        if await self.writable():
            return True
        assert self._probed is not None
        log.error(
            "STATUS_DIR %s cannot be written (%s): async jobs and their status will not work",
            self.directory,
            self._probed[2],
        )
        return False

    def health(self) -> dict[str, Any]:
        """What the folder and its threads are doing: threads in use, the last error, and the
        last write probe's answer (None before any)."""
        return {
            "status_dir": str(self.directory),
            "threads": self.threads,
            "busy": self._busy,
            "writable": None if self._probed is None else self._probed[1],
            "not_writable_because": None if self._probed is None else self._probed[2],
            "hard_links": self._links,
            "last_error": self._last_error,
        }

    # -- retention ---------------------------------------------------------------------------

    async def prune_forever(self, retention_days: float, every: float = 3600.0) -> None:
        """Remove tasks whose files are all older than the retention, now and then every `every`
        seconds. Not bounded by `io_timeout`: a big folder may take long, and it is one thread."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                removed = await loop.run_in_executor(
                    self._pool, self._tracked, sidecars.prune, self.directory, retention_days * 86400
                )
            except OSError as exc:
                log.error("status logs in %s could not be pruned: %s", self.directory, exc)
                removed = 0
            if removed:
                log.info("removed the status logs of %d task(s) older than %g days", removed, retention_days)
            await asyncio.sleep(every)

    # -- threads -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the threads; operations stuck on the disk are abandoned, queued ones dropped."""
        if self._refresh is not None:
            self._refresh.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in the log's threads, given up after `io_timeout` seconds."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._tracked, function, *args)
        deadline = asyncio.timeout(self.io_timeout)
        try:
            async with deadline:
                return await future
        except TimeoutError:
            if not deadline.expired():
                raise  # an OSError(ETIMEDOUT) of the file system itself
            message = f"status folder did not answer within {self.io_timeout:g}s"
            self._last_error = message
            raise Unavailable(message, raw={"busy_threads": self._busy}) from None

    def _tracked(self, function: Callable[..., T], *args: Any) -> T:
        with self._busy_lock:
            self._busy += 1
        try:
            return function(*args)
        finally:
            with self._busy_lock:
                self._busy -= 1

    @contextlib.contextmanager
    def _translated(self, task_id: str) -> Iterator[None]:
        """OS errors as the error tree's: a squatted name is the task's problem (400), anything
        else the folder's (503)."""
        try:
            yield
        except files.NotAFile as exc:
            raise InvalidParams(
                f"task id {task_id} cannot be used: its status log {exc.name} is {exc.kind}, not a file",
                raw={"task_id": task_id, "found": exc.kind},
            ) from None
        except OSError as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.error("status folder %s failed for task_id=%s: %s", self.directory, task_id, exc)
            raise Unavailable(f"status folder could not be used: {exc.strerror or exc}") from exc
