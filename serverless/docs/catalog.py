"""What each route of the API is, for people (pure data): one `Operation` per method and path,
read by `openapi.build_document`. A route added to the app is one entry here; the test that
compares the app's routes with the document fails until it is written, and the one that calls
every documented path fails for an entry the app does not serve."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Where = Literal["query", "header", "path"]


@dataclass(frozen=True, slots=True)
class Param:
    """One query, header or path parameter."""

    name: str
    where: Where
    description: str
    type: str = "string"  # a JSON Schema type
    required: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """One response: status, description and, when it has a body, its media type and schema
    (a component name, or a JSON Schema type such as "string")."""

    status: str
    description: str
    schema: str | None = None
    media: str = "application/json"


@dataclass(frozen=True, slots=True)
class Operation:
    path: str
    method: str
    tag: str
    summary: str
    description: str = ""
    params: tuple[Param, ...] = ()
    body: str | None = None  # a component schema name
    body_required: bool = True
    replies: tuple[Reply, ...] = ()
    errors: tuple[str, ...] = ("400",)  # statuses answered with the error object
    operation_id: str = field(default="")


def flag(name: str, description: str) -> Param:
    return Param(name, "query", description + " (true unless absent, empty, 0 or false)", "boolean")


TASK_ID = Param("task_id", "query", "the task id (`^[A-Za-z0-9._-]{1,128}$`)", required=True)
WORKFLOW_ID = Param(
    "workflow_id",
    "path",
    "the hosted workflow's id; `<id>@<n>` names version n, `<id>@<alias>` an alias's",
    required=True,
)
BARE_WORKFLOW_ID = Param("workflow_id", "path", "the hosted workflow's id", required=True)
BASE64 = flag("output_base64", "each output's bytes in `output.base64.content`")
OSS = flag("output_oss", "each output uploaded to the bucket `STORAGE` names, OSS or S3 (`output.oss`)")
STREAM = flag("stream", "answer `text/event-stream`: ComfyUI's messages byte for byte, our events, then the result")
DELIVERY = (
    Param("output_format", "query", "convert image outputs: `png`, `jpeg` (`jpg`) or `webp`"),
    Param("output_quality", "query", "JPEG/WebP quality, 1..100", "integer"),
    Param("output_max_side", "query", "downscale image outputs so that no side is longer (keeps aspect)", "integer"),
    flag("output_url", "each output gets `output.url`, a signed `GET /api/files/{token}` link"),
    Param("callback_url", "query", "POST the terminal payload there when the job ends (signed webhook)"),
    Param("X-Callback-Url", "header", "the same as `callback_url`"),
)
TASK_HEADERS = (
    Param(
        "X-Fc-Invocation-Type",
        "header",
        '`Async`: answer 202 `{"task_id"}` at once (outside FC), follow the task with `status`, `task` or `events`',
    ),
    Param("X-Fc-Async-Task-Id", "header", "the task id (else `X-Fc-Trace-Id`, `X-Fc-Request-Id`, the prompt id)"),
    Param("X-Fc-Trace-Id", "header", "the task id when `X-Fc-Async-Task-Id` is absent"),
    Param("Idempotency-Key", "header", "a repeated POST with this key attaches to the task it started"),
)
PREVIEWS = flag(
    "previews",
    "sampler previews as `serverless_preview` events (`task_id`, `node`, `mime`, `base64`, `step`), at most "
    "4 a second, the newest winning; not numbered, not in the status log",
)
RUN_PARAMS = (BASE64, OSS, STREAM, PREVIEWS, *DELIVERY, *TASK_HEADERS)
RUN_REPLIES = (
    Reply("200", "the result (JSON), or with `stream` its events then the result", "Result"),
    Reply("202", "an async invocation outside FC: the task it started", "Accepted"),
)
SSE = Reply(
    "200", "server-sent events: `id:` and `data:` lines, the terminal payload last", "string", "text/event-stream"
)
RUN_ERRORS = ("400", "404", "409", "500", "503", "504")

OPERATIONS: tuple[Operation, ...] = (
    # -- the FC-compatible API ------------------------------------------------------------------
    Operation(
        "/api/serverless/run",
        "post",
        "run",
        "Run a workflow",
        'The body is a ComfyUI API-format workflow (or `{"prompt", "extra_data"}`). With `workflow_id`, '
        "a hosted workflow's overrides instead.",
        (*RUN_PARAMS, Param("workflow_id", "query", "run this hosted workflow; the body is its overrides")),
        "Workflow",
        True,
        (*RUN_REPLIES, SSE),
        RUN_ERRORS,
        "run",
    ),
    Operation(
        "/api/serverless/status",
        "get",
        "run",
        "A task's payloads so far (the status log)",
        "Done when the last element's `type` is `serverless_api` or `error`; `[]` for an unknown task.",
        (
            TASK_ID,
            Param("after", "query", "only the elements after the first N", "integer"),
            Param("attempt", "query", "the payloads of attempt K (FC retries)", "integer"),
        ),
        None,
        True,
        (Reply("200", "the payloads, oldest first", "StatusLog"),),
        ("400",),
        "status",
    ),
    Operation(
        "/api/serverless/ws",
        "get",
        "run",
        "Run a workflow over a websocket",
        "Upgrade to a websocket, send one text message (the run body), receive ComfyUI's messages, "
        "our events, then the terminal payload; the server closes.",
        (BASE64, OSS, PREVIEWS, Param("workflow_id", "query", "run this hosted workflow")),
        None,
        True,
        (Reply("101", "switching protocols"),),
        (),
        "websocket",
    ),
    Operation(
        "/api/serverless/health",
        "get",
        "operations",
        "Alive, and ComfyUI answers",
        replies=(Reply("200", "ComfyUI's summary, its queue, jobs here", "Health"),),
        errors=("503",),
        operation_id="health",
    ),
    Operation(
        "/initialize",
        "post",
        "fc",
        "FC initializer hook: wait for ComfyUI, prewarm",
        replies=(Reply("200", "ready", "object"),),
        errors=("401", "503"),
        operation_id="initialize",
    ),
    Operation(
        "/pre-stop",
        "get",
        "fc",
        "FC pre-stop hook: take no new jobs, wait for running ones",
        replies=(Reply("200", "drained", "object"),),
        errors=("401",),
        operation_id="preStop",
    ),
    Operation(
        "/pre-stop",
        "post",
        "fc",
        "FC pre-stop hook (POST)",
        replies=(Reply("200", "drained", "object"),),
        errors=("401",),
        operation_id="preStopPost",
    ),
    # -- tenants -------------------------------------------------------------------------------
    Operation(
        "/api/usage",
        "get",
        "operations",
        "Usage per API key",
        "Jobs by state, GPU seconds (ComfyUI's execution time), bytes of results sent and models "
        "downloaded, kept by the hour. A key reads its own; an admin key (`admin=yes` in "
        "API_KEYS_FILE) any key's by label, or every key's with `key=*` (403 FORBIDDEN otherwise).",
        params=(
            Param("since", "query", "Unix seconds or ISO 8601 (counted from its hour); default: as far back as kept"),
            Param("key", "query", "a key's label (an admin's call), or `*` for every key"),
        ),
        replies=(
            Reply(
                "200", '{"since", "keys": [{"key", "jobs", "gpu_seconds", "bytes_out", "models_downloaded"}]}', "object"
            ),
        ),
        errors=("400", "401", "403", "404"),
        operation_id="getUsage",
    ),
    # -- hosted workflows -----------------------------------------------------------------------
    Operation(
        "/api/workflows",
        "get",
        "workflows",
        "The hosted workflows",
        params=(flag("refresh", "re-read ComfyUI's object_info"),),
        replies=(Reply("200", "id, title, parameter count, modification time", "WorkflowList"),),
        errors=(),
        operation_id="listWorkflows",
    ),
    Operation(
        "/api/workflows/convert",
        "post",
        "workflows",
        "Convert a UI-format workflow to the API format",
        "The body is the editor's saved workflow (`nodes`, `links`, subgraphs; bare or under `prompt`). "
        "It is converted with the running ComfyUI's object_info as the editor would export it: widget "
        "values to inputs, links through reroutes, primitives, bypassed and muted nodes and subgraphs "
        "(inner nodes `<outer>:<inner>`), titles in `_meta.title`. `notes` tell what could not be kept. "
        "A node class ComfyUI lacks is INVALID_PARAMS with `raw.missing.nodes`. Every endpoint that "
        "takes an API-format workflow takes a UI-format one too, converted the same way.",
        body="Workflow",
        replies=(Reply("200", "the API-format prompt and notes", "Converted"),),
        errors=("400",),
        operation_id="convertWorkflow",
    ),
    Operation(
        "/api/workflows/{workflow_id}",
        "put",
        "workflows",
        "Register or replace a workflow",
        "Validated against the running ComfyUI's object_info, then stored on the shared disk (a UI-format "
        "workflow is converted first and stored in the API format). With API keys it is the caller's: other "
        "keys get 404 for it and 409 on its id, unless it is registered with shared=true.",
        (WORKFLOW_ID, flag("shared", "with API keys: other keys may read and run it (never replace or delete it)")),
        "Workflow",
        True,
        (Reply("200", "replaced", "WorkflowDescription"), Reply("201", "created", "WorkflowDescription")),
        ("400", "409"),
        "putWorkflow",
    ),
    Operation(
        "/api/workflows/{workflow_id}",
        "get",
        "workflows",
        "A workflow and its parameter schema",
        params=(WORKFLOW_ID, flag("refresh", "re-read ComfyUI's object_info")),
        replies=(Reply("200", "the stored workflow and its parameters", "WorkflowDescription"),),
        errors=("404",),
        operation_id="getWorkflow",
    ),
    Operation(
        "/api/workflows/{workflow_id}",
        "delete",
        "workflows",
        "Delete a workflow",
        params=(WORKFLOW_ID,),
        replies=(Reply("200", "deleted", "Deleted"),),
        errors=("404",),
        operation_id="deleteWorkflow",
    ),
    Operation(
        "/api/workflows/{workflow_id}/openapi.json",
        "get",
        "workflows",
        "The workflow's own OpenAPI document (its parameters as the request body)",
        params=(WORKFLOW_ID,),
        replies=(Reply("200", "an OpenAPI 3.1 document", "object"),),
        errors=("404",),
        operation_id="workflowOpenapi",
    ),
    Operation(
        "/api/workflows/{workflow_id}/run",
        "post",
        "workflows",
        "Run a hosted workflow",
        'The body holds overrides: `{"<node_id>.<input>": value}` (or `"<title>.<input>"` where the '
        "node's title is unique), the advanced or the simple form. See the workflow's own document "
        "for its parameters.",
        (WORKFLOW_ID, *RUN_PARAMS),
        "Overrides",
        False,
        (*RUN_REPLIES, SSE),
        RUN_ERRORS,
        "runWorkflow",
    ),
    Operation(
        "/api/workflows/{workflow_id}/versions",
        "get",
        "workflows",
        "A workflow's versions and aliases",
        "Each `PUT` makes an immutable version n; each is listed with when and by whom it was registered and "
        "the aliases naming it. `current` is what the bare id runs: the `default` alias's version, else the newest.",
        params=(BARE_WORKFLOW_ID,),
        replies=(Reply("200", "versions and aliases", "object"),),
        errors=("404",),
        operation_id="workflowVersions",
    ),
    Operation(
        "/api/workflows/{workflow_id}/versions/{version}",
        "delete",
        "workflows",
        "Delete one version",
        "Refused (409 CONFLICT) while an alias names it, or when it is the workflow's only version.",
        (BARE_WORKFLOW_ID, Param("version", "path", "the version number", "integer", True)),
        replies=(Reply("200", "deleted", "object"),),
        errors=("400", "404", "409"),
        operation_id="deleteWorkflowVersion",
    ),
    Operation(
        "/api/workflows/{workflow_id}/aliases/{alias}",
        "put",
        "workflows",
        "Point an alias at a version (promotion, rollback)",
        'The body is `{"version": n}`. `<id>@<alias>` then runs version n wherever an id is taken; the '
        "`default` alias is what the bare id runs.",
        (BARE_WORKFLOW_ID, Param("alias", "path", "a letter, then letters, digits, '.', '_' or '-'", required=True)),
        "object",
        True,
        (Reply("200", "the alias and its version", "object"),),
        ("400", "404", "409"),
        "putWorkflowAlias",
    ),
    Operation(
        "/api/workflows/{workflow_id}/aliases/{alias}",
        "delete",
        "workflows",
        "Remove an alias",
        params=(BARE_WORKFLOW_ID, Param("alias", "path", "the alias", required=True)),
        replies=(Reply("200", "deleted", "object"),),
        errors=("400", "404", "409"),
        operation_id="deleteWorkflowAlias",
    ),
    # -- job control (issue 13) -----------------------------------------------------------------
    Operation(
        "/api/serverless/task",
        "get",
        "jobs",
        "A task's summary, from any instance",
        params=(TASK_ID,),
        replies=(Reply("200", "state, percent, queue, times, result or error", "Task"),),
        errors=("400", "404"),
        operation_id="task",
    ),
    Operation(
        "/api/serverless/cancel",
        "post",
        "jobs",
        "Cancel a task, from any instance",
        params=(TASK_ID,),
        replies=(Reply("202", "cancelling", "Cancelling"),),
        errors=("400", "404", "409"),
        operation_id="cancel",
    ),
    Operation(
        "/api/serverless/events",
        "get",
        "jobs",
        "A task's events as SSE, resumable",
        "From the status log, then live until the terminal payload. `Last-Event-ID` (or `after`) resumes "
        "after that event, with the original stream's `id:` numbering.",
        (
            TASK_ID,
            Param("after", "query", "resume after event N", "integer"),
            Param("Last-Event-ID", "header", "resume after this event id"),
            PREVIEWS,
        ),
        None,
        True,
        (SSE,),
        ("400", "404"),
        "events",
    ),
    # -- models (issue 29) -----------------------------------------------------------------------
    Operation(
        "/api/models",
        "get",
        "models",
        "The models the store holds",
        "Each placed model: `folder`, `name` (as ComfyUI lists it), `sha256`, `bytes`, `source`, `pinned`, "
        "`last_used`. On a fleet's gateway: what its workers' stores published.",
        (Param("folder", "query", "only this models folder (checkpoints, loras, vae...)"),),
        replies=(Reply("200", '`{"models": [...]}`', "object"),),
        operation_id="listModels",
    ),
    Operation(
        "/api/models",
        "post",
        "models",
        "Import a model",
        'Body `{"source", "folder", "name"?, "sha256"?, "pin"?}`: `source` is `https://...`, `oss://bucket/key`, '
        "`s3://bucket/key` or `sha256:<hex>`. Runs as a task where the models live (a fleet: a worker); follow it "
        "with `task`, `events` or `status` (`serverless_progress` carries `bytes_done` and `bytes_total`). "
        "With API keys, a key is needed.",
        body_required=True,
        replies=(Reply("202", "the import's task", "Accepted"),),
        errors=("400", "401"),
        operation_id="importModel",
    ),
    Operation(
        "/api/models/{folder}/{name}",
        "delete",
        "models",
        "Delete a model",
        "Removes the placed name (and the file when no other name holds it). 409 while a running job uses it.",
        (
            Param("folder", "path", "the models folder", required=True),
            Param("name", "path", "the model's name", required=True),
        ),
        replies=(Reply("200", '`{"folder", "name"}` deleted', "object"),),
        errors=("400", "401", "404", "409"),
        operation_id="deleteModel",
    ),
    Operation(
        "/api/models/{folder}/{name}/pin",
        "put",
        "models",
        "Pin or unpin a model",
        'Body `{"pinned": true|false}`: a pinned model is never evicted under MODEL_CACHE_MAX_BYTES.',
        (
            Param("folder", "path", "the models folder", required=True),
            Param("name", "path", "the model's name", required=True),
        ),
        replies=(Reply("200", "the model's listing entry", "object"),),
        errors=("400", "401", "404"),
        operation_id="pinModel",
    ),
    Operation(
        "/api/tasks",
        "get",
        "jobs",
        "The tasks, newest first, a page at a time",
        "From the status store (the folder on a box, Redis on a fleet); with API keys, the caller's own. "
        "`next_cursor` (null at the end) asks for the next page.",
        (
            Param("state", "query", "queued, running, succeeded, failed or cancelled"),
            Param("workflow_id", "query", "a hosted workflow's tasks only"),
            Param("limit", "query", "rows per page, 1-200 (default 50)", "integer"),
            Param("cursor", "query", "the `next_cursor` of the previous page"),
        ),
        replies=(Reply("200", "a page of task summaries and the next cursor", "TaskList"),),
        errors=("400",),
        operation_id="tasks",
    ),
    Operation(
        "/api/fleet/dead-letters",
        "get",
        "operations",
        "The fleet's dead letters, newest first",
        "Queue entries no worker could read and jobs whose workers died under them twice; with API keys, "
        "the caller's own. Empty on one box (no queue).",
        (Param("limit", "query", "how many, 1-1000 (default 100)", "integer"),),
        replies=(Reply("200", '`{"dead_letters": [{id, task_id, priority, reason, worker, at}]}`', "object"),),
        errors=("400", "503"),
        operation_id="deadLetters",
    ),
    Operation(
        "/api/fleet/dead-letters/{letter_id}/requeue",
        "post",
        "operations",
        "Queue a dead letter again: its task runs once more, as a new attempt",
        params=(Param("letter_id", "path", "the dead letter's id", required=True),),
        replies=(Reply("202", "`{id, task_id, state: queued, entry}`", "object"),),
        errors=("400", "404", "503"),
        operation_id="requeueDeadLetter",
    ),
    Operation(
        "/api/fleet/workers",
        "get",
        "operations",
        "The fleet's live workers and what each holds",
        "Each worker's heartbeat: lane, whether it runs a job, resident models, model files, node classes "
        "(a count), VRAM. Empty on one box.",
        replies=(Reply("200", '`{"workers": [{name, lane, busy, resident_models, model_files, ...}]}`', "object"),),
        errors=("503",),
        operation_id="fleetWorkers",
    ),
    # -- result delivery (issue 14) -------------------------------------------------------------
    Operation(
        "/api/files/{token}",
        "get",
        "delivery",
        "Download an output through a signed link",
        params=(
            Param("token", "path", "the signed token from `output.url`", required=True),
            Param("format", "query", "png, jpeg or webp (covered by the signature)"),
            Param("q", "query", "quality (covered by the signature)", "integer"),
            Param("Range", "header", "a byte range (video)"),
        ),
        replies=(
            Reply("200", "the file", "string", "application/octet-stream"),
            Reply("206", "a byte range of the file", "string", "application/octet-stream"),
        ),
        errors=("403", "404"),
        operation_id="file",
    ),
    Operation(
        "/api/files/{token}/{name}",
        "get",
        "delivery",
        "The same download, named for saving",
        "GenStudio-compatible `get_task_info` links end in the file's name (its clients save under it).",
        params=(
            Param("token", "path", "the signed token", required=True),
            Param("name", "path", "the file's name (not checked)", required=True),
        ),
        replies=(Reply("200", "the file", "string", "application/octet-stream"),),
        errors=("403", "404"),
        operation_id="namedFile",
    ),
    # -- GenStudio-compatible API (issue 15): {"code", "msg", "data"} envelopes ------------------
    Operation(
        "/api/maas/comfy_task_api/prompt",
        "post",
        "genstudio",
        "Queue a hosted workflow's job",
        'Body `{"workflow_id", "prompt": {"<node_id>": {"inputs": {...}}}}` (overrides only). '
        'Answers at once `data: {"prompt_id", "prompt_token"}`.',
        params=(flag("previews", "keep the sampler's previews for the progress socket (`&previews=true` there)"),),
        body="object",
        replies=(Reply("200", "the envelope; code 0, or the error's code and msg", "object"),),
        errors=("401",),
        operation_id="genstudioPrompt",
    ),
    Operation(
        "/api/maas/comfy_task_api/get_task_info",
        "post",
        "genstudio",
        "Tasks' status, progress and files",
        'Body `{"comfy_task_ids": [...], "url_expire_period": 600, "image_post_process_cmd": '
        '{"format": "jpg", "quality": {"q": 80}}}`; status 1 queued, 2 running, 3 succeeded, '
        "4 failed, cancelled or unknown, 5 another key's.",
        body="object",
        replies=(Reply("200", "`data.comfy_task_info`: one entry per id", "object"),),
        errors=("401",),
        operation_id="genstudioTaskInfo",
    ),
    Operation(
        "/api/maas/comfy_task_api/cancel",
        "post",
        "genstudio",
        "Cancel tasks",
        'Body `{"comfy_task_id"}` or `{"comfy_task_ids": [...]}`.',
        body="object",
        replies=(Reply("200", "the envelope", "object"),),
        errors=("401",),
        operation_id="genstudioCancel",
    ),
    Operation(
        "/api/maas/comfy_task_api/upload/image",
        "post",
        "genstudio",
        "Upload an input image",
        "multipart/form-data, the image in the field `source_file`; `data.image_id` is then a "
        "LoadImage/LoadImageMask input.",
        replies=(Reply("200", "the envelope, `data.image_id`", "object"),),
        errors=("401",),
        operation_id="genstudioUpload",
    ),
    Operation(
        "/api/maas/comfy_task_ws_api/get_task_progress",
        "get",
        "genstudio",
        "Follow a task (websocket)",
        '`?authorization=<prompt_token>`; pushes `{"comfy_task_info": {...}}` on every change until '
        "the task ends, then closes. A missing, forged or expired token: 403 at the handshake.",
        (
            Param("authorization", "query", "the prompt_token", required=True),
            flag("previews", "also each newest sampler preview, as the last object with a `preview` member"),
        ),
        replies=(Reply("101", "switching protocols"),),
        errors=("403",),
        operation_id="genstudioProgress",
    ),
    # -- operations (issue 16) ------------------------------------------------------------------
    Operation(
        "/metrics",
        "get",
        "operations",
        "Prometheus metrics",
        replies=(Reply("200", "the Prometheus text format", "string", "text/plain"),),
        errors=("401",),
        operation_id="metrics",
    ),
    Operation(
        "/api/serverless/ready",
        "get",
        "operations",
        "Ready for work (for load balancers)",
        replies=(Reply("200", "ComfyUI answers, not draining, under MAX_PENDING_JOBS", "object"),),
        errors=("503",),
        operation_id="ready",
    ),
    # -- developer experience -------------------------------------------------------------------
    Operation(
        "/api/openapi.json",
        "get",
        "docs",
        "This document",
        replies=(Reply("200", "OpenAPI 3.1", "object"),),
        errors=(),
        operation_id="openapi",
    ),
    Operation(
        "/docs",
        "get",
        "docs",
        "The interactive reference (Swagger UI, served offline)",
        replies=(Reply("200", "an HTML page", "string", "text/html"),),
        errors=(),
        operation_id="docs",
    ),
    Operation(
        "/",
        "get",
        "docs",
        "The playground: pick or drop a workflow, fill its form, run it",
        replies=(Reply("200", "an HTML page", "string", "text/html"),),
        errors=(),
        operation_id="playground",
    ),
)


def _comfyui(path: str, method: str, summary: str, description: str = "", *params: Param) -> tuple[Operation, ...]:
    """One of ComfyUI's own routes, at its path and under `/api/` (as ComfyUI serves both)."""
    name = "comfyui" + "".join(part.strip("{}").title() for part in path.replace("_", "/").split("/")) + method.title()
    reply = Reply("101", "switching protocols") if path == "/ws" else Reply("200", "as ComfyUI answers", "object")
    return tuple(
        Operation(
            prefix + path,
            method,
            "comfyui",
            summary,
            description,
            params,
            None,
            False,
            (reply,),
            ("400", "404", "503"),
            name + ("Api" if prefix else ""),
        )
        for prefix in ("", "/api")
    )


