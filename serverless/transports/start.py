"""Starting a job from a request, the same for HTTP and the websocket: parse, decide the mode,
resolve credentials once, refuse what this instance cannot do, then `Jobs.start`."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..auth import NOBODY, Caller
from ..auth import caller as current_caller
from ..core.credentials import Credentials
from ..core.request import (
    BIG_BODY,
    RunRequest,
    check_nodes,
    check_parameter_names,
    parse_run_document,
    parse_run_request,
    query_flag,
    run_request,
    task_id_from_headers,
)
from ..core.uiformat import UIFormatWorkflow
from ..core.workflow import check_output_paths
from ..delivery.convert import parse_conversion
from ..delivery.storage import Storage
from ..errors import Conflict, InvalidParams, ServerlessError, Unavailable
from ..inputs.resolve import CLASSIFY_PREFIX, LOADER_INPUTS, classify, find_loader_inputs
from ..jobs.runner import JobRunner, RunningJob
from ..jobs.spec import JobSpec, Mode, OutputPolicy
from ..resources import Resources
from ..settings import LANE_RE
from ..tenants.limits import check_rate
from ..workflows.conversion import convert_with
from ..workflows.hosting import PreparedRun

log = logging.getLogger(__name__)

Transport = Literal["http", "ws"]

PRIORITIES = ("high", "normal", "low")


def is_async(headers: Mapping[str, str]) -> bool:
    """FC's async invocation header."""
    return headers.get("x-fc-invocation-type", "").lower() == "async"


def job_mode(request: RunRequest, headers: Mapping[str, str], transport: Transport) -> Mode:
    """How the caller follows the job; decided here only."""
    if transport == "ws":
        return "ws"
    if is_async(headers):
        return "async"
    return "stream" if request.stream else "sync"


def output_policy(
    request: RunRequest,
    credentials: Credentials | None,
    storage: Storage | None,
    query: Mapping[str, str] | None = None,
    link_secret: str = "",
    base_url: str | None = None,
) -> OutputPolicy:
    """The outputs' treatment (`output_base64`, `output_oss`, `output_format`, `output_quality`,
    `output_max_side`, `output_url`); refuses, before anything runs, what is malformed or what
    this instance cannot do."""
    query = query or {}
    conversion = parse_conversion(query.get("output_format"), query.get("output_quality"), query.get("output_max_side"))
    url = None
    if query_flag(query, "output_url"):
        # A per-process secret would make links that no other instance (nor this one restarted) serves.
        if not link_secret:
            raise InvalidParams("output_url was asked but download links are not configured (set FILE_LINK_SECRET)")
        if base_url is None:
            raise InvalidParams("output_url is not available on this transport")
        url = base_url
    if request.output_oss and storage is None:
        raise InvalidParams(
            "output_oss was asked but OSS is not configured (set OSS_BUCKET_DOMAIN, or STORAGE=s3 and S3_BUCKET)"
        )
    missing = storage.missing_credentials(credentials) if request.output_oss and storage is not None else None
    if missing is not None:
        raise InvalidParams(missing)
    return OutputPolicy(base64=request.output_base64, oss=request.output_oss, convert=conversion, url=url)


@dataclass(frozen=True, slots=True)
class Decoded:
    """A request body whose JSON its endpoint has decoded already (ComfyUI's `/prompt`), and the
    size of the body it came in: a run's body, neither serialised again nor parsed again."""

    document: dict[str, Any]
    size: int


Body = bytes | str | Decoded


async def parse(
    body: Body, query: Mapping[str, str], headers: Mapping[str, str], resources: Resources | None = None
) -> tuple[RunRequest, int]:
    """`parse_run_request`, in a thread for big bodies so other callers are not kept waiting; a
    UI-format workflow is converted with ComfyUI's `/object_info` (`resources`). With the request,
    the bytes of its body that are not loader inputs' base64 (`weighed`)."""
    size = _size(body)
    try:
        if size < BIG_BODY:
            return _parsed(body, query, headers), size
        loaders = LOADER_INPUTS | set(resources.settings.inputs.loaders) if resources is not None else LOADER_INPUTS
        return await asyncio.to_thread(_parsed_and_weighed, body, query, headers, loaders)
    except UIFormatWorkflow as ui:
        if resources is None:
            raise
        return await _converted(resources, ui, size, query, headers), size


def _size(body: Body) -> int:
    return body.size if isinstance(body, Decoded) else len(body)


