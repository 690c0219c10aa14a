"""ComfyUI's JSON calls over connections kept open (`serverless/comfyui/keepalive.py`), against a
real HTTP server on loopback that answers as scripted: kept connections are reused, a connection
the server closed while idle is replaced without the caller noticing, an answer cut short or late
is ComfyUI being unavailable (never a hang, never a request sent twice), and every framing HTTP/1.1
allows is read whole."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from serverless.comfyui.client import ComfyUI, Timeouts
from serverless.comfyui.keepalive import KeepAlive
from serverless.errors import ComfyUIUnavailable

Reply = Callable[[bytes], bytes | None]  # a request's bytes -> what to write back (None: close at once)


@contextlib.asynccontextmanager
async def json_calls(url: str, request: float = 2.0) -> AsyncIterator[ComfyUI]:
    """A ComfyUI client for its JSON calls only (they use no aiohttp session), closed on exit."""
    comfy = ComfyUI(None, url, Timeouts(connect=2, request=request))  # type: ignore[arg-type]
    try:
        yield comfy
    finally:
        await comfy.calls.aclose()


def answer(body: bytes = b'{"ok": true}', status: str = "200 OK", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )


class Scripted:
    """A loopback HTTP/1.1 server: each request read whole (head + Content-Length body), answered
    by `reply`; counts connections and keeps every request it read."""

    def __init__(self, reply: Reply, close_after: bool = False) -> None:
        self.reply = reply
        self.close_after = close_after  # each connection closed after its first answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.close_idle = asyncio.Event()  # set: every open connection is closed without a word
        self._writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                out = self.reply(request)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def drop_idle(self) -> None:
        for writer in self._writers:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            yield f"http://127.0.0.1:{port}"
            self.drop_idle()  # its connections' tasks end before the server closes
            await asyncio.sleep(0.01)


async def test_requests_share_one_kept_connection_and_carry_the_base_urls_path_and_user() -> None:
    server = Scripted(lambda _: answer())
    async with server.running() as url:
        user_url = url.replace("http://", "http://user:p%40ss@") + "/comfy/"
        calls = KeepAlive(user_url, connect_timeout=5)
        try:
            answers = [await calls.request("POST", "/prompt", b'{"prompt": {}}') for _ in range(3)]
            got = await calls.request("GET", "/queue")
        finally:
            await calls.aclose()
    assert [a.status for a in answers] == [200, 200, 200] and answers[0].body == b'{"ok": true}'
    assert got.status == 200
    assert server.connections == 1  # kept alive
    first = server.requests[0]
    assert first.startswith(b"POST /comfy/prompt HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Basic dXNlcjpwQHNz\r\n" in first  # user:p@ss, as aiohttp sends it
    assert first.endswith(b'Content-Length: 14\r\n\r\n{"prompt": {}}')
    assert server.requests[3].startswith(b"GET /comfy/queue HTTP/1.1\r\n")
    assert b"Content-Length" not in server.requests[3]


async def test_a_connection_the_server_closed_while_idle_is_replaced_and_the_request_sent_once() -> None:
    server = Scripted(lambda _: answer())
    async with server.running() as url:
        calls = KeepAlive(url, connect_timeout=5)
        try:
            await calls.request("POST", "/prompt", b"{}")
            server.drop_idle()  # ComfyUI's keep-alive timeout passed
            await asyncio.sleep(0.05)
            again = await calls.request("POST", "/prompt", b"{}")
        finally:
            await calls.aclose()
    assert again.status == 200
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_a_server_that_closes_without_keep_alive_gets_a_new_connection_each_time() -> None:
    server = Scripted(lambda _: answer(extra="Connection: close\r\n"))
    async with server.running() as url:
        calls = KeepAlive(url, connect_timeout=5)
        try:
            statuses = [(await calls.request("GET", "/history/x")).status for _ in range(3)]
        finally:
            await calls.aclose()
    assert statuses == [200, 200, 200]
    assert server.connections == 3


@pytest.mark.parametrize(
    "raw",
    [
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n',
        b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"a": 1}',  # ends with the connection
    ],
    ids=["chunked", "until-close"],
)
async def test_every_framing_of_an_answer_is_read_whole(raw: bytes) -> None:
    server = Scripted(lambda _: raw, close_after=True)  # the HTTP/1.0 answer's end is the connection's
    async with server.running() as url:
        calls = KeepAlive(url, connect_timeout=5)
        try:
            got = await calls.request("GET", "/queue")
        finally:
            await calls.aclose()
    assert (got.status, got.body) == (200, b'{"a": 1}')


async def test_an_answer_cut_short_is_comfyui_unavailable_and_the_prompt_is_not_sent_again() -> None:
    def first_whole_then_cut(request: bytes) -> bytes:
        if b"POST /prompt" not in request:
            return answer()
        server.close_after = True
        return b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"node_err'

    server = Scripted(first_whole_then_cut)
    async with server.running() as url, json_calls(url) as comfy:
        await comfy.queue()  # the connection is kept, and reused for the prompt
        with pytest.raises(ComfyUIUnavailable, match="submitting the prompt"):
            await comfy.submit({"1": {}}, "client", "prompt-1", None)
    assert server.connections == 1
    assert [r.split(b" ")[:2] for r in server.requests] == [[b"GET", b"/queue"], [b"POST", b"/prompt"]]


async def test_a_late_answer_is_comfyui_unavailable_within_the_request_timeout() -> None:
    server = Scripted(lambda _: b"")  # reads, never answers
    async with server.running() as url, json_calls(url, request=0.3) as comfy:
        with pytest.raises(ComfyUIUnavailable, match="reading the queue"):
            await comfy.queue()


async def test_nobody_listening_is_comfyui_unavailable() -> None:
    async with json_calls("http://127.0.0.1:9") as comfy:
        with pytest.raises(ComfyUIUnavailable, match="could not be reached"):
            await comfy.history("x")


async def test_a_garbled_answer_is_comfyui_unavailable() -> None:
    server = Scripted(lambda _: b"SMTP ready\r\n\r\n")
    async with server.running() as url, json_calls(url) as comfy:
        with pytest.raises(ComfyUIUnavailable, match="could not be parsed"):
            await comfy.queue()


def test_only_http_urls_are_taken() -> None:
    with pytest.raises(ValueError, match="not an http"):
        KeepAlive("ftp://127.0.0.1:21", connect_timeout=1)
