"""A batch's items as jobs: each checked before anything runs (`check_batch`), then started as
an ordinary async task of ours (`submit_item`), whose id the batch gave it up front.

A hosted batch's item is a hosted run with the item's overrides as its body (the same resolver,
so `{id}@{n}` versions resolve as they do for `POST /api/workflows/{id}/run`); a batch carrying
its workflow gets each item's overrides merged into a copy of it, read as a hosted run's are.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..core.workflow import copy_json
from ..delivery.convert import parse_conversion
from ..errors import InvalidParams
from ..jobs.runner import JobRunner
from ..resources import Resources
from ..transports.start import job_priority, start_job
from ..workflows.overrides import merge, parse_overrides
from ..workflows.validate import prompt_error, summary, validate_workflow
from .spec import Batch

YIELD_EVERY = 50  # items checked between two looks at the event loop


async def check_batch(resources: Resources, batch: Batch) -> None:
    """Refuse (INVALID_PARAMS naming the item) a batch any item of which would be refused."""
    flags = batch.flags
    job_priority(flags)
    parse_conversion(flags.get("output_format"), flags.get("output_quality"), flags.get("output_max_side"))
    if _true(flags.get("output_oss")) and resources.storage is None:
        raise InvalidParams("output_oss was asked but OSS is not configured (set OSS_BUCKET_DOMAIN, or STORAGE=s3)")
    if _true(flags.get("output_url")) and not resources.settings.security.file_link_secret:
        raise InvalidParams("output_url was asked but download links are not configured (set FILE_LINK_SECRET)")
    if batch.callback_url is not None:
        await resources.webhooks.check(batch.callback_url)
    for index in range(batch.total):
        try:
            await item_workflow(resources, batch, index)
        except InvalidParams as exc:
            raw = {"item": index, "task_id": batch.task_id(index), "parameters": batch.item(index), "error": exc.raw}
            raise InvalidParams(f"item {index}: {exc.message}", raw=raw) from None
        if index % YIELD_EVERY == YIELD_EVERY - 1:
            await asyncio.sleep(0)


async def item_workflow(resources: Resources, batch: Batch, index: int) -> dict[str, Any]:
    """Item `index`'s workflow, checked (InvalidParams when it would be refused)."""
    overrides = batch.item(index)
    if batch.workflow_id is not None:
        workflow, _, _ = await resources.workflows.prepare_run(batch.workflow_id, json.dumps(overrides), batch.owner)
        return workflow
    assert batch.workflow is not None
    info = await resources.workflows.object_info.get()
    parsed = parse_overrides(overrides, batch.workflow, info)
    problems = list(parsed.problems)
    merged = merge(batch.workflow, parsed.values) if not problems else copy_json(batch.workflow)
    problems += validate_workflow(merged, info, resources.workflows.loaders) if not problems else []
    if problems:
        raise InvalidParams(summary(problems, "the item's workflow was refused"), raw=prompt_error(problems))
    return merged


async def submit_item(resources: Resources, jobs: JobRunner, batch: Batch, index: int) -> None:
    """Start item `index` as an async task (a new attempt when it ran before)."""
    headers = {"x-fc-invocation-type": "Async", "x-fc-async-task-id": batch.task_id(index)}
    query = dict(batch.flags)
    if batch.item_webhooks and batch.callback_url:
        query["callback_url"] = batch.callback_url
    if batch.workflow_id is not None:
        body = json.dumps(batch.item(index), ensure_ascii=False)
    else:
        body = json.dumps({"prompt": await item_workflow(resources, batch, index)}, ensure_ascii=False)
    await start_job(
        resources,
        jobs,
        body,
        query,
        headers,
        "http",
        batch.workflow_id,
        base_url=batch.base_url,
        owner=batch.owner,
    )


def _true(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false")
