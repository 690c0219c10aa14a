"""Hosted workflows as the endpoints and `start_job` use them: the folder, the running ComfyUI's
`/object_info` they are checked against, and the steps of each call (register, describe, list,
prepare a run). Owned by the lifespan (`Resources.workflows`).

`/object_info` is read once per ComfyUI process (the supervisor's generation) and again when a
caller asks (`?refresh=true`), or when a check fails on something a newer answer could fix (an
unknown class or option: a custom node or model added since), at most every `REFRESH_MIN_AGE` s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

from ..core.request import check_nodes, decode_body, split_workflow
from ..core.uiformat import UIFormatWorkflow
from ..errors import InvalidParams
from .conversion import convert_with
from .openapi import openapi_document
from .overrides import merge, parse_overrides
from .schema import ObjectInfo, Parameter, build_schema
from .store import Stored, WorkflowStore, validate_workflow_id
from .validate import REFRESHABLE, Problem, prompt_error, summary, validate_overrides, validate_workflow

REFRESH_MIN_AGE = 10.0
PARSE_IN_THREAD = 256 * 1024

T = TypeVar("T")


class ObjectInfoCache:
    """ComfyUI's `/object_info`, kept per ComfyUI generation; one read at a time."""

    def __init__(self, fetch: Callable[[], Awaitable[dict[str, Any]]], generation: Callable[[], int]) -> None:
        self._fetch = fetch
        self._generation = generation
        self._lock = asyncio.Lock()
        self._value: dict[str, Any] | None = None
        self._read_generation = -1
        self._read_at = 0.0

    async def get(self, refresh: bool = False) -> dict[str, Any]:
        """The cached answer, read again when asked, or when ComfyUI restarted since."""
        async with self._lock:
            if refresh or self._value is None or self._read_generation != self._generation():
                await self._read()
            assert self._value is not None
            return self._value

    async def newer(self, min_age: float) -> dict[str, Any] | None:
        """A fresh answer when the cached one is older than `min_age` seconds, else None."""
        async with self._lock:
            if self._value is not None and time.monotonic() - self._read_at < min_age:
                return None
            await self._read()
            return self._value

    async def _read(self) -> None:
        generation = self._generation()
        self._value = await self._fetch()
        self._read_generation, self._read_at = generation, time.monotonic()


@dataclass(frozen=True, slots=True)
class Described:
    """A stored workflow with what `/object_info` says of it."""

    stored: Stored
    title: str
    parameters: list[Parameter]

    def summary(self) -> dict[str, Any]:
        return {
            "workflow_id": self.stored.workflow_id,
            "title": self.title,
            "parameters": len(self.parameters),
            "modified": self.stored.modified_iso,
        }

    def to_payload(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "parameters": [p.to_payload() for p in self.parameters],
            "workflow": self.stored.workflow,
        }


class HostedWorkflows:
    """The registry's operations; each refusal is an `InvalidParams` (with ComfyUI-shaped
    `node_errors` in `raw`) or a `NotFound`."""

    def __init__(
        self, store: WorkflowStore, object_info: ObjectInfoCache, loaders: Collection[tuple[str, str]]
    ) -> None:
        self.store = store
        self.object_info = object_info
        self.loaders = frozenset(loaders)

    def describe_with(self, stored: Stored, info: ObjectInfo) -> Described:
        # Its title is the name it was registered under: a node's title (every SaveImage is "保存图像"
        # in a Chinese ComfyUI) would name every workflow alike.
        return Described(stored, stored.workflow_id, build_schema(stored.workflow, info, self.loaders))

    async def describe(self, workflow_id: str, refresh: bool = False) -> Described:
        stored = await self.store.read(workflow_id)
        return self.describe_with(stored, await self.object_info.get(refresh))

    async def summaries(self, refresh: bool = False) -> list[dict[str, Any]]:
        stored = await self.store.all()
        info = await self.object_info.get(refresh) if stored else {}
        return [self.describe_with(item, info).summary() for item in stored]

    async def openapi(self, workflow_id: str, server_url: str, refresh: bool = False) -> dict[str, Any]:
        described = await self.describe(workflow_id, refresh)
        return openapi_document(workflow_id, described.parameters, server_url)

    async def delete(self, workflow_id: str) -> None:
        await self.store.delete(workflow_id)

    async def register(self, workflow_id: str, body: bytes | str) -> tuple[Described, bool]:
        """Validate against the running ComfyUI, then store (a UI-format workflow converted
        first); True when it was new."""
        validate_workflow_id(workflow_id)  # a bad id is refused before the body is looked at
        try:
            workflow, extra_data = await _in_thread(len(body), lambda: split_workflow(decode_body(body)))
        except UIFormatWorkflow as ui:  # stored converted: the API format, titles in `_meta.title`
            workflow, extra_data = (await convert_with(self.object_info, ui.document, len(body))).prompt, ui.extra_data
            check_nodes(workflow)
        if extra_data is not None:
            raise InvalidParams("extra_data is not stored with a workflow: send it with each run")
        info, _ = await self._checked(
            lambda info: (validate_workflow(workflow, info, self.loaders), None),
            "the workflow failed validation against ComfyUI's /object_info",
        )
        created = await self.store.write(workflow_id, workflow)
        stored = await self.store.read(workflow_id)
        return self.describe_with(stored, info), created

    async def prepare_run(
        self, workflow_id: str, body: bytes | str
    ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
        """The stored workflow with the body's overrides merged in, checked, the body's
        extra_data and its `output` options; nothing reaches ComfyUI when anything is wrong."""
        stored = await self.store.read(workflow_id)
        document = await _in_thread(len(body), lambda: decode_body(body) if body and body.strip() else None)

        Prepared = tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]

        def check(info: ObjectInfo) -> tuple[list[Problem], Prepared | None]:
            parsed = parse_overrides(document, stored.workflow, info)
            parameters = build_schema(stored.workflow, info, self.loaders)
            problems = parsed.problems + validate_overrides(parsed.values, parameters, stored.workflow)
            if problems:
                return problems, None
            merged = merge(stored.workflow, parsed.values)
            return validate_workflow(merged, info, self.loaders), (merged, parsed.extra_data, parsed.output)

        _, prepared = await self._checked(check, f"the run of hosted workflow {workflow_id!r} was refused")
        assert prepared is not None
        check_nodes(prepared[0])
        return prepared

    async def _checked(
        self, check: Callable[[ObjectInfo], tuple[list[Problem], T]], refusal: str
    ) -> tuple[ObjectInfo, T]:
        """Run `check`; on problems a newer `/object_info` could fix, once more with that; raise
        InvalidParams naming every problem left."""
        info = await self.object_info.get()
        problems, result = check(info)
        if any(problem.kind in REFRESHABLE for problem in problems):
            newer = await self.object_info.newer(REFRESH_MIN_AGE)
            if newer is not None:
                info = newer
                problems, result = check(info)
        if problems:
            raise InvalidParams(summary(problems, refusal), raw=prompt_error(problems))
        return info, result


async def _in_thread(size: int, work: Callable[[], T]) -> T:
    """Big bodies are decoded off the event loop, so other callers are not kept waiting."""
    return await asyncio.to_thread(work) if size >= PARSE_IN_THREAD else work()
