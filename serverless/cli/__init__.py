"""`comfy-serverless`: run workflows, manage hosted workflows and follow tasks from a shell.

    comfy-serverless run WORKFLOW.json [--set 6.text="a cat" --set 3.seed=-1] [--out DIR]
    comfy-serverless run --workflow-id ID [--set ...] [--async] [--oss] [--format webp --quality 80]
    comfy-serverless run WORKFLOW.json --previews DIR     (the sampler's preview frames saved as they come)
    comfy-serverless workflows list | show ID | put ID FILE | rm ID
    comfy-serverless task TASK_ID [--out DIR | --json] | cancel TASK_ID | events TASK_ID [--follow] [--after N]
    comfy-serverless batch WORKFLOW.json --sweep 3.seed=1,2,3 --sweep 6.text=@prompts.txt [--zip] [--out DIR]
    comfy-serverless batch --workflow-id ID --items ITEMS.jsonl [--detach]
    comfy-serverless keys add --label NAME [--workflows a,b] [--raw no] [--rate 5/s] ... | list | revoke NAME

`--url` / COMFY_SERVERLESS_URL (default http://127.0.0.1:9000; `127.0.0.1:9000` means http),
`--api-key` / COMFY_SERVERLESS_API_KEY.

Exit codes (EXIT_CODES): 0 done; 1 the job failed (EXECUTION_FAILED, OUTPUT_ERROR, UNCLASSIFY);
2 bad usage (arguments, a bad --set, an unreadable file); 3 the server refused the request
(INVALID_PARAMS, PROMPT_ERROR, INPUT_ERROR, NOT_FOUND, UNAUTHORIZED, a conflict); 4 the server or
ComfyUI is unavailable, busy or timed out (no connection, COMFYUI_UNAVAILABLE, UNAVAILABLE, BUSY,
TIMEOUT, a URL
that is not this API); 5 the job was cancelled or interrupted (EXECUTION_INTERRUPTED); 130
interrupted by Ctrl-C; 141 (128 + SIGPIPE) when the reader of stdout went away (`| head`), quietly.
Errors are printed as one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..client import APIError, Client, ClientError, Event, NotServerless, Output, Result, TransportError
from ..client.calls import apply_overrides, split_key
from ..client.errors import from_payload
from ..client.results import parse_result
from ..client.sync import settings
from . import keys

EXIT_CODES = {"done": 0, "failed": 1, "usage": 2, "refused": 3, "unavailable": 4, "cancelled": 5, "pipe": 141}
REFUSED = ("INVALID_PARAMS", "PROMPT_ERROR", "INPUT_ERROR", "NOT_FOUND", "UNAUTHORIZED", "FORBIDDEN", "CONFLICT")
UNAVAILABLE = ("COMFYUI_UNAVAILABLE", "UNAVAILABLE", "BUSY", "TIMEOUT", "RATE_LIMITED")


class UsageError(Exception):
    """A bad argument the parser could not see (a --set, a file): exit 2."""


def exit_code(error: ClientError) -> int:
    if isinstance(error, TransportError | NotServerless):
        return EXIT_CODES["unavailable"]
    code = error.error_code if isinstance(error, APIError) else ""
    if code in REFUSED:
        return EXIT_CODES["refused"]
    if code in UNAVAILABLE:
        return EXIT_CODES["unavailable"]
    if code == "EXECUTION_INTERRUPTED":
        return EXIT_CODES["cancelled"]
    return EXIT_CODES["failed"]


def parse_set(text: str) -> tuple[str, Any]:
    """`6.text=a cat` -> ("6.text", "a cat"); the value is JSON when it parses (`3.seed=-1` is a number)."""
    key, equals, value = text.partition("=")
    if not equals:
        raise UsageError(f'--set {text!r}: expected <node_id>.<input>=<value>, e.g. 6.text="a cat"')
    try:
        split_key(key)
    except ValueError as exc:
        raise UsageError(f"--set {text!r}: {exc}") from None
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def read_json(path: str) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: not a JSON object")
    return value


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help="the API (env COMFY_SERVERLESS_URL)")
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="env COMFY_SERVERLESS_API_KEY")
    main = argparse.ArgumentParser(
        prog="comfy-serverless", parents=[common], description="Run ComfyUI workflows through the serverless API."
    )
    commands = main.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", parents=[common], help="run a workflow file or a hosted workflow")
    run.add_argument("workflow", nargs="?", help="an API-format workflow JSON file")
    run.add_argument("--workflow-id", help="run this hosted workflow instead")
    run.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="override an input")
    run.add_argument("--out", default=".", help="folder for the outputs (default: here)")
    run.add_argument("--async", dest="asynchronous", action="store_true", help="start it and print the task id")
    run.add_argument("--oss", action="store_true", help="upload the outputs to OSS")
    run.add_argument("--format", choices=("png", "jpeg", "jpg", "webp"), help="convert image outputs")
    run.add_argument("--quality", type=int, help="JPEG/WebP quality, 1..100")
    run.add_argument("--max-side", type=int, help="downscale image outputs")
    run.add_argument("--task-id", help="the task id to use")
    run.add_argument("--previews", metavar="DIR", help="save the sampler's previews here as they come (frames)")
    workflows = commands.add_parser("workflows", parents=[common], help="hosted workflows").add_subparsers(
        dest="action", required=True
    )
    workflows.add_parser("list", parents=[common])
    workflows.add_parser("show", parents=[common]).add_argument("workflow_id")
    put = workflows.add_parser("put", parents=[common])
    put.add_argument("workflow_id")
    put.add_argument("file")
    workflows.add_parser("rm", parents=[common]).add_argument("workflow_id")
    workflows.add_parser("versions", parents=[common]).add_argument("workflow_id")
    alias = workflows.add_parser("alias", parents=[common], help="point an alias at a version")
    alias.add_argument("workflow_id")
    alias.add_argument("alias")
    alias.add_argument("version", type=int)
    task = commands.add_parser("task", parents=[common], help="a task's summary")
    task.add_argument("task_id")
    shown = task.add_mutually_exclusive_group()
    shown.add_argument("--out", help="save a finished task's outputs in this folder")
    shown.add_argument("--json", action="store_true", help="the server's whole answer (base64 outputs too)")
    commands.add_parser("cancel", parents=[common], help="cancel a task").add_argument("task_id")
    events = commands.add_parser("events", parents=[common], help="a task's events")
    events.add_argument("task_id")
    events.add_argument("--follow", action="store_true", help="follow live until the task ends (resumable)")
    events.add_argument("--after", type=int, default=0, help="skip the first N events")
    batch = commands.add_parser("batch", parents=[common], help="run many items of a workflow as one batch")
    batch.add_argument("workflow", nargs="?", help="an API-format workflow JSON file")
    batch.add_argument("--workflow-id", help="a hosted workflow instead")
    batch.add_argument("--sweep", action="append", default=[], metavar="NODE.INPUT=V1,V2|@FILE", help="values to sweep")
    batch.add_argument("--zip", action="store_true", help="pair the sweeps' values instead of crossing them")
    batch.add_argument("--items", metavar="FILE", help="a JSON lines file: one object of overrides per item")
    batch.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="set for every item")
    batch.add_argument("--out", help="save every output here (and manifest.jsonl)")
    batch.add_argument("--oss", action="store_true", help="upload the outputs to OSS (the manifest beside them)")
    batch.add_argument("--priority", choices=("high", "normal", "low"))
    batch.add_argument("--detach", action="store_true", help="print the batch id and return")
    keys.add_parser(commands)
    return main


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)  # argparse itself exits 2 on bad usage
    if args.command == "keys":  # the keys file on this machine: no server is called
        try:
            print(keys.run(args))
        except keys.KeysUsage as exc:
            print(f"comfy-serverless: error: {exc}", file=sys.stderr)
            return EXIT_CODES["usage"]
        return EXIT_CODES["done"]
    try:
        url = checked_url(getattr(args, "url", None))
        with Client(url, getattr(args, "api_key", None)) as client:
            code = dispatch(client, args)
        sys.stdout.flush()  # here, where a closed pipe can still be told apart from a failure
        return code
    except BrokenPipeError:
        # The reader left (`| head`): no traceback, and none again when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CODES["pipe"]
    except UsageError as exc:
        print(f"comfy-serverless: error: {exc}", file=sys.stderr)
        return EXIT_CODES["usage"]
    except ClientError as exc:
        print(f"comfy-serverless: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print("comfy-serverless: interrupted", file=sys.stderr)
        return 130


def checked_url(url: str | None) -> str:
    """The API's base URL (`--url`, else the environment's, else the default); UsageError when it
    cannot be one (`ftp://…`, no host)."""
    base, _ = settings(url, None)
    scheme, _, rest = base.partition("://")
    if scheme not in ("http", "https") or not rest.strip("/"):
        raise UsageError(f"--url (or COMFY_SERVERLESS_URL) {base!r}: expected http://HOST:PORT, e.g. 127.0.0.1:9000")
    return base


def dispatch(client: Client, args: argparse.Namespace) -> int:
    if args.command == "run":
        return run(client, args)
    if args.command == "workflows":
        return workflows(client, args)
    if args.command == "task":
        return task(client, args)
    if args.command == "batch":
        from .batch import batch  # the bar and the sweep parsing, where a batch is run

        return batch(client, args)
    if args.command == "cancel":
        print(dumps(client.cancel(args.task_id)))
        return EXIT_CODES["done"]
    return events(client, args)


def dumps(value: Any) -> str:
    """JSON for a person: indented, and text as it is (Chinese titles, not `\\u` escapes)."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def run(client: Client, args: argparse.Namespace) -> int:
    from .progress import RunProgress  # rich only where a bar is drawn

    if args.workflow is None and args.workflow_id is None:
        raise UsageError("give a WORKFLOW.json file or --workflow-id ID")
    if args.workflow is not None and args.workflow_id is not None:
        raise UsageError("give a WORKFLOW.json file or --workflow-id ID, not both")
    overrides: dict[str, Any] | None = dict(parse_set(text) for text in args.set)
    workflow = read_json(args.workflow) if args.workflow else None
    if workflow is not None:  # a file: set its inputs here, so a --set naming no node is usage (2)
        try:
            workflow, overrides = apply_overrides(workflow, overrides or {}), None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    options: dict[str, Any] = {
        "output_oss": args.oss,
        "output_base64": not args.oss,
        "task_id": args.task_id,
        "output_format": args.format,
        "output_quality": args.quality,
        "output_max_side": args.max_side,
    }
    if args.previews is not None:
        options["previews"] = True
    if args.asynchronous:
        print(client.submit_async(workflow, workflow_id=args.workflow_id, overrides=overrides, **options))
        return EXIT_CODES["done"]
    frames = PreviewFolder(Path(args.previews)) if args.previews is not None else None
    with RunProgress(args.workflow_id or Path(args.workflow).stem) as bar:

        def on_event(event: Event) -> None:
            bar.update(event)
            if frames is not None:
                frames.keep(event)

        result = client.run(workflow, workflow_id=args.workflow_id, overrides=overrides, on_event=on_event, **options)
    report(result, Path(args.out))
    return EXIT_CODES["done"]