PROMPT_ID = Param("prompt_id", "path", "the prompt id (our task id)", required=True)
COMFYUI_OPERATIONS: tuple[Operation, ...] = (
    *_comfyui(
        "/prompt",
        "post",
        "Queue a prompt (ComfyUI's API): a durable job of ours",
        '`{"prompt", "client_id"?, "prompt_id"?, "number"?, "front"?, "extra_data"?}` -> '
        '`{"prompt_id", "number", "node_errors"}`; refusals in ComfyUI\'s `{"error", "node_errors"}` shape.',
    ),
    *_comfyui("/prompt", "get", "How many prompts are queued or running"),
    *_comfyui("/queue", "get", "Prompts running and pending, as ComfyUI lists them"),
    *_comfyui("/queue", "post", 'Cancel queued prompts: `{"delete": [ids]}` or `{"clear": true}`'),
    *_comfyui("/interrupt", "post", 'Cancel the running prompt(s), or the one named by `{"prompt_id"}`'),
    *_comfyui(
        "/history",
        "get",
        "Ended prompts in ComfyUI's history shape",
        "",
        Param("max_items", "query", "at most N", "integer"),
    ),
    *_comfyui("/history", "post", 'Forget ended prompts: `{"delete": [ids]}` or `{"clear": true}`'),
    *_comfyui("/history/{prompt_id}", "get", "One ended prompt's history entry (`{}` before it ends)", "", PROMPT_ID),
    *_comfyui(
        "/view",
        "get",
        "An output file (kept by a fleet's worker, else read through ComfyUI)",
        "",
        Param("filename", "query", "the file's name", required=True),
        Param("subfolder", "query", "its subfolder"),
        Param("type", "query", "`output`, `temp` or `input`"),
    ),
    *_comfyui("/upload/image", "post", "Stage an input (multipart field `image`) under its content hash"),
    *_comfyui("/upload/mask", "post", "Stage a mask (multipart field `image`) under its content hash"),
    *_comfyui("/object_info", "get", "Every node class a worker's ComfyUI has"),
    *_comfyui(
        "/object_info/{node_class}", "get", "One node class", "", Param("node_class", "path", "its name", required=True)
    ),
    *_comfyui("/system_stats", "get", "A worker's ComfyUI's system stats"),
    *_comfyui("/embeddings", "get", "A worker's ComfyUI's embeddings"),
    # `GET /api/models` is ours (the model store, CONTRACT section 8); ComfyUI's answers at `/models`.
    *(op for op in _comfyui("/models", "get", "A worker's ComfyUI's model folders") if op.path != "/api/models"),
    *_comfyui(
        "/models/{folder}", "get", "The models in one folder", "", Param("folder", "path", "the folder", required=True)
    ),
    *_comfyui(
        "/ws",
        "get",
        "ComfyUI's websocket: the messages of this client's prompts, from any gateway",
        "",
        Param("clientId", "query", "the client id its prompts name"),
        Param("token", "query", "the API key, where API keys are on (browsers cannot send headers)"),
    ),
)


