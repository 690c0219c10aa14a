"""Queue and history endpoints: `/prompt`, `/queue`, `/interrupt`, `/free`, `/history`."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from aiohttp import web

from .state import EMULATOR
from .validation import error_body, validate_prompt

log = logging.getLogger(__name__)


async def post_prompt(request: web.Request) -> web.Response:
    """Validate and queue a prompt; 400 with ComfyUI's error body when nothing can run."""
    emu = request.app[EMULATOR]
    body = await request.json()
    number = emu.next_number(body)  # every POST takes a number, even a refused one
    if "prompt" not in body:
        error = error_body("no_prompt", "No prompt provided", "No prompt provided")
        return web.json_response({"error": error, "node_errors": {}}, status=400)
    prompt = body["prompt"]
    prompt_id = str(body.get("prompt_id", uuid.uuid4()))
    result = validate_prompt(emu.specs, emu.folders, prompt, body.get("partial_execution_targets"))
    extra_data = body.get("extra_data", {})
    if "client_id" in body:
        extra_data["client_id"] = body["client_id"]
    if not result.ok:
        log.warning("invalid prompt: %s", result.error)
        return web.json_response({"error": result.error, "node_errors": result.node_errors}, status=400)
    emu.queue.put([number, prompt_id, prompt, extra_data, result.outputs])
    return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors})


async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response(request.app[EMULATOR].queue_info())


async def get_queue(request: web.Request) -> web.Response:
    running, pending = request.app[EMULATOR].queue.snapshot()
    return web.json_response({"queue_running": running, "queue_pending": pending})


async def post_queue(request: web.Request) -> web.Response:
    """`{"clear": true}` empties the pending queue; `{"delete": [ids]}` removes pending prompts."""
    emu = request.app[EMULATOR]
    body = await request.json()
    if body.get("clear"):
        emu.queue.wipe()
    for prompt_id in body.get("delete", []):
        emu.queue.delete(prompt_id)
    return web.Response(status=200)


async def post_interrupt(request: web.Request) -> web.Response:
    """Interrupt the running prompt; with `{"prompt_id": ..}` only if that one is running."""
    emu = request.app[EMULATOR]
    body = await _json_or_empty(request)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    if not prompt_id or prompt_id in emu.queue.running_ids():
        emu.runtime.interrupt.set()
    else:
        log.info("Prompt %s is not currently running, skipping interrupt", prompt_id)
    return web.Response(status=200)


async def post_free(request: web.Request) -> web.Response:
    """`{"unload_models": bool, "free_memory": bool}`: flags the prompt worker applies before its
    next prompt (`worker.Worker._free`), as ComfyUI's queue flags are; it is woken to do so now."""
    emu = request.app[EMULATOR]
    body = await _json_or_empty(request)
    body = body if isinstance(body, dict) else {}
    emu.memory.request_free(body.get("unload_models", False) is True, body.get("free_memory", False) is True)
    emu.queue.wake()
    return web.Response(status=200)


async def get_history(request: web.Request) -> web.Response:
    query = request.rel_url.query
    max_items = int(query["max_items"]) if "max_items" in query else None
    offset = int(query["offset"]) if "offset" in query else -1
    return web.json_response(request.app[EMULATOR].queue.history(max_items=max_items, offset=offset))


async def get_history_item(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    if emu.config.history_delay:  # fault knob (hooks.py)
        await asyncio.sleep(emu.config.history_delay)
    if emu.config.history_garbage:
        return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
    return web.json_response(emu.queue.history(request.match_info["prompt_id"]))


async def post_history(request: web.Request) -> web.Response:
    """`{"clear": true}` forgets all history; `{"delete": [ids]}` forgets some entries."""
    emu = request.app[EMULATOR]
    body = await request.json()
    if body.get("clear"):
        emu.queue.wipe_history()
    for prompt_id in body.get("delete", []):
        emu.queue.delete_history(prompt_id)
    return web.Response(status=200)


async def _json_or_empty(request: web.Request) -> Any:
    try:
        return await request.json()
    except json.JSONDecodeError:
        return {}


ROUTES = [
    ("POST", "/prompt", post_prompt),
    ("GET", "/prompt", get_prompt),
    ("GET", "/queue", get_queue),
    ("POST", "/queue", post_queue),
    ("POST", "/interrupt", post_interrupt),
    ("POST", "/free", post_free),
    ("GET", "/history", get_history),
    ("GET", "/history/{prompt_id}", get_history_item),
    ("POST", "/history", post_history),
]
