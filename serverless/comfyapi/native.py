"""ComfyUI's own HTTP API on our paths, each prompt a durable job of ours (its task id is its
prompt id), answered the same by one box and by any gateway of a fleet:

    POST /prompt                 validate (against what `/object_info` says), queue, answer
    GET  /prompt                 `{"exec_info": {"queue_remaining"}}`
    GET  /history[/{id}]         built from the status store (`history`)
    POST /history                forget (`clear`, `delete`)
    GET  /queue, POST /queue     our queue; `delete` and `clear` cancel
    POST /interrupt              cancel the running prompt(s) (or the one named)

The websocket `/ws` is `relay`'s; `/view`, uploads and ComfyUI's information are `files`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from ..auth import caller, may_see
from ..core.request import TASK_ID_RE
from ..errors import Conflict, InvalidParams, NotFound
from ..jobs.feed import Event
from ..jobs.runner import RunningJob
from ..resources import Resources
from ..state import AppState, app_state
from ..status.summary import ENDED
from ..transports.events import ended_now, job_summary, published_events
from ..transports.http import json_value, read_body, read_json
from ..transports.start import Decoded, start_job
from ..workflows.validate import node_errors, validate_workflow
from . import history
from .index import MemoryIndex, PromptEntry, PromptIndex, RedisIndex
from .uploads import ComfyUIInputs, Inputs, RedisInputs

log = logging.getLogger(__name__)

HISTORY_DEFAULT = 200  # prompts `/history` lists without `max_items` (ComfyUI: all it keeps)
HISTORY_BATCH = 32  # logs read at once for `/history`
END_WAIT = 30.0  # seconds `/history` waits for a job running here to publish its end after ComfyUI's


def prompts(state: AppState) -> PromptIndex:
    """This app's prompt index: the fleet's in Redis where there is one, else this process's."""
    if state.prompts is None:
        redis = state.resources.redis
        state.prompts = RedisIndex(redis.client, redis.ttl, redis.watch) if redis is not None else MemoryIndex()
    return state.prompts


def inputs(resources: Resources) -> Inputs:
    """Where uploads are staged: Redis when jobs may run on another machine, else our ComfyUI."""
    redis = resources.redis
    if redis is not None and resources.settings.fleet.queue_backend == "redis":
        return RedisInputs(redis.client, redis.result_ttl)
    return ComfyUIInputs(resources.comfy)


def owner_of(connection: HTTPConnection) -> str | None:
    return caller(connection).owner


def refusal(kind: str, message: str, details: str = "", errors: dict[str, Any] | None = None) -> JSONResponse:
    """ComfyUI's 400 answer to a prompt it will not queue."""
    error = {"type": kind, "message": message, "details": details, "extra_info": {}}
    return JSONResponse({"error": error, "node_errors": errors or {}}, status_code=400)


async def _json_body(request: Request) -> Any:
    settings = app_state(request).resources.settings
    return await read_json(request, settings.inputs.max_body_bytes, settings.inputs.timeout, empty={})