def _v2(path: str, method: str, summary: str, description: str = "", status: str = "200") -> Operation:
    """A Comfy API v2 route (its own OpenAPI is the reference: Comfy-Org/comfy-python-sdk spec/openapi.yaml)."""
    name = "v2" + "".join(
        part.strip("{}").title() for part in path.removeprefix("/api/v2").replace("-", "/").split("/")
    )
    params = tuple(
        Param(name, "path", f"the {name}", required=True) for name in ("id", "hash") if "{" + name + "}" in path
    )
    reply = Reply(status, "as Comfy API v2 describes", "string" if path.endswith("/events") else "object")
    if path.endswith("/events"):
        reply = Reply(status, "server-sent events: status, progress, output", "string", "text/event-stream")
    return Operation(
        path,
        method,
        "comfyv2",
        summary,
        description,
        params,
        None,
        False,
        (reply,),
        ("401", "404"),
        name + method.title(),
    )


V2_OPERATIONS: tuple[Operation, ...] = (
    _v2("/api/v2/jobs", "post", 'Submit a workflow (`{"workflow", "extra_data"?}`): a job', status="201"),
    _v2("/api/v2/jobs", "get", "Jobs, newest first (`limit`, `cursor`)"),
    _v2("/api/v2/jobs/{id}", "get", "A job: status, progress, outputs, error"),
    _v2("/api/v2/jobs/{id}/events", "get", "A job's events (SSE; ours: `id:` lines, `Last-Event-ID` resumes)"),
    _v2("/api/v2/jobs/{id}/cancel", "post", "Cancel a job (idempotent)"),
    _v2("/api/v2/jobs/{id}/workflow", "get", "The API-format workflow a job ran"),
    _v2("/api/v2/assets", "post", "Upload an asset (multipart `file`)", status="201"),
    _v2("/api/v2/assets/from-hash", "post", 'A new asset over bytes already here (`{"hash"}`)', status="201"),
    _v2("/api/v2/assets/by-hash/{hash}", "get", "Whether bytes of this blake3 hash are here (HEAD or GET)"),
    _v2("/api/v2/assets/{id}", "get", "An asset (uploaded, or a job's output)"),
    _v2("/api/v2/assets/{id}", "delete", "Forget an asset record", status="204"),
    _v2("/api/v2/assets/{id}/content", "get", "An asset's bytes (ranges served)"),
)
BATCH_ID = Param("batch_id", "path", "the batch's id (`batch-<hex>`)", required=True)
BATCH_OPERATIONS: tuple[Operation, ...] = (  # issue 34: serverless/batches
    Operation(
        "/api/batches",
        "post",
        "batches",
        "Run many items of one workflow as one batch",
        '`{"workflow_id" | "workflow", "items": [overrides...]}` or `{..., "sweep": {"<param>": [values...]}, '
        '"mode": "product" | "zip"}`, with the run flags (`output_oss`, `output_format`, `priority`, '
        "`callback_url`, `item_webhooks`...). Every item is checked first; each runs as task `<batch_id>-<index>`.",
        body="object",
        replies=(Reply("202", "`{batch_id, total, task_ids}`", "object"),),
        errors=("400", "404", "503"),
        operation_id="createBatch",
    ),
    Operation(
        "/api/batches/{batch_id}",
        "get",
        "batches",
        "A batch's counts by state, percent, ETA and a page of its items",
        params=(
            BATCH_ID,
            Param("offset", "query", "the first item listed", "integer"),
            Param("limit", "query", "items listed (default 100, at most 1000)", "integer"),
        ),
        replies=(Reply("200", "state, counts, percent, eta_s, items (task id, state, outputs)", "object"),),
        errors=("400", "404"),
        operation_id="batch",
    ),
    Operation(
        "/api/batches/{batch_id}/events",
        "get",
        "batches",
        "A batch's events as SSE, resumable",
        "`batch_item`, `batch_progress`, then `batch_end`; `Last-Event-ID` (or `after`) resumes.",
        (BATCH_ID, Param("after", "query", "resume after event N", "integer")),
        None,
        True,
        (SSE,),
        ("400", "404"),
        "batchEvents",
    ),
    Operation(
        "/api/batches/{batch_id}/cancel",
        "post",
        "batches",
        "Cancel a batch: items not submitted dropped, queued and running ones cancelled",
        params=(BATCH_ID,),
        body_required=False,
        replies=(Reply("202", "cancelling", "object"),),
        errors=("400", "404", "409"),
        operation_id="cancelBatch",
    ),
    Operation(
        "/api/batches/{batch_id}/retry",
        "post",
        "batches",
        "Run a batch's failed items again (new attempts of the same tasks)",
        params=(BATCH_ID,),
        body_required=False,
        replies=(Reply("202", "`{batch_id, retried, task_ids}`", "object"),),
        errors=("400", "404", "409"),
        operation_id="retryBatch",
    ),
    Operation(
        "/api/batches/{batch_id}/manifest",
        "get",
        "batches",
        "A batch's manifest: one JSON line per item (parameters, task, state, outputs)",
        params=(BATCH_ID,),
        replies=(Reply("200", "JSON lines", "string", "application/x-ndjson"),),
        errors=("400", "404"),
        operation_id="batchManifest",
    ),
)
OPERATIONS = OPERATIONS + COMFYUI_OPERATIONS + V2_OPERATIONS + BATCH_OPERATIONS

