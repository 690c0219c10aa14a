"""The seam between the transports and whatever runs jobs, declared as httpx declares its
transports: every endpoint talks to a `JobRunner` and the `RunningJob`s it starts, and mypy
holds both backends to them.

    JobRunner                      RunningJob
    ├── Jobs        (one box)      ├── Job        runs here, against this instance's ComfyUI
    └── RemoteJobs  (a gateway)    └── RemoteJob  queued in Redis, run by a worker, followed
                                                  through its status stream

A transport never asks which one it holds: a feature that needs something of a backend declares
it here, so that it cannot exist on one topology and silently not on the other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from .feed import Event
from .spec import JobSpec


class EventSource(Protocol):
    """What the renderers read (JSON, SSE, websocket): a running job, or a task followed through
    its status log (`serverless.transports.events.TaskEvents`)."""

    @property
    def task_id(self) -> str: ...

    def events(
        self, after: int | None = None, idle: float | None = None, previews: bool = False
    ) -> AsyncIterator[Event | None]:
        """The events after number `after` until the terminal one; None after `idle` seconds of
        silence (for keep-alives). With `previews`, the job's newest sampler previews too
        (`Event.preview`: numbered as the event before them, never in the status log), when
        the job was started with `previews`."""
        ...

    async def finished(self) -> Event:
        """The terminal event (its `error` set for an error object)."""
        ...

    async def more_after(self, seq: int, within: float) -> bool:
        """Whether an event after `seq` can be read without waiting, now or within `within`
        seconds (none: now). A source that cannot tell answers False: its events are written as
        they come (`serverless.transports.bursts`)."""
        ...


class RunningJob(EventSource, Protocol):
    """A job this instance started (or, on a worker that is also a gateway, runs)."""

    @property
    def spec(self) -> JobSpec: ...

    @property
    def prompt_id(self) -> str: ...

    def abandon(self, reason: str) -> None:
        """Its caller went away: cancel it wherever it runs, unless it already ended."""
        ...

    def published_now(self, after: int = 0) -> list[Event] | None:
        """The events published after the first `after` so far (previews left out), when they
        may be read at once, without a turn of the loop; None when they cannot (not held here,
        or not readable yet: `events` then tells)."""
        ...

    async def terminal_recorded(self) -> bytes:
        """The terminal payload, once the status store holds it too (a webhook receiver that
        polls the status is then sure to find it there)."""
        ...

    def tap(self, call: Callable[[Event], None], previews: bool = False) -> Callable[[], None] | None:
        """Call `call` with each event in the step that publishes it, and with `previews` each
        preview shown (`Feed.tap`); returns what ends that. None where the job's events are not
        published here (a gateway's job)."""
        ...


class JobRunner(Protocol):
    """Starts jobs, admits them, stops them, and drains on shutdown."""

    @property
    def accepting(self) -> bool:
        """False once draining: new jobs are refused (UNAVAILABLE)."""
        ...

    @property
    def running(self) -> int:
        """Jobs under way on this instance."""
        ...

    @property
    def admitted(self) -> int:
        """Jobs admitted and not ended (here: on this instance; a gateway: waiting in the queue)."""
        ...

    async def check_room(self) -> None:
        """Refuse (BUSY, with `Retry-After`) when a new job would not be admitted: before a body
        is read."""
        ...

    async def refusal(self) -> str | None:
        """Why a new job would be refused now (draining, full), None when it would be admitted."""
        ...

    def limits(self) -> dict[str, Any]:
        """The admission figures `ready` shows (jobs admitted and the limit they are held to)."""
        ...

    def get(self, task_id: str) -> RunningJob | None:
        """The task's job when it runs on this instance."""
        ...

    async def start(self, spec: JobSpec, prompt_id: str | None = None) -> RunningJob:
        """Start a job in the background; its events are recorded in the task's status log."""
        ...

    async def cancel(self, task_id: str) -> str:
        """Stop a task wherever it runs: "cancelling" while it stops, "cancelled" when a queue still
        held it (removed, ended). NotFound for an unknown task, Conflict for one that has ended."""
        ...

    async def end_if_stranded(self, task_id: str) -> None:
        """End a task that waits where it can no longer run (a fleet's queue past QUEUE_TTL, or a
        queue that lost it), so that whoever reads it next reads its end; nothing on one box."""
        ...

    async def queue_position(self, task_id: str) -> int | None:
        """How many jobs wait ahead of a queued task, where a queue before ComfyUI's holds it
        (None: none does; the job's own progress events tell its place in ComfyUI's queue)."""
        ...

    async def measure(self) -> None:
        """Read what the metrics show of a backend kept elsewhere (a fleet's queue), before a scrape."""
        ...

    async def drain(self, timeout: float) -> None:
        """Take no new jobs; wait up to `timeout` for running ones, then cancel the rest."""
        ...
