"""The ComfyUI client: its HTTP API and websocket, on the app's one aiohttp session.

`ComfyUI.connect(client_id)` opens a websocket for our client id and waits for ComfyUI's greeting;
`Connection.follow(prompt_id)` then yields that prompt's messages until ComfyUI ends it. A broken
socket is reopened with the same client id and the prompt recovered from `/history` and `/queue`
here, so a job sees one unbroken sequence of messages. ComfyUI's answers come back as typed
shapes (`QueueState`, `HistoryEntry`, `SystemStats`).

aiohttp errors are translated here, and only here, into the adapter's error tree: whatever goes
wrong talking to ComfyUI becomes `ComfyUIUnavailable`, except what ComfyUI itself answers (a
refused prompt is `PromptError`, a missing output `OutputError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..core.messages import Message, from_history, parse_message
from ..errors import ComfyUIUnavailable, InputError, OutputError, PromptError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Fetched:
    """An output file read from `/view`: its bytes (None for a HEAD), type and size."""

    content: bytes | None
    content_type: str | None
    size: int | None


@contextlib.contextmanager
def translate_errors(action: str) -> Iterator[None]:
    """Turn transport failures while talking to ComfyUI into ComfyUIUnavailable."""
    try:
        yield
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ComfyUIUnavailable(f"ComfyUI could not be reached ({action}): {reason}") from exc


def _view_params(item: Mapping[str, Any]) -> dict[str, str]:
    return {
        "filename": str(item.get("filename", "")),
        "subfolder": str(item.get("subfolder", "") or ""),
        "type": str(item.get("type", "output") or "output"),
    }


@dataclass(frozen=True, slots=True)
class QueueState:
    """`GET /queue`: the prompt ids running, and those waiting in the order ComfyUI will run them."""

    running: tuple[str, ...]
    pending: tuple[str, ...]

    @classmethod
    def from_answer(cls, answer: Any) -> QueueState:
        answer = answer if isinstance(answer, dict) else {}
        return cls(_prompt_ids(answer.get("queue_running")), _prompt_ids(answer.get("queue_pending")))

    def holds(self, prompt_id: str) -> bool:
        return prompt_id in self.running or prompt_id in self.pending

    def position(self, prompt_id: str) -> int | None:
        """0 when running, 1 when next, ...; None when ComfyUI does not hold the prompt."""
        if prompt_id in self.running:
            return 0
        return self.pending.index(prompt_id) + 1 if prompt_id in self.pending else None

    @property
    def size(self) -> int:
        return len(self.running) + len(self.pending)


def _prompt_ids(items: Any) -> tuple[str, ...]:
    """Queue items are `[number, prompt_id, prompt, extra_data, outputs, ...]`; ComfyUI lists its
    pending ones in heap order, and runs them by number."""
    if not isinstance(items, list):
        return ()
    entries = [item for item in items if isinstance(item, list) and len(item) > 1]
    entries.sort(key=lambda item: item[0] if isinstance(item[0], int | float) else 0)
    return tuple(str(item[1]) for item in entries)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """`GET /history/{prompt_id}` for one prompt: its outputs (None until written) and how it went."""

    outputs: dict[str, Any] | None
    messages: tuple[Message, ...]

    @classmethod
    def from_answer(cls, entry: dict[str, Any]) -> HistoryEntry:
        outputs = entry.get("outputs")
        status = entry.get("status")
        pairs = status.get("messages", []) if isinstance(status, dict) else []
        messages = tuple(
            from_history(pair[0], pair[1])
            for pair in pairs
            if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], dict)
        )
        return cls(dict(outputs) if isinstance(outputs, dict) else None, messages)


@dataclass(frozen=True, slots=True)
class SystemStats:
    """The parts of `GET /system_stats` that health reports."""

    version: str | None
    python: str | None
    pytorch: str | None
    devices: tuple[dict[str, Any], ...]

    @classmethod
    def from_answer(cls, answer: Any) -> SystemStats:
        answer = answer if isinstance(answer, dict) else {}
        system = answer.get("system") if isinstance(answer.get("system"), dict) else {}
        devices = answer.get("devices") if isinstance(answer.get("devices"), list) else []
        return cls(
            system.get("comfyui_version"),
            system.get("python_version"),
            system.get("pytorch_version"),
            tuple(
                {k: d.get(k) for k in ("name", "type", "vram_total", "vram_free")}
                for d in devices
                if isinstance(d, dict)
            ),
        )

    def to_payload(self) -> dict[str, Any]:
        return {"version": self.version, "python": self.python, "pytorch": self.pytorch, "devices": list(self.devices)}


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds: to connect (and be greeted), for one HTTP request, and to get a lost websocket back."""

    connect: float = 5.0
    request: float = 60.0
    reconnect: float = 30.0


