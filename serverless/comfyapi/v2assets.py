"""Comfy API v2's assets (`/api/v2/assets...`): uploads staged as our inputs are (`uploads`),
addressed by their blake3 hash; a job's outputs are assets too (`out~<job id>~<n>`), served as
ComfyUI's `/view` serves them."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..auth import may_see
from ..core.media import sniff
from ..errors import InvalidParams
from ..state import app_state
from ..transports.files import ranged
from ..transports.http import read_body, read_json
from . import jobview
from .files import serve_file
from .native import inputs, owner_of, prompts, task_payloads
from .uploads import form_fields
from .v2 import V2Error, answered, base_of, entry_of

FORM_OVERHEAD = 64 * 1024


def _blake3(data: bytes) -> str | None:
    """`blake3:<hex>`, when the blake3 package is installed (else the hash is null, as the
    API allows: assets are then never found by hash)."""
    try:
        from blake3 import blake3
    except ImportError:
        return None
    return "blake3:" + blake3(data).hexdigest()


@answered
async def post_asset(request: Request) -> Response:
    """Multipart `file` (+ `content_type`, `file_path`, `expected_hash`) -> 201 (or 200 when the
    bytes were here already) `Asset`."""
    state = app_state(request)
    settings = state.resources.settings
    limit = min(settings.inputs.max_body_bytes, settings.inputs.max_bytes + FORM_OVERHEAD)
    body = await read_body(request, limit, settings.inputs.timeout)
    fields = await asyncio.to_thread(form_fields, body, request.headers.get("content-type", ""))
    data = fields.get("file")
    if not data:
        raise V2Error(422, "invalid_request", "the multipart field file is required")
    digest = await asyncio.to_thread(_blake3, data)
    expected = fields.get("expected_hash", b"").decode()
    if expected and digest is not None and expected != digest:
        raise V2Error(409, "hash_mismatch", "expected_hash does not match the bytes received")
    index = prompts(state)
    known = await index.asset_by_hash(digest) if digest is not None else None
    try:
        name = await inputs(state.resources).stage(data)
    except InvalidParams as exc:
        raise V2Error(422, "invalid_request", exc.message) from None
    sniffed = sniff(data)
    content_type = fields.get("content_type", b"").decode() or (sniffed[1] if sniffed else "application/octet-stream")
    record = _record(
        name, digest, len(data), content_type, fields.get("file_path", b"").decode() or None, owner_of(request)
    )
    await index.put_asset(record)
    created = known is None
    return JSONResponse(
        jobview.asset(record, time.time(), base_of(request), created), status_code=201 if created else 200
    )


def _record(
    name: str, digest: str | None, size: int, content_type: str, path: str | None, owner: str | None
) -> dict[str, Any]:
    created = jobview.iso(time.time())
    return {
        "id": str(uuid.uuid4()),
        "hash": digest,
        "size_bytes": size,
        "content_type": content_type,
        "file_path": path,
        "created_at": created,
        "name": name,
        "owner": owner,
    }


@answered
async def asset_from_hash(request: Request) -> Response:
    """`{"hash", "file_path"?}` -> 201 `Asset` over bytes already here; 404 `blob_not_found`."""
    state = app_state(request)
    try:
        asked = await read_json(request, 64 * 1024, state.resources.settings.inputs.timeout, empty={})
    except InvalidParams as exc:
        raise V2Error(422, "invalid_request", exc.message) from None
    index = prompts(state)
    known = await index.asset_by_hash(str(asked.get("hash", ""))) if isinstance(asked, dict) else None
    if known is None or not may_see(owner_of(request), known.get("owner")):
        raise V2Error(404, "blob_not_found", "no such bytes here")
    path = asked.get("file_path") or known.get("file_path")
    record = _record(known["name"], known["hash"], known["size_bytes"], known["content_type"], path, owner_of(request))
    await index.put_asset(record)
    return JSONResponse(jobview.asset(record, time.time(), base_of(request), False), status_code=201)


async def asset_by_hash(request: Request) -> Response:
    """200 when bytes of that hash are here (for this caller), else 404."""
    known = await prompts(app_state(request)).asset_by_hash(request.path_params["hash"])
    found = known is not None and may_see(owner_of(request), known.get("owner"))
    return Response(status_code=200 if found else 404)


async def _asset(request: Request) -> tuple[dict[str, Any], dict[str, str] | None]:
    """(the `Asset`, the file it is: ComfyUI's `filename`/`subfolder`/`type`) of the path's id."""
    asset_id = request.path_params["id"]
    state = app_state(request)
    output = jobview.parse_output_id(asset_id)
    if output is None:
        record = await prompts(state).asset(asset_id)
        if record is None or not may_see(owner_of(request), record.get("owner")):
            raise V2Error(404, "not_found", f"no asset {asset_id}")
        return jobview.asset(record, time.time(), base_of(request)), {
            "filename": record["name"],
            "subfolder": "",
            "type": "input",
        }
    task_id = output
    entry = await entry_of(request, task_id)
    payloads = await task_payloads(state, task_id)
    for result, shown in zip(
        jobview.results(payloads), jobview.outputs(task_id, payloads, time.time(), base_of(request)), strict=True
    ):
        if shown["id"] == asset_id:
            raw = result["output"]["raw"]
            item = {
                "filename": raw["filename"],
                "subfolder": raw.get("subfolder", ""),
                "type": raw.get("type", "output"),
            }
            return jobview.output_asset(shown, jobview.iso(entry.created)), item
    raise V2Error(404, "not_found", f"no asset {asset_id}")


@answered
async def get_asset(request: Request) -> Response:
    shown, _ = await _asset(request)
    return JSONResponse(shown)


@answered
async def asset_content(request: Request) -> Response:
    shown, item = await _asset(request)
    resources = app_state(request).resources
    assert item is not None
    range_header = request.headers.get("range")
    if item["type"] == "input":
        kept = await inputs(resources).read(item["filename"])
        if kept is not None:
            return ranged(kept, str(shown["content_type"]), range_header)
    return await serve_file(resources, item, range_header, request.method == "HEAD")


@answered
async def delete_asset(request: Request) -> Response:
    asset_id = request.path_params["id"]
    index = prompts(app_state(request))
    record = await index.asset(asset_id)
    if record is None or not may_see(owner_of(request), record.get("owner")):
        raise V2Error(404, "not_found", f"no asset {asset_id}")
    await index.delete_asset(asset_id)
    return Response(status_code=204)
