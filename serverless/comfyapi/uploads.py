"""ComfyUI's `/upload/image` and `/upload/mask` staged the way our inputs are: a file named by its
content hash, which the job's own ComfyUI gets.

    Inputs
    ├── ComfyUIInputs   one box: written into this instance's ComfyUI input folder at once
    └── RedisInputs     a fleet (a gateway has no ComfyUI): kept in Redis; a prompt naming it
                        carries it as a `data:` URI, which the worker's input resolver writes
                        into its ComfyUI's input folder under the same name
"""

from __future__ import annotations

import base64
import hashlib
from email import policy
from email.parser import BytesParser
from typing import Any, Protocol

from redis import asyncio as aioredis

from ..comfyui.client import ComfyUI
from ..core.media import sniff
from ..errors import InvalidParams
from ..status import keys
from ..status.redis import translated

HASH_CHARS = 32  # as the input resolver names fetched inputs: the same bytes, the same file


def staged_name(data: bytes) -> tuple[str, str]:
    """(the name an upload is staged under, its mime): its content hash and sniffed extension."""
    sniffed = sniff(data)
    if sniffed is None:
        raise InvalidParams("the upload is not a file ComfyUI loads (an image, a video or audio)")
    return f"{hashlib.sha256(data).hexdigest()[:HASH_CHARS]}.{sniffed[0]}", sniffed[1]


def form_fields(body: bytes, content_type: str) -> dict[str, bytes]:
    """The fields of a multipart form (the stdlib's MIME parser: blocking, run it in a thread
    for big bodies)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidParams("uploads take multipart/form-data with the file in the field image")
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise InvalidParams("the multipart body could not be read")
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = payload
    return fields


class Inputs(Protocol):
    async def stage(self, data: bytes) -> str:
        """Keep an upload where the next job finds it; returns its name (a LoadImage input)."""
        ...

    async def inline(self, workflow: dict[str, Any], loaders: frozenset[tuple[str, str]]) -> dict[str, Any]:
        """The workflow with its loader inputs naming staged uploads made to carry them."""
        ...

    async def read(self, name: str) -> bytes | None:
        """A staged upload's bytes where they are kept apart from ComfyUI (None: ask ComfyUI's
        input folder, `/view?type=input`)."""
        ...


class ComfyUIInputs:
    """One box: uploads go straight into its ComfyUI's input folder."""

    def __init__(self, comfy: ComfyUI) -> None:
        self.comfy = comfy

    async def stage(self, data: bytes) -> str:
        name, _ = staged_name(data)
        return await self.comfy.upload_input(data, name)

    async def inline(self, workflow: dict[str, Any], loaders: frozenset[tuple[str, str]]) -> dict[str, Any]:
        return workflow

    async def read(self, name: str) -> bytes | None:
        return None


class RedisInputs:
    """A fleet: uploads kept in Redis `ttl` seconds, carried by the prompts that name them."""

    def __init__(self, client: aioredis.Redis, ttl: int) -> None:
        self.client = client
        self.ttl = ttl

    async def stage(self, data: bytes) -> str:
        name, _ = staged_name(data)
        with translated():
            await self.client.set(keys.comfy_upload(name), data, ex=self.ttl)
        return name

    async def inline(self, workflow: dict[str, Any], loaders: frozenset[tuple[str, str]]) -> dict[str, Any]:
        named = [
            (node_id, field, value)
            for node_id, node in workflow.items()
            if isinstance(node, dict) and isinstance(node.get("inputs"), dict)
            for field, value in node["inputs"].items()
            if (node.get("class_type"), field) in loaders and isinstance(value, str) and len(value) < 200
        ]
        if not named:
            return workflow
        with translated():
            found = await self.client.mget([keys.comfy_upload(value) for _, _, value in named])
        changed = {node_id: dict(node) for node_id, node in workflow.items()}
        for (node_id, field, _), data in zip(named, found, strict=True):
            if not isinstance(data, bytes):
                continue  # a file the workers' ComfyUI holds already, or none: ComfyUI will tell
            _, mime = staged_name(data)
            inputs = {**changed[node_id]["inputs"], field: f"data:{mime};base64,{base64.b64encode(data).decode()}"}
            changed[node_id] = {**changed[node_id], "inputs": inputs}
        return changed

    async def read(self, name: str) -> bytes | None:
        with translated():
            data: Any = await self.client.get(keys.comfy_upload(name))
        return bytes(data) if data is not None else None