class PreviewFolder:
    """`run --previews DIR`: each preview as it comes, `preview-0001-step05.jpg` and on, so the
    folder holds the frames of the image forming, in order."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.count = 0

    def keep(self, event: Event) -> None:
        preview = event.preview
        if preview is None:
            return
        self.count += 1
        step = f"-step{preview.step:02d}" if preview.step is not None else ""
        (self.folder / f"preview-{self.count:04d}{step}.{preview.extension}").write_bytes(preview.content)


def report(result: Result, out: Path | None) -> None:
    """The outputs written to `out` (None: listed, not written) or where OSS has them, and the
    seeds, on stdout."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for output in result.outputs:
        if output.content is not None and out is not None:
            print(f"wrote {output.save(out / output.name)}")
        elif output.oss and output.oss.get("object"):
            # OSS regions keep their `oss-` prefix (as FC reports them); an S3 bucket's do not.
            scheme = "oss" if str(output.oss.get("region") or "").startswith("oss-") else "s3"
            where = f"{scheme}://{output.oss.get('bucket')}/{output.oss.get('object')}"
            print(f"{where}  {output.oss.get('url') or ''}")
        else:
            print(f"output {describe(output)}")
    for node_id, inputs in result.seeds.items():
        for name, value in inputs.items():
            print(f"seed {node_id}.{name}={value}")
    print(f"task {result.task_id}  prompt {result.prompt_id}  {result.execution_time}s")


