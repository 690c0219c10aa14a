"""A batch as asked (pure): the workflow it runs, its items (a list of overrides, or a sweep of
parameter values crossed as a `product` or paired as a `zip`), and the run flags every item
gets. Items of a sweep are computed on demand (`Batch.item`): a 10,000-item grid is a few lists.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..core.request import RUN_QUERY_FLAGS
from ..errors import InvalidParams

Mode = Literal["product", "zip"]
MODES: tuple[Mode, ...] = ("product", "zip")
# The run flags an item takes from its batch (`stream`, `workflow_id`, `previews` make no sense here).
ITEM_FLAGS = tuple(flag for flag in RUN_QUERY_FLAGS if flag not in ("stream", "workflow_id", "previews"))
BODY_KEYS = frozenset({"workflow_id", "workflow", "items", "sweep", "mode", "item_webhooks", *ITEM_FLAGS})
ID_PREFIX = "batch-"
MAX_ITEMS = 10000  # the most items one batch may hold (a bigger one is INVALID_PARAMS: split it)


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch as stored: immutable once created. Item `i` runs as task `<id>-<i>`."""

    batch_id: str
    total: int
    workflow_id: str | None = None
    workflow: dict[str, Any] | None = field(default=None, repr=False)
    items: list[dict[str, Any]] | None = field(default=None, repr=False)
    sweep: dict[str, list[Any]] | None = field(default=None, repr=False)
    mode: Mode = "product"
    flags: dict[str, str] = field(default_factory=dict)  # the run flags (query) every item gets
    callback_url: str | None = field(default=None, repr=False)  # the batch's webhook, when it ends
    item_webhooks: bool = False  # each item's terminal payload to `callback_url` too
    owner: str | None = None  # the creator's key digest (API keys)
    base_url: str | None = None  # where the creator reached us: download links of `output_url`
    created: float = 0.0

    def task_id(self, index: int) -> str:
        return f"{self.batch_id}-{index}"

    def item(self, index: int) -> dict[str, Any]:
        """Item `index`'s overrides."""
        if self.items is not None:
            return self.items[index]
        sweep = self.sweep or {}
        if self.mode == "zip":
            return {name: values[index] for name, values in sweep.items()}
        chosen: dict[str, Any] = {}
        for name in reversed(list(sweep)):  # the last parameter varies fastest, as itertools.product
            values = sweep[name]
            index, position = divmod(index, len(values))
            chosen[name] = values[position]
        return {name: chosen[name] for name in sweep}

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> Batch:
        return cls(**json.loads(data))


def new_batch_id() -> str:
    return ID_PREFIX + uuid.uuid4().hex


def parse_batch(
    document: Any,
    query: Mapping[str, str],
    max_items: int,
    batch_id: str | None = None,
    owner: str | None = None,
    base_url: str | None = None,
    created: float = 0.0,
) -> Batch:
    """The batch a `POST /api/batches` body asks for (its flags may also be in the query, which
    wins); InvalidParams for any malformed part, before anything is stored or run."""
    if not isinstance(document, dict):
        raise InvalidParams("the body of a batch must be a JSON object")
    unknown = sorted(set(document) - BODY_KEYS)
    if unknown:
        raise InvalidParams(f"unknown batch field(s): {', '.join(unknown)[:200]}", raw={"known": sorted(BODY_KEYS)})
    workflow_id, workflow = document.get("workflow_id"), document.get("workflow")
    if (workflow_id is None) == (workflow is None):
        raise InvalidParams('a batch names a hosted "workflow_id" or carries a "workflow" (one of them)')
    if workflow_id is not None and (not isinstance(workflow_id, str) or not workflow_id):
        raise InvalidParams("workflow_id must be a text")
    if workflow is not None and (not isinstance(workflow, dict) or not workflow):
        raise InvalidParams("workflow must be a JSON object (the API format)")
    items, sweep, mode, total = _items(document, max_items)
    flags = {name: _flag_text(name, document[name]) for name in ITEM_FLAGS if name in document}
    flags.update({name: value for name, value in query.items() if name in ITEM_FLAGS})
    return Batch(
        batch_id=batch_id or new_batch_id(),
        total=total,
        workflow_id=workflow_id,
        workflow=workflow,
        items=items,
        sweep=sweep,
        mode=mode,
        flags={name: value for name, value in flags.items() if name != "callback_url"},
        callback_url=flags.get("callback_url") or None,
        item_webhooks=bool(document.get("item_webhooks")),
        owner=owner,
        base_url=base_url,
        created=created,
    )


def _items(
    document: dict[str, Any], max_items: int
) -> tuple[list[dict[str, Any]] | None, dict[str, list[Any]] | None, Mode, int]:
    items, sweep, mode = document.get("items"), document.get("sweep"), document.get("mode", "product")
    if (items is None) == (sweep is None):
        raise InvalidParams('a batch has "items" (a list of overrides) or a "sweep" (one of them)')
    if mode not in MODES:
        raise InvalidParams('mode must be "product" or "zip"', raw={"mode": str(mode)[:50]})
    if items is not None:
        if not isinstance(items, list) or not items:
            raise InvalidParams("items must be a non-empty list of overrides")
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise InvalidParams(f"item {index} is not an object of overrides", raw={"item": index})
        _cap(len(items), max_items)
        return items, None, mode, len(items)
    if not isinstance(sweep, dict) or not sweep:
        raise InvalidParams('sweep must be an object: {"<parameter>": [values...]}')
    for name, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise InvalidParams(f"sweep parameter {name[:64]!r} needs a non-empty list of values", raw={"param": name})
    lengths = [len(values) for values in sweep.values()]
    if mode == "zip" and len(set(lengths)) > 1:
        raise InvalidParams("a zip sweep's value lists must be as long as each other", raw={"lengths": lengths})
    total = lengths[0] if mode == "zip" else math.prod(lengths)
    _cap(total, max_items)
    return None, sweep, mode, total


def _cap(total: int, max_items: int) -> None:
    if total > max_items:
        raise InvalidParams(
            f"a batch holds at most {max_items} items; this one has {total}",
            raw={"items": total, "max_items": max_items},
        )


def _flag_text(name: str, value: Any) -> str:
    """A body's flag as the query would carry it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise InvalidParams(f"{name} must be a text, number or boolean")
