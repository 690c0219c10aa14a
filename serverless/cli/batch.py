"""`comfy-serverless batch`: a sweep (`--sweep 3.seed=1,2,3 --sweep 6.text=@prompts.txt`) or a
file of items run as one batch, followed with a bar until it ends; `--out DIR` saves every
output (`<index>_<name>`) and the manifest (`manifest.jsonl`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..client import Client
from ..client.calls import apply_overrides
from ..client.results import parse_result
from . import EXIT_CODES, UsageError, parse_set, read_json
from .progress import BatchProgress


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """`3.seed=1,2,3` -> ("3.seed", [1, 2, 3]); `6.text=@prompts.txt` -> one value per line."""
    key, value = parse_set(text)
    raw = text.partition("=")[2]
    if raw.startswith("@"):
        try:
            lines = Path(raw[1:]).read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"--sweep {text!r}: {exc}") from None
        values: list[Any] = [line for line in lines if line.strip()]
    else:
        values = [_value(part) for part in raw.split(",")] if not isinstance(value, list) else value
    if not values:
        raise UsageError(f"--sweep {text!r}: no values")
    return key, values


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_items(path: str) -> list[dict[str, Any]]:
    try:
        lines = Path(path).read_text().splitlines()
        items = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    if not items or not all(isinstance(item, dict) for item in items):
        raise UsageError(f"{path}: expected one JSON object of overrides per line")
    return items


def batch(client: Client, args: argparse.Namespace) -> int:
    if (args.workflow is None) == (args.workflow_id is None):
        raise UsageError("give a WORKFLOW.json file or --workflow-id ID (one of them)")
    if bool(args.sweep) == bool(args.items):
        raise UsageError("give --sweep (one or more) or --items FILE")
    common = dict(parse_set(text) for text in args.set)
    workflow = read_json(args.workflow) if args.workflow else None
    if workflow is not None and common:
        try:
            workflow, common = apply_overrides(workflow, common), {}
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    sweep = dict(parse_sweep(text) for text in args.sweep) if args.sweep else None
    items = read_items(args.items) if args.items else None
    if sweep is not None:
        sweep = {**{key: [value] for key, value in common.items()}, **sweep}
    if items is not None:
        items = [{**common, **item} for item in items]
    options = {"output_oss": args.oss, "output_base64": bool(args.out) and not args.oss}
    created = client.batch(
        workflow,
        workflow_id=args.workflow_id,
        items=items,  # type: ignore[arg-type]
        sweep=sweep,
        mode="zip" if args.zip else "product",
        priority=args.priority,
        **options,
    )
    batch_id, total = str(created["batch_id"]), int(created["total"])
    print(f"batch {batch_id}  {total} items")
    if args.detach:
        return EXIT_CODES["done"]
    end = follow(client, batch_id, total, args.workflow_id or Path(args.workflow).stem)
    if args.out:
        save(client, batch_id, Path(args.out))
    counts = end.get("counts") or {}
    print(f"batch {batch_id}  {end.get('state')}  " + "  ".join(f"{k} {v}" for k, v in counts.items() if v))
    if end.get("manifest"):
        print(f"manifest {end['manifest'].get('url') or end['manifest'].get('object')}")
    return EXIT_CODES[{"succeeded": "done", "cancelled": "cancelled"}.get(str(end.get("state")), "failed")]


def follow(client: Client, batch_id: str, total: int, label: str) -> dict[str, Any]:
    """The batch's events with a bar, until `batch_end` (resumed where a stream broke off)."""
    last: str | None = None
    with BatchProgress(label, total) as bar:
        while True:
            for event in client.batch_events(batch_id, resume=last):
                last = event.id or last
                if isinstance(event.data, dict):
                    bar.update(event.data)
                if event.type == "batch_end":
                    return dict(event.data) if isinstance(event.data, dict) else {}
            rolled = client.batch_status(batch_id, limit=0)
            if rolled.get("state") not in ("running", "cancelling"):
                return rolled


def save(client: Client, batch_id: str, out: Path) -> None:
    """Every done item's outputs as `<index>_<name>`, and the manifest with the files' names."""
    out.mkdir(parents=True, exist_ok=True)
    lines, saved = [], 0
    for line in client.batch_manifest(batch_id):
        files = []
        if line.get("state") == "succeeded":
            result = client.task(str(line["task_id"])).get("result")
            for output in parse_result(result).outputs if isinstance(result, dict) else []:
                if output.content is not None:
                    files.append(output.save(out / f"{int(line['index']):05d}_{output.name}").name)
        saved += len(files)
        lines.append(json.dumps({**line, "files": files}, ensure_ascii=False))
    (out / "manifest.jsonl").write_text("".join(text + "\n" for text in lines))
    print(f"wrote {saved} file(s) and {out / 'manifest.jsonl'}")
