"""GenStudio's endpoints, each a few lines over the mapping (`mapping`), our jobs (`start_job`),
the status log (any instance answers) and result delivery (OSS signed URLs, or our links):

    POST /api/maas/comfy_task_api/prompt          a hosted workflow's job, queued and answered at once
    POST /api/maas/comfy_task_api/get_task_info   each task's status, progress and fresh file URLs
    POST /api/maas/comfy_task_api/cancel          our cancel, per id
    POST /api/maas/comfy_task_api/upload/image    an image into ComfyUI's input folder
    WS   /api/maas/comfy_task_ws_api/get_task_progress?authorization=<prompt_token>

Every answer and error is in GenStudio's envelope (`envelope`), rendered by `_respond` only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from ..auth import caller, may_see
from ..core.conversion import EXTENSION, Conversion
from ..core.credentials import Credentials
from ..core.media import sniff
from ..core.request import query_flag
from ..delivery import links
from ..errors import Conflict, Forbidden, InvalidParams, NotFound, as_serverless_error
from ..inputs import verify
from ..inputs.verify import verify_media
from ..jobs.feed import Event
from ..jobs.runner import JobRunner
from ..resources import Resources
from ..state import app_state, of_app
from ..status.summary import summarise
from ..transports import caller as caller_module
from ..transports.caller import bounded, watch
from ..transports.events import TaskEvents
from ..transports.http import read_body, read_json
from ..transports.start import start_job
from . import mapping, token
from .envelope import failure, success

log = logging.getLogger(__name__)
TOKEN_KEY = b"genstudio prompt_token"  # what FILE_LINK_SECRET is keyed with for prompt tokens

Endpoint = Callable[[Request], Awaitable[Any]]
HASH_CHARS = 32  # as the input resolver names fetched inputs: the same bytes, the same file
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and headers around the image
BIG_FORM = 256 * 1024  # from this size on the multipart body is parsed in a thread


def _respond(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    """The one renderer: the endpoint's data in the success envelope, any error in the error one."""

    async def answer(request: Request) -> Response:
        try:
            data = await endpoint(request)
        except ClientDisconnect:
            raise  # nobody to answer: the app's handler notes it
        except Exception as exc:
            error = as_serverless_error(exc, f"{request.method} {request.url.path}")
            body, status = failure(error)
            return JSONResponse(body, status_code=status, headers=error.headers or None)
        return JSONResponse(success(data))

    answer.__doc__ = endpoint.__doc__
    return answer


def _owner(scope: Any) -> str | None:
    return caller(scope).owner


def token_secret(app: Starlette) -> bytes:
    """A key derived from FILE_LINK_SECRET (its own: a link's signature is never a token's), else a
    random secret of this process (tokens then work only here)."""
    state = of_app(app)
    if state.resources.settings.security.file_link_secret:
        return hmac.new(state.resources.settings.security.file_link_secret.encode(), TOKEN_KEY, "sha256").digest()
    made = state.genstudio_token_secret
    if made is None:
        made = secrets.token_bytes(32)
        state.genstudio_token_secret = made
        log.warning(
            "FILE_LINK_SECRET is not set: prompt_tokens are signed with a secret of this "
            "process and are refused by other instances; set it where several instances serve"
        )
    return made


async def _decoded(request: Request) -> Any:
    """The request's JSON body (bounded in size and time), as GenStudio's endpoints take it."""
    settings = app_state(request).resources.settings
    return mapping.as_object(await read_json(request, settings.inputs.max_body_bytes, settings.inputs.timeout))


def _delivery(resources: Resources, credentials: Credentials | None) -> dict[str, str]:
    """How the task's files will be served: OSS when configured (signed anew on every
    get_task_info), else our signed download links; refused when neither can be."""
    if resources.storage is not None and resources.storage.missing_credentials(credentials) is None:
        return {"output_oss": "true"}
    if resources.settings.security.file_link_secret:
        return {"output_url": "true"}  # on a fleet, the worker keeps the files where gateways serve them
    raise InvalidParams(
        "result files cannot be delivered by this instance: configure OSS "
        "(OSS_BUCKET_DOMAIN and credentials) or download links (FILE_LINK_SECRET)"
    )