class ComfyUI:
    """One ComfyUI server, spoken to over one aiohttp session (`ComfyUI.open` owns it)."""

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, base_url: str, timeouts: Timeouts) -> AsyncIterator[ComfyUI]:
        """A client with its own session (connections kept alive), closed on exit."""
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.connect)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            yield cls(session, base_url, timeouts)

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeouts: Timeouts = Timeouts()) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts
        self.timeout = aiohttp.ClientTimeout(total=timeouts.request)
        self._queue_read: tuple[float, asyncio.Future[QueueState]] | None = None

    def _url(self, path: str) -> str:
        return self.base_url + path

    async def _json(self, method: str, path: str, action: str, **kwargs: Any) -> Any:
        with translate_errors(action):
            async with self.session.request(method, self._url(path), timeout=self.timeout, **kwargs) as resp:
                if resp.status >= 500:
                    raise ComfyUIUnavailable(f"ComfyUI answered HTTP {resp.status} to {action}")
                body = await resp.read()
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise ComfyUIUnavailable(f"ComfyUI answered {action} with something that is not JSON") from None

    async def submit(
        self,
        workflow: dict[str, Any],
        client_id: str,
        prompt_id: str,
        extra_data: dict[str, Any] | None,
        big: bool = False,
    ) -> dict[str, Any]:
        """POST /prompt with our own ids. Returns ComfyUI's `node_errors` for outputs it refused
        while accepting the rest; raises PromptError when it refused the whole prompt. A `big`
        prompt is serialised in a thread, so other callers are not kept waiting meanwhile."""
        payload: dict[str, Any] = {"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id}
        if extra_data:
            payload["extra_data"] = extra_data
        data = await asyncio.to_thread(json.dumps, payload) if big else json.dumps(payload)
        headers = {"Content-Type": "application/json"}
        with translate_errors("submitting the prompt"):
            async with self.session.post(
                self._url("/prompt"), data=data.encode(), headers=headers, timeout=self.timeout
            ) as resp:
                status, body = resp.status, await resp.read()
        try:
            answer = json.loads(body) if body else None
        except ValueError:
            answer = None
        if status == 400:
            raise PromptError(_prompt_error_message(answer), raw=answer)
        if status != 200 or not isinstance(answer, dict):
            raise ComfyUIUnavailable(f"ComfyUI answered HTTP {status} to /prompt", raw=answer)
        node_errors = answer.get("node_errors")
        return node_errors if isinstance(node_errors, dict) else {}

    async def history(self, prompt_id: str) -> HistoryEntry | None:
        """The history entry of a prompt, or None while ComfyUI has none."""
        answer = await self._json("GET", f"/history/{prompt_id}", "reading the history")
        entry = answer.get(prompt_id) if isinstance(answer, dict) else None
        return HistoryEntry.from_answer(entry) if isinstance(entry, dict) else None

    async def queue(self) -> QueueState:
        return QueueState.from_answer(await self._json("GET", "/queue", "reading the queue"))

    async def recent_queue(self, max_age: float = 0.1) -> QueueState:
        """The queue as read at most `max_age` seconds ago: many jobs asking at once (every job
        waiting in the queue asks when it moves) share one request."""
        loop = asyncio.get_running_loop()
        if self._queue_read is None or loop.time() - self._queue_read[0] > max_age:
            self._queue_read = (loop.time(), asyncio.ensure_future(self.queue()))
        return await asyncio.shield(self._queue_read[1])

    async def object_info(self) -> dict[str, Any]:
        """GET /object_info: every node class, its inputs (types, ranges, options) and outputs."""
        answer = await self._json("GET", "/object_info", "reading object_info")
        if not isinstance(answer, dict):
            raise ComfyUIUnavailable("ComfyUI answered /object_info with something that is not an object")
        return answer

    async def system_stats(self) -> SystemStats:
        return SystemStats.from_answer(await self._json("GET", "/system_stats", "reading system stats"))

    async def answers(self) -> bool:
        """True when ComfyUI answers /system_stats (a readiness probe; never raises)."""
        try:
            async with self.session.get(self._url("/system_stats"), timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, OSError):
            return False

    async def cancel(self, prompt_id: str) -> None:
        """Remove the prompt from the queue if pending, interrupt it if running; never touches
        another prompt (the interrupt names its prompt id)."""
        await self._json("POST", "/queue", "deleting from the queue", json={"delete": [prompt_id]})
        await self._json("POST", "/interrupt", "interrupting", json={"prompt_id": prompt_id})

    async def fetch(self, item: Mapping[str, Any], with_content: bool) -> Fetched:
        """GET (or HEAD, when only size and type are needed) `/view` for a history output item."""
        name = item.get("filename")
        method = "GET" if with_content else "HEAD"
        try:
            with translate_errors(f"reading output {name}"):
                async with self.session.request(
                    method, self._url("/view"), params=_view_params(item), timeout=self.timeout
                ) as resp:
                    if resp.status != 200:
                        raise OutputError(f"ComfyUI answered HTTP {resp.status} for output {name}")
                    content = await resp.read() if with_content else None
                    size = len(content) if content is not None else resp.content_length
                    return Fetched(content, resp.headers.get("Content-Type"), size)
        except ComfyUIUnavailable as exc:
            raise OutputError(exc.message) from exc

    async def upload_input(self, data: bytes, filename: str) -> str:
        """POST /upload/image into the input folder; returns the name to use in the workflow."""
        form = aiohttp.FormData()
        form.add_field("image", data, filename=filename, content_type="application/octet-stream")
        form.add_field("type", "input")
        form.add_field("overwrite", "true")
        try:
            answer = await self._json("POST", "/upload/image", "uploading an input", data=form)
        except ComfyUIUnavailable as exc:
            raise InputError(f"uploading {filename} to ComfyUI failed: {exc.message}") from exc
        if not isinstance(answer, dict) or not answer.get("name"):
            raise InputError(f"ComfyUI did not accept the upload of {filename}")
        subfolder = answer.get("subfolder") or ""
        return f"{subfolder}/{answer['name']}" if subfolder else str(answer["name"])

    @contextlib.asynccontextmanager
    async def connect(self, client_id: str) -> AsyncIterator[Connection]:
        """A websocket for `client_id`, once ComfyUI has registered it (its greeting, a `status`
        message, is `connection.greeting`); closed on exit."""
        connection = Connection(self, client_id)
        try:
            await connection.open()
            yield connection
        finally:
            await connection.close()

    async def _greeted_socket(self, client_id: str) -> tuple[aiohttp.ClientWebSocketResponse, Message | None]:
        url = self._url("/ws") + f"?clientId={client_id}"
        with translate_errors("opening the websocket"):
            async with asyncio.timeout(self.timeouts.connect):
                ws = await self.session.ws_connect(url, max_msg_size=0, autoping=True)
        try:
            async with asyncio.timeout(self.timeouts.connect):
                first = await ws.receive()
        except (TimeoutError, aiohttp.ClientError) as exc:
            await ws.close()
            raise ComfyUIUnavailable("ComfyUI's websocket did not greet us") from exc
        if first.type != aiohttp.WSMsgType.TEXT:
            await ws.close()
            raise ComfyUIUnavailable(f"ComfyUI's websocket closed before greeting us ({first.type.name})")
        return ws, parse_message(first.data)


class Connection:
    """Our websocket to ComfyUI for one client id (see `ComfyUI.connect`)."""

    def __init__(self, comfy: ComfyUI, client_id: str) -> None:
        self.comfy = comfy
        self.client_id = client_id
        self.greeting: Message | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def open(self) -> None:
        self._ws, self.greeting = await self.comfy._greeted_socket(self.client_id)

    async def close(self) -> None:
        """Close the socket (its close handshake may overlap other work)."""
        if self._ws is not None:
            await self._ws.close()

    async def follow(self, prompt_id: str, lost: Callable[[], bool] = lambda: False) -> AsyncIterator[Message]:
        """The messages concerning `prompt_id` (its own, and broadcasts), until ComfyUI ends the
        prompt. After a broken socket, the prompt is recovered: from its history when it ended
        meanwhile (those messages come with `live` false), else it is still queued and we listen
        on. `lost()` true means the ComfyUI that had the prompt is gone (a supervised restart)."""
        while True:
            async for message in self._read(prompt_id):
                yield message
                if message.ends(prompt_id):
                    return
            log.warning("websocket lost prompt_id=%s: reconnecting", prompt_id)
            await self._reconnect(lost)
            if self.greeting is not None:
                yield self.greeting  # as on the first connect: ComfyUI's `status` for our new socket
            recovered = await self._recover(prompt_id)
            if recovered is not None:
                log.info("prompt recovered from history prompt_id=%s", prompt_id)
                for message in recovered.messages:
                    yield message
                return

    async def _read(self, prompt_id: str) -> AsyncIterator[Message]:
        """Messages from the current socket until it closes or breaks."""
        assert self._ws is not None
        try:
            async for frame in self._ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary previews are not forwarded
                message = parse_message(frame.data)
                if message is not None and message.concerns(prompt_id):
                    yield message
                # One network read can hold a burst of messages: let readers keep up with it.
                await asyncio.sleep(0)
        except (aiohttp.ClientError, OSError):
            pass

    async def _reconnect(self, lost: Callable[[], bool]) -> None:
        await self.close()
        deadline = time.monotonic() + self.comfy.timeouts.reconnect
        delay = 0.05
        while True:
            if lost():
                raise ComfyUIUnavailable("ComfyUI exited mid-job; the job died with it")
            try:
                await self.open()
                return
            except ComfyUIUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise ComfyUIUnavailable(
                        f"lost ComfyUI's websocket mid-job and could not reconnect: {exc.message}"
                    ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _recover(self, prompt_id: str) -> HistoryEntry | None:
        """The history entry if the prompt ended; None if ComfyUI still runs or queues it. A
        history that cannot be read is no proof of loss while the queue still holds the prompt."""
        history_error: ComfyUIUnavailable | None = None
        for ask_queue in (True, False):
            try:
                entry = await self.comfy.history(prompt_id)
            except ComfyUIUnavailable as exc:  # ComfyUI answers, but not with a history
                entry, history_error = None, exc
            if entry is not None:
                return entry
            if ask_queue and (await self.comfy.queue()).holds(prompt_id):
                return None
        because = f" ({history_error.message})" if history_error is not None else ""
        raise ComfyUIUnavailable("the websocket broke and ComfyUI no longer knows the job" + because)


def _prompt_error_message(answer: Any) -> str:
    """A sentence for a person out of ComfyUI's 400 body: its error, then each refused node."""
    if not isinstance(answer, dict):
        return "ComfyUI refused the prompt"
    error: dict[str, Any] = answer["error"] if isinstance(answer.get("error"), dict) else {}
    message = f"ComfyUI refused the prompt: {error.get('message') or error.get('type') or 'invalid prompt'}"
    if error.get("details"):
        message += f" ({error['details']})"
    for node_id, node in (answer.get("node_errors") or {}).items():
        if not isinstance(node, dict):
            continue
        reasons = "; ".join(
            f"{e.get('message')}: {e.get('details')}" for e in node.get("errors", []) if isinstance(e, dict)
        )
        message += f"; node {node_id} ({node.get('class_type')}): {reasons}"
    return message