def describe(output: Output) -> str:
    size = f"{output.size} bytes" if output.size is not None else "size unknown"
    return f"{output.name}  node {output.node_id}  {output.mime or output.type}  {size}"


def when(at: Any) -> str:
    """A summary's time (Unix seconds) in UTC, to the second."""
    if not isinstance(at, int | float):
        return str(at)
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def task(client: Client, args: argparse.Namespace) -> int:
    """A task's state and times, its outputs listed (`--out`: saved) or its error; `--json`: the
    server's answer as it is."""
    answer = client.task(args.task_id)
    if args.json:
        print(dumps(answer))
        return EXIT_CODES["done"]
    print(f"task {args.task_id}  {answer.get('state')}  {float(answer.get('percent') or 0):.0f}%")
    if answer.get("queue_position"):
        print(f"queue position {answer['queue_position']} of {answer.get('queue_size')}")
    times = [
        f"{name} {when(answer[name + '_at'])}" for name in ("created", "started", "ended") if answer.get(name + "_at")
    ]
    if times:
        print("  ".join(times))
    if isinstance(answer.get("result"), dict):
        report(parse_result(answer["result"]), Path(args.out) if args.out else None)
    if isinstance(answer.get("error"), dict):
        print(f"error {from_payload(answer['error'])}")
    return EXIT_CODES["done"]


