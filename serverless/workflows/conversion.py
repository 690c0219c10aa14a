"""UI-format workflows (the editor's own save) converted with the running ComfyUI's `/object_info`,
wherever an API-format one is accepted: a run (`start_job`), a registration, and
`POST /api/workflows/convert` (`{"prompt", "notes"}`). The conversion itself is pure
(`serverless.core.uiformat`); this is where it meets the `/object_info` cache.

A class the cached answer does not know is looked up once more in a newer answer (a custom node
installed since), at most every `REFRESH_MIN_AGE` s, before it is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..core.request import decode_body, split_workflow
from ..core.uiformat import Converted, UIFormatWorkflow, convert, is_ui_format
from ..errors import InvalidParams

if TYPE_CHECKING:
    from .hosting import ObjectInfoCache

REFRESH_MIN_AGE = 10.0
IN_THREAD = 256 * 1024  # from this size on, a conversion runs off the event loop


async def _convert(document: Mapping[str, Any], info: Mapping[str, Any], size: int) -> Converted:
    return await asyncio.to_thread(convert, document, info) if size >= IN_THREAD else convert(document, info)


async def convert_with(cache: ObjectInfoCache, document: Mapping[str, Any], size: int = 0) -> Converted:
    """The API format of `document`, read with the cached `/object_info` (a newer one when the
    cached one lacks a class); InvalidParams naming the classes ComfyUI does not have."""
    try:
        return await _convert(document, await cache.get(), size)
    except InvalidParams as exc:
        if not (isinstance(exc.raw, dict) and "missing" in exc.raw):
            raise
        newer = await cache.newer(REFRESH_MIN_AGE)
        if newer is None:
            raise
        return await _convert(document, newer, size)


def _document(body: bytes | str) -> Any:
    try:
        workflow, _ = split_workflow(decode_body(body))
    except UIFormatWorkflow as ui:
        return ui.document
    return workflow


async def convert_body(cache: ObjectInfoCache, body: bytes | str) -> Converted:
    """A convert request's body: a UI-format workflow, bare or under `"prompt"`, converted; an
    API-format one is answered as it is, with a note saying so."""
    document = await asyncio.to_thread(_document, body) if len(body) >= IN_THREAD else _document(body)
    if not is_ui_format(document):
        return Converted(document, ["already in the API format: returned as sent"])
    return await convert_with(cache, document, len(body))
