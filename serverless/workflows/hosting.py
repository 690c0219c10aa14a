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
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

from ..core import jsontext
from ..core.request import check_nodes, decode_body, split_workflow
from ..core.uiformat import UIFormatWorkflow
from ..errors import Conflict, InvalidParams, NotFound
from .conversion import convert_with
from .openapi import openapi_document
from .overrides import merge, parse_overrides
from .schema import ObjectInfo, Parameter, build_schema
from .store import Stored, WorkflowStore, validate_workflow_id
from .validate import REFRESHABLE, Problem, prompt_error, summary, validate_overrides, validate_workflow

REFRESH_MIN_AGE = 10.0
PARSE_IN_THREAD = 256 * 1024
KEPT = 64  # workflows whose schema is kept derived
RENDERED_KEPT_BYTES = 64 * 1024 * 1024  # JSON answers kept rendered, all together

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
        # What a workflow's version says under an /object_info answer, derived once (a 4 MB
        # workflow's schema takes a second of CPU): workflow id -> (its key, the result).
        self._described: dict[str, tuple[tuple[Any, ...], Described]] = {}
        # Their JSON answers (describe; OpenAPI per server URL), least recently used dropped first.
        self._texts: OrderedDict[tuple[str, str], tuple[Described, bytes]] = OrderedDict()
        self._texts_bytes = 0

    def describe_with(self, stored: Stored, info: ObjectInfo) -> Described:
        # Its title is the name it was registered under: a node's title (every SaveImage is "保存图像"
        # in a Chinese ComfyUI) would name every workflow alike.
        return Described(stored, stored.workflow_id, build_schema(stored.workflow, info, self.loaders))

    async def read(self, workflow_id: str, caller: str | None = None) -> Stored:
        """The stored workflow, when `caller` (an API key's digest; None: keys off) may see it;
        NotFound otherwise, as for an unknown id."""
        stored = await self.store.read(workflow_id)
        if not stored.visible_to(caller):
            raise NotFound(f"no hosted workflow {workflow_id!r}")
        return stored

    async def visible(self, caller: str | None = None) -> list[Stored]:
        """Every workflow `caller` may see."""
        return [item for item in await self.store.all() if item.visible_to(caller)]

    async def described(self, stored: Stored, info: ObjectInfo) -> Described:
        """`describe_with`, once per workflow version and /object_info answer (off the event
        loop for a big workflow)."""
        key = (stored.version, stored.owner, stored.shared, id(info))
        kept = self._described.get(stored.workflow_id)
        if kept is not None and kept[0] == key and kept[1].stored is stored:
            return kept[1]
        described = await _in_thread(stored.size, lambda: self.describe_with(stored, info))
        if len(self._described) >= KEPT and stored.workflow_id not in self._described:
            self._described.pop(next(iter(self._described)))
        self._described[stored.workflow_id] = (key, described)
        return described

    def size(self, workflow_id: str) -> int:
        """Bytes of the workflow's file as last read (0 when not read yet)."""
        kept = self._described.get(workflow_id)
        return kept[1].stored.size if kept is not None else 0

    async def describe(self, workflow_id: str, refresh: bool = False, caller: str | None = None) -> Described:
        stored = await self.read(workflow_id, caller)
        return await self.described(stored, await self.object_info.get(refresh))

    async def summaries(self, refresh: bool = False, caller: str | None = None) -> list[dict[str, Any]]:
        stored = await self.visible(caller)
        info = await self.object_info.get(refresh) if stored else {}
        return [(await self.described(item, info)).summary() for item in stored]

    async def openapi(
        self, workflow_id: str, server_url: str, refresh: bool = False, caller: str | None = None
    ) -> dict[str, Any]:
        described = await self.describe(workflow_id, refresh, caller)
        return openapi_document(workflow_id, described.parameters, server_url)

    async def describe_json(self, workflow_id: str, refresh: bool = False, caller: str | None = None) -> bytes:
        """`describe`'s payload as JSON text, rendered once per version (off the event loop)."""
        described = await self.describe(workflow_id, refresh, caller)
        return await self._rendered(described, "", described.to_payload)

    async def openapi_json(
        self, workflow_id: str, server_url: str, refresh: bool = False, caller: str | None = None
    ) -> bytes:
        """`openapi`'s document as JSON text, rendered once per version and server URL."""
        described = await self.describe(workflow_id, refresh, caller)
        return await self._rendered(
            described,
            server_url,
            lambda: openapi_document(workflow_id, described.parameters, server_url),
        )

    async def _rendered(self, described: Described, variant: str, make: Callable[[], Any]) -> bytes:
        key = (described.stored.workflow_id, variant)
        kept = self._texts.pop(key, None)
        if kept is not None and kept[0] is described:
            self._texts[key] = kept  # the most recently used last
            return kept[1]
        text = await _in_thread(described.stored.size, lambda: jsontext.compact(make()))
        if kept is not None:
            self._texts_bytes -= len(kept[1])
        self._texts[key] = (described, text)
        self._texts_bytes += len(text)
        while self._texts_bytes > RENDERED_KEPT_BYTES and len(self._texts) > 1:
            _, (_, dropped) = self._texts.popitem(last=False)
            self._texts_bytes -= len(dropped)
        return text

    async def delete(self, workflow_id: str, caller: str | None = None) -> None:
        """Remove it: its owner only (another key: NotFound, or Conflict when it is shared)."""
        self._check_writable(await self.read(workflow_id, caller), caller)
        await self.store.delete(workflow_id)

    async def _existing(self, workflow_id: str, caller: str | None) -> Stored | None:
        try:
            stored = await self.store.read(workflow_id)
        except NotFound:
            return None
        self._check_writable(stored, caller)
        return stored

    @staticmethod
    def _check_writable(stored: Stored, caller: str | None) -> None:
        if not stored.writable_by(caller):
            raise Conflict(
                f"workflow id {stored.workflow_id!r} is taken by another API key: name another workflow",
                raw={"workflow_id": stored.workflow_id},
            )

    async def register(
        self,
        workflow_id: str,
        body: bytes | str,
        caller: str | None = None,
        shared: bool = False,
        by: str | None = None,
    ) -> tuple[Described, bool]:
        """Validate against the running ComfyUI, then store (a UI-format workflow converted
        first; as `caller`'s, other keys seeing it when `shared`); True when it was new.
        Conflict when another key registered that id."""
        validate_workflow_id(workflow_id)  # a bad id is refused before the body is looked at
        existing = await self._existing(workflow_id, caller)
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
            len(body),
        )
        existing = existing or await self._existing(workflow_id, caller)  # registered meanwhile?
        created = await self.store.write(workflow_id, workflow, caller, shared, new=existing is None, by=by)
        stored = await self.store.read(workflow_id)
        return await self.described(stored, info), created

    async def prepare_run(
        self, workflow_id: str, body: bytes | str, caller: str | None = None
    ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
        """The stored workflow with the body's overrides merged in, checked, the body's
        extra_data and its `output` options; nothing reaches ComfyUI when anything is wrong."""
        stored = await self.read(workflow_id, caller)
        document = await _in_thread(len(body), lambda: decode_body(body) if body and body.strip() else None)
        schemas: dict[int, list[Parameter]] = {}
        info = await self.object_info.get()
        schemas[id(info)] = (await self.described(stored, info)).parameters  # derived once per version

        Prepared = tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]

        def check(info: ObjectInfo) -> tuple[list[Problem], Prepared | None]:
            parsed = parse_overrides(document, stored.workflow, info)
            parameters = schemas.get(id(info)) or build_schema(stored.workflow, info, self.loaders)
            problems = parsed.problems + validate_overrides(parsed.values, parameters, stored.workflow)
            if problems:
                return problems, None
            merged = merge(stored.workflow, parsed.values)
            return validate_workflow(merged, info, self.loaders), (merged, parsed.extra_data, parsed.output)

        refusal = f"the run of hosted workflow {workflow_id!r} was refused"
        _, prepared = await self._checked(check, refusal, stored.size + len(body))
        assert prepared is not None
        await _in_thread(stored.size, lambda: check_nodes(prepared[0]))
        return prepared

    async def _checked(
        self, check: Callable[[ObjectInfo], tuple[list[Problem], T]], refusal: str, size: int = 0
    ) -> tuple[ObjectInfo, T]:
        """Run `check` (in a thread for a big workflow); on problems a newer `/object_info` could
        fix, once more with that; raise InvalidParams naming every problem left."""
        info = await self.object_info.get()
        problems, result = await _in_thread(size, lambda: check(info))
        if any(problem.kind in REFRESHABLE for problem in problems):
            newer = await self.object_info.newer(REFRESH_MIN_AGE)
            if newer is not None:
                info = newer
                problems, result = await _in_thread(size, lambda: check(newer))
        if problems:
            raise InvalidParams(summary(problems, refusal), raw=prompt_error(problems))
        return info, result


async def _in_thread(size: int, work: Callable[[], T]) -> T:
    """Big bodies are decoded off the event loop, so other callers are not kept waiting."""
    return await asyncio.to_thread(work) if size >= PARSE_IN_THREAD else work()
