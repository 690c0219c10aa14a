"""The caller-watch: a renderer delivers a job while the caller may hang up; the first to finish
wins and cancels the other (one `asyncio.TaskGroup`, as starlette races its streams)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from starlette.websockets import WebSocketDisconnect

from ..jobs.job import Job

log = logging.getLogger(__name__)

Winner = Literal["delivered", "caller_gone"]


class _Finished(Exception):
    """Raised by the first step to finish, so the task group cancels the other."""


class CallerStalled(ConnectionError):
    """The caller stopped reading: one send waited longer than the write timeout."""


async def bounded(send: Awaitable[None], timeout: float) -> None:
    """One send to the caller, given up after `timeout` seconds: a caller that never reads must
    not pin its answer (and the connection) in memory for ever."""
    try:
        async with asyncio.timeout(timeout):
            await send
    except TimeoutError:
        raise CallerStalled(f"the caller read nothing for {timeout:g}s") from None


async def watch(
    job: Job,
    deliver: Callable[[], Awaitable[None]],
    caller_gone: Callable[[], Awaitable[None]],
    cancel_on_disconnect: bool,
) -> Winner:
    """Run `deliver` until it ends or `caller_gone` returns; if the caller left first (or could no
    longer be sent to), the job is abandoned (its ComfyUI prompt cancelled) unless
    `cancel_on_disconnect` is off. Any other error of `deliver` propagates."""
    winner: list[Winner] = []

    async def step(name: Winner, run: Callable[[], Awaitable[None]]) -> None:
        try:
            await run()
        except CallerStalled as exc:
            log.info("task_id=%s: %s; its connection is closed", job.task_id, exc)
            name = "caller_gone"
        except (OSError, WebSocketDisconnect) as exc:  # the connection is gone mid-send
            log.debug("task_id=%s: sending failed (%r): the caller is gone", job.task_id, exc)
            name = "caller_gone"
        winner.append(name)
        raise _Finished

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(step("delivered", deliver))
            group.create_task(step("caller_gone", caller_gone))
    except* _Finished:
        pass
    if winner[0] == "caller_gone" and cancel_on_disconnect:
        job.abandon("caller disconnected")
    return winner[0]
