"""The caller-watch: a renderer delivers a job while the caller may hang up; the first to finish
wins and cancels the other (one `asyncio.TaskGroup`, as starlette races its streams)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from starlette.websockets import WebSocketDisconnect

log = logging.getLogger(__name__)

WRITE_TIMEOUT = 60.0  # seconds one write to a caller may wait for it to read; then its connection closes

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
    task_id: str,
    deliver: Callable[[], Awaitable[None]],
    caller_gone: Callable[[], Awaitable[None]],
    abandon: Callable[[str], None] | None,
) -> Winner:
    """Run `deliver` until it ends or `caller_gone` returns; if the caller left first (or could no
    longer be sent to), `abandon` is called (`Job.abandon`: its ComfyUI prompt is cancelled);
    None when the job must go on without this caller (CANCEL_ON_DISCONNECT off, or a caller that
    only watches). Any other error of `deliver` propagates."""
    winner: list[Winner] = []

    async def step(name: Winner, run: Callable[[], Awaitable[None]]) -> None:
        try:
            await run()
        except CallerStalled as exc:
            log.info("task_id=%s: %s; its connection is closed", task_id, exc)
            name = "caller_gone"
        except (OSError, WebSocketDisconnect) as exc:  # the connection is gone mid-send
            log.debug("task_id=%s: sending failed (%r): the caller is gone", task_id, exc)
            name = "caller_gone"
        winner.append(name)
        log.debug("task_id=%s: %s first", task_id, name)
        if winner == ["caller_gone"] and abandon is not None:
            abandon("caller disconnected")  # at once: not after the other side has wound down
        raise _Finished

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(step("delivered", deliver))
            group.create_task(step("caller_gone", caller_gone))
    except* _Finished:
        pass
    return winner[0]
