"""WS /api/serverless/ws: the client sends one run body; it gets every ComfyUI message text of
the job, then the terminal payload, then a normal close. A client that leaves abandons its job."""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..core.request import parse_run_request
from ..errors import InvalidParams, ServerlessError
from ..jobs.feed import ReaderTooSlow
from ..jobs.job import Job
from ..jobs.registry import Jobs
from ..resources import Services

log = logging.getLogger(__name__)

FIRST_MESSAGE_TIMEOUT = 60.0


async def websocket_run(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    jobs: Jobs = websocket.app.state.jobs
    await websocket.accept()
    try:
        job = await _start(websocket, services, jobs)
    except ServerlessError as exc:
        await websocket.send_text(json.dumps(exc.to_payload(), ensure_ascii=False))
        await websocket.close()
        return
    except WebSocketDisconnect:
        return
    await _forward(websocket, job, services.settings.cancel_on_disconnect)


async def _start(websocket: WebSocket, services: Services, jobs: Jobs) -> Job:
    """Read the one run body (bounded in size and time) and start its job."""
    try:
        async with asyncio.timeout(FIRST_MESSAGE_TIMEOUT):
            message = await websocket.receive()
    except TimeoutError:
        raise InvalidParams(f"no run body received within {FIRST_MESSAGE_TIMEOUT:g}s") from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    body = message.get("text") or message.get("bytes") or b""
    if len(body) > services.settings.max_body_bytes:
        raise InvalidParams(f"the run body is larger than {services.settings.max_body_bytes} bytes")
    run_request = parse_run_request(body, websocket.query_params, websocket.headers)
    credentials = services.credentials(websocket.headers)
    services.check_supported(run_request, credentials)
    return await jobs.start(run_request, credentials)


async def _forward(websocket: WebSocket, job: Job, cancel_on_disconnect: bool) -> None:
    """Send the job's events while watching for the client leaving; first to end wins."""
    async def send_events() -> None:
        async for event in job.feed.follow():
            if event is None:
                continue
            if event.terminal:
                await job.finished()  # in the status log first: a poller told "done" finds it there
            await websocket.send_text(event.text)
        await websocket.close()

    async def watch_client() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass  # the protocol has one client message; later ones are ignored

    sender = asyncio.create_task(send_events())
    watcher = asyncio.create_task(watch_client())
    done, pending = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    failure = sender.exception() if sender in done else None
    if isinstance(failure, ReaderTooSlow):
        # The job goes on; only this reader is dropped ("try again later").
        log.warning("dropping a slow websocket reader of task_id=%s: %s", job.task_id, failure)
        await websocket.close(code=1013, reason="reader too slow; see the task's status log")
    elif (watcher in done or failure is not None) and cancel_on_disconnect:
        job.abandon("websocket client disconnected")
