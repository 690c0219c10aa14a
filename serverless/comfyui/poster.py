"""`POST /prompt` to ComfyUI on connections of its own, kept alive (`Poster`).

Every job's prompt goes to ComfyUI this way: on a box it lies on the path from a client's request
to ComfyUI's first message, and aiohttp's client builds a request in a few hundred microseconds
on a loaded machine (its request and response objects, its connector's turns of the loop). Here
the request is written in the caller's first step, on a connection the last prompt left open:
one write, its answer read by its length. An `http://` ComfyUI only (the one beside us); the
client's other calls keep aiohttp.

The answer is HTTP/1.1 as ComfyUI's aiohttp server writes it (`Content-Length`, or chunked); a
connection is kept for the next prompt unless the answer says `Connection: close`. One that
ComfyUI closed while idle (its keep-alive timeout) is seen closed and not taken again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from urllib.parse import urlsplit

IDLE_KEPT = 8  # connections kept open for the next prompts
MAX_HEAD = 64 * 1024  # bytes of an answer's status line and headers
MAX_ANSWER = 64 * 1024 * 1024  # bytes of an answer's body (ComfyUI's `node_errors` of a big prompt)

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class BadAnswer(ConnectionError):
    """ComfyUI's answer is not HTTP as expected (an OSError: the caller's translation applies)."""


class Poster:
    """POSTs to one path of an `http://` server; `usable` is False for any other URL."""

    def __init__(self, base_url: str, path: str, connect_timeout: float) -> None:
        parts = urlsplit(base_url)
        self.usable = parts.scheme == "http" and parts.hostname is not None and not parts.query
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.connect_timeout = connect_timeout
        target = (parts.path.rstrip("/") + path).encode()
        self._head = b"POST " + target + b" HTTP/1.1\r\nHost: " + parts.netloc.encode() + b"\r\n"
        self._idle: list[Stream] = []

    async def post(self, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        """The status and body of the server's answer to `body`. OSError (or TimeoutError) when
        the server cannot be reached or answers something that is not HTTP; the caller bounds
        the whole call."""
        stream = self._take()
        if stream is None:
            async with asyncio.timeout(self.connect_timeout):
                stream = await asyncio.open_connection(self.host, self.port)
            sock = stream[1].get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the request is one write
        reader, writer = stream
        kept = False
        try:
            head = self._head + b"Content-Type: " + content_type.encode()
            writer.write(head + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            status, body, keep = await _answer(reader)
            kept = keep and self._give_back(stream)
            return status, body
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("ComfyUI closed the connection before it answered") from exc
        except asyncio.LimitOverrunError as exc:
            raise BadAnswer("ComfyUI's answer has a line too long") from exc
        finally:
            if not kept:
                writer.close()

    def _take(self) -> Stream | None:
        """An idle connection still open, else None (the closed ones are dropped)."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    def _give_back(self, stream: Stream) -> bool:
        if len(self._idle) >= IDLE_KEPT:
            return False
        self._idle.append(stream)
        return True

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """An HTTP/1.1 answer: its status, its body, and whether the connection may be used again."""
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise BadAnswer("ComfyUI's answer has headers too long")
    lines = head[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(rest) < 3 or not rest[:3].isdigit():
        raise BadAnswer(f"ComfyUI's answer does not start as HTTP: {lines[0][:80]!r}")
    status = int(rest[:3])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise BadAnswer(f"ComfyUI's answer has a header line without a colon: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    keep = version != b"HTTP/1.0" and headers.get(b"connection", b"").lower() != b"close"
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return status, await _chunked(reader), keep
    length = headers.get(b"content-length")
    if length is None:  # the body ends with the connection
        return status, await _to_the_end(reader), False
    if not length.isdigit() or int(length) > MAX_ANSWER:
        raise BadAnswer(f"ComfyUI's answer has a Content-Length of {length[:20]!r}")
    return status, await reader.readexactly(int(length)), keep


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadAnswer(f"ComfyUI's answer has a bad chunk size: {size_text[:20]!r}") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the end
                pass
            return bytes(body)
        if len(body) + size > MAX_ANSWER:
            raise BadAnswer("ComfyUI's answer is too big")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _to_the_end(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while chunk := await reader.read(64 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER:
            raise BadAnswer("ComfyUI's answer is too big")
    return bytes(body)
