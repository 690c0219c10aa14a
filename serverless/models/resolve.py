"""A job's model references resolved before it is submitted: each distinct reference obtained
once from the store (concurrently), the workflow given the placed names, and `data.models`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from yarl import URL

from ..core.credentials import Credentials
from ..errors import InputError, ServerlessError
from ..inputs.download import DownloadPolicy, check_url
from ..inputs.resolve import BIG_WORKFLOW_NODES
from .refs import ModelInput, find_model_inputs
from .store import ModelStore, Placed


@dataclass(frozen=True, slots=True)
class Resolved:
    """The workflow ComfyUI receives, what `data.models` says, and the models it holds in use
    until `release` (None: it names none)."""

    workflow: dict[str, Any]
    models: list[dict[str, Any]]
    digests: list[str]
    release: Callable[[], None] | None = None


def check_references(
    workflow: Mapping[str, Any], extra: Mapping[tuple[str, str], str], policy: DownloadPolicy
) -> list[ModelInput]:
    """Refuse, before anything runs, a malformed reference or a URL the host policy blocks
    (what a gateway can tell without downloading: scheme, IP literals, MODEL_ALLOWED_HOSTS)."""
    found = find_model_inputs(workflow, extra)
    for item in found:
        if item.ref.kind == "url":
            try:
                check_url(URL(item.ref.location), policy)
            except (ServerlessError, ValueError) as exc:
                reason = exc.message if isinstance(exc, ServerlessError) else "invalid URL"
                raise _error(workflow, item, f"cannot download: {reason}") from exc
    return found


async def resolve_models(
    workflow: dict[str, Any],
    store: ModelStore | None,
    extra: Mapping[tuple[str, str], str],
    credentials: Credentials | None,
) -> Resolved:
    """`workflow` (a copy when it names models) with every reference replaced by its placed name,
    the models held in use (against eviction and delete, on every instance) until released."""
    if len(workflow) >= BIG_WORKFLOW_NODES:  # a big workflow's nodes are looked through off the event loop
        found = await asyncio.to_thread(find_model_inputs, workflow, extra)
    else:
        found = find_model_inputs(workflow, extra)
    if not found:
        return Resolved(workflow, [], [])
    if store is None:
        raise _error(workflow, found[0], "model references need MODELS_DIR on this instance")
    distinct: dict[tuple[str, str], ModelInput] = {}
    for item in found:
        distinct.setdefault((item.ref.location, item.folder), item)

    async def obtain(item: ModelInput) -> Placed:
        try:
            return await store.obtain(item.ref, item.folder, credentials)
        except ServerlessError as exc:
            raise _error(workflow, item, exc.message) from exc

    wanted = [(item.ref, item.folder) for item in distinct.values()]
    held = await _holding(functools.partial(store.hold_cached, wanted), _let_go_held)
    if held is not None:  # all in the store already (the usual case): placed and held in one hop
        hits, release = held
        store.metrics.hits.inc(len(hits))
        placed = dict(zip(distinct, hits, strict=True))
    else:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = {key: group.create_task(obtain(item)) for key, item in distinct.items()}
        except ExceptionGroup as eg:
            first = eg.exceptions[0]
            if isinstance(first, ServerlessError):
                raise first from first.__cause__
            raise
        placed = {key: task.result() for key, task in tasks.items()}
        digests = sorted({model.sha256 for model in placed.values()})
        release = await _holding(functools.partial(store.use, digests), _let_go)
    result = dict(workflow)  # only the nodes that change are copied
    for item in found:
        result[item.node_id] = dict(result[item.node_id])
    models = []
    for item in found:
        model = placed[(item.ref.location, item.folder)]
        node = result[item.node_id]
        node["inputs"] = {**node["inputs"], item.input_name: model.name}
        models.append(
            {
                "node_id": item.node_id,
                "input": item.input_name,
                "source": item.ref.shown,
                "name": model.name,
                "sha256": model.sha256,
                "bytes": model.bytes,
                "cached": model.cached,
                "download_s": model.download_s,
            }
        )
    return Resolved(result, models, sorted({m.sha256 for m in placed.values()}), release)


Release = Callable[[], None]
Held = tuple[list[Placed], Release]
R = TypeVar("R")


async def _holding(take: Callable[[], R], let_go: Callable[[R], None]) -> R:
    """`take` (which takes locks) in a thread; when the caller is cancelled meanwhile, what it
    took is let go of (`let_go`) once it returns."""
    taking = asyncio.ensure_future(asyncio.to_thread(take))
    try:
        return await asyncio.shield(taking)
    except asyncio.CancelledError:
        taking.add_done_callback(functools.partial(_when_taken, let_go))
        raise


def _when_taken(let_go: Callable[[R], None], taking: asyncio.Future[R]) -> None:
    if not taking.cancelled() and taking.exception() is None:
        let_go(taking.result())


def _let_go(release: Release) -> None:
    release()


def _let_go_held(held: Held | None) -> None:
    if held is not None:
        held[1]()


def _error(workflow: Mapping[str, Any], item: ModelInput, reason: str) -> InputError:
    class_type = workflow[item.node_id].get("class_type")
    message = f"node {item.node_id} ({class_type}) input '{item.input_name}': {reason}"
    raw = {"node_id": item.node_id, "class_type": str(class_type), "input_name": item.input_name, "reason": reason}
    return InputError(message, raw)