@_respond
async def prompt(request: Request) -> dict[str, str]:
    """POST .../prompt: `{"workflow_id", "prompt"}` -> `{"prompt_id", "prompt_token"}`."""
    resources = app_state(request).resources
    settings = resources.settings
    asked = mapping.parse_prompt(await _decoded(request))
    headers = {**request.headers, "x-fc-invocation-type": "Async"}  # queued and answered at once
    query = _delivery(resources, Credentials.resolve(headers, settings.oss.credentials))
    if query_flag(request.query_params, "previews"):
        query["previews"] = "true"  # its progress socket may then show them (`?previews=true` there)
    owner = _owner(request.scope)
    body = json.dumps({"prompt": asked.overrides}, ensure_ascii=False)
    job = await start_job(
        resources,
        app_state(request).jobs,
        body,
        query,
        headers,
        "http",
        asked.workflow_id,
        base_url=str(request.base_url),
        owner=owner,
    )
    log.info("task_id=%s: GenStudio prompt of hosted workflow %r", job.task_id, asked.workflow_id)
    return {
        "prompt_id": job.task_id,
        "prompt_token": token.issue(token_secret(request.app), job.task_id, owner, time.time()),
    }


@_respond
async def get_task_info(request: Request) -> dict[str, Any]:
    """POST .../get_task_info: one `comfy_task_info` per id asked (unknown ones included)."""
    resources = app_state(request).resources
    asked = mapping.parse_task_info(await _decoded(request))
    files = Files(resources, request, asked)
    owner = _owner(request.scope)
    jobs = app_state(request).jobs
    infos = await asyncio.gather(*(_info(resources, jobs, files, task_id, owner) for task_id in asked.task_ids))
    return {"comfy_task_info": list(infos)}


async def _info(resources: Resources, jobs: JobRunner, files: Files, task_id: str, owner: str | None) -> dict[str, Any]:
    try:
        resources.status.validate(task_id)  # the rule of task ids
    except InvalidParams:
        return mapping.unknown(task_id)
    summary = await resources.status.summary(task_id)
    if summary is None and jobs.get(task_id) is None:
        return mapping.unknown(task_id)
    if not await _may_see(resources, jobs, task_id, owner):
        return mapping.not_permitted(task_id)
    if summary is None:
        return mapping.unknown(task_id)
    return mapping.task_info(task_id, summary, await files.urls(summary))


async def _may_see(resources: Resources, jobs: JobRunner, task_id: str, owner: str | None) -> bool:
    if owner is None:
        return True
    job = jobs.get(task_id)  # here, whose it is is known before its log's first line is written
    return may_see(owner, job.spec.owner if job is not None else await resources.status.owner(task_id))


class Files:
    """Fresh URLs of a task's files: OSS signed URLs where they were uploaded, else our links;
    valid `url_expire_period` seconds (at most FILE_LINK_EXPIRES), converted as
    `image_post_process_cmd` asks."""

    def __init__(self, resources: Resources, request: Request | WebSocket, asked: mapping.TaskInfoRequest) -> None:
        self.resources = resources
        self.asked = asked
        self.period = min(asked.url_expire_period, resources.settings.outputs.link_expires)
        self.credentials = Credentials.resolve(request.headers, resources.settings.oss.credentials)
        scheme = {"ws": "http", "wss": "https"}.get(request.url.scheme, request.url.scheme)
        self.base_url = str(request.base_url.replace(scheme=scheme)).rstrip("/")

    async def urls(self, summary: dict[str, Any]) -> list[str | None]:
        return list(await asyncio.gather(*(self.url(item["output"]) for item in mapping.outputs(summary))))

    async def url(self, output: dict[str, Any]) -> str | None:
        oss, raw = output.get("oss"), output.get("raw")
        key = oss.get("object") if isinstance(oss, dict) else None
        store = self.resources.storage
        if isinstance(key, str) and key and store is not None:
            process = self.asked.post_process.oss_process
            signed = await store.sign_object(self.credentials, key, self.period, process)
            if signed is not None:
                return signed
        secret = self.resources.settings.security.file_link_secret
        if not secret or not isinstance(raw, dict) or not raw.get("filename"):
            return None
        conversion = self.asked.post_process.conversion
        expires = int(time.time()) + self.period
        signed = links.sign(secret.encode(), raw, expires, conversion)
        return f"{self.base_url}/api/files/{signed}/{quote(_served_name(str(raw['filename']), conversion))}"


def _served_name(filename: str, conversion: Conversion) -> str:
    """The file's name as served (a client names its download after the URL's last segment)."""
    name = PurePosixPath(filename).name
    if conversion.format is None:
        return name
    return f"{PurePosixPath(name).stem}.{EXTENSION[conversion.format]}"


@_respond
async def cancel(request: Request) -> dict[str, Any]:
    """POST .../cancel: `{"comfy_task_id"}` or `{"comfy_task_ids"}`; each id's outcome."""
    resources = app_state(request).resources
    ids = mapping.cancel_ids(await _decoded(request))
    owner = _owner(request.scope)
    jobs = app_state(request).jobs
    results = [await _cancel_one(resources, jobs, task_id, owner) for task_id in ids]
    failed = [result for result in results if result["code"] != 0]
    if len(ids) == 1 and failed:  # one id: its refusal is the answer's
        raise failed[0]["error"]
    return {
        "comfy_task_ids": [result["comfy_task_id"] for result in results if result["code"] == 0],
        "results": [{key: value for key, value in result.items() if key != "error"} for result in results],
    }