def _parsed(body: Body, query: Mapping[str, str], headers: Mapping[str, str]) -> RunRequest:
    if isinstance(body, Decoded):
        return parse_run_document(body.document, query, headers)
    return parse_run_request(body, query, headers)


def _parsed_and_weighed(
    body: Body, query: Mapping[str, str], headers: Mapping[str, str], loaders: frozenset[tuple[str, str]]
) -> tuple[RunRequest, int]:
    request = _parsed(body, query, headers)
    return request, weighed(request.workflow, _size(body), loaders)


def weighed(workflow: Mapping[str, Any], size: int, loaders: frozenset[tuple[str, str]]) -> int:
    """What walking and serialising a workflow costs, in bytes of its body of `size`: all of it but
    its loader inputs' base64, which is decoded once and replaced by a file name before the
    workflow is sent on. A body of 1 MB that is one image in a handful of nodes is not big: its
    checks, copy and `/prompt` text take microseconds in the event loop, less than a thread's trip."""
    return size - sum(_base64_size(item.value) for item in find_loader_inputs(workflow, loaders))


def _base64_size(value: str) -> int:
    if len(value) <= CLASSIFY_PREFIX:
        return 0
    try:
        return len(value) if classify(value) == "base64" else 0
    except ServerlessError:  # refused later, before anything is sent on
        return 0


async def _converted(
    resources: Resources, ui: UIFormatWorkflow, size: int, query: Mapping[str, str], headers: Mapping[str, str]
) -> RunRequest:
    """The run of a UI-format workflow: converted, then as any other."""
    task_id = task_id_from_headers(headers)
    converted = await convert_with(resources.workflows.object_info, ui.document, size)
    if converted.notes:
        log.info("task_id=%s: UI-format workflow converted: %s", task_id or "-", "; ".join(converted.notes))
    check_nodes(converted.prompt)
    return run_request(converted.prompt, ui.extra_data, query, task_id)


async def parse_hosted(
    resources: Resources,
    workflow_id: str,
    body: bytes | str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    owner: str | None = None,
) -> tuple[RunRequest, Mapping[str, str], PreparedRun]:
    """A hosted workflow's run (`workflow_id` may name a version: `<id>@<n>`, `<id>@<alias>`):
    the body holds only overrides, checked and merged into the stored version
    (`serverless.workflows.hosting`); the flags and task id as for any run. The body's
    `"output": {"format", "quality", "max_side"}` join the query (whose own values win)."""
    task_id = task_id_from_headers(headers)
    prepared = await resources.workflows.prepare(workflow_id, body, owner)
    if prepared.output:
        from_body = {f"output_{key}": str(value) for key, value in prepared.output.items() if value is not None}
        query = {**from_body, **query}
    return run_request(prepared.workflow, prepared.extra_data, query, task_id), query, prepared


def hosted_id(query: Mapping[str, str], path_id: str | None) -> str | None:
    """The hosted workflow asked for: from the path, else `?workflow_id=`; None for an ordinary run."""
    query_id = query.get("workflow_id")
    if path_id is not None and query_id is not None and query_id != path_id:
        raise InvalidParams(f"the path names workflow {path_id!r} but workflow_id is {query_id!r}")
    return path_id if path_id is not None else query_id


