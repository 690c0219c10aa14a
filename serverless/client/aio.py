"""The asynchronous client (httpx): the same methods as `Client`, as coroutines and async iterators."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
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
from .sync import DEFAULT_TIMEOUT, settings


class AsyncClient:
    """`async with AsyncClient(url, api_key) as client: result = await client.run(...)`."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        base, headers = settings(url, api_key)
        self.url = base
        self._http = httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def run(
        self,
        workflow: Mapping[str, Any] | None = None,
        *,
        workflow_id: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        on_event: Callable[[Event], None] | None = None,
        **options: Any,
    ) -> Result:
        """Run and wait for the result (errors raised); with `on_event`, streamed."""
        if on_event is None:
            return outcome(await self._json(run_call(workflow, workflow_id, overrides, RunOptions(**options))))
        async for event in self.stream(workflow, workflow_id=workflow_id, overrides=overrides, **options):
            on_event(event)
            if event.terminal:
                return event.outcome()
        raise ProtocolError("the stream ended without its terminal payload")

    async def stream(
        self,
        workflow: Mapping[str, Any] | None = None,
        *,
        workflow_id: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncIterator[Event]:
        """The run's events as they arrive, the terminal payload last."""
        async for event in self._sse(run_call(workflow, workflow_id, overrides, RunOptions(**options), stream=True)):
            yield event

    async def submit_async(
        self,
        workflow: Mapping[str, Any] | None = None,
        *,
        workflow_id: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> str:
        call = run_call(workflow, workflow_id, overrides, RunOptions(**options), asynchronous=True)
        answer = await self._json(call)
        if "task_id" not in answer:
            raise ProtocolError("the server ran the job instead of accepting it (is it on FC?)")
        return str(answer["task_id"])

    async def status(self, task_id: str, after: int = 0) -> list[Event]:
        items = (await self._send(task_call("status", task_id, after=str(after)))).json()
        if not isinstance(items, list):
            raise ProtocolError("status did not answer a JSON array")
        return [Event(str(item.get("type")), item.get("data"), json.dumps(item, ensure_ascii=False)) for item in items]

    async def task(self, task_id: str) -> dict[str, Any]:
        return await self._json(task_call("task", task_id))

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return await self._json(task_call("cancel", task_id))

    async def events(self, task_id: str, resume: str | int | None = None) -> AsyncIterator[Event]:
        async for event in self._sse(events_call(task_id, resume)):
            yield event

    async def batch(
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
        call = batch_call(workflow, workflow_id, items, sweep, mode, RunOptions(**options), priority, item_webhooks)
        return await self._json(call)

    async def batch_status(self, batch_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return await self._json(batch_path(batch_id, offset=str(offset), limit=str(limit)))

    async def batch_events(self, batch_id: str, resume: str | int | None = None) -> AsyncIterator[Event]:
        call = batch_path(batch_id, "/events")
        if resume is not None:
            call.headers["Last-Event-ID"] = str(resume)
        async for event in self._sse(call):
            yield event

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return await self._json(batch_path(batch_id, "/cancel", "POST"))

    async def retry_batch(self, batch_id: str) -> dict[str, Any]:
        return await self._json(batch_path(batch_id, "/retry", "POST"))

    async def batch_manifest(self, batch_id: str) -> list[dict[str, Any]]:
        text = (await self._send(batch_path(batch_id, "/manifest"))).text
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    async def register_workflow(self, workflow_id: str, workflow: Mapping[str, Any]) -> dict[str, Any]:
        return await self._json(workflow_call("PUT", workflow_id, dict(workflow)))

    async def workflows(self) -> list[dict[str, Any]]:
        workflows: list[dict[str, Any]] = (await self._json(workflow_call("GET")))["workflows"]
        return workflows

    async def workflow(self, workflow_id: str) -> dict[str, Any]:
        return await self._json(workflow_call("GET", workflow_id))

    async def schema(self, workflow_id: str) -> list[dict[str, Any]]:
        parameters: list[dict[str, Any]] = (await self.workflow(workflow_id))["parameters"]
        return parameters

    async def delete_workflow(self, workflow_id: str) -> dict[str, Any]:
        return await self._json(workflow_call("DELETE", workflow_id))

    async def versions(self, workflow_id: str) -> dict[str, Any]:
        return await self._json(workflow_call("GET", workflow_id, suffix="/versions"))

    async def set_alias(self, workflow_id: str, alias: str, version: int) -> dict[str, Any]:
        call = alias_call(workflow_id, alias, version)
        return await self._json(call)

    async def health(self) -> dict[str, Any]:
        return await self._json(Call("GET", "/api/serverless/health"))

    async def _send(self, call: Call) -> httpx.Response:
        try:
            answer = await self._http.request(
                call.method, call.path, params=call.params, headers=call.headers, content=call.body
            )
        except httpx.HTTPError as exc:
            raise TransportError(f"{call.method} {self.url}{call.path}: {exc}") from exc
        if answer.status_code >= 400:
            raise error_of(answer.status_code, answer.content, f"{call.method} {self.url}{call.path}")
        return answer

    async def _json(self, call: Call) -> dict[str, Any]:
        return json_object((await self._send(call)).content)

    async def _sse(self, call: Call) -> AsyncIterator[Event]:
        async with self._open(call) as answer:
            parser = SSEParser()
            try:
                async for chunk in answer.aiter_raw():
                    for event in parser.feed(chunk):
                        yield event
            except httpx.HTTPError as exc:
                raise TransportError(f"the event stream broke: {exc}") from exc

    @asynccontextmanager
    async def _open(self, call: Call) -> AsyncIterator[httpx.Response]:
        request = self._http.build_request(
            call.method, call.path, params=call.params, headers=call.headers, content=call.body
        )
        try:
            answer = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise TransportError(f"{call.method} {self.url}{call.path}: {exc}") from exc
        try:
            if answer.status_code >= 400:
                raise error_of(answer.status_code, await answer.aread(), f"{call.method} {self.url}{call.path}")
            if not answer.headers.get("content-type", "").startswith("text/event-stream"):
                raise ProtocolError(f"{call.path} did not answer an event stream")
            yield answer
        finally:
            await answer.aclose()
