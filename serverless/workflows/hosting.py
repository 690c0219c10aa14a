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
from .environment import missing
from .openapi import openapi_document
from .overrides import merge, parse_overrides
from .refs import DEFAULT_ALIAS, WorkflowRef, parse_ref, parse_version, validate_alias
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
            "version": self.stored.number,
            "title": self.title,
            "parameters": len(self.parameters),
            "modified": self.stored.modified_iso,
            "lane": self.stored.lane,
        }

    def to_payload(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "parameters": [p.to_payload() for p in self.parameters],
            "workflow": self.stored.workflow,
        }


@dataclass(frozen=True, slots=True)
class PreparedRun:
    """A hosted run, checked: the workflow to send (overrides merged), the body's extra_data and
    `output` options, and which workflow and version it is."""

    workflow: dict[str, Any]
    extra_data: dict[str, Any] | None
    output: dict[str, Any] | None
    workflow_id: str
    version: int | None
    size: int  # bytes of the stored version's file
    lane: str = ""  # the fleet's lane it queues on, as registered ("": the default lane)


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
        kept = self._described.get(stored.ref)
        if kept is not None and kept[0] == key and kept[1].stored.workflow is stored.workflow:
            return kept[1]
        described = await _in_thread(stored.size, lambda: self.describe_with(stored, info))
        if len(self._described) >= KEPT and stored.ref not in self._described:
            self._described.pop(next(iter(self._described)))
        self._described[stored.ref] = (key, described)
        return described

    def size(self, ref: str) -> int:
        """Bytes of the workflow's file as last read (0 when not read yet)."""
        kept = self._described.get(ref)
        return kept[1].stored.size if kept is not None else 0

    async def resolve(self, ref: str | WorkflowRef, caller: str | None = None) -> Stored:
        """The version `ref` (`<id>`, `<id>@<n>`, `<id>@<alias>`) names, when `caller` may see the
        workflow: the bare id is the `default` alias's version when set, else the newest.
        NotFound for an unknown workflow, version or alias."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        head = await self.read(parsed.workflow_id, caller)
        number = parsed.version
        if number is None:
            number = await self.store.alias(head.workflow_id, parsed.alias or DEFAULT_ALIAS)
            if number is None and parsed.alias is not None:
                raise NotFound(f"workflow {head.workflow_id!r} has no alias {parsed.alias!r}")
        if number is None:
            return head
        return await self.store.read_version(head, number)

    async def describe(self, workflow_id: str, refresh: bool = False, caller: str | None = None) -> Described:
        stored = await self.resolve(workflow_id, caller)
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
        key = (described.stored.ref, variant)
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
        """Remove it, every version and alias with it: its owner only (another key: NotFound, or
        Conflict when it is shared). `<id>@<n>` removes that version only."""
        parsed = parse_ref(workflow_id)
        if parsed.version is not None:
            await self.delete_version(parsed.workflow_id, parsed.version, caller)
            return
        if parsed.alias is not None:
            raise InvalidParams("name a version to delete (<id>@<n>), or the workflow (<id>); not an alias")
        self._check_writable(await self.read(workflow_id, caller), caller)
        await self.store.delete(workflow_id)

    async def delete_version(self, workflow_id: str, number: int, caller: str | None = None) -> None:
        """Remove one version; Conflict while an alias names it, or when it is the only one."""
        head = await self.read(workflow_id, caller)
        self._check_writable(head, caller)
        await self.store.delete_version(head, number)

    async def versions(self, workflow_id: str, caller: str | None = None) -> dict[str, Any]:
        """`GET /api/workflows/{id}/versions`: each version (number, created, created_by, the
        aliases naming it), the aliases, and which version the bare id runs."""
        head = await self.read(workflow_id, caller)
        versions, aliases = await self.store.history(workflow_id)
        named: dict[int, list[str]] = {}
        for name, number in aliases.items():
            named.setdefault(number, []).append(name)
        return {
            "workflow_id": workflow_id,
            "newest": head.number,
            "current": aliases.get(DEFAULT_ALIAS, head.number),
            "versions": [version.to_payload(named.get(version.number, [])) for version in versions],
            "aliases": aliases,
        }

    async def set_alias(
        self, workflow_id: str, alias: str, body: bytes | str, caller: str | None = None
    ) -> dict[str, Any]:
        """`PUT /api/workflows/{id}/aliases/{alias}` `{"version": n}`: point the alias at version
        n (made or moved: promotion, rollback); its owner only."""
        validate_alias(alias)
        document = decode_body(body) if body and body.strip() else None
        number = document.get("version") if isinstance(document, dict) else None
        if isinstance(number, str):
            number = parse_version(number)
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise InvalidParams('the body must be {"version": n}, n a version number of the workflow')
        head = await self.read(workflow_id, caller)
        self._check_writable(head, caller)
        await self.store.set_alias(head, alias, number, caller)
        return {"workflow_id": workflow_id, "alias": alias, "version": number}

    async def delete_alias(self, workflow_id: str, alias: str, caller: str | None = None) -> None:
        validate_alias(alias)
        head = await self.read(workflow_id, caller)
        self._check_writable(head, caller)
        await self.store.delete_alias(workflow_id, alias)

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
        lane: str = "",
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
        created, number = await self.store.write(
            workflow_id, workflow, caller, shared, new=existing is None, by=by, lane=lane
        )
        stored = await self.store.read_version(await self.store.read(workflow_id), number)
        return await self.described(stored, info), created

    async def prepare_run(
        self, workflow_id: str, body: bytes | str, caller: str | None = None
    ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
        """`prepare`'s workflow, extra_data and `output` options."""
        prepared = await self.prepare(workflow_id, body, caller)
        return prepared.workflow, prepared.extra_data, prepared.output

    async def prepare(self, workflow_id: str, body: bytes | str, caller: str | None = None) -> PreparedRun:
        """The version `workflow_id` names (`<id>`, `<id>@<n>`, `<id>@<alias>`) with the body's
        overrides merged in, checked against what the instance has (`raw.missing` naming the node
        classes and models it lacks), the body's extra_data and its `output` options; nothing
        reaches ComfyUI when anything is wrong."""
        stored = await self.resolve(workflow_id, caller)
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

        refusal = f"the run of hosted workflow {stored.ref!r} was refused"
        _, prepared = await self._checked(check, refusal, stored.size + len(body))
        assert prepared is not None
        await _in_thread(stored.size, lambda: check_nodes(prepared[0]))
        merged, extra_data, output = prepared
        return PreparedRun(merged, extra_data, output, stored.workflow_id, stored.number, stored.size, stored.lane)

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
            raw = prompt_error(problems)
            lacking = missing(problems)
            if lacking is not None:
                raw["missing"] = lacking
            raise InvalidParams(summary(problems, refusal), raw=raw)
        return info, result


async def _in_thread(size: int, work: Callable[[], T]) -> T:
    """Big bodies are decoded off the event loop, so other callers are not kept waiting."""
    return await asyncio.to_thread(work) if size >= PARSE_IN_THREAD else work()
