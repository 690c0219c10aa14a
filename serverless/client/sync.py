"""The synchronous client (httpx). One `Client` per server; close it, or use it as a context
manager. Every method raises the errors of `serverless.client.errors`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from .calls import (
    Call,
    RunOptions,
    alias_call,
    batch_call,
    batch_path,
    events_call,
    run_call,
    task_call,
    workflow_call,
)
from .errors import ProtocolError, TransportError
from .results import Event, Result, SSEParser, error_of, json_object, outcome

DEFAULT_URL = "http://127.0.0.1:9000"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=None)  # a run answers when it ends: no read deadline


def settings(url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The base URL and auth headers: arguments, else COMFY_SERVERLESS_URL / COMFY_SERVERLESS_API_KEY."""
    base = (url or os.environ.get("COMFY_SERVERLESS_URL") or DEFAULT_URL).strip().rstrip("/")
    if "://" not in base:  # `127.0.0.1:9000`, as people type it
        base = "http://" + base
    key = api_key or os.environ.get("COMFY_SERVERLESS_API_KEY")
    return base, ({"Authorization": f"Bearer {key}"} if key else {})


class Client:
    """`Client(url, api_key)`; `run`, `stream`, `submit_async`, `status`, `task`, `cancel`,
    `events`, and the hosted workflows (`register_workflow`, `workflows`, `workflow`, `schema`,
    `delete_workflow`)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base, headers = settings(url, api_key)
        self.url = base
        self._http = httpx.Client(base_url=base, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- runs -----------------------------------------------------------------------------------

    def run(
        self,
        workflow: Mapping[str, Any] | None = None,
        *,
        workflow_id: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        on_event: Callable[[Event], None] | None = None,
        **options: Any,
    ) -> Result:
        """Run and wait for the result (errors raised). With `on_event`, the run is streamed and
        each event handed to it as it arrives (progress, ComfyUI's messages)."""
        if on_event is None:
            return outcome(self._json(run_call(workflow, workflow_id, overrides, RunOptions(**options))))
        for event in self.stream(workflow, workflow_id=workflow_id, overrides=overrides, **options):
            on_event(event)
            if event.terminal:
                return event.outcome()
        raise ProtocolError("the stream ended without its terminal payload")

    def stream(
        self,
        workflow: Mapping[str, Any] | None = None,
        *,
        workflow_id: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Iterator[Event]:
        """The run's events as they arrive, the terminal payload last (not raised: see `Event.outcome`).
        Closing the iterator early hangs up, which cancels the job (the server's CANCEL_ON_DISCONNECT)."""
        yield from self._sse(run_call(workflow, workflow_id, overrides, RunOptions(**options), stream=True))

    def submit_async(
        self,
        workflow: Mapping[str, Any] | None = None,
        *,
        workflow_id: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> str:
        """Start the run in the background (202) and return its task id."""
        answer = self._json(run_call(workflow, workflow_id, overrides, RunOptions(**options), asynchronous=True))
        if "task_id" not in answer:
            raise ProtocolError("the server ran the job instead of accepting it (is it on FC?)")
        return str(answer["task_id"])

    # -- tasks ----------------------------------------------------------------------------------

    def status(self, task_id: str, after: int = 0) -> list[Event]:
        """The task's status log (compat): its payloads so far, after the first `after`."""
        answer = self._send(task_call("status", task_id, after=str(after)))
        items = answer.json()
        if not isinstance(items, list):
            raise ProtocolError("status did not answer a JSON array")
        return [Event(str(item.get("type")), item.get("data"), json.dumps(item, ensure_ascii=False)) for item in items]

    def task(self, task_id: str) -> dict[str, Any]:
        """The task's summary: state, percent, queue, times, result or error (GET /api/serverless/task)."""
        return self._json(task_call("task", task_id))

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Ask for the task to be cancelled, from any instance (202 `{"state": "cancelling"}`)."""
        return self._json(task_call("cancel", task_id))

    def events(self, task_id: str, resume: str | int | None = None) -> Iterator[Event]:
        """The task's events as SSE, from the start or after event `resume`, live until the terminal."""
        yield from self._sse(events_call(task_id, resume))

    # -- batches --------------------------------------------------------------------------------

    def batch(
        self,
        workflow: Mapping[str, Any] | None = None,
        *,
        workflow_id: str | None = None,
        items: list[Mapping[str, Any]] | None = None,
        sweep: Mapping[str, list[Any]] | None = None,
        mode: str = "product",
        priority: str | None = None,
        item_webhooks: bool = False,
        **options: Any,
    ) -> dict[str, Any]:
        """Start a batch (POST /api/batches): `{"batch_id", "total", "task_ids"}`, every item
        checked first. `options` as for `run` (`output_oss`, `output_format`, `callback_url`...)."""
        call = batch_call(workflow, workflow_id, items, sweep, mode, RunOptions(**options), priority, item_webhooks)
        return self._json(call)

    def batch_status(self, batch_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        """The batch's state, counts, percent, ETA and a page of its items."""
        return self._json(batch_path(batch_id, offset=str(offset), limit=str(limit)))

    def batch_events(self, batch_id: str, resume: str | int | None = None) -> Iterator[Event]:
        """The batch's events (`batch_item`, `batch_progress`, `batch_end` last), live."""
        call = batch_path(batch_id, "/events")
        if resume is not None:
            call.headers["Last-Event-ID"] = str(resume)
        yield from self._sse(call)

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json(batch_path(batch_id, "/cancel", "POST"))

    def retry_batch(self, batch_id: str) -> dict[str, Any]:
        """Run the failed items again (new attempts of the same tasks)."""
        return self._json(batch_path(batch_id, "/retry", "POST"))

    def batch_manifest(self, batch_id: str) -> list[dict[str, Any]]:
        """One object per item: `index`, `task_id`, `state`, `parameters`, `outputs`."""
        text = self._send(batch_path(batch_id, "/manifest")).text
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # -- hosted workflows -----------------------------------------------------------------------

    def register_workflow(self, workflow_id: str, workflow: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and store (PUT); the answer describes it, parameters included."""
        return self._json(workflow_call("PUT", workflow_id, dict(workflow)))

    def workflows(self) -> list[dict[str, Any]]:
        workflows: list[dict[str, Any]] = self._json(workflow_call("GET"))["workflows"]
        return workflows

    def workflow(self, workflow_id: str) -> dict[str, Any]:
        return self._json(workflow_call("GET", workflow_id))

    def schema(self, workflow_id: str) -> list[dict[str, Any]]:
        """The workflow's parameters (name, node_id, input, type, spec, loader)."""
        parameters: list[dict[str, Any]] = self.workflow(workflow_id)["parameters"]
        return parameters

    def delete_workflow(self, workflow_id: str) -> dict[str, Any]:
        """Delete the workflow, or one version of it (`<id>@<n>`)."""
        return self._json(workflow_call("DELETE", workflow_id))

    def versions(self, workflow_id: str) -> dict[str, Any]:
        """Its versions (number, created, created_by, aliases) and aliases."""
        return self._json(workflow_call("GET", workflow_id, suffix="/versions"))

    def set_alias(self, workflow_id: str, alias: str, version: int) -> dict[str, Any]:
        """Point `alias` at `version` (promotion, rollback); `<id>@<alias>` then runs it."""
        return self._json(alias_call(workflow_id, alias, version))

    def health(self) -> dict[str, Any]:
        return self._json(Call("GET", "/api/serverless/health"))

    # -- HTTP -----------------------------------------------------------------------------------

    def _send(self, call: Call) -> httpx.Response:
        try:
            answer = self._http.request(
                call.method, call.path, params=call.params, headers=call.headers, content=call.body
            )
        except httpx.HTTPError as exc:
            raise TransportError(f"{call.method} {self.url}{call.path}: {exc}") from exc
        if answer.status_code >= 400:
            raise error_of(answer.status_code, answer.content, f"{call.method} {self.url}{call.path}")
        return answer

    def _json(self, call: Call) -> dict[str, Any]:
        return json_object(self._send(call).content)

    def _sse(self, call: Call) -> Iterator[Event]:
        with self._open(call) as answer:
            parser = SSEParser()
            try:
                for chunk in answer.iter_raw():
                    yield from parser.feed(chunk)
            except httpx.HTTPError as exc:
                raise TransportError(f"the event stream broke: {exc}") from exc

    @contextmanager
    def _open(self, call: Call) -> Iterator[httpx.Response]:
        request = self._http.build_request(
            call.method, call.path, params=call.params, headers=call.headers, content=call.body
        )
        try:
            answer = self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise TransportError(f"{call.method} {self.url}{call.path}: {exc}") from exc
        try:
            if answer.status_code >= 400:
                raise error_of(answer.status_code, answer.read(), f"{call.method} {self.url}{call.path}")
            if not answer.headers.get("content-type", "").startswith("text/event-stream"):
                raise ProtocolError(f"{call.path} did not answer an event stream")
            yield answer
        finally:
            answer.close()