ERROR_TEXT = {
    "400": "INVALID_PARAMS, PROMPT_ERROR or INPUT_ERROR",
    "401": "UNAUTHORIZED",
    "403": "FORBIDDEN (an API key out of its scope) or UNAUTHORIZED (a tampered or expired link)",
    "429": "RATE_LIMITED: the API key's rate= (with Retry-After)",
    "404": "NOT_FOUND",
    "409": (
        "a conflict: the task already ended, an Idempotency-Key reused with another body, or (with API keys) "
        "a task or workflow id another key used first"
    ),
    "500": "EXECUTION_FAILED, EXECUTION_INTERRUPTED, OUTPUT_ERROR or UNCLASSIFY",
    "503": "COMFYUI_UNAVAILABLE, BUSY (with Retry-After) or draining",
    "504": "TIMEOUT",
}
TAGS = {
    "run": "Run workflows (FC-compatible)",
    "workflows": "Hosted workflows: register once, run with parameters",
    "jobs": "Job control: summary, cancel, resumable events",
    "delivery": "Result delivery",
    "models": "Models on demand: the content-addressed model store",
    "operations": "Health, readiness, metrics",
    "fc": "Function Compute lifecycle hooks",
    "docs": "This reference and the playground",
    "genstudio": "GenStudio-compatible API: its clients change only their base URL and key",
    "comfyui": "ComfyUI's own API on its paths (and under /api/): every prompt a durable job",
    "comfyv2": "Comfy API v2 (its clients, e.g. comfy-sdk, with COMFY_BASE_URL pointing here)",
}