async def _cancel_one(resources: Resources, jobs: JobRunner, task_id: str, owner: str | None) -> dict[str, Any]:
    try:
        resources.status.validate(task_id)
        if not await _may_see(resources, jobs, task_id, owner):
            raise NotFound(f"no task {task_id}")  # another key's: as if it did not exist
        await jobs.cancel(task_id)
    except (NotFound, Conflict, InvalidParams) as exc:
        return {"comfy_task_id": task_id, "code": exc.status_code, "msg": exc.message, "error": exc}
    return {"comfy_task_id": task_id, "code": 0, "msg": "cancelling"}


@_respond
async def upload_image(request: Request) -> dict[str, str]:
    """POST .../upload/image: the multipart field `source_file`, checked to be a whole image,
    stored in ComfyUI's input folder under its content hash -> `{"image_id"}` (a LoadImage input)."""
    resources = app_state(request).resources
    settings = resources.settings
    limit = min(settings.inputs.max_body_bytes, settings.inputs.max_bytes + FORM_OVERHEAD)
    body = await read_body(request, limit, settings.inputs.timeout)
    content_type = request.headers.get("content-type", "")
    if len(body) < BIG_FORM:
        data = mapping.source_file(body, content_type)
    else:
        data = await asyncio.to_thread(mapping.source_file, body, content_type)
    del body
    sniffed = sniff(data)
    if sniffed is None or not sniffed[1].startswith("image/"):
        raise InvalidParams("source_file is not an image (PNG, JPEG, WebP, GIF, BMP or TIFF)")
    await asyncio.to_thread(verify_media, data, sniffed[1], verify.MAX_PIXELS)
    name = f"{hashlib.sha256(data).hexdigest()[:HASH_CHARS]}.{sniffed[0]}"
    image_id = await resources.comfy.upload_input(data, name)
    log.info("GenStudio upload stored as %s (%d bytes)", image_id, len(data))
    return {"image_id": image_id}


async def get_task_progress(websocket: WebSocket) -> None:
    """WS .../get_task_progress?authorization=<prompt_token>: `{"comfy_task_info": {...}}` on every
    change of the task, until it ends; then a normal close. A missing, forged or expired token is
    refused before the handshake completes (403). With `&previews=true`, for a task prompted
    with `?previews=true`, each newest sampler preview comes as the last `comfy_task_info` again
    with a `preview` member ({"node", "mime", "base64", "step"}): GenStudio's shape has no
    place of its own for one, and its clients ignore members they do not know."""
    resources = app_state(websocket).resources
    jobs = app_state(websocket).jobs
    try:
        grant = token.verify(token_secret(websocket.app), websocket.query_params.get("authorization"), time.time())
    except Forbidden as exc:
        await websocket.close(code=1008, reason=exc.message)
        return
    await websocket.accept()
    task_id = grant.task_id
    source = TaskEvents(task_id, resources.status, jobs.get(task_id))
    files = Files(
        resources,
        websocket,
        mapping.TaskInfoRequest((task_id,), mapping.DEFAULT_URL_EXPIRE, mapping.parse_post_process(None)),
    )

    timeout = caller_module.WRITE_TIMEOUT

    previews = query_flag(websocket.query_params, "previews")

    async def deliver() -> None:
        payloads: list[Any] = []
        sent: dict[str, Any] | None = None
        async for event in source.events(previews=previews):
            if event is not None and event.preview and sent is not None:
                preview = mapping.preview(json.loads(event.data))
                message = {"comfy_task_info": {**sent, "preview": preview}}
                await bounded(websocket.send_text(json.dumps(message, ensure_ascii=False)), timeout)
                continue
            payload = _ours(event)
            if payload is None:
                continue
            payloads.append(payload)
            summary = summarise(task_id, payloads)
            info = mapping.task_info(task_id, summary, await files.urls(summary))
            if info != sent:
                await bounded(websocket.send_text(json.dumps({"comfy_task_info": info}, ensure_ascii=False)), timeout)
                sent = info
        await bounded(websocket.close(), timeout)

    async def caller_gone() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass  # nothing is asked of the client; what it sends is ignored

    await watch(task_id, deliver, caller_gone, None)  # a follower leaving never cancels the task


def _ours(event: Event | None) -> Any:
    """Our payloads among a task's events (progress and terminal); ComfyUI's own are skipped."""
    if event is None:
        return None
    if event.preview:
        return None
    if event.terminal or '"serverless_progress"' in event.text[:64]:
        return json.loads(event.text)
    return None