def workflows(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        for item in client.workflows():
            print(f"{item['workflow_id']}\t{item.get('title')}\t{item.get('parameters')} parameters")
    elif args.action == "show":
        described = client.workflow(args.workflow_id)
        print(dumps({k: v for k, v in described.items() if k != "workflow"}))
    elif args.action == "put":
        described = client.register_workflow(args.workflow_id, read_json(args.file))
        version = f"@{described['version']}" if described.get("version") else ""
        print(f"{described['workflow_id']}{version}: {len(described['parameters'])} parameters")
    elif args.action == "versions":
        listed = client.versions(args.workflow_id)
        for item in listed["versions"]:
            print(f"{item['version']}\t{item['created']}\t{','.join(item['aliases'])}")
    elif args.action == "alias":
        moved = client.set_alias(args.workflow_id, args.alias, args.version)
        print(f"{moved['workflow_id']}@{moved['alias']} -> {moved['version']}")
    else:
        client.delete_workflow(args.workflow_id)
        print(f"{args.workflow_id}: deleted")
    return EXIT_CODES["done"]


def events(client: Client, args: argparse.Namespace) -> int:
    """Without --follow, the status log so far; with it, the events live until the terminal payload."""
    stream = (
        client.events(args.task_id, resume=args.after or None)
        if args.follow
        else iter(client.status(args.task_id, after=args.after))
    )
    for event in stream:
        print(event.text)
        if event.type == "error":
            return exit_code(from_payload(json.loads(event.text)))
    return EXIT_CODES["done"]
