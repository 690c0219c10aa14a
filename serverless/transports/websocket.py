"""WS /api/serverless/ws: the client sends one run body; it gets every ComfyUI message text of
the job, then the terminal payload, then a normal close (each message its own frame; a burst of
them in one write: `bursts`, `frames`). A client that leaves abandons its job;
a body that is refused gets the error object as the last message."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..auth import caller
from ..core.request import query_flag
from ..errors import InvalidParams, as_serverless_error
from ..jobs.feed import ReaderTooSlow
from ..jobs.runner import RunningJob
from ..ops.metrics import ReaderMeter
from ..settings import Settings
from ..state import app_state
from . import caller as caller_module
from .bursts import bursts
from .caller import CallerStalled, bounded, watch
from .frames import Frames, Message
from .http import SMALL_END, abort_connection, hang_up
from .start import start_job

log = logging.getLogger(__name__)

FIRST_MESSAGE_TIMEOUT = 60.0


async def websocket_run(websocket: WebSocket) -> None:
    state = app_state(websocket)
    resources, jobs = state.resources, state.jobs
    await websocket.accept()
    try:
        body = await _run_body(websocket, resources.settings.inputs.max_body_bytes)
        owner = caller(websocket).owner
        base_url = str(websocket.base_url.replace(scheme="https" if websocket.url.scheme == "wss" else "http"))
        job = await start_job(
            resources, jobs, body, websocket.query_params, websocket.headers, "ws", base_url=base_url, owner=owner
        )
    except WebSocketDisconnect:
        return
    except Exception as exc:
        error = as_serverless_error(exc, "websocket run")
        await websocket.send_text(json.dumps(error.to_payload(), ensure_ascii=False))
        await websocket.close()
        return
    with resources.metrics.reader("ws") as meter:
        await _forward(websocket, job, resources.settings, meter, query_flag(websocket.query_params, "previews"))


async def _run_body(websocket: WebSocket, limit: int) -> str | bytes:
    """The one run body (bounded in size and time)."""
    try:
        async with asyncio.timeout(FIRST_MESSAGE_TIMEOUT):
            message = await websocket.receive()
    except TimeoutError:
        raise InvalidParams(f"no run body received within {FIRST_MESSAGE_TIMEOUT:g}s") from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    body: str | bytes = message.get("text") or message.get("bytes") or b""
    if len(body) > limit:
        raise InvalidParams(f"the run body is larger than {limit} bytes")
    return body


async def _forward(
    websocket: WebSocket, job: RunningJob, settings: Settings, meter: ReaderMeter, previews: bool = False
) -> None:
    """Send the job's events while watching for the client leaving."""
    too_slow: list[ReaderTooSlow] = []
    timeout = caller_module.WRITE_TIMEOUT

    frames = Frames(websocket)

    async def deliver() -> None:
        try:
            async for burst in bursts(job, previews=previews):
                if burst is None:
                    continue
                messages = [Message(event.data) for event in burst]
                if burst[-1].terminal and sum(len(m.data) for m in messages) <= SMALL_END:
                    await bounded(frames.close(messages), timeout)  # the last burst and the close in one write
                    return
                await bounded(frames.send(messages), timeout)
            # After a big last burst, the close waits for room alone: a reader that stopped
            # reading is noticed (and dropped) instead of holding the rest in memory.
            await bounded(frames.close(), timeout)
        except ReaderTooSlow as exc:
            too_slow.append(exc)
        except CallerStalled:
            # A stalled reader ends here, its connection dropped with what it has not read.
            abort_connection(getattr(websocket, "_receive", None))
            raise

    async def caller_gone() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass  # the protocol has one client message; later ones are ignored

    winner = await watch(job.task_id, deliver, caller_gone, hang_up(job, settings))
    if too_slow and winner == "delivered":
        # The job goes on; only this reader is dropped ("try again later").
        log.warning("dropping a slow websocket reader of task_id=%s: %s", job.task_id, too_slow[0])
        meter.dropped()
        with contextlib.suppress(CallerStalled):
            await bounded(websocket.close(code=1013, reason="reader too slow; see the task's status log"), timeout)