class Refused(Exception):
    """A prompt ComfyUI would not queue: its `error.type`, message, details and `node_errors`."""

    def __init__(self, kind: str, message: str, details: str = "", errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.details, self.errors = kind, message, details, errors or {}

    def response(self) -> JSONResponse:
        return refusal(self.kind, self.message, self.details, self.errors)


async def queue_prompt(request: Request) -> Response:
    """POST /prompt: `{"prompt", "client_id"?, "prompt_id"?, "number"?, "front"?, "extra_data"?}`
    -> `{"prompt_id", "number", "node_errors"}`, the prompt a job of ours that any instance follows."""
    state = app_state(request)
    await state.jobs.check_room()
    settings = state.resources.settings
    body = await read_body(request, settings.inputs.max_body_bytes, settings.inputs.timeout)
    asked = await json_value(body, empty={})
    try:
        entry, errors = await submit(request, asked if isinstance(asked, dict) else {}, len(body))
    except Refused as refused:
        return refused.response()
    return JSONResponse({"prompt_id": entry.task_id, "number": entry.number, "node_errors": errors})


async def checked_workflow(
    resources: Resources, workflow: Any
) -> tuple[dict[str, Any], tuple[str, ...], dict[str, Any]]:
    """The workflow, the output nodes that will run and the `node_errors` of those that will not,
    checked as ComfyUI checks a prompt (against what `/object_info` says: a worker's on a fleet):
    Refused when no output can run."""
    if not isinstance(workflow, dict) or not workflow:
        raise Refused("no_prompt", "No prompt provided", "No prompt provided")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or "class_type" not in node:
            message = "Cannot execute because a node is missing the class_type property."
            raise Refused("invalid_prompt", message, f"Node ID '#{node_id}'")
    info = await resources.workflows.object_info.get()
    for node_id, node in workflow.items():
        if node["class_type"] not in info:
            message = f"Cannot execute because node {node['class_type']} does not exist."
            raise Refused("invalid_prompt", message, f"Node ID '#{node_id}'")
    outputs = history.output_nodes(workflow, info)
    if not outputs:
        raise Refused("prompt_no_outputs", "Prompt has no outputs")
    problems = validate_workflow(workflow, info, resources.workflows.loaders)
    errors = node_errors(problems)
    good = history.runnable_outputs(workflow, outputs, set(errors))
    for node_id, error in errors.items():
        error["dependent_outputs"] = [o for o in outputs if o not in good and node_id in history.upstream(workflow, o)]
    if not good:
        raise Refused("prompt_outputs_failed_validation", "Prompt outputs failed validation", "", errors)
    return workflow, good, errors  # as ComfyUI: the valid outputs run, `node_errors` tells of the others


async def submit(request: Request, asked: dict[str, Any], size: int) -> tuple[PromptEntry, dict[str, Any]]:
    """Queue a prompt as ComfyUI's `/prompt` takes it (`prompt`, `client_id`, `prompt_id`,
    `number`, `front`, `extra_data`): a job of ours whose task id is the prompt id; with the
    `node_errors` of the outputs that will not run. `size`: the bytes of the body it came in."""
    state = app_state(request)
    resources = state.resources
    chosen = asked.get("prompt_id")  # else one made here: nobody knows it before the answer
    prompt_id = str(chosen or uuid.uuid4())
    if not TASK_ID_RE.fullmatch(prompt_id) or prompt_id in (".", ".."):
        raise Refused("invalid_prompt", "prompt_id must be 1-128 letters, digits, '.', '_' or '-'", prompt_id[:128])
    workflow, outputs, errors = await checked_workflow(resources, asked.get("prompt"))
    index = prompts(state)
    front = bool(asked.get("front"))
    number = asked.get("number")
    if not isinstance(number, int | float) or isinstance(number, bool):
        number = await index.number(front)
    client_id = str(asked["client_id"]) if asked.get("client_id") else None
    extra = asked.get("extra_data")
    extra_data = {k: v for k, v in extra.items() if k != "client_id"} if isinstance(extra, dict) else {}
    carried = await inputs(resources).inline(workflow, resources.workflows.loaders)
    # Not serialised to be parsed again: a prompt carrying an upload's base64 is megabytes.
    body = Decoded({"prompt": carried, "extra_data": extra_data}, size)
    headers = {**request.headers, "x-fc-invocation-type": "Async", "x-fc-async-task-id": prompt_id}
    headers.pop("idempotency-key", None)  # ComfyUI's API names its prompts itself
    # Previews (ComfyUI's binary frames) are asked for: `/ws` relays them as ComfyUI frames them.
    query = {"previews": "true", **({"priority": "high"} if front else {})}
    owner = owner_of(request)
    entry = PromptEntry(prompt_id, int(number), workflow, client_id, outputs, owner, time.time())
    # No download links (`output_url`) for a prompt: its outputs are served by `/view`.
    job = await start_job(
        resources, state.jobs, body, query, headers, "http", owner=owner, native=True, id_made=not chosen
    )
    # One turn of the loop before the rest: the job's task, made by `start_job`, takes it and sends
    # the prompt on to ComfyUI (one box) before this answer is written, not after it (~0.1 ms of
    # the prompt's path; its client waits for ComfyUI's messages, not for the answer).
    await asyncio.sleep(0)
    await index.add(entry)
    index.ring(client_id)  # its followers here pick it up at once
    # Its one INFO line is the job's end, as every job's (a line costs the loop ~30 µs a prompt).
    log.debug("task_id=%s: queued through ComfyUI's API (number %s, client %s)", job.task_id, entry.number, client_id)
    return entry, errors


async def live(state: AppState, owner: str | None) -> list[tuple[PromptEntry, str]]:
    """The prompts not yet ended that `owner` may see, each with its state (queued, running);
    those seen ended are settled in the index."""
    index = prompts(state)
    entries = [entry for entry in await index.live() if may_see(owner, entry.owner)]
    # Their jobs here, taken before their logs are read: one that leaves meanwhile, its end
    # recorded, is still asked (its log, read before that, may not hold the end).
    jobs = [state.jobs.get(entry.task_id) for entry in entries]
    summaries = await asyncio.gather(*(state.resources.status.summary(entry.task_id) for entry in entries))
    ended, found = [], []
    for entry, job, summary in zip(entries, jobs, summaries, strict=True):
        if summary is None and job is not None:  # answered before its log is claimed: the job says
            summary = await job_summary(job)
        status = summary["state"] if summary is not None else "queued"
        job = job if status not in ENDED else None
        if status in ENDED or (job is not None and await _ended_here(state, job, entry.task_id)):
            ended.append(entry.task_id)
        else:
            found.append((entry, status))
    await index.settled(ended)
    return found


async def _ended_here(state: AppState, job: RunningJob, task_id: str) -> bool:
    """Whether a job running here has ended as its `/history` entry tells it, so that `/queue`
    leaves it out the moment `/history` has it (ComfyUI changes both at once): its end published
    (its log may not hold it yet), or, on one box, ComfyUI's verdict and last message relayed
    (`history_payloads` answers from those)."""
    if await ended_now(job):
        return True
    if prompts(state).shared:
        return False
    events = await published_events(job)
    return events is not None and _comfyui_ended(events, task_id) and _comfyui_verdict(events)


async def prompt_state(request: Request) -> Response:
    """GET /prompt: how many prompts are queued or running."""
    remaining = len(await live(app_state(request), owner_of(request)))
    return JSONResponse({"exec_info": {"queue_remaining": remaining}})


async def get_queue(request: Request) -> Response:
    """GET /queue: `{"queue_running": [...], "queue_pending": [...]}`, items as ComfyUI's."""
    found = await live(app_state(request), owner_of(request))
    running = [history.queue_item(entry) for entry, status in found if status == "running"]
    pending = [history.queue_item(entry) for entry, status in found if status != "running"]
    return JSONResponse({"queue_running": running, "queue_pending": pending})


async def _cancel(state: AppState, task_ids: list[str]) -> None:
    for task_id in task_ids:
        try:
            await state.jobs.cancel(task_id)
        except (NotFound, Conflict, InvalidParams) as exc:  # ended meanwhile: as ComfyUI, nothing to say
            log.info("task_id=%s: not cancelled (%s)", task_id, exc.message)


async def post_queue(request: Request) -> Response:
    """POST /queue: `{"delete": [ids]}` cancels those still queued, `{"clear": true}` every queued one."""
    state = app_state(request)
    asked = await _json_body(request)
    found = await live(state, owner_of(request))
    pending = [entry.task_id for entry, status in found if status != "running"]
    if isinstance(asked, dict) and asked.get("clear"):
        await _cancel(state, pending)
    if isinstance(asked, dict) and isinstance(asked.get("delete"), list):
        await _cancel(state, [str(task_id) for task_id in asked["delete"] if str(task_id) in pending])
    return Response(status_code=200)


async def interrupt(request: Request) -> Response:
    """POST /interrupt: `{"prompt_id"}` cancels that prompt if it runs; no body, every running one."""
    state = app_state(request)
    asked = await _json_body(request)
    found = await live(state, owner_of(request))
    running = [entry.task_id for entry, status in found if status == "running"]
    named = asked.get("prompt_id") if isinstance(asked, dict) else None
    if named:
        running = [task_id for task_id in running if task_id == named]
    await _cancel(state, running)
    return Response(status_code=200)


async def _history_of(state: AppState, entry: PromptEntry) -> dict[str, Any] | None:
    payloads, by_comfyui = await history_payloads(state, entry.task_id)
    return history.history_entry(entry, payloads, by_comfyui)


async def history_payloads(state: AppState, task_id: str) -> tuple[list[Any], bool]:
    """A prompt's payloads for its `/history` entry: those of its job while it runs here (its log
    is not read), else its log's; and whether the entry is ComfyUI's verdict (the job's end not
    published yet). As ComfyUI's own history, the prompt is there once its client was told it
    ended (`/ws` passes ComfyUI's last message on as it comes on one box: `relay`). On one box,
    whose `/view` reads ComfyUI's own folder, a job running here whose ComfyUI has ended the
    prompt (its last message, after `execution_success`, `_error` or `_interrupted`) is answered
    for as ComfyUI then answers, without waiting for the job to publish its end: collecting its
    outputs can take a thread's trip, milliseconds on a loaded machine, while its client asks.
    (Should the job still fail after ComfyUI's success, its entry says so from then on.) Else
    such a job is waited for until it publishes its end (its outputs collected, kept where every
    gateway's `/view` serves them), at most END_WAIT seconds. Each payload is parsed once (from
    a job, only those the entry is built from)."""
    job = state.jobs.get(task_id)
    if job is not None:
        events = await published_events(job)
        if events is not None and not _ends(events) and _comfyui_ended(events, task_id):
            if not prompts(state).shared and _comfyui_verdict(events):
                return [json.loads(event.data) for event in events if history.in_history(event.text)], True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(END_WAIT):
                    await job.finished()  # from its feed as soon as it is published
            more = await published_events(job, events[-1].seq)
            events = events + more if more is not None else None
        if events is not None:  # those the entry is not built from are not parsed
            kept = [json.loads(event.data) for event in events if event.terminal or history.in_history(event.text)]
            return kept, False
    payloads: list[Any] = json.loads(await state.resources.status.read(task_id))
    if job is None or history.ended(payloads) or not history.comfyui_ended(payloads, task_id):
        return payloads, False
    with contextlib.suppress(TimeoutError):  # its feed no longer holds them all: its log has them once recorded
        async with asyncio.timeout(END_WAIT):
            await job.terminal_recorded()
    payloads = json.loads(await state.resources.status.read(task_id))
    return payloads, False


def _ends(events: list[Event]) -> bool:
    return bool(events) and events[-1].terminal


def _comfyui_verdict(events: list[Event]) -> bool:
    """Whether ComfyUI has said how the prompt went among `events` (`execution_success`, `_error`
    or `_interrupted`; told without parsing them)."""
    return any(history.message_type(event.text) in history.ENDS for event in reversed(events))


def _comfyui_ended(events: list[Event], prompt_id: str) -> bool:
    """Whether ComfyUI has sent the prompt's last message among `events` (only its `executing`
    messages with no node are parsed)."""
    return any(not event.terminal and history.ends_prompt(event.text, prompt_id) for event in reversed(events))


async def task_payloads(state: AppState, task_id: str) -> list[Any]:
    """A prompt's payloads: where its job runs here and has published its end, as the job
    published them (its log may not hold the end yet: a box's is written a moment later, and
    `/ws` and API v2's events tell the end without waiting for it; nor is the disk read); else
    as its log holds them."""
    job = state.jobs.get(task_id)
    published = await published_payloads(job) if job is not None else None
    if published is not None:
        return published
    payloads: list[Any] = json.loads(await state.resources.status.read(task_id))
    return payloads


async def published_payloads(job: RunningJob, ended: bool = True) -> list[Any] | None:
    """The payloads a job running here has published: once it has published its terminal one
    (None before), or with `ended=False` so far; None when its feed no longer holds them all
    (its log has them then)."""
    events = await published_events(job)
    if events is None or (ended and not _ends(events)):
        return None
    return [json.loads(event.data) for event in events]


async def get_history(request: Request) -> Response:
    """GET /history[?max_items=N]: the newest ended prompts, oldest first."""
    state = app_state(request)
    owner = owner_of(request)
    max_items = request.query_params.get("max_items")
    limit = int(max_items) if max_items and max_items.isdigit() else HISTORY_DEFAULT
    entries = [entry for entry in await prompts(state).recent(None) if may_see(owner, entry.owner)]
    answer: dict[str, Any] = {}
    newest_first = entries[::-1]
    while newest_first and len(answer) < limit:  # read in batches, until `limit` ended ones
        batch, newest_first = newest_first[:HISTORY_BATCH], newest_first[HISTORY_BATCH:]
        made = await asyncio.gather(*(_history_of(state, entry) for entry in batch))
        for entry, item in zip(batch, made, strict=True):
            if item is not None and len(answer) < limit:
                answer[entry.task_id] = item
    return JSONResponse(dict(reversed(answer.items())))


async def get_history_item(request: Request) -> Response:
    """GET /history/{prompt_id}: `{prompt_id: entry}` once it ended, `{}` before (or when unknown)."""
    state = app_state(request)
    prompt_id = request.path_params["prompt_id"]
    entry = await prompts(state).get(prompt_id)
    if entry is None or not may_see(owner_of(request), entry.owner):
        return JSONResponse({})
    made = await _history_of(state, entry)
    return JSONResponse({prompt_id: made} if made is not None else {})


async def post_history(request: Request) -> Response:
    """POST /history: `{"clear": true}` or `{"delete": [ids]}` (ended prompts leave the list)."""
    state = app_state(request)
    asked = await _json_body(request)
    if isinstance(asked, dict) and asked.get("clear"):
        await prompts(state).forget(None)
    if isinstance(asked, dict) and isinstance(asked.get("delete"), list):
        await prompts(state).forget([str(task_id) for task_id in asked["delete"]])
    return Response(status_code=200)