async def start_job(
    resources: Resources,
    jobs: JobRunner,
    body: Body,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    transport: Transport,
    workflow_id: str | None = None,
    *,
    base_url: str | None = None,
    owner: str | None = None,
    prompt_id: str | None = None,
    native: bool = False,
    id_made: bool = False,
    caller: Caller | None = None,
) -> RunningJob:
    """The job a request asks for, started; `workflow_id` (the path's, else the query's) runs a
    hosted workflow with the body as its overrides. `base_url` (where the caller reached us)
    prefixes download links; `owner` is the caller's key digest; `prompt_id` is one chosen
    beforehand. A `callback_url` (or `X-Callback-Url`) gets the terminal payload. `native`: queued
    through ComfyUI's own API (its outputs kept where any gateway's `/view` serves them);
    `id_made`: its task id was made for the caller, who learns it from the answer. The
    caller's key (`caller`, else the request's) must allow the run (403 FORBIDDEN) and its rate
    (429 RATE_LIMITED), checked before the body is parsed."""
    check_parameter_names(query)
    workflow_id = hosted_id(query, workflow_id)
    who = admitted_caller(caller, owner)
    who.check_run(workflow_id)
    await check_rate(resources.tenants.rate, who.owner, who.label, who.rights.rate)
    hosted: PreparedRun | None = None
    weight = _size(body)
    if workflow_id is None:
        request, weight = await parse(body, query, headers, resources)
    else:
        if isinstance(body, Decoded):  # a hosted run's overrides are read from the text it was sent
            raise TypeError("a hosted workflow's run takes its body as it was sent")
        request, query, hosted = await parse_hosted(resources, workflow_id, body, query, headers, owner)
    big = weight >= BIG_BODY or (hosted is not None and hosted.size >= BIG_BODY)
    check_output_paths(request.workflow, resources.reserved_output_dirs)
    # Model references' syntax and hosts, before any GPU time (a big workflow's nodes off the event loop).
    if big or (workflow_id is not None and resources.workflows.size(workflow_id) >= BIG_BODY):
        await asyncio.to_thread(resources.check_models, request.workflow)
    else:
        resources.check_models(request.workflow)
    await check_task_owner(resources, request.task_id, owner)
    mode = job_mode(request, headers, transport)
    if mode == "async" and not await resources.status.writable():
        # Its caller would poll a status that never comes: refuse now, FC retries elsewhere.
        reason = resources.status.health()["not_writable_because"]
        raise Unavailable(f"the status folder cannot be written ({reason}): async jobs are refused")
    credentials = Credentials.resolve(headers, resources.settings.oss.credentials)
    outputs = output_policy(
        request, credentials, resources.storage, query, resources.settings.security.file_link_secret, base_url
    )
    if native:
        outputs = replace(outputs, keep=True)
    callback_url = query.get("callback_url") or headers.get("x-callback-url") or None
    if callback_url is not None:
        callback_url = await resources.webhooks.check(callback_url)
    spec = JobSpec(
        workflow=request.workflow,
        extra_data=request.extra_data,
        mode=mode,
        outputs=outputs,
        task_id=request.task_id,
        credentials=credentials,
        big=big,
        workflow_id=hosted.workflow_id if hosted is not None else None,
        workflow_version=hosted.version if hosted is not None else None,
        priority=job_priority(query),
        lane=job_lane(query) or (hosted.lane if hosted is not None else ""),  # the run's, else the workflow's
        idempotency_key=headers.get("idempotency-key") or None,
        owner=owner,
        concurrency=who.rights.concurrency,
        callback_url=callback_url,
        previews=query_flag(query, "previews"),
        native=native,
        id_made=id_made,
    )
    job = await jobs.start(spec, prompt_id)  # whoever runs it delivers its webhook
    resources.tenants.usage.add(owner, {"jobs_submitted": 1})  # usage per key (written once a second)
    return job


def admitted_caller(caller: Caller | None, owner: str | None) -> Caller:
    """The caller whose rights a run is checked against: the one given, else the request's
    (`auth.caller()`); one that is not the job's `owner` has no right at all (fail closed)."""
    who = caller if caller is not None else current_caller()
    if who.owner != owner:
        return Caller(owner, NOBODY.label, NOBODY.rights)
    return who


async def check_task_owner(resources: Resources, task_id: str | None, owner: str | None) -> None:
    """A task id the caller names belongs to the key that first used it: another key naming it
    is refused (409) before anything runs, never given a new attempt of it (nor its old ones).
    The Redis tier's queue claims the id itself as well (SET NX), closing the race of two
    first uses."""
    if owner is None or task_id is None:
        return
    task_owner = await resources.status.owner(task_id)
    if task_owner is None or (task_owner and hmac.compare_digest(task_owner, owner)):
        return  # made without keys (anyone's), or this caller's own
    if task_owner == "" and not await resources.status.known(task_id):
        return  # nobody's yet
    raise Conflict(f"task id {task_id} is taken: name another task", raw={"task_id": task_id})


def job_lane(query: Mapping[str, str]) -> str:
    """`?lane=<name>` (the Redis tier: the lane whose workers run it, WORKER_LANE; ignored
    without a queue)."""
    lane = (query.get("lane") or "").strip()
    if lane and not LANE_RE.fullmatch(lane):
        raise InvalidParams("lane must be 1-32 lowercase letters, digits or '-'", raw={"lane": lane[:50]})
    return lane


def job_priority(query: Mapping[str, str]) -> str:
    """`?priority=high|normal|low` (the Redis tier's queue streams; ignored without a queue)."""
    priority = (query.get("priority") or "normal").strip().lower()
    if priority not in PRIORITIES:
        raise InvalidParams(f"priority must be one of {', '.join(PRIORITIES)}", raw={"priority": priority[:50]})
    return priority
