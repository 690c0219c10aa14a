"""The ComfyUI client: its HTTP API and websocket.

One websocket serves the whole instance (`listener.Listener`, started and stopped by
`ComfyUI.open`): `ComfyUI.connect(prompt_id)` registers a job on it and hands back the client id
to submit with; `Connection.follow(prompt_id, take)` then hands that prompt's messages to `take`
until ComfyUI ends it, recovered from `/history` and `/queue` after a broken socket, so a job sees
one unbroken sequence of messages. ComfyUI's answers come back as typed shapes (`QueueState`, `HistoryEntry`,
`SystemStats`). When ComfyUI's folders are on our disk (`folders.Folders`), outputs are read and
inputs written there, falling back to `/view` for a file that is not there.

ComfyUI's JSON calls (every job's `POST /prompt`, `/history`, `/queue`, `/interrupt`, ...) go over
connections of our own kept open (`keepalive.KeepAlive`: a request's bytes written, its answer
parsed in C, a fraction of aiohttp's CPU); files, uploads and the websocket over one aiohttp session.
Transport errors of both are translated here, and only here, into the adapter's error tree: whatever goes
wrong talking to ComfyUI becomes `ComfyUIUnavailable`, except what ComfyUI itself answers (a
refused prompt is `PromptError`, a missing output `OutputError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ..core import jsontext
from ..core.messages import Message, from_history
from ..core.previews import FEATURE_FLAGS
from ..errors import ComfyUIUnavailable, InputError, NotFound, OutputError, PromptError
from .folders import CACHED_UP_TO, Folders, confined, read_cached, read_item, write_input
from .keepalive import KeepAlive
from .listener import Connection, Listener

log = logging.getLogger(__name__)


_MISSING = object()  # `_json`'s answer for a 404
VIA_HTTP = Folders()  # no folder of ComfyUI's on our disk: `/view` and `/upload/image`


@dataclass(frozen=True, slots=True)
class Fetched:
    """An output file read from `/view` or ComfyUI's folder: its bytes (None when only its size
    and type were asked for), type and size; `encoded`, what `fetch`'s `encode` made of the bytes
    (None when not asked, or when they came through `/view`)."""

    content: bytes | None
    content_type: str | None
    size: int | None
    encoded: bytes | None = None


@dataclass(frozen=True, slots=True)
class View:
    """A `/view` answer being streamed: status, the headers a download passes on, the body."""

    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]


VIEW_HEADERS = ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "Last-Modified", "ETag")
VIEW_CHUNK = 256 * 1024
BIG_ANSWER = 256 * 1024  # from this size on, a JSON answer is parsed in a thread


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


# The ComfyUI beside us answers in milliseconds: these bound a ComfyUI that is stuck, not a slow one.
CONNECT_TIMEOUT = 5.0  # seconds to connect
REQUEST_TIMEOUT = 60.0  # seconds for one HTTP call


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds: to connect, for one HTTP request, and for a job to get a lost websocket back."""

    connect: float = 5.0
    request: float = 60.0
    reconnect: float = 30.0


