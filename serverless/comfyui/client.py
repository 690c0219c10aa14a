"""The ComfyUI client: its HTTP API and websocket, on the app's one aiohttp session.

aiohttp errors are translated here, and only here, into the adapter's error tree: whatever goes
wrong talking to ComfyUI becomes `ComfyUIUnavailable`, except what ComfyUI itself answers (a
refused prompt is `PromptError`, a missing output `OutputError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..errors import ComfyUIUnavailable, InputError, OutputError, PromptError


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


class ComfyUI:
    """One ComfyUI server. Cheap to create; owns nothing but a reference to the session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, request_timeout: float) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)

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
        self, workflow: dict[str, Any], client_id: str, prompt_id: str, extra_data: dict[str, Any] | None
    ) -> dict[str, Any]:
        """POST /prompt with our own ids. Returns ComfyUI's `node_errors` for outputs it refused
        while accepting the rest; raises PromptError when it refused the whole prompt."""
        payload: dict[str, Any] = {"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id}
        if extra_data:
            payload["extra_data"] = extra_data
        with translate_errors("submitting the prompt"):
            async with self.session.post(self._url("/prompt"), json=payload, timeout=self.timeout) as resp:
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

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of a prompt, or None while ComfyUI has none."""
        answer = await self._json("GET", f"/history/{prompt_id}", "reading the history")
        if not isinstance(answer, dict):
            return None
        entry = answer.get(prompt_id)
        return entry if isinstance(entry, dict) else None

    async def queue(self) -> dict[str, Any]:
        answer = await self._json("GET", "/queue", "reading the queue")
        return answer if isinstance(answer, dict) else {}

    async def system_stats(self) -> dict[str, Any]:
        answer = await self._json("GET", "/system_stats", "reading system stats")
        return answer if isinstance(answer, dict) else {}

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

    async def open_websocket(self, client_id: str, connect_timeout: float) -> aiohttp.ClientWebSocketResponse:
        """ComfyUI's websocket for one client id: it carries that client's prompts' messages.
        The caller closes it."""
        url = self._url("/ws") + f"?clientId={client_id}"
        with translate_errors("opening the websocket"):
            async with asyncio.timeout(connect_timeout):
                return await self.session.ws_connect(url, max_msg_size=0, autoping=True)


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
