"""`POST /prompt` on connections of our own (`comfyui.poster`), against a real loopback server
that answers as told: by length, chunked, closing, or with something that is not HTTP; an idle
connection the server closed is not used again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from serverless.comfyui.poster import Poster

Answer = Callable[[bytes], bytes]


class Server:
    """Reads each request whole (by its Content-Length) and writes what `answer` makes of its body."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.answered = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                writer.write(self.answer(body))
                await writer.drain()
                self.answered.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], asyncio.Future[tuple[Server, str]]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> tuple[Server, str]:
        state = Server(answer)
        server = await asyncio.start_server(state.serve, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return state, f"http://127.0.0.1:{port}/base/"

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


def by_length(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_prompts_go_on_one_kept_connection_and_the_answer_is_read_by_its_length(serve):
    state, url = await serve(by_length)
    poster = Poster(url, "/prompt", 5.0)
    assert await poster.post(b'{"a": 1}') == (200, b'{"a": 1}')
    assert await poster.post(b'{"b": 2}') == (200, b'{"b": 2}')
    assert state.connections == 1
    first = state.requests[0]
    assert first.startswith(b"POST /base/prompt HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n" in first
    await poster.aclose()


async def test_a_chunked_answer_is_read_whole(serve):
    def chunked(body: bytes) -> bytes:
        head = b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head + b'3;x=y\r\n{"e\r\n2\r\n":\r\n2\r\n1}\r\n0\r\n\r\n'

    state, url = await serve(chunked)
    poster = Poster(url, "/prompt", 5.0)
    assert await poster.post(b"{}") == (400, b'{"e":1}')
    assert await poster.post(b"{}") == (400, b'{"e":1}')
    assert state.connections == 1
    await poster.aclose()


async def test_an_answer_that_closes_the_connection_is_not_kept(serve):
    def closing(body: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"

    state, url = await serve(closing)
    poster = Poster(url, "/prompt", 5.0)
    assert await poster.post(b"{}") == (200, b"{}")
    assert await poster.post(b"{}") == (200, b"{}")
    assert state.connections == 2


async def test_an_idle_connection_the_server_closed_is_not_used_again(serve):
    state, url = await serve(by_length)
    poster = Poster(url, "/prompt", 5.0)
    assert await poster.post(b"1") == (200, b"1")
    state.writers[0].close()  # its keep-alive timeout
    await asyncio.sleep(0.05)
    assert await poster.post(b"2") == (200, b"2")
    assert state.connections == 2
    await poster.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBroken header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    ],
)
async def test_an_answer_that_is_not_http_is_a_connection_error(serve, answer):
    _, url = await serve(lambda body: answer)
    poster = Poster(url, "/prompt", 5.0)
    with pytest.raises(OSError):
        await poster.post(b"{}")


async def test_a_server_that_hangs_up_before_answering_is_a_connection_error(serve):
    state, url = await serve(lambda body: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    poster = Poster(url, "/prompt", 5.0)
    task = asyncio.create_task(poster.post(b"{}"))
    await state.answered.wait()  # half of its body
    state.writers[0].close()
    with pytest.raises(ConnectionResetError):
        await task


def test_only_a_plain_http_url_is_posted_to_this_way():
    assert Poster("http://127.0.0.1:8188", "/prompt", 5.0).usable
    assert not Poster("https://comfy.example", "/prompt", 5.0).usable
    assert not Poster("unix:///tmp/comfy.sock", "/prompt", 5.0).usable