class ComfyUI:
    """One ComfyUI server, spoken to over connections kept open and one aiohttp session
    (`ComfyUI.open` owns both)."""

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, base_url: str, timeouts: Timeouts, folders: Folders = VIA_HTTP, listen: bool = True
    ) -> AsyncIterator[ComfyUI]:
        """A client with its own session (connections kept alive) and, when it runs jobs
        (`listen`), its websocket; both closed on exit."""
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.connect)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            comfy = cls(session, base_url, timeouts, folders)
            task = asyncio.create_task(comfy.listener.run(), name="comfyui websocket") if listen else None
            try:
                yield comfy
            finally:
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                await comfy.calls.aclose()

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        timeouts: Timeouts = Timeouts(),
        folders: Folders = VIA_HTTP,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts
        self.timeout = aiohttp.ClientTimeout(total=timeouts.request)
        self.calls = KeepAlive(self.base_url, timeouts.connect)
        self.folders = folders
        self._queue_read: tuple[float, asyncio.Future[QueueState]] | None = None
        self.listener = Listener(self._open_socket, self.history, self.queue, timeouts.connect, timeouts.reconnect)

    def _url(self, path: str) -> str:
        return self.base_url + path

    async def _json(self, method: str, path: str, action: str, allow_missing: bool = False, body: Any = None) -> Any:
        """ComfyUI's JSON answer (None for an empty one) to `body` sent as JSON; `_MISSING` for a
        404 when `allow_missing`."""
        data = b"" if body is None else jsontext.compact(body)
        with translate_errors(action):
            answer = await self.calls.request(method, path, data, timeout=self.timeouts.request)
        if answer.status >= 500:
            raise ComfyUIUnavailable(f"ComfyUI answered HTTP {answer.status} to {action}")
        if answer.status == 404 and allow_missing:
            return _MISSING
        return await self._parsed(answer.body, action)

    async def _parsed(self, body: bytes, action: str) -> Any:
        if not body:
            return None
        try:
            # /queue and /history hold whole prompts: a big one is parsed off the event loop.
            return await asyncio.to_thread(jsontext.loads, body) if len(body) >= BIG_ANSWER else jsontext.loads(body)
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
        data = await asyncio.to_thread(jsontext.compact, payload) if big else jsontext.compact(payload)
        with translate_errors("submitting the prompt"):
            sent = await self.calls.request("POST", "/prompt", data, timeout=self.timeouts.request)
        status, body = sent.status, sent.body
        try:
            answer = jsontext.loads(body) if body else None
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
        waiting in the queue asks every PROGRESS_INTERVAL) share one request."""
        loop = asyncio.get_running_loop()
        read = self._queue_read
        if read is None or loop.time() - read[0] > max_age:
            self._queue_read = read = (loop.time(), asyncio.ensure_future(self.queue()))
        return await asyncio.shield(read[1])

    async def object_info(self) -> dict[str, Any]:
        """GET /object_info: every node class, its inputs (types, ranges, options) and outputs."""
        answer = await self._json("GET", "/object_info", "reading object_info")
        if not isinstance(answer, dict):
            raise ComfyUIUnavailable("ComfyUI answered /object_info with something that is not an object")
        return answer

    async def read_info(self, path: str) -> Any:
        """GET one of ComfyUI's informational routes (`/system_stats`, `/embeddings`, `/models`,
        `/models/<folder>`) as it answers it, for ComfyUI's own API on our paths; NotFound where
        ComfyUI answers 404 (a models folder it does not know)."""
        answer = await self._json("GET", path, f"reading {path}", allow_missing=True)
        if answer is _MISSING:
            raise NotFound(f"ComfyUI has no {path}")
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

    async def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free: ComfyUI unloads its models and empties its caches before its next prompt."""
        body = {"unload_models": unload_models, "free_memory": free_memory}
        await self._json("POST", "/free", "freeing memory", body=body)

    async def cancel(self, prompt_id: str) -> None:
        """Remove the prompt from the queue if pending, interrupt it if running; never touches
        another prompt (the interrupt names its prompt id)."""
        await self._json("POST", "/queue", "deleting from the queue", body={"delete": [prompt_id]})
        await self._json("POST", "/interrupt", "interrupting", body={"prompt_id": prompt_id})

    async def fetch(
        self, item: Mapping[str, Any], with_content: bool, encode: Callable[[bytes], bytes] | None = None
    ) -> Fetched:
        """A history output item's file: from ComfyUI's folder when it is on our disk and holds
        the file, else GET (or HEAD, when only size and type are needed) `/view`. `encode` (e.g.
        base64) is applied to bytes read from our disk in the worker thread that read them (one
        trip, not two): its result is `encoded`."""
        folder = self.folders.for_type(str(item.get("type", "output") or "output"))
        if folder is not None:
            cached = _cached_item(folder, item) if with_content else None
            if cached is not None:  # a small file ComfyUI has just written: no trip to a thread
                content, content_type, size = cached
                return Fetched(content, content_type, size, encode(content) if encode is not None else None)
            read = await asyncio.to_thread(_read_item, folder, item, with_content, encode)
            if read is not None:
                return read
        return await self._view(item, with_content)

    async def read_local(self, item: Mapping[str, Any], limit: int) -> Fetched | None:
        """A history item's file read whole from ComfyUI's folder for its type, in one trip to a
        thread, when that folder is on our disk and holds it and it is at most `limit` bytes;
        None otherwise (`/view` then serves it: ComfyUI decides, a big file streams)."""
        folder = self.folders.for_type(str(item.get("type", "output") or "output"))
        if folder is None:
            return None
        read = _cached_item(folder, item, limit) or await asyncio.to_thread(_read_small_item, folder, item, limit)
        return Fetched(*read) if read is not None else None

    async def local_output(self, item: Mapping[str, Any]) -> Path | None:
        """The path of a history output item's file when it is on our disk (ComfyUI's folder for
        its type holds it), so that it can be streamed from there; None otherwise."""
        folder = self.folders.for_type(str(item.get("type", "output") or "output"))
        if folder is None:
            return None
        return await asyncio.to_thread(_local_item, folder, item)

    @contextlib.asynccontextmanager
    async def spooled_output(self, item: Mapping[str, Any]) -> AsyncIterator[Path]:
        """A history output item's file copied from `/view` into a temporary file as it streams
        (never whole in memory), for an upload that reads from disk; removed on exit. OutputError
        when it cannot be read."""
        name = item.get("filename")
        fd, raw = await asyncio.to_thread(tempfile.mkstemp, prefix="serverless-output-", suffix=".part")
        path = Path(raw)
        try:
            with os.fdopen(fd, "wb") as file:
                try:
                    async with self.view(item) as view:
                        if view.status != 200:
                            raise OutputError(f"ComfyUI answered HTTP {view.status} for output {name}")
                        async for chunk in view.chunks:
                            await asyncio.to_thread(file.write, chunk)
                except ComfyUIUnavailable as exc:
                    raise OutputError(exc.message) from exc
                await asyncio.to_thread(file.flush)  # what is left to close is not I/O
            yield path
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)

    async def _view(self, item: Mapping[str, Any], with_content: bool) -> Fetched:
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

    @contextlib.asynccontextmanager
    async def view(self, item: Mapping[str, Any], range_header: str | None = None) -> AsyncIterator[View]:
        """GET `/view` for an output item, streamed (a big video is never held whole); ComfyUI
        (aiohttp's FileResponse) answers a `Range` with 206. Errors as ComfyUIUnavailable."""
        name = item.get("filename")
        headers = {"Range": range_header} if range_header else {}
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect, sock_read=self.timeouts.request)
        with translate_errors(f"reading output {name}"):
            async with self.session.get(
                self._url("/view"), params=_view_params(item), headers=headers, timeout=timeout
            ) as resp:
                passed = {key: resp.headers[key] for key in VIEW_HEADERS if key in resp.headers}
                yield View(resp.status, passed, self._chunks(resp, name))

    async def _chunks(self, resp: aiohttp.ClientResponse, name: Any) -> AsyncIterator[bytes]:
        with translate_errors(f"reading output {name}"):
            async for chunk in resp.content.iter_chunked(VIEW_CHUNK):
                yield chunk

    async def upload_input(self, data: bytes, filename: str) -> str:
        """Into ComfyUI's input folder (written there when it is on our disk, else POST
        /upload/image); `filename` may name a subfolder (`sub/name.png`); returns the name to
        use in the workflow."""
        written = await self._write_input(data, filename)
        if written is not None:
            return written
        subfolder, _, name = filename.rpartition("/")
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type="application/octet-stream")
        form.add_field("type", "input")
        if subfolder:
            form.add_field("subfolder", subfolder)
        form.add_field("overwrite", "true")
        try:
            with translate_errors("uploading an input"):
                async with self.session.post(self._url("/upload/image"), data=form, timeout=self.timeout) as resp:
                    if resp.status >= 500:
                        raise ComfyUIUnavailable(f"ComfyUI answered HTTP {resp.status} to uploading an input")
                    body = await resp.read()
            answer = await self._parsed(body, "uploading an input")
        except ComfyUIUnavailable as exc:
            raise InputError(f"uploading {filename} to ComfyUI failed: {exc.message}") from exc
        if not isinstance(answer, dict) or not answer.get("name"):
            raise InputError(f"ComfyUI did not accept the upload of {filename}")
        subfolder = answer.get("subfolder") or ""
        return f"{subfolder}/{answer['name']}" if subfolder else str(answer["name"])

    async def _write_input(self, data: bytes, filename: str) -> str | None:
        """Write the input into ComfyUI's input folder when it is on our disk (no upload round
        trip); None when it is not, or the write failed (then it is uploaded)."""
        if self.folders.input is None:
            return None
        return await asyncio.to_thread(self.write_input_here, data, filename)

    def write_input_here(self, data: bytes, filename: str) -> str | None:
        """`upload_input`'s write into ComfyUI's input folder on our disk, blocking (for a worker
        thread that holds the bytes already): the name to use in the workflow; None when the
        folder is not on our disk or the write failed (then `upload_input` uploads it)."""
        if self.folders.input is None:
            return None
        try:
            write_input(self.folders.input, filename, data)
        except (OSError, OutputError) as exc:
            log.warning("could not write input %s into %s (%s): uploading it", filename, self.folders.input, exc)
            return None
        log.debug("input %s written into ComfyUI's input folder", filename)
        return filename

    @contextlib.asynccontextmanager
    async def connect(
        self, prompt_id: str, forward: Callable[[Message], None] | None = None, previews: bool = False
    ) -> AsyncIterator[Connection]:
        """Follow `prompt_id` on the shared websocket, once it is open (ComfyUIUnavailable when
        it cannot be opened); submit the prompt with `connection.client_id`. Unregistered on exit.
        `forward` takes ComfyUI's `status` broadcasts (in order with the prompt's messages),
        for a job whose caller gets them; without it the job gets none. With `previews`, the
        prompt's sampler preview frames come too."""
        await self.listener.ready()
        connection = Connection(self.listener, self.listener.register(prompt_id, forward, previews))
        try:
            yield connection
        finally:
            await connection.close()

    async def _open_socket(self, client_id: str) -> aiohttp.ClientWebSocketResponse:
        url = self._url("/ws") + f"?clientId={client_id}"
        with translate_errors("opening the websocket"):
            async with asyncio.timeout(self.timeouts.connect):
                ws = await self.session.ws_connect(url, max_msg_size=0, autoping=True)
                # As ComfyUI's own frontend does, first thing: previews then name their prompt.
                await ws.send_str(FEATURE_FLAGS)
                return ws


def _read_item(
    folder: Path, item: Mapping[str, Any], with_content: bool, encode: Callable[[bytes], bytes] | None = None
) -> Fetched | None:
    """A history item's file from `folder` (blocking): confined to it, None when not there; its
    bytes put through `encode` too when given."""
    read = read_item(folder, str(item.get("subfolder", "") or ""), str(item.get("filename", "")), with_content)
    if read is None:
        return None
    content, content_type, size = read
    encoded = encode(content) if encode is not None and content is not None else None
    return Fetched(content, content_type, size, encoded)


def _cached_item(folder: Path, item: Mapping[str, Any], limit: int = CACHED_UP_TO) -> tuple[bytes, str, int] | None:
    """A history item's file read from the page cache, without waiting (`folders.read_cached`)."""
    subfolder, filename = str(item.get("subfolder", "") or ""), str(item.get("filename", ""))
    return read_cached(folder, subfolder, filename, min(limit, CACHED_UP_TO))


def _read_small_item(folder: Path, item: Mapping[str, Any], limit: int) -> tuple[bytes, str, int] | None:
    """A history item's file from `folder` (blocking) when it is at most `limit` bytes; None when
    it is not there, bigger, or names a path outside the folder."""
    try:
        read = read_item(folder, str(item.get("subfolder", "") or ""), str(item.get("filename", "")), True, limit)
    except OutputError:
        return None
    return (read[0], read[1], read[2]) if read is not None and read[0] is not None else None


def _local_item(folder: Path, item: Mapping[str, Any]) -> Path | None:
    """A history item's file in `folder` (blocking): confined to it, None when not a file there."""
    path = confined(folder, str(item.get("subfolder", "") or ""), str(item.get("filename", "")))
    return path if path.is_file() else None


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
